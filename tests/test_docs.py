"""The commands README.md, the docs/ pages and the shipped agent's card give parse as written, name public data (no
path into a checkout's neighbours), and their prompt specs are valid; the install lines are the true ones; every
relative link in README.md and docs/ leads to a file (and heading) that exists."""

import glob
import os
import re
import shlex

import pytest

from mara_hf.cli.app import build_parser
from mara_hf.data.prompts import parse_prompt_spec

ROOT = os.path.join(os.path.dirname(__file__), "..")
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
DOCS = PAGES + ["model_cards/smollm2-135m-refusal.md"]
# pages that must show at least one command (the docs pages show commands where they have them)
WITH_COMMANDS = ["README.md", "model_cards/smollm2-135m-refusal.md"]


def commands(path):
    """Every `mara-hf ...` command in the file's bash blocks, continuation lines joined, comments dropped."""
    text = open(os.path.join(ROOT, path)).read()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if "mara-hf " in line and not line.startswith("pip"):
                line = line[line.index("mara-hf "):].split(" && ")[0]
                yield shlex.split(line)[1:]


@pytest.mark.parametrize("path", DOCS)
def test_documented_commands_parse(path):
    parser = build_parser()
    found = list(commands(path))
    assert found or path not in WITH_COMMANDS, path
    for argv in found:
        argv = [a for a in argv if a not in ("[--push-to-hub", "me/mara-agent-llama-3.2-1b]")]
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{path}: does not parse: mara-hf {' '.join(argv)}")
        for spec in getattr(args, "prompts", None) or []:
            assert "shared" not in spec, spec
            parse_prompt_spec(spec, split=args.split)  # a valid spec; a file path would have to exist


@pytest.mark.parametrize("path", DOCS + ["examples/mara_hf_colab.ipynb"])
def test_no_paths_into_the_development_machine(path):
    text = open(os.path.join(ROOT, path)).read()
    assert "shared/data" not in text and "YOUR-ORG" not in text


def test_install_lines():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in readme


def test_readme_names_the_test_command_ci_runs():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "python -m pytest tests -q" in ci and "python -m pytest tests -q" in readme
    assert "bash .ci/run" in readme


def test_docs_pages_exist():
    assert "docs/README.md" in PAGES and len(PAGES) > 2, PAGES


def _outside_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans, where Markdown links live."""
    return re.sub(r"`[^`\n]*`", "", _outside_code_blocks(text))


def _anchors(path: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file: lowercased, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _outside_code_blocks(open(path).read()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


@pytest.mark.parametrize("path", PAGES)
def test_relative_links_point_at_files_that_exist(path):
    folder = os.path.dirname(os.path.join(ROOT, path))
    links = re.findall(r"\]\(([^)\s]+)\)", _prose(open(os.path.join(ROOT, path)).read()))
    for link in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # https:, mailto:, ...
            continue
        target, _, anchor = link.partition("#")
        full = os.path.normpath(os.path.join(folder, target)) if target else os.path.join(ROOT, path)
        assert os.path.exists(full), f"{path}: the link {link!r} leads to {os.path.relpath(full, ROOT)}: no such file"
        if anchor and full.endswith(".md"):
            assert anchor in _anchors(full), f"{path}: the link {link!r}: no heading with that anchor"


def test_help_examples_are_valid_specs():
    from mara_hf.cli.app import PROMPTS_EPILOG

    specs = [line.split()[0] for line in PROMPTS_EPILOG.splitlines() if line.startswith("  ") and line[2] != " "]
    assert len(specs) == 8
    for spec in specs:
        if not spec.startswith(("org/", "prompts.jsonl")):
            parse_prompt_spec(spec)


def _execute(block: str, where: str) -> dict:
    """Run a documented code block as written; the processor it builds (`mara`) is detached afterwards."""
    namespace = {}
    try:
        exec(compile(block, where, "exec"), namespace)
    finally:
        if "mara" in namespace:
            namespace["mara"].remove()
    return namespace


@pytest.mark.slow  # loads SmolLM2
def test_the_readme_quick_start_runs_as_pasted_and_prints_an_answer(capsys):
    """README's first Python block, executed as written: it prints the answer (the shipped agent refuses this
    harmful request, as its card says it does for this prompt) and the statistics."""
    from mara_hf.rewards.refusal import is_refusal

    readme = open(os.path.join(ROOT, "README.md")).read()
    _execute(re.findall(r"```python\n(.*?)```", readme, re.S)[0], "README.md")
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) >= 2 and printed[-1].startswith("MaraStats(")
    answer = "\n".join(printed[:-1])
    assert answer.strip() and is_refusal(answer), answer


@pytest.mark.slow  # loads SmolLM2
def test_the_decision_view_example_prints_what_the_page_shows(capsys, monkeypatch):
    """docs/space.md's Python block, executed as written, prints the view its text block shows (P(accept) compared
    to the printed two decimals' neighbourhood only: float kernels differ a little between CPUs)."""
    page = open(os.path.join(ROOT, "docs", "space.md")).read()
    block = re.findall(r"```python\n(.*?)```", page, re.S)[0]
    shown = re.findall(r"```text\n(.*?)```", page, re.S)[0].strip()
    monkeypatch.setenv("NO_COLOR", "1")
    _execute(block, "docs/space.md")
    printed = capsys.readouterr().out.strip()
    numbers = r"\d\.\d\d"
    assert re.sub(numbers, "#", printed) == re.sub(numbers, "#", shown)
    for got, documented in zip(re.findall(numbers, printed), re.findall(numbers, shown)):
        assert abs(float(got) - float(documented)) <= 0.02


