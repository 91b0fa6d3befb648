"""Read a llama.cpp GGUF file (Llama architecture) into Hugging Face names, layout and config.

GGUF lists tensor dims innermost first (`token_embd.weight` is [d, vocab]); the
dequantized numpy arrays are row-major [out, in], which is the torch layout
Hugging Face uses, so only the names and llama.cpp's q/k row order change.
The tokenizer is rebuilt from the metadata (vocabulary, merges, token types).
"""

from __future__ import annotations

import pathlib
import re

import gguf
import numpy as np
import tokenizers
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from jtrust.io.raw import RawCheckpoint, stop_ids
from jtrust.models.tokenizer import Tokenizer

_MAGIC = b"GGUF"
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")

# llama.cpp's pre-tokenizer types (`tokenizer.ggml.pre`) as `tokenizers` pre-tokenizers
_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2 split regex
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    "default": _BYTE_LEVEL,
    "gpt-2": _BYTE_LEVEL,
    # every digit on its own, then the GPT-2 split (llama.cpp's "smollm" regex list)
    "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _BYTE_LEVEL]),
    "llama-bpe": pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}


def read_gguf(path) -> RawCheckpoint:
    """Dequantize every tensor of a Llama-architecture GGUF file to float32 Hugging Face tensors.

    Raises FileNotFoundError for a missing file and ValueError (naming the file)
    for a non-GGUF, truncated or unsupported one.
    """
    path = pathlib.Path(path)
    reader = _open(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; jtrust reads "
                         "'llama' GGUF files only (load other models from their Hugging Face "
                         "directory instead)")
    tensors = {}
    for t in reader.tensors:
        # GGUF dims are innermost first, so the numpy shape is the reverse: [out, in]
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        tensors[_hf_name(t.name, path)] = w.reshape(tuple(reversed(t.shape.tolist())))
    config = _hf_config(meta, path, vocab_size=tensors["model.embed_tokens.weight"].shape[0],
                        tied="lm_head.weight" not in tensors)
    for i in range(config["num_hidden_layers"]):
        q, k = (f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qk")
        tensors[q] = _unpermute(tensors[q], config["num_attention_heads"])
        tensors[k] = _unpermute(tensors[k], config["num_key_value_heads"])
    return RawCheckpoint(config, tensors, _tokenizer(meta, path))


def _open(path: pathlib.Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file; check the path (a Hugging Face "
                                "checkpoint directory is read with read_hf_dir instead)")
    with open(path, "rb") as f:
        magic = f.read(len(_MAGIC))
    if magic != _MAGIC:
        raise ValueError(f"{path}: not a GGUF file (it starts with {magic!r}, GGUF files start "
                         f"with {_MAGIC!r}); pass a llama.cpp .gguf file")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError) as err:
        raise ValueError(f"{path}: the GGUF file is truncated or corrupt ({err}); download or "
                         "copy it again") from err


def _hf_name(name: str, path: pathlib.Path) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise ValueError(f"{path}: tensor {name!r} has no Hugging Face Llama equivalent; the file uses "
                     "a feature jtrust does not support (biases, RoPE frequency factors, ...)")


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of q/k rows. w: [n_heads * head_dim, d_in]."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def _hf_config(meta: dict, path: pathlib.Path, vocab_size: int, tied: bool) -> dict:
    def need(key):
        if f"llama.{key}" not in meta:
            raise ValueError(f"{path}: GGUF metadata lacks 'llama.{key}'; the file is incomplete")
        return meta[f"llama.{key}"]

    d, n_heads = need("embedding_length"), need("attention.head_count")
    # float32 metadata: keep the value its writer meant (1e-05, not 9.99999974e-06)
    eps = float(str(np.float32(need("attention.layer_norm_rms_epsilon"))))
    config = dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab_size,
        hidden_size=d, intermediate_size=need("feed_forward_length"),
        num_hidden_layers=need("block_count"), num_attention_heads=n_heads,
        num_key_value_heads=meta.get("llama.attention.head_count_kv", n_heads),
        head_dim=meta.get("llama.attention.key_length", d // n_heads), rms_norm_eps=eps,
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=need("context_length"), hidden_act="silu",
        tie_word_embeddings=tied, bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none":  # recorded so that config_from_hf refuses it rather than ignoring it
        config["rope_scaling"] = {"rope_type": scaling,
                                  "factor": meta.get("llama.rope.scaling.factor")}
    return config


def _tokenizer(meta: dict, path: pathlib.Path) -> Tokenizer:
    """A byte-level BPE tokenizer from `tokenizer.ggml.*` metadata, control tokens kept whole."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer model {kind!r} is not supported; jtrust builds "
                         "byte-level BPE ('gpt2') tokenizers from GGUF files only")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported (supported: "
                         f"{sorted(_PRE_TOKENIZERS)}); load the model from its Hugging Face "
                         "directory, whose tokenizer.json defines it")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [])
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    backend.pre_tokenizer = _PRE_TOKENIZERS[pre]
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == _CONTROL])
    # user-defined tokens (e.g. <think>) are matched whole, like llama.cpp does, but are not special
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    pad = meta.get("tokenizer.ggml.padding_token_id", 0 if eos is None else eos)
    return Tokenizer(backend=backend, bos_id=bos, eos_id=eos, pad_id=pad,
                     add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                     chat_template=meta.get("tokenizer.chat_template"),
                     stop_ids=stop_ids(backend, [eos, meta.get("tokenizer.ggml.eot_token_id")]))
