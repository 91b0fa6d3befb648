"""`jtrust.load` / `convert` / series: every path checked against the torch model it came from."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch

import jtrust
from jtrust.models.model import Series, forward_jit
from helpers import make_tiny_hf_dir, random_tokens


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def jtrust_logits(model, tokens):
    return np.asarray(model.apply(tokens, np.ones_like(tokens)).logits)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
def test_load_hf_dir_then_cached(tiny_checkpoints, family):
    path, torch_model = tiny_checkpoints[family]
    tokens = random_tokens((2, 9))
    first = jtrust.load(path)
    cached = pathlib.Path(os.environ["JTRUST_CACHE"]) / "converted" / first.checkpoint_hash
    assert (cached / "jtrust_config.json").exists()
    second = jtrust.load(path)  # read back from the orbax cache
    np.testing.assert_allclose(jtrust_logits(first, tokens), torch_logits(torch_model, tokens), atol=1e-4)
    np.testing.assert_array_equal(jtrust_logits(second, tokens), jtrust_logits(first, tokens))
    assert second.tokenizer.encode("Trust, but verify.") == first.tokenizer.encode("Trust, but verify.")


def test_convert_roundtrip_and_refusals(tiny_checkpoints, tmp_path):
    path, torch_model = tiny_checkpoints["qwen2"]
    dst = jtrust.convert(path, tmp_path / "qwen2_jtrust")
    model = jtrust.load(dst)
    tokens = random_tokens((1, 12), seed=3)
    np.testing.assert_allclose(jtrust_logits(model, tokens), torch_logits(torch_model, tokens), atol=1e-4)
    with pytest.raises(FileExistsError, match="already exists"):
        jtrust.convert(path, dst)


def test_convert_crash_leaves_nothing(tiny_checkpoints, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    def crash(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        jtrust.convert(tiny_checkpoints["llama"][0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_series_order_and_one_compiled_function(tmp_path):
    root = tmp_path / "run"
    torch_models = {}
    for step, seed in ((2000, 2), (100, 0), (1000, 1)):
        torch_models[step] = make_tiny_hf_dir(root / f"step{step}", "llama", seed=seed)
    (root / "notes").mkdir()  # a non-checkpoint folder is ignored
    series = jtrust.load(root)
    assert isinstance(series, Series)
    assert series.names == ["step100", "step1000", "step2000"]
    assert [c.step for c in series.checkpoints] == [100, 1000, 2000]
    tokens = random_tokens((2, 7), seed=5)
    sizes = []
    for ckpt, model in zip(series.checkpoints, series):
        np.testing.assert_allclose(jtrust_logits(model, tokens), torch_logits(torch_models[ckpt.step], tokens),
                                   atol=1e-4)
        sizes.append(forward_jit._cache_size())
    assert sizes[0] == sizes[1] == sizes[2]  # no recompile across checkpoints
    explicit = jtrust.load([root / "step1000", root / "step100"])
    assert explicit.names == ["step1000", "step100"]


def test_wrong_path_and_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        jtrust.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no checkpoint found"):
        jtrust.load(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(ValueError, match="bare weights file"):
        jtrust.load(tmp_path / "weights.bin")


def test_config_that_does_not_match_tensors(tiny_checkpoints, tmp_path):
    path = tmp_path / "bad"
    shutil.copytree(tiny_checkpoints["llama"][0], path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight.*does not match"):
        jtrust.load(path, cache=False)
    config["intermediate_size"], config["num_hidden_layers"] = 96, 4
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model.layers.3.* is missing"):
        jtrust.load(path, cache=False)


def test_unsupported_architecture(tiny_checkpoints, tmp_path):
    path = tmp_path / "bert"
    shutil.copytree(tiny_checkpoints["llama"][0], path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"], config["architectures"] = "bert", ["BertModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture model_type='bert'"):
        jtrust.load(path, cache=False)


def test_incomplete_jtrust_dir(tiny_checkpoints, tmp_path):
    dst = jtrust.convert(tiny_checkpoints["gpt2"][0], tmp_path / "gpt2")
    shutil.rmtree(dst / "params")
    with pytest.raises(FileNotFoundError, match="not a complete jtrust checkpoint"):
        jtrust.load(dst)


def test_series_step_numbers():
    from jtrust.io.loading import _step
    assert _step("pythia-160m-step20000") == 20000  # the number after "step", not the first
    assert _step("pythia-160m-step300") == 300
    assert _step("ckpt_0200") == 200  # else the last number
    assert _step("final") is None