def test_every_command_help_starts_with_what_it_does_and_ends_with_an_example_that_parses():
    from mara_hf.cli.arguments import DESCRIPTIONS, EXAMPLES

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(commands) == set(DESCRIPTIONS) == set(EXAMPLES)
    for name, sub in commands.items():
        text = sub.format_help().strip()
        assert DESCRIPTIONS[name] in text.split("\n\n")[1], name  # the line after usage
        assert text.endswith(EXAMPLES[name]), name
        parser.parse_args(shlex.split(EXAMPLES[name])[1:])  # the example parses as written


# ----- the pages and --help agree ------------------------------------------------------------------------------------
# Each command's flags are documented on its pages; the prompt-set, reward and --verbose flags that several commands
# share are documented once, on the pages every command shares.
SHARED_PAGES = ["docs/README.md", "docs/prompts-and-rewards.md", "docs/hardware.md"]
COMMAND_PAGES = {"train": ["docs/training.md", "docs/ray.md"], "imitate": ["docs/imitation.md", "docs/ray.md"],
                 "eval": ["docs/evaluation.md"], "demo": ["docs/evaluation.md"], "bench": ["docs/benchmarks.md"],
                 "convert": ["docs/authors-agents.md"]}


def _subcommands():
    import argparse

    from mara_hf.cli.options import Renamed

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: [a for a in p._actions if not isinstance(a, Renamed) and a.option_strings != ["-h", "--help"]]
            for name, p in sub.choices.items()}


def _default_of(action):
    """The default a flag's --help states: `(default: X)` at the end of its help, else argparse's default."""
    import argparse

    text = (action.help or "") % {**vars(action), "prog": "mara-hf"}  # argparse's %(default)s, filled in
    found = re.search(r"\(default:? ([^);]+)", text)
    if found:
        return found.group(1).strip()
    return None if action.default is argparse.SUPPRESS else action.default


def _prose(text: str) -> str:
    """A page without its fenced blocks (commands in them are parsed by test_documented_commands_parse)."""
    return re.sub(r"```.*?```", "", text, flags=re.S)


def test_every_flag_of_a_command_is_on_its_pages():
    assert set(COMMAND_PAGES) == set(_subcommands())
    for command, actions in _subcommands().items():
        text = "".join(open(os.path.join(ROOT, p)).read() for p in COMMAND_PAGES[command] + SHARED_PAGES)
        flags = {o for a in actions for o in a.option_strings if o.startswith("--")}
        missing = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", text))
        assert not missing, f"mara-hf {command}: {missing} not on {COMMAND_PAGES[command]}"


