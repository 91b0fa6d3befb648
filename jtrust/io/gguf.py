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

from jtrust.core.errors import InputError, MissingInput
from jtrust.io.raw import RawCheckpoint, check_finite, stop_ids
from jtrust.models.config import config_from_hf
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
# what a corrupt file makes the gguf package (and numpy under it) raise
_CORRUPT = (ValueError, IndexError, KeyError, TypeError, OverflowError, AttributeError,
            UnicodeDecodeError, NotImplementedError, ZeroDivisionError, MemoryError)

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

    Raises `MissingInput` (a FileNotFoundError) for a missing file and `InputError` (a
    ValueError) naming the file for a non-GGUF, truncated, corrupt or unsupported one,
    including tensors that hold NaN or inf after dequantization.
    """
    path = pathlib.Path(path)
    reader = _open(path)
    meta = {}
    for name, field in reader.fields.items():
        try:
            meta[name] = field.contents()
        except _CORRUPT as err:
            raise _corrupt(path, f"metadata {name!r}", err) from None
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise InputError(f"{path}: GGUF architecture {arch!r} is not supported; jtrust reads "
                         "'llama' GGUF files only (load other models from their Hugging Face "
                         "directory instead)")
    tensors = {}
    for t in reader.tensors:
        hf_name = _hf_name(t.name, path)
        if hf_name in tensors:
            raise InputError(f"{path}: tensor {t.name!r} appears twice; the file is corrupt")
        try:
            # GGUF dims are innermost first, so the numpy shape is the reverse: [out, in]
            w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
            w = w.reshape(tuple(reversed(t.shape.tolist())))
        except _CORRUPT as err:
            raise _corrupt(path, f"tensor {t.name!r}", err) from None
        check_finite(w, t.name, path)
        tensors[hf_name] = w
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None or embed.ndim != 2:
        raise InputError(f"{path}: no 2-D 'token_embd.weight' tensor; the file is incomplete or not "
                         "a llama model")
    config = _hf_config(meta, path, vocab_size=embed.shape[0], tied="lm_head.weight" not in tensors)
    config_from_hf(config, source=f"{path} (GGUF metadata)")  # sizes positive and consistent
    for i in range(config["num_hidden_layers"]):
        for p, heads in (("q", config["num_attention_heads"]), ("k", config["num_key_value_heads"])):
            name = f"model.layers.{i}.self_attn.{p}_proj.weight"
            if name not in tensors:
                raise InputError(f"{path}: tensor 'blk.{i}.attn_{p}.weight' is missing (the metadata "
                                 f"says {config['num_hidden_layers']} blocks); the file is incomplete")
            tensors[name] = _unpermute(tensors[name], heads, f"blk.{i}.attn_{p}.weight", path)
    return RawCheckpoint(config, tensors, _tokenizer(meta, path))


def _corrupt(path: pathlib.Path, what: str, err: BaseException) -> InputError:
    detail = str(err).splitlines()[0][:160] if str(err).strip() else type(err).__name__
    return InputError(f"{path}: the GGUF file is truncated or corrupt ({what}: {detail}); download "
                      "or copy it again")


def _open(path: pathlib.Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise MissingInput(f"{path}: no such GGUF file; check the path (a Hugging Face "
                           "checkpoint directory is read with read_hf_dir instead)")
    with open(path, "rb") as f:
        magic = f.read(len(_MAGIC))
    if magic != _MAGIC:
        raise InputError(f"{path}: not a GGUF file (it starts with {magic!r}, GGUF files start "
                         f"with {_MAGIC!r}); pass a llama.cpp .gguf file")
    try:
        return gguf.GGUFReader(path)
    except _CORRUPT as err:
        raise _corrupt(path, "header", err) from None


def _hf_name(name: str, path: pathlib.Path) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise InputError(f"{path}: tensor {name!r} has no Hugging Face Llama equivalent; the file uses "
                     "a feature jtrust does not support (biases, RoPE frequency factors, ...)")


def _unpermute(w: np.ndarray, n_heads: int, name: str, path: pathlib.Path) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of q/k rows. w: [n_heads * head_dim, d_in]."""
    if w.ndim != 2 or w.shape[0] % (2 * n_heads):
        raise InputError(f"{path}: tensor {name!r} has shape {w.shape}, which does not split into "
                         f"{n_heads} heads of an even size; the metadata does not match the tensors")
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def _hf_config(meta: dict, path: pathlib.Path, vocab_size: int, tied: bool) -> dict:
    def value(key, kind, default=None, required=True):
        if key not in meta:
            if required:
                raise InputError(f"{path}: GGUF metadata lacks {key!r}; the file is incomplete")
            return default
        v = meta[key]
        if isinstance(v, bool) or not isinstance(v, kind):
            raise InputError(f"{path}: GGUF metadata {key!r} is {v!r}, expected "
                             f"{'an integer' if kind is int else 'a number'}; the file is corrupt")
        return v

    def need(key, kind=int):
        return value(f"llama.{key}", kind)

    def size(key, default):
        return value(f"llama.{key}", int, default, required=False)

    def token(key):
        return value(f"tokenizer.ggml.{key}", int, required=False)

    d, n_heads = need("embedding_length"), need("attention.head_count")
    if n_heads <= 0:
        raise InputError(f"{path}: GGUF metadata 'llama.attention.head_count' is {n_heads}; expected "
                         "a positive integer; the file is corrupt")
    # float32 metadata: keep the value its writer meant (1e-05, not 9.99999974e-06)
    eps = float(str(np.float32(need("attention.layer_norm_rms_epsilon", (int, float)))))
    config = dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab_size,
        hidden_size=d, intermediate_size=need("feed_forward_length"),
        num_hidden_layers=need("block_count"), num_attention_heads=n_heads,
        num_key_value_heads=size("attention.head_count_kv", n_heads),
        head_dim=size("attention.key_length", d // n_heads), rms_norm_eps=eps,
        rope_theta=float(value("llama.rope.freq_base", (int, float), 10000.0, required=False)),
        max_position_embeddings=need("context_length"), hidden_act="silu",
        tie_word_embeddings=tied, bos_token_id=token("bos_token_id"),
        eos_token_id=token("eos_token_id"), pad_token_id=token("padding_token_id"))
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none":  # recorded so that config_from_hf refuses it rather than ignoring it
        config["rope_scaling"] = {"rope_type": scaling,
                                  "factor": meta.get("llama.rope.scaling.factor")}
    return config


