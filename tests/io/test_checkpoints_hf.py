"""read_hf_dir: every family's logits match torch; sharded, bf16 and .bin weights; clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import FAMILIES, make_tiny_hf_dir, random_tokens
from jtrust.io.hf import read_hf_dir
from jtrust.models.model import forward_jit
from jtrust.models.config import config_from_hf
from jtrust.io.convert import hf_to_params

LENGTHS = (8, 5, 3)  # real tokens per row of the padded batches


def jtrust_logits(raw, tokens, mask):
    """Logits [B, T, vocab] of a RawCheckpoint on tokens/mask [B, T]."""
    config = config_from_hf(raw.hf_config)
    params = hf_to_params(raw.tensors, config)
    return np.asarray(forward_jit(params, tokens, mask, config=config).logits)


def torch_logits(model, row) -> np.ndarray:
    """Logits [T, vocab] of one unpadded row."""
    with torch.no_grad():
        return model(torch.tensor(row, dtype=torch.long)[None]).logits[0].float().numpy()


def padded(rows, side, T):
    tokens = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    for b, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        tokens[b, sl], mask[b, sl] = r, 1
    return tokens, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_torch(tiny_checkpoints, family):
    path, model = tiny_checkpoints[family]
    raw = read_hf_dir(path)
    assert raw.hf_config["model_type"] == model.config.model_type
    T = max(LENGTHS)
    full = random_tokens((len(LENGTHS), T), seed=1)
    got = jtrust_logits(raw, full, np.ones_like(full))
    for b in range(len(full)):
        np.testing.assert_allclose(got[b], torch_logits(model, full[b]), atol=1e-4, rtol=0)
    rows = [full[b, :n] for b, n in enumerate(LENGTHS)]
    for side in ("left", "right"):
        tokens, mask = padded(rows, side, T)
        got = jtrust_logits(raw, tokens, mask)
        for b, row in enumerate(rows):
            real = got[b][mask[b].astype(bool)]
            np.testing.assert_allclose(real, torch_logits(model, row), atol=1e-4, rtol=0,
                                       err_msg=f"{family} {side}-padded row {b}")


def test_tokenizer_from_tokenizer_json_and_config(tiny_checkpoints):
    raw = read_hf_dir(tiny_checkpoints["llama"][0])
    tok = raw.tokenizer
    # no tokenizer_config.json: ids come from config.json, pad falls back to eos
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, False)
    assert tok.stop_ids == (2,)
    text = "The quick brown fox"
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_config_files(tiny_checkpoints, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["llama"][0], path)
    (path / "tokenizer_config.json").write_text(json.dumps(dict(
        bos_token="<s>", eos_token={"content": "</s>", "special": True}, add_bos_token=True,
        chat_template="{{ messages[0]['content'] }} from the config")))
    (path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    tok = read_hf_dir(path).tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 0, True)
    assert tok.encode("fox")[0] == 1
    assert tok.decode(tok.encode("fox")) == "fox"  # special tokens skipped
    assert tok.chat("hi") == "hi from the config"
    (path / "chat_template.jinja").write_text("{{ messages[0]['content'] }} from the file")
    assert read_hf_dir(path).tokenizer.chat("hi") == "hi from the file"


def test_sharded_safetensors(tiny_checkpoints, tmp_path):
    _, model = tiny_checkpoints["llama"]
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="100KB")
    (path / "tokenizer.json").write_text((tiny_checkpoints["llama"][0] / "tokenizer.json").read_text())
    shards = sorted(path.glob("model-*.safetensors"))
    assert (path / "model.safetensors.index.json").is_file() and len(shards) > 2
    raw = read_hf_dir(path)
    assert_tensors_equal(raw.tensors, model.state_dict())


def test_bf16_safetensors(tmp_path):
    model = make_tiny_hf_dir(tmp_path / "f32", "llama")
    model = model.to(torch.bfloat16)
    path = tmp_path / "bf16"
    model.save_pretrained(path)
    shutil.copy(tmp_path / "f32" / "tokenizer.json", path)
    raw = read_hf_dir(path)
    assert all(w.dtype == np.float32 for w in raw.tensors.values())
    assert_tensors_equal(raw.tensors, model.state_dict())  # upcast is exact
    row = random_tokens((1, 6), seed=2)
    np.testing.assert_allclose(jtrust_logits(raw, row, np.ones_like(row))[0],
                               torch_logits(model.float(), row[0]), atol=1e-4, rtol=0)


def test_pytorch_bin(tiny_checkpoints, tmp_path):
    src, model = tiny_checkpoints["gpt_neox"]
    path = pickled_dir(src, tmp_path, model.state_dict())
    raw = read_hf_dir(path)
    assert_tensors_equal(raw.tensors, model.state_dict())


class NotATensor:
    """A pickled object that weights_only loading must refuse."""


def test_refuses_unsafe_pickle(tiny_checkpoints, tmp_path):
    src, model = tiny_checkpoints["gpt2"]
    path = pickled_dir(src, tmp_path, dict(model.state_dict(), extra=NotATensor()))
    with pytest.raises(ValueError, match="never unpickles") as err:
        read_hf_dir(path)
    assert str(path / "pytorch_model.bin") in str(err.value)


def broken_copy(tiny_checkpoints, tmp_path, damage):
    """A copy of the llama checkpoint (sharded) with `damage(path)` applied."""
    _, model = tiny_checkpoints["llama"]
    path = tmp_path / "broken"
    model.save_pretrained(path, max_shard_size="100KB")
    shutil.copy(tiny_checkpoints["llama"][0] / "tokenizer.json", path)
    damage(path)
    return path


@pytest.mark.parametrize("case, error, culprit", [
    ("missing config", FileNotFoundError, "config.json"),
    ("missing weights", FileNotFoundError, ""),
    ("missing shard", FileNotFoundError, "model-00002-of-"),
    ("truncated shard", ValueError, "model-00001-of-"),
    ("missing tokenizer", FileNotFoundError, "tokenizer.json"),
])
def test_errors_name_the_file(tiny_checkpoints, tmp_path, case, error, culprit):
    def damage(path):
        first, second = sorted(path.glob("model-*.safetensors"))[:2]
        if case == "missing config":
            (path / "config.json").unlink()
        elif case == "missing weights":
            for f in path.glob("model*.*"):
                f.unlink()
        elif case == "missing shard":
            second.unlink()
        elif case == "truncated shard":
            first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
        else:
            (path / "tokenizer.json").unlink()

    path = broken_copy(tiny_checkpoints, tmp_path, damage)
    with pytest.raises(error) as err:
        read_hf_dir(path)
    assert str(path) in str(err.value) and culprit in str(err.value)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory") as err:
        read_hf_dir(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)


def pickled_dir(src, tmp_path, state_dict):
    """config.json + tokenizer.json from `src`, weights as torch.save(state_dict) pytorch_model.bin."""
    path = tmp_path / "pickled"
    path.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(src / name, path)
    torch.save(state_dict, path / "pytorch_model.bin")
    return path


def assert_tensors_equal(tensors, state_dict):
    """Every checkpoint tensor equals the torch one (float32 upcast); tied heads may be left out."""
    expected = {k: v.float().numpy() for k, v in state_dict.items()}
    assert set(tensors) <= set(expected) and set(expected) - set(tensors) <= {"lm_head.weight"}
    for name, w in tensors.items():
        np.testing.assert_array_equal(w, expected[name], err_msg=name)