def test_every_flag_a_page_names_exists():
    known = {o for actions in _subcommands().values() for a in actions for o in a.option_strings}
    known |= {a for action in build_parser()._actions for a in action.option_strings}
    for page in PAGES:
        named = set(re.findall(r"`(--[a-z][a-z0-9-]*)", _prose(open(os.path.join(ROOT, page)).read())))
        unknown = sorted(f for f in named if f not in known)
        assert not unknown, f"{page} names flags no command has: {unknown}"


def _as_number(text):
    try:
        return float(str(text).replace(",", ""))
    except ValueError:
        return None


def _same(value: str, default: str) -> bool:
    """A quoted default against the code's: numbers by value (1,000 = 1000 = 1e3), lists and words as written."""
    if _as_number(value) is not None and _as_number(default) is not None:
        return _as_number(value) == _as_number(default)
    return value.replace(",", "") == default.replace(",", "")


def test_defaults_the_pages_quote_are_the_code_s():
    """`--flag` (N) and `--flag` (default N) quote a default; so does every `--flag value` in training.md's section
    on the default recipe."""
    defaults = {}
    for actions in _subcommands().values():
        for a in actions:
            for o in a.option_strings:
                defaults.setdefault(o, set()).add(str(_default_of(a)))
    checked = 0
    for page in PAGES:
        text = _prose(open(os.path.join(ROOT, page)).read())
        quoted = [(f, v.strip(" ,.")) for f, v in
                  re.findall(r"`(--[a-z][a-z0-9-]*)`\s*\((?:default:? )?(\d[\d,. ]*)", text)]
        if page == "docs/training.md":  # each bullet of the default recipe quotes its flags' defaults
            recipe = text[text.index("## The default recipe"):text.index("### Why these defaults")]
            for group in re.findall(r"\*\*[^*]+\*\*\s*\(([^)]*)\)", recipe):
                tokens = " ".join(re.findall(r"`([^`]+)`", group)).split()
                for i, token in enumerate(tokens):
                    if not token.startswith("--"):
                        continue
                    if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                        quoted.append((token, tokens[i + 1]))
                    else:  # an on/off flag: --x on, --no-x off
                        on = defaults.get(token.replace("--no-", "--", 1), set())
                        assert on == {"off" if token.startswith("--no-") else "on"}, (page, token, on)
                        checked += 1
        for flag, value in quoted:
            assert flag in defaults, (page, flag)
            assert any(_same(value, d) for d in defaults[flag]), (page, flag, value, defaults[flag])
            checked += 1
    assert checked >= 10


# ----- the examples in the public classes' docstrings run as written ------------------------------------------------
def _docstring_example(cls) -> tuple[str, list[str]]:
    """The first Python block of `cls`'s docstring and what its `print(...)  # output` lines say they print."""
    import textwrap

    block = textwrap.dedent(re.findall(r"```python\n(.*?)```", cls.__doc__, re.S)[0])
    said = [line.split("  # ", 1)[1] for line in block.splitlines() if line.startswith("print(") and "  # " in line]
    return block, said


def _run_example(cls, tmp_path, monkeypatch, capsys):
    block, said = _docstring_example(cls)
    monkeypatch.chdir(tmp_path)
    namespace = _execute(block, f"{cls.__name__} docstring")
    assert capsys.readouterr().out.splitlines() == said
    return namespace


@pytest.mark.parametrize("name", ["MaraTrainingConfig", "ImitationConfig"])
def test_config_docstring_examples_print_what_they_say(name, tmp_path, monkeypatch, capsys):
    import mara_hf

    _run_example(getattr(mara_hf, name), tmp_path, monkeypatch, capsys)


@pytest.mark.slow  # trains on SmolLM2 (under a minute each)
@pytest.mark.parametrize("name", ["MaraTrainer", "ImitationTrainer"])
def test_trainer_docstring_examples_train_an_agent(name, tmp_path, monkeypatch, capsys):
    import mara_hf

    namespace = _run_example(getattr(mara_hf, name), tmp_path, monkeypatch, capsys)
    agent = namespace["agent"]
    assert isinstance(agent, mara_hf.MaraAgent) and agent.config.state_dim == namespace["model"].config.hidden_size
    output = next(tmp_path.glob("runs/*/agent/config.json")).parent
    assert mara_hf.MaraAgent.from_pretrained(str(output)).config.training  # saved, with its provenance
