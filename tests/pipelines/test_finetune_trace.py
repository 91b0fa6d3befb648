"""experiments/finetune_trace.py on a tiny random Llama (the default suite's small version): a
LoRA fine-tuning series that loads as a series and is traced at every saved step."""

from __future__ import annotations

import csv
import json

import numpy as np

import jtrust
from jtrust.pipelines import finetune_trace
from helpers import make_tiny_hf_dir


SMALL = {
    "model": None,
    "out": None,
    "data": {"chat": False, "seq_len": 256, "val_pairs": 8, "seed": 0},
    "train": {"steps": 4, "batch_size": 4, "learning_rate": 0.01, "warmup_steps": 0,
              "schedule": "constant", "log_every": 1, "seed": 0,
              "lora": {"rank": 4, "alpha": 8.0, "targets": ["q", "v", "down"]}},
    "save_steps": [0, 2, 4],
    "trace": {"dims": "reliability", "layers": "0,2", "limit": 100, "mi_samples": 0},
}


def test_truthful_pairs_are_split_by_question():
    train, held = finetune_trace.truthful_pairs(seed=0)
    assert not {q for q, _ in train} & {q for q, _ in held}
    assert 0.05 < len(held) / (len(train) + len(held)) < 0.15
    assert len(train) + len(held) == 9484  # the judge data's "yes" rows


def test_finetune_trace_small(tmp_path):
    make_tiny_hf_dir(tmp_path / "tiny", "llama")
    config = tmp_path / "small.json"
    config.write_text(json.dumps(SMALL))
    out = tmp_path / "run"
    finetune_trace.main(["--config", str(config), "--model", str(tmp_path / "tiny"), "--out", str(out)])
    series = jtrust.load(out)
    assert series.names == ["step0", "step2", "step4"]
    base, last = jtrust.load(tmp_path / "tiny"), series.checkpoints[-1].load()
    np.testing.assert_array_equal(series.checkpoints[0].load().params["blocks"]["attn"]["q"]["kernel"],
                                  base.params["blocks"]["attn"]["q"]["kernel"])  # step 0 is the base
    assert not np.array_equal(last.params["blocks"]["attn"]["q"]["kernel"], base.params["blocks"]["attn"]["q"]["kernel"])
    np.testing.assert_array_equal(last.params["blocks"]["attn"]["k"]["kernel"], base.params["blocks"]["attn"]["k"]["kernel"])
    with open(out / "trace" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["checkpoint"], r["layer"]) for r in rows] == [(s, l) for s in series.names for l in ("0", "2")]
    assert "Fitting and compression" in (out / "trace" / "report.md").read_text()
