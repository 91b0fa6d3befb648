"""Options as frozen dataclasses, and the command-line flags generated from them.

A field's default and help live in the dataclass only:

    @dataclasses.dataclass(frozen=True)
    class TraceOptions:
        seed: int = option(0, "seed of the shuffled split and the MI subset")

`add_flags(parser, TraceOptions)` adds `--seed` (type, default and help from the field) and
`from_flags(TraceOptions, args)` builds the dataclass back from the parsed namespace; a value its
`__post_init__` refuses with `check(...)` is reported under the flag's name. Types:
int, float, str, bool (--x / --no-x), tuples of int/float/str (comma-separated), and any of
these `| None` (an empty value or "none" gives None; for tuples of ints also "all").
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Sequence

from jtrust.core.errors import InputError


class OptionError(InputError):
    """A bad option value; `field` is the dataclass field, so the CLI can name the flag."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.detail = field, message


def check(condition: bool, field: str, message: str) -> None:
    """Raise OptionError(field, message) unless `condition` (for __post_init__ validation)."""
    if not condition:
        raise OptionError(field, message)


def option(default: Any, help: str, *, flag: str | None = None, choices: Sequence | None = None) -> Any:
    """A dataclass field with its command-line help (and an optional flag name and choices)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


def _flag(field: dataclasses.Field, prefix: str) -> str:
    return "--" + prefix + (field.metadata.get("flag") or field.name).replace("_", "-")


def _dest(field: dataclasses.Field, prefix: str) -> str:
    return (prefix + field.name).replace("-", "_")


def _unwrap_optional(tp) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _parser(tp, optional: bool):
    """A function str -> value for argparse's `type`, raising ArgumentTypeError with the flag."""
    element = None
    if typing.get_origin(tp) is tuple:
        element = typing.get_args(tp)[0]
    base = element or tp

    def one(text: str):
        try:
            return base(text)
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(base, base.__name__)
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None

    def parse(text: str):
        if optional and text.strip().lower() in (("", "none", "all") if element is int else ("", "none")):
            return None
        if element is None:
            return one(text.strip())
        items = tuple(one(x.strip()) for x in text.split(",") if x.strip())
        if not items:
            raise argparse.ArgumentTypeError("give at least one value, comma-separated")
        return items
    return parse


def add_flags(parser: argparse.ArgumentParser, cls, prefix: str = "", skip: Sequence[str] = ()) -> None:
    """One flag per field of the dataclass `cls` (flags named --<prefix><field-name>)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip or "help" not in field.metadata:
            continue
        flag, dest = _flag(field, prefix), _dest(field, prefix)
        tp, optional = _unwrap_optional(hints[field.name])
        default = field.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f"{field.metadata['help']} (default: {shown})"
        if tp is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                                help=field.metadata["help"])
            continue
        parser.add_argument(flag, dest=dest, type=_parser(tp, optional), default=default,
                            choices=field.metadata.get("choices"), help=help_text,
                            metavar=None if field.metadata.get("choices") else field.name.upper())


def from_flags(cls, args: argparse.Namespace, prefix: str = "", **overrides):
    """The dataclass `cls` from parsed flags (fields without a flag keep their defaults)."""
    values = {f.name: getattr(args, _dest(f, prefix)) for f in dataclasses.fields(cls)
              if hasattr(args, _dest(f, prefix))}
    try:
        return cls(**{**values, **overrides})
    except OptionError as e:  # name the flag the user typed, not the field
        field = next((f for f in dataclasses.fields(cls) if f.name == e.field), None)
        flag = _flag(field, prefix.replace("_", "-")) if field is not None else e.field
        raise InputError(f"{flag}: {e.detail}") from None


def from_config(cls, values: dict):
    """An options dataclass from a JSON config's "options" object (JSON lists become tuples);
    unknown keys are an InputError naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(f"unknown options {unknown} in the config; known: {sorted(names)}")
    for f in dataclasses.fields(cls):  # the CLI checks choices in argparse; a config, here
        choices = f.metadata.get("choices")
        if f.name in values and choices is not None and values[f.name] not in choices:
            raise InputError(f"option {f.name!r} in the config: {values[f.name]!r} is not one of {list(choices)}")
    return cls(**{k: tuple(v) if isinstance(v, list) and "tuple" in str(hints[k]) else v for k, v in values.items()})
