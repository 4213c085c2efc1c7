"""Command-line flags built from a settings dataclass: one `--field-name` per field, documented by the field's
`metadata["help"]` (the TRL / PEFT convention) followed by its default.

    @dataclass
    class Settings:
        episodes: int = field(default=100, metadata={"help": "responses to generate, in episodes"})

    add_config_arguments(parser, Settings)   # --episodes EPISODES  responses to generate, in episodes (default: 100)

A field without help is an error (`MissingHelpError`), raised before any flag is added: every flag says what it does.
"""

import argparse
import dataclasses
import json
import typing

from transformers.utils import logging

logger = logging.get_logger(__name__)


class MissingHelpError(TypeError):
    """A field of a settings dataclass has no `metadata={"help": ...}`: its flag would say nothing but its default."""


def add_config_arguments(parser: argparse.ArgumentParser, config_class, title: str | None = None,
                         description: str | None = None):
    """Add one `--field-name` per field of the dataclass `config_class` to `parser` (in an argument group `title`,
    if given), typed from the field's default (list fields from their annotation: `nargs="+"`; bool fields:
    `--name/--no-name`; optional fields also take "none"). Its help is the field's `metadata["help"]` and its
    default; `metadata["metavar"]`, if given, names its value (e.g. "{veto,chain}").

    Flags left out are absent from the parsed namespace (`argparse.SUPPRESS`), so that a caller can tell them
    apart from values given (a preset's values sit between the two). Raises `MissingHelpError` when a field has no
    help, and `TypeError` when one has no default."""
    fields = dataclasses.fields(config_class)
    missing = [f.name for f in fields if not str(f.metadata.get("help") or "").strip()]
    if missing:
        raise MissingHelpError(f"{config_class.__name__}: no metadata={{'help': ...}} on field(s) "
                               f"{', '.join(missing)}; every field is a command-line flag and needs a help text.")
    group = parser.add_argument_group(title, description) if title else parser
    for f in fields:
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"{config_class.__name__}.{f.name} has no default: a flag needs one.")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        optional = type(None) in typing.get_args(f.type)
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=field_help(f, default, optional))
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        if isinstance(default, bool):
            kwargs.pop("metavar", None)
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(default, list):
            item = (typing.get_args(f.type) or (str,))[0]
            group.add_argument(flag, type=item, nargs="+", **kwargs)
        else:
            kind = type(default) if default is not None else next(
                (t for t in typing.get_args(f.type) if t is not type(None)), str)
            group.add_argument(flag, type=_or_none(kind) if optional else kind, **kwargs)
    return group


class Renamed(argparse.Action):
    """A flag's earlier name, kept for one release: it sets the new flag's value and logs what to write instead."""

    def __init__(self, option_strings, dest, new: str, why: str, **kwargs):
        self.new, self.why = new, why
        kwargs.setdefault("help", f"deprecated name of {new}; goes in the next release")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        logger.warning(f"{option_string} is deprecated here: use {self.new} ({self.why}); {option_string} goes in "
                       "the next release.")
        setattr(namespace, self.dest, values)


def field_help(f: dataclasses.Field, default, optional: bool = False) -> str:
    """The field's help text, then its default as given on the command line (escaped for argparse's % format)."""
    text = " ".join(str(f.metadata["help"]).split()).rstrip(".")
    if isinstance(default, bool):
        shown = "on" if default else "off"
    elif isinstance(default, list):
        shown = " ".join(json.dumps(v, ensure_ascii=False) if isinstance(v, str) else str(v) for v in default)
        shown = shown or "empty"
    else:
        shown = str(default)
    if optional and default is not None:
        shown += "; none for None"
    return f"{text} (default: {shown})".replace("%", "%%")


def _or_none(kind):
    """`kind`, or None for the text "none" (any case): how an optional setting is unset on the command line."""
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse
