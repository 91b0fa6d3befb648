"""Bad input on the command line: one line naming the flag or file and the fix, exit status 2,
nothing written; --debug shows the traceback. Arbitrary values of every generated flag parse or
fail that way, never with another exception."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jtrust.cli import build_parser, main
from jtrust.core.errors import InputError
from jtrust.core.options import from_flags
from jtrust.pipelines.evaluate import EvaluateOptions
from jtrust.pipelines.trace import SteerOptions, TraceOptions
from jtrust.runtime.generate import Sampling


def run(argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of `jtrust argv` in this process."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "questions.json"
    path.write_text(json.dumps([{"question": "What is 2 + 2?", "answer": "4"}]))
    return path


@pytest.mark.parametrize("flags, message", [
    (["--alpha", "0"], "--alpha: must be in (0, 1)"),  # was ZeroDivisionError in bounds.py
    (["--alpha", "1.5"], "--alpha: must be in (0, 1)"),  # was rc 0 and results full of NaN
    (["--n", "0"], "--n: must be at least 1"),  # was `n_samples`, after a greedy pass
    (["--temperature", "0"], "--temperature: must be > 0"),
    (["--top-p", "2"], "--top-p: must be in (0, 1]"),
])
def test_evaluate_options_fail_in_one_line_before_any_work(flags, message, prompts, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(["evaluate", "--model", str(tmp_path / "no_model_needed"), "--prompts", str(prompts),
                     "--out", str(out), *flags], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("jtrust evaluate: ") and message in err, err
    assert not out.exists()


def test_debug_shows_the_traceback(prompts, tmp_path):
    argv = ["evaluate", "--prompts", str(prompts), "--alpha", "0"]
    with pytest.raises(InputError, match="--alpha"):
        main(["--debug", *argv])
    with pytest.raises(InputError, match="--alpha"):
        main([*argv, "--debug"])


@pytest.mark.parametrize("flags, message", [
    (["trace", "--layers", "abc"], "argument --layers: 'abc' is not an integer"),  # was int() ValueError
    (["trace", "--steer-strengths", ","], "give at least one value"),
    (["extract", "--data", "x.csv", "--out", "o", "--layers", "1,b"], "'1,b' is not 'all' or comma-separated"),
    (["evaluate", "--prompts", "p.json", "--scorer", "bleu"], "invalid choice: 'bleu'"),
])
def test_unparseable_flags_name_the_flag(flags, message, capsys):
    code, err = run(flags, capsys)
    assert code == 2 and message in err, err


def test_trace_option_values_are_checked(capsys):
    code, err = run(["trace", "--limit", "0"], capsys)
    assert code == 2 and "jtrust trace: --limit: must be at least 1 row" in err
    code, err = run(["trace", "--steer", "--steer-depths", "1.5"], capsys)
    assert code == 2 and "--steer-depths: fractions of the model's depth" in err
    code, err = run(["trace", "--steer", "--steer-metrics", "honesty"], capsys)
    assert code == 2 and "--steer-metrics: unknown steering metrics ['honesty']" in err


def test_generate_checks_positions(tiny_checkpoints, capsys):
    """--max-new-tokens beyond the model's positions was accepted (10 GB, no output after 150 s)."""
    path = tiny_checkpoints["llama"][0]
    code, err = run(["generate", "--model", str(path), "--prompt", "Hello", "--max-new-tokens", "100000"],
                    capsys)
    assert code == 2 and "exceeds" in err and "positions; lower --max-new-tokens" in err, err
    code, err = run(["generate", "--model", str(path)], capsys)
    assert code == 2 and "give --prompt TEXT" in err


def test_relative_destination_and_cache(tiny_checkpoints, tmp_path, monkeypatch):
    """`jtrust convert path/to/hf_dir runs/my_model` (the README's command) printed ~40 lines of
    orbax tracebacks and 'Checkpoint path should be absolute'; so did a relative JTRUST_CACHE."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JTRUST_CACHE", "relative_cache")
    src = tiny_checkpoints["gpt2"][0]
    proc = subprocess.run([sys.executable, "-m", "jtrust.cli", "convert", str(src), "runs/my_model"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "ERROR" not in proc.stderr
    assert (tmp_path / "runs" / "my_model" / "jtrust_config.json").exists()
    proc = subprocess.run([sys.executable, "-m", "jtrust.cli", "info", "--model", str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and '"n_layers": 3' in proc.stdout, proc.stderr[-2000:]
    assert any((tmp_path / "relative_cache" / "converted").iterdir())  # cached under the cwd


# --------------------------------------------------------------------------- every option parser

OPTION_CLASSES = [(TraceOptions, "trace", ""), (SteerOptions, "trace", "steer-"),
                  (EvaluateOptions, "evaluate", ""), (Sampling, "generate", "")]
FLAGS = [(cmd, prefix, f) for cls, cmd, prefix in OPTION_CLASSES for f in dataclasses.fields(cls)
         if "help" in f.metadata]
REQUIRED = {"evaluate": ["--prompts", "p.json"], "trace": [], "generate": []}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(FLAGS), value=st.one_of(
    st.text(max_size=12), st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.lists(st.one_of(st.integers(-5, 40), st.floats(-2, 2)), max_size=4).map(lambda v: ",".join(map(str, v)))))
def test_any_flag_value_parses_or_is_refused_cleanly(which, value):
    command, prefix, field = which
    flag = "--" + prefix + (field.metadata.get("flag") or field.name).replace("_", "-")
    parser = build_parser()
    argv = [command, *REQUIRED[command]]
    argv += [flag] if field.type in ("bool", bool) else [f"{flag}={value}"]
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's one-line usage error
        assert e.code == 2
        return
    for cls, cmd, pre in OPTION_CLASSES:
        if cmd == command:
            try:
                from_flags(cls, args, prefix=pre.replace("-", "_"))
            except InputError as e:
                assert str(e).startswith("--"), e  # names the flag


@pytest.mark.parametrize("command", ["trace", "extract", "generate"])
@pytest.mark.parametrize("mesh, message", [
    ("data=2,tensor=2", "write axis=size pairs over data, fsdp, model"),
    ("data=0", "write axis=size pairs"),
    ("data=64", "needs 64 devices; there are 1"),
])
def test_bad_mesh_fails_in_one_line_before_loading(command, mesh, message, tmp_path, capsys):
    extra = {"extract": ["--data", "toxicity", "--out", str(tmp_path / "out")], "generate": ["--prompt", "hi"],
             "trace": ["--out", str(tmp_path / "out")]}[command]
    code, err = run([command, "--model", str(tmp_path / "no_model_needed"), "--mesh", mesh, *extra], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"jtrust {command}: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_plan_bad_device_sizes_fail_in_one_line(capsys):
    code, err = run(["plan", "--model", "llama-2-7b", "--device-gib", "16,lots"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("jtrust plan: --device-gib '16,lots': give comma-separated")
