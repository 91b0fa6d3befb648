"""jtrust.core.options: flags generated from dataclass fields, defaults only in the dataclass."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from jtrust.core.options import add_flags, from_flags, option
from jtrust.pipelines.evaluate import EvaluateOptions
from jtrust.pipelines.trace import SteerOptions, TraceOptions


@dataclasses.dataclass(frozen=True)
class Example:
    layers: tuple[int, ...] | None = option(None, "blocks")
    strengths: tuple[float, ...] = option((1.0, 2.0), "strengths")
    name: str | None = option(None, "a name")
    count: int = option(3, "a count", flag="n")
    verbose: bool = option(False, "talk")
    mode: str = option("a", "mode", choices=("a", "b"))


def parse(cls, argv, prefix=""):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_flags(parser, cls, prefix=prefix)
    return from_flags(cls, parser.parse_args(argv), prefix=prefix.replace("-", "_"))


@pytest.mark.parametrize("cls", [Example, TraceOptions, SteerOptions, EvaluateOptions])
def test_no_flags_give_the_dataclass_defaults(cls):
    assert parse(cls, []) == cls()
    assert parse(cls, [], prefix="steer-") == cls()


def test_values_are_parsed_by_field_type():
    got = parse(Example, ["--layers", "0,5, 10", "--strengths", "0.5", "--name", "x", "--n", "7",
                          "--verbose", "--mode", "b"])
    assert got == Example(layers=(0, 5, 10), strengths=(0.5,), name="x", count=7, verbose=True, mode="b")
    assert parse(Example, ["--layers", "all", "--name", "all"]) == Example(name="all")  # "all" only for ints
    assert parse(SteerOptions, ["--steer-prompts", "8", "--steer-from", "step10"], prefix="steer-") == \
        SteerOptions(n_prompts=8, source="step10")


@pytest.mark.parametrize("argv, message", [(["--layers", "abc"], "argument --layers: 'abc' is not an integer"),
                                           (["--n", "1.5"], "argument --n: '1.5' is not an integer"),
                                           (["--strengths", ","], "argument --strengths: give at least one value")])
def test_bad_values_name_the_flag(argv, message, capsys):
    parser = argparse.ArgumentParser(prog="jtrust")
    add_flags(parser, Example)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_steering_layers_default_to_fractions_of_depth():
    assert SteerOptions().layers_of(30) == (8, 15, 22)  # SmolLM2's 30 blocks: the previous default
    assert SteerOptions().layers_of(12) == (3, 6, 9)
    assert SteerOptions(layers=(1, 2)).layers_of(30) == (1, 2)
