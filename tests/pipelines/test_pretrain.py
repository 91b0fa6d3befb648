"""Pre-training from scratch and tracing the series: the two-phase rule on closed-form
trajectories, the BPE tokenizer, and experiments/pretrain.py end to end (small by default, the
real config with -m slow)."""

from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
import pytest

import jtrust
from jtrust import training as T
from jtrust.data import corpus_paragraphs
from jtrust.analysis.mi import fitting_compression
from jtrust.models.tokenizer import train_bpe
from jtrust.pipelines import pretrain

ROOT = pathlib.Path(__file__).parents[2]

STEPS = [0, 10, 20, 40, 80, 160]


def test_fitting_compression_rule():
    up_down = [1.0, 1.2, 1.5, 1.4, 1.3, 1.2]
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    ph = fitting_compression(STEPS, up_down, rising)
    assert ph.two_phases and ph.peak_step == 20
    assert ph.rise == pytest.approx(0.5 / 1.5) and ph.fall == pytest.approx(0.3 / 1.5)
    assert ph.ty_change == pytest.approx(0.6 - 0.3)
    assert not fitting_compression(STEPS, rising, rising).two_phases  # peak at the end: fitting only
    assert not fitting_compression(STEPS, up_down, rising[::-1]).two_phases  # I(T;Y) fell too
    small = [1.0, 1.2, 1.5, 1.48, 1.47, 1.46]  # a 2.7% dip is not compression
    assert not fitting_compression(STEPS, small, rising).two_phases


def test_bpe_tokenizer_roundtrip_and_lowercasing():
    tok = train_bpe(corpus_paragraphs("tinystories_train")[:2000], vocab_size=600)
    assert tok.backend.get_vocab_size() == 600 and tok.eos_id == 0
    text = "Once upon a time, Lily found a Zebra (émigré) — 42!"
    assert tok.decode(tok.encode(text)) == text.lower()
    assert len(tok.encode("once upon a time")) < len("once upon a time") / 2  # merges were learnt


SMALL = {
    "corpus": {"train": "tinystories_train", "val": "tinystories_val", "val_windows": 16},
    "tokenizer": {"vocab_size": 512, "lowercase": True},
    "model": {"d_model": 64, "n_layers": 3, "head_dim": 32, "d_ff": 128, "seq_len": 32,
              "max_positions": 256, "init_seed": 0},
    "train": {"steps": 24, "batch_size": 8, "learning_rate": 0.003, "warmup_steps": 2,
              "weight_decay": 0.1, "min_lr_ratio": 0.1, "log_every": 4, "seed": 0},
    "checkpoints": {"count": 8, "dense_until": 2},
    "trace": {"dims": "toxicity,fairness", "mi_samples": 100, "limit": 200},
}


def _check_run(out: pathlib.Path, cfg: dict) -> None:
    series = jtrust.load(out)
    steps = [c.step for c in series.checkpoints]
    assert len(steps) >= cfg["checkpoints"]["count"] and steps[0] == 0 and steps[-1] == cfg["train"]["steps"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {m["step"]: m for m in metrics if m["kind"] == "eval"}
    assert sorted(evals) == steps
    assert evals[steps[-1]]["val_ppl"] < 0.5 * evals[0]["val_ppl"]  # it learnt something
    # the saved series is the trained one: re-evaluating a loaded checkpoint repeats the log
    tokenizer = series.checkpoints[-1].load().tokenizer
    val = T.packed_examples(pretrain._encode(tokenizer, corpus_paragraphs(cfg["corpus"]["val"])),
                            cfg["model"]["seq_len"])
    val = T.take(val, np.arange(cfg["corpus"]["val_windows"]))
    middle = series.checkpoints[len(steps) // 2]
    again = T.perplexity_eval(val, batch_size=32)(middle.load())
    assert again["val_ppl"] == pytest.approx(evals[middle.step]["val_ppl"], rel=1e-5)
    # the trace: every (checkpoint, dimension, layer), plots against step, the phase table
    dims = cfg["trace"]["dims"].split(",") if cfg["trace"]["dims"] != "all" else list(jtrust.data.TRUST_DATASETS)
    with open(out / "trace" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(steps) * len(dims) * cfg["model"]["n_layers"]
    report = (out / "trace" / "report.md").read_text()
    assert "Fitting and compression (two phases)" in report
    for dim in dims:
        assert (out / "trace" / "plots" / f"steps_{dim}.png").stat().st_size > 10_000
        assert (out / "trace" / "plots" / f"infoplane_{dim}.png").exists()
    assert (out / "training.png").exists()


# the default suite's version: fewer checkpoints and rows to trace; SMALL itself runs with -m slow
SMALLER = {**SMALL, "checkpoints": {"count": 5, "dense_until": 2},
           "trace": {**SMALL["trace"], "limit": 100}}


@pytest.mark.parametrize("cfg", [SMALLER, pytest.param(SMALL, marks=pytest.mark.slow, id="small")])
def test_pretrain_small_end_to_end_and_resume(tmp_path, cfg):
    config_path = tmp_path / "small.json"
    config_path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    pretrain.main(["--config", str(config_path), "--out", str(out), "--no-trace"])
    first = (out / "metrics.jsonl").read_text()
    pretrain.main(["--config", str(config_path), "--out", str(out)])  # finished run: traced, not retrained
    assert (out / "metrics.jsonl").read_text() == first
    _check_run(out, cfg)


@pytest.mark.slow
def test_pretrain_full_config(tmp_path):
    """The README's pre-training run (about 25 minutes of training, then the trace)."""
    config_path = ROOT / "experiments" / "configs" / "pretrain_tiny.json"
    out = tmp_path / "run"
    pretrain.main(["--config", str(config_path), "--out", str(out)])
    _check_run(out, json.loads(config_path.read_text()))
