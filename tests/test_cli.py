"""Help on every flag: every option of every `mara-hf` command says what it does (more than its default), every
command has a one-line description in `mara-hf --help` and atop its own --help, and the settings flags of train and
imitate take their help from their config dataclasses' field metadata (a field without help is refused)."""

import argparse
import dataclasses
import re

import pytest

from mara_hf.cli.app import build_parser, main
from mara_hf.cli.options import MissingHelpError, Renamed, add_config_arguments
from mara_hf.training.imitation_config import ImitationConfig
from mara_hf.training.sac_config import MaraTrainingConfig

DEFAULT_ONLY = re.compile(r"^\s*\(?default: [^)]*\)?\s*$")


def _commands(parser=None):
    parser = parser or build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _options(parser):
    return [a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)]


def _words_beyond_default(text: str) -> list[str]:
    """The help's words once every "(default: ...)" / "default: ..." part is taken out."""
    text = re.sub(r"\(default:? [^)]*\)", " ", text)
    text = re.sub(r"default:? \S+", " ", text)
    return re.findall(r"[A-Za-z]{2,}", text)


def _parsers():
    parser = build_parser()
    return [("mara-hf", parser)] + [(f"mara-hf {name}", p) for name, p in _commands(parser).choices.items()]


@pytest.mark.parametrize("name, parser", _parsers(), ids=[name for name, _ in _parsers()])
def test_every_option_has_a_help_that_says_more_than_its_default(name, parser):
    parser.format_help()  # the help renders (a stray % in a help text would raise here)
    for action in _options(parser):
        flag = "/".join(action.option_strings) or action.dest
        text = action.help
        assert text and text is not argparse.SUPPRESS and text.strip(), f"{name} {flag}: no help"
        assert not DEFAULT_ONLY.match(text), f"{name} {flag}: help is only its default: {text!r}"
        assert len(_words_beyond_default(text)) >= 3, f"{name} {flag}: help says too little: {text!r}"


def test_every_command_has_a_one_line_description(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    top = capsys.readouterr().out
    commands = _commands()
    listed = {a.dest: a.help for a in commands._choices_actions}
    assert list(listed) == list(commands.choices) == ["convert", "train", "imitate", "eval", "demo", "bench"]
    for name, parser in commands.choices.items():
        description = listed[name]
        assert description and len(_words_beyond_default(description)) >= 4, name
        assert "\n" not in description, name
        # listed in `mara-hf --help`, next to the command's name (argparse may wrap it onto a second line)
        line = next(line for line in top.splitlines() if line.split()[:1] == [name])
        assert description.split()[0] in line, name
        assert " ".join(description.split()[:4]) in " ".join(top.split()), name
        # and at the top of its own --help, right after the usage
        assert parser.description == description, name
        own = " ".join(parser.format_help().split())  # whitespace as wrapped at the terminal's width
        assert own.index(description) < own.index("options:"), name


@pytest.mark.parametrize("command, config_class", [("train", MaraTrainingConfig), ("imitate", ImitationConfig)])
def test_settings_flags_carry_the_config_fields_help_and_default(command, config_class):
    parser = _commands().choices[command]
    by_dest = {a.dest: a for a in parser._actions if not isinstance(a, Renamed)}  # not the deprecated names
    for field in dataclasses.fields(config_class):
        help_text = field.metadata.get("help")
        assert help_text and len(help_text.split()) >= 3, f"{config_class.__name__}.{field.name}: no help metadata"
        action = by_dest[field.name]
        assert action.option_strings[0] == "--" + field.name.replace("_", "-")
        shown = action.help.replace("%%", "%")
        assert shown.startswith(" ".join(help_text.split()).rstrip(".")), field.name
        assert re.search(r"\(default: [^)]+\)$", shown), (field.name, shown)
        assert action.default is argparse.SUPPRESS  # flags left out stay out of the namespace (presets)
    train_help = parser.format_help()
    assert "{veto,chain}" in train_help if command == "train" else "{auto,float32,float16,bfloat16}" in train_help


def test_preset_and_choice_flags_list_their_values():
    commands = _commands().choices
    train = commands["train"].format_help()
    assert "--preset {paper}" in train and "--mdp {veto,chain}" in train and "--backend {local,ray}" in train
    assert "--dtype {auto,float32,float16,bfloat16}" in train
    assert "--mdp {veto,chain}" in commands["bench"].format_help()
    assert "--harmful {true,false}" in commands["eval"].format_help()


# ----- the builder, on dataclasses of this test's own ----------------------------------------------------------------
@dataclasses.dataclass
class _Documented:
    steps: int = dataclasses.field(default=3, metadata={"help": "updates to run, in steps; 100% of them count."})
    rate: float | None = dataclasses.field(default=0.5, metadata={"help": "share of something, in (0, 1)."})
    names: list[str] = dataclasses.field(default_factory=lambda: ["a b", "c"], metadata={"help": "some texts."})
    fast: bool = dataclasses.field(default=False, metadata={"help": "go fast."})
    mode: str = dataclasses.field(default="x", metadata={"help": "the mode.", "metavar": "{x,y}"})


@dataclasses.dataclass
class _Undocumented:
    steps: int = dataclasses.field(default=3, metadata={"help": "updates to run, in steps"})
    rate: float = 0.5  # no help: its flag would say only "(default: 0.5)"
    blank: str = dataclasses.field(default="", metadata={"help": "  "})


def test_builder_refuses_a_field_without_help_and_adds_nothing():
    parser = argparse.ArgumentParser()
    before = len(parser._actions)
    with pytest.raises(MissingHelpError, match=r"_Undocumented.*rate, blank"):
        add_config_arguments(parser, _Undocumented)
    assert len(parser._actions) == before
    assert issubclass(MissingHelpError, TypeError)


def test_builder_types_flags_and_writes_help_with_the_default():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, _Documented, "settings", "what they are")
    by_dest = {a.dest: a for a in parser._actions if not isinstance(a, Renamed)}  # not the deprecated names
    assert by_dest["steps"].help == "updates to run, in steps; 100%% of them count (default: 3)"
    assert by_dest["rate"].help == "share of something, in (0, 1) (default: 0.5; none for None)"
    assert by_dest["names"].help == 'some texts (default: "a b" "c")'
    assert by_dest["fast"].help == "go fast (default: off)"
    assert by_dest["mode"].metavar == "{x,y}"
    text = " ".join(parser.format_help().split())
    assert "100% of them count (default: 3)" in text and "settings:" in text and "what they are" in text
    assert vars(parser.parse_args([])) == {}  # flags left out stay out
    args = parser.parse_args(["--steps", "4", "--rate", "none", "--names", "p", "q", "--fast", "--mode", "y"])
    assert vars(args) == {"steps": 4, "rate": None, "names": ["p", "q"], "fast": True, "mode": "y"}
    assert parser.parse_args(["--no-fast", "--rate", "0.25"]).rate == 0.25
    with pytest.raises(SystemExit):
        parser.parse_args(["--steps", "many"])


@pytest.mark.parametrize("path", ["./no-such-model", "/no/such/model", "runs/a/b"])
def test_a_missing_model_folder_is_one_clear_line(path):
    from mara_hf.models import load_model

    with pytest.raises(OSError, match="No model folder at"):
        load_model(path)


@pytest.mark.parametrize("argv", [["--verbose", "bench"], ["bench", "--verbose"]])
def test_verbose_goes_before_or_after_the_command(argv):
    from mara_hf.cli.app import build_parser

    assert build_parser().parse_args(argv).verbose is True
    assert build_parser().parse_args(["bench"]).verbose is False


# ----- one meaning per flag name --------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, config_class, new", [("train", MaraTrainingConfig, "learner_batch_size"),
                                                        ("imitate", ImitationConfig, "fit_batch_size")])
def test_batch_size_means_prompts_per_batch_and_the_old_training_names_still_work(command, config_class, new,
                                                                                 caplog):
    commands = _commands().choices
    for name in ("eval", "bench"):  # where --batch-size is the number of prompts generated together
        (action,) = [a for a in commands[name]._actions if "--batch-size" in a.option_strings]
        assert "prompt" in action.help
    # train / imitate: the learner's and the fit's batch have their own names; --batch-size sets them, with a warning
    parser = commands[command]
    flag = "--" + new.replace("_", "-")
    assert flag in parser.format_help() and "deprecated name of " + flag in parser.format_help()
    with caplog.at_level("WARNING"):
        args = parser.parse_args(_required(command) + ["--batch-size", "64"])
    assert getattr(args, new) == 64 and any(f"use {flag}" in r.getMessage() for r in caplog.records)
    assert getattr(parser.parse_args(_required(command) + [flag, "32"]), new) == 32
    # in Python: the 0.1 keyword and attribute, with a FutureWarning; the new name, and replace(), without one
    with pytest.warns(FutureWarning, match=new):
        config = config_class(batch_size=64)
    assert getattr(config, new) == 64
    with pytest.warns(FutureWarning, match=new):
        assert config.batch_size == 64
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert getattr(dataclasses.replace(config, **{new: 8}), new) == 8
        assert getattr(config_class(**{new: 16}), new) == 16
        assert new in config.to_dict() and "batch_size" not in config.to_dict()


def _required(command: str) -> list[str]:
    return {"train": ["--model", "m", "--prompts", "p", "--reward", "refusal", "--output", "o"],
            "imitate": ["--model", "m", "--prompts", "p", "--output", "o"]}[command]