def _tokenizer(meta: dict, path: pathlib.Path) -> Tokenizer:
    """A byte-level BPE tokenizer from `tokenizer.ggml.*` metadata, control tokens kept whole."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise InputError(f"{path}: tokenizer model {kind!r} is not supported; jtrust builds "
                         "byte-level BPE ('gpt2') tokenizers from GGUF files only")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in _PRE_TOKENIZERS:
        raise InputError(f"{path}: pre-tokenizer {pre!r} is not supported (supported: "
                         f"{sorted(_PRE_TOKENIZERS)}); load the model from its Hugging Face "
                         "directory, whose tokenizer.json defines it")

    def strings(key):
        v = meta.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise InputError(f"{path}: GGUF metadata {key!r} is not a list of strings; the file "
                             "is corrupt")
        return v

    tokens = strings("tokenizer.ggml.tokens")
    if not tokens:
        raise InputError(f"{path}: GGUF metadata lacks 'tokenizer.ggml.tokens' (the vocabulary); "
                         "the file is incomplete")
    types = meta.get("tokenizer.ggml.token_type", [])
    if not isinstance(types, list) or not all(isinstance(x, int) for x in types):
        raise InputError(f"{path}: GGUF metadata 'tokenizer.ggml.token_type' is not a list of "
                         "integers; the file is corrupt")
    merges = [tuple(m.split(" ")) for m in strings("tokenizer.ggml.merges")]
    bad = next((m for m in merges if len(m) != 2), None)
    if bad is not None:
        raise InputError(f"{path}: merge {' '.join(bad)!r} in 'tokenizer.ggml.merges' is not two "
                         "space-separated tokens; the file is corrupt")
    try:
        backend = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    except Exception as err:  # the Rust library raises a bare Exception for every problem
        raise InputError(f"{path}: the GGUF tokenizer metadata does not form a BPE tokenizer "
                         f"({str(err)[:160]}); the file is corrupt") from None
    backend.pre_tokenizer = _PRE_TOKENIZERS[pre]
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == _CONTROL])
    # user-defined tokens (e.g. <think>) are matched whole, like llama.cpp does, but are not special
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    bos = meta.get("tokenizer.ggml.bos_token_id")  # ids checked to be integers by _hf_config
    eos = meta.get("tokenizer.ggml.eos_token_id")
    pad = meta.get("tokenizer.ggml.padding_token_id", 0 if eos is None else eos)
    eot = meta.get("tokenizer.ggml.eot_token_id")
    template = meta.get("tokenizer.chat_template")
    if (eot is not None and (isinstance(eot, bool) or not isinstance(eot, int))) or \
            (template is not None and not isinstance(template, str)):
        raise InputError(f"{path}: GGUF metadata 'tokenizer.ggml.eot_token_id' or "
                         "'tokenizer.chat_template' has the wrong type; the file is corrupt")
    return Tokenizer(backend=backend, bos_id=bos, eos_id=eos, pad_id=pad,
                     add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                     chat_template=template, stop_ids=stop_ids(backend, [eos, eot]))
