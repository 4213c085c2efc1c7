"""The commands README.md and the shipped agent's card give parse as written, name public data (no path into a
checkout's neighbours), and their prompt specs are valid; the install lines are the true ones."""

import os
import re
import shlex

import pytest

from mara_hf.cli import build_parser
from mara_hf.prompts import parse_prompt_spec

ROOT = os.path.join(os.path.dirname(__file__), "..")
DOCS = ["README.md", "model_cards/smollm2-135m-refusal.md"]


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
    assert found, path
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
    assert "`pip install torch` first if you want a CPU-only torch" not in readme


def test_help_examples_are_valid_specs():
    from mara_hf.cli import PROMPTS_EPILOG

    specs = [line.split()[0] for line in PROMPTS_EPILOG.splitlines() if line.startswith("  ") and line[2] != " "]
    assert len(specs) == 8
    for spec in specs:
        if not spec.startswith(("org/", "prompts.jsonl")):
            parse_prompt_spec(spec)
