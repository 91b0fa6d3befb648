"""Bad checkpoints: whatever bytes a config.json, a GGUF file, a safetensors file or a pickle
holds, the readers return a valid result or raise an `InputError` naming the file, never another
exception; parameters are finite after loading; one regression test per case of issue 12."""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import struct

import gguf
import numpy as np
import pytest
import safetensors.numpy
import torch
from gguf.quants import quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jtrust
from jtrust.core.errors import InputError, MissingInput
from jtrust.core.store import cache_root
from jtrust.io.convert import hf_to_params
from jtrust.io.gguf import read_gguf
from jtrust.io.hf import read_hf_config, read_hf_dir, read_safetensors
from jtrust.models.config import ModelConfig, config_from_hf

PROPERTY = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_names = itertools.count()

# Hugging Face configs of each family, as save_pretrained writes them (the keys jtrust reads)
LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=300, hidden_size=64,
             intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
             hidden_act="silu", tie_word_embeddings=False, attention_bias=False, rope_scaling=None,
             bos_token_id=1, eos_token_id=2, pad_token_id=None, torch_dtype="float32")
NEOX = dict(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], vocab_size=300,
            hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            rotary_pct=0.25, rotary_emb_base=10000, layer_norm_eps=1e-5, hidden_act="gelu",
            use_parallel_residual=True, max_position_embeddings=2048, tie_word_embeddings=False,
            attention_bias=True, bos_token_id=1, eos_token_id=2)
GPT2 = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=300, n_embd=64,
            n_layer=3, n_head=4, n_positions=128, n_inner=None, layer_norm_epsilon=1e-5,
            activation_function="gelu_new", bos_token_id=1, eos_token_id=2)
CONFIGS = {"llama": LLAMA, "gpt_neox": NEOX, "gpt2": GPT2}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A directory for hypothesis examples (function-scoped tmp_path does not mix with @given)."""
    return tmp_path_factory.mktemp("bad_checkpoints")


def fresh(directory: pathlib.Path, name: str) -> pathlib.Path:
    path = directory / f"x{next(_names)}"
    path.mkdir()
    return path / name


def valid_model_config(c: ModelConfig) -> None:
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                 "max_positions"):
        value = getattr(c, name)
        assert isinstance(value, int) and not isinstance(value, bool) and value > 0, name
    assert c.n_heads % c.n_kv_heads == 0 and 0 < c.norm_eps < np.inf and c.rope_theta > 0
    if c.family != "llama":
        assert c.n_heads * c.head_dim == c.d_model
    if c.position == "rope":
        assert 0 < c.rotary_dim <= c.head_dim and c.rotary_dim % 2 == 0


# ------------------------------------------------------------------ config.json

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
              st.text(max_size=8), st.sampled_from(["64", "silu", "gelu", "llama", "gpt2", "default"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner,
                                                                         max_size=3)),
    max_leaves=6)


@PROPERTY
@given(family=st.sampled_from(sorted(CONFIGS)),
       changes=st.dictionaries(st.sampled_from(sorted(set(LLAMA) | set(NEOX) | set(GPT2) |
                                                      {"rope_parameters", "rotary_pct"})),
                               st.one_of(st.just("<delete>"), JSON_VALUES,
                                         st.integers(-3, 130)), max_size=4))
def test_config_with_random_values(scratch, family, changes):
    hf = dict(CONFIGS[family])
    for key, value in changes.items():
        if value == "<delete>":
            hf.pop(key, None)
        else:
            hf[key] = value
    path = fresh(scratch, "config.json")
    path.write_text(json.dumps(hf))
    try:
        config = read_hf_config(path.parent)
    except InputError as e:
        assert str(path) in str(e)
        return
    valid_model_config(config)


@PROPERTY
@given(data=st.one_of(st.binary(max_size=300),
                      st.lists(st.sampled_from([b"{", b"}", b'"hidden_size"', b":", b"64", b'"64"',
                                                b",", b'"model_type"', b'"llama"', b"[", b"]", b"-1",
                                                b"\xff", b"1e999", b"[" * 40, b"null"]),
                               max_size=30).map(b"".join)))
def test_config_any_bytes(scratch, data):
    path = fresh(scratch, "config.json")
    path.write_bytes(data)
    try:
        valid_model_config(read_hf_config(path))
    except InputError as e:
        assert str(path) in str(e)


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": "64"}, r"'hidden_size' is \"64\" \(a string\), expected a positive integer"),
    ({"hidden_size": None}, r"missing key 'hidden_size' \(a positive integer\)"),
    ({"num_hidden_layers": 0}, r"'num_hidden_layers' is 0, expected a positive integer"),
    ({"vocab_size": -5}, r"'vocab_size' is -5, expected a positive integer"),
    ({"head_dim": None, "num_attention_heads": 5, "num_key_value_heads": 5},
     "hidden_size=64 is not divisible by num_attention_heads=5"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ({"rms_norm_eps": "1e-5"}, r"'rms_norm_eps' is \"1e-5\" \(a string\), expected a positive number"),
    ({"tie_word_embeddings": "false"}, r"'tie_word_embeddings' is \"false\" \(a string\), expected "
                                       "true or false"),
    ({"eos_token_id": "2"}, r"'eos_token_id' is \"2\" \(a string\), expected a token id"),
    ({"model_type": "bert", "architectures": ["BertModel"]},
     "unsupported architecture model_type='bert'"),
])
def test_config_regressions(tmp_path, change, message):
    hf = dict(LLAMA, **change)
    if change.get("hidden_size", 0) is None:
        del hf["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(InputError, match=message) as err:  # "64" was a jax TypeError much later
        read_hf_config(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)
    with pytest.raises(InputError, match=message):  # the directory reader checks it first
        read_hf_dir(tmp_path)
    with pytest.raises(InputError, match=message):  # and without a file, it says so
        config_from_hf(hf)


def test_config_file_not_an_object_or_not_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(InputError, match="holds a list, expected a JSON object"):
        read_hf_config(path)
    path.write_text('{"model_type": "llama",')
    with pytest.raises(InputError, match="not valid JSON .*truncated or corrupt") as err:
        read_hf_config(path)
    assert str(path) in str(err.value)
    with pytest.raises(MissingInput, match="absent: no such config.json or checkpoint directory"):
        read_hf_config(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInput, match="empty/config.json: missing"):
        read_hf_config(tmp_path / "empty")


def test_every_family_config_reads():
    for family, hf in CONFIGS.items():
        c = config_from_hf(hf, source="config.json")
        valid_model_config(c)
        assert c.family == family


# ------------------------------------------------------------------ GGUF


def tiny_gguf(path, d=8, heads=2, kv=1, ff=8, layers=1, vocab=10, seed=0, meta=None, drop=(),
              q8=False, poison=None):
    """A tiny llama GGUF (float32, or Q8_0 where rows allow) that read_gguf reads; `meta` replaces
    metadata values (their Python type picks the GGUF type), `drop` leaves keys or tensors out,
    `poison` = (tensor, value) writes that value into one element."""
    rng = np.random.RandomState(seed)
    head_dim = max(d // heads, 1)
    writer = gguf.GGUFWriter(path, "llama")
    values = {"llama.embedding_length": d, "llama.attention.head_count": heads,
              "llama.attention.head_count_kv": kv, "llama.feed_forward_length": ff,
              "llama.block_count": layers, "llama.context_length": 64,
              "llama.attention.layer_norm_rms_epsilon": 1e-5}
    values.update(meta or {})
    for key, v in values.items():
        if key in drop:
            continue
        if isinstance(v, float):
            writer.add_float32(key, v)
        elif isinstance(v, str):
            writer.add_string(key, v)
        elif isinstance(v, int) and v < 0:
            writer.add_int32(key, v)
        elif isinstance(v, int):
            writer.add_uint32(key, v)
    tokens = ["a", "b", "c", "ab", "bc", "<s>", "</s>", "d", "e", "f"][:vocab] + \
        [f"t{i}" for i in range(max(vocab - 10, 0))]
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", [1] * len(tokens))
    writer.add_array("tokenizer.ggml.merges", ["a b", "b c"])
    shapes = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,)}
    for i in range(layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.ffn_norm.weight": (d,),
            f"blk.{i}.attn_q.weight": (heads * head_dim, d), f"blk.{i}.attn_k.weight": (kv * head_dim, d),
            f"blk.{i}.attn_v.weight": (kv * head_dim, d), f"blk.{i}.attn_output.weight": (d, heads * head_dim),
            f"blk.{i}.ffn_gate.weight": (ff, d), f"blk.{i}.ffn_up.weight": (ff, d),
            f"blk.{i}.ffn_down.weight": (d, ff)})
    for name, shape in shapes.items():
        if name in drop:
            continue
        w = rng.randn(*shape).astype(np.float32)
        if poison and poison[0] == name:
            w.flat[w.size // 2] = poison[1]
        if q8 and w.ndim == 2 and w.shape[1] % 32 == 0:
            q = quantize(w, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def check_gguf(path):
    """read_gguf, then conversion: a valid model or an InputError naming the file."""
    try:
        raw = read_gguf(path)
        config = config_from_hf(raw.hf_config, source=path)
        params = hf_to_params(raw.tensors, config, source=str(path))
    except InputError as e:
        assert str(path) in str(e)
        return None
    valid_model_config(config)
    assert all(np.isfinite(w).all() for w in raw.tensors.values())
    return params


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory):
    """(bytes, offset of the tensor data) of a valid tiny GGUF with Q8_0 and float32 tensors."""
    path = tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", d=32, q8=True)
    assert check_gguf(path) is not None
    return path.read_bytes(), int(gguf.GGUFReader(path).data_offset)


@pytest.fixture(scope="module")
def valid_gguf_bytes(valid_gguf):
    return valid_gguf[0]


@PROPERTY
@given(data=st.one_of(st.binary(max_size=300),
                      st.binary(max_size=300).map(lambda b: b"GGUF" + b),
                      st.binary(max_size=300).map(lambda b: b"GGUF\x03\x00\x00\x00" + b)))
def test_gguf_any_bytes(scratch, data):
    path = fresh(scratch, "m.gguf")
    path.write_bytes(data)
    check_gguf(path)


@PROPERTY
@given(data=st.data())
def test_gguf_damaged_copies(scratch, valid_gguf, data):
    """Truncations and overwritten bytes of a valid file, in each region: the fixed header
    (version, counts), the metadata and tensor infos, the tensor data."""
    blob, data_offset = bytearray(valid_gguf[0]), valid_gguf[1]
    regions = [(4, 24), (24, data_offset), (data_offset, len(blob))]
    for _ in range(data.draw(st.integers(1, 4))):
        low, high = data.draw(st.sampled_from(regions))
        at = data.draw(st.integers(low, high - 1))
        patch = data.draw(st.one_of(st.binary(min_size=1, max_size=8),
                                    st.sampled_from([b"\xff" * 8, b"\x00" * 8, b"\x00\x7c", b"\xff\x7f"])))
        blob[at:at + len(patch)] = patch
    if data.draw(st.integers(0, 3)) == 0:
        blob = blob[:data.draw(st.integers(0, len(blob)))]
    path = fresh(scratch, "m.gguf")
    path.write_bytes(bytes(blob))
    check_gguf(path)


METADATA_KEYS = ["llama.embedding_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                 "llama.feed_forward_length", "llama.block_count", "llama.context_length",
                 "llama.attention.layer_norm_rms_epsilon", "llama.attention.key_length",
                 "llama.rope.freq_base", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                 "llama.rope.scaling.type", "tokenizer.ggml.pre", "general.architecture"]
TENSOR_NAMES = ["token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
                "blk.0.ffn_down.weight", "blk.1.attn_norm.weight"]


@PROPERTY
@given(d=st.sampled_from([4, 6, 8]), heads=st.integers(1, 3), kv=st.integers(1, 2),
       layers=st.integers(1, 2), vocab=st.integers(7, 12),
       meta=st.dictionaries(st.sampled_from(METADATA_KEYS),
                            st.one_of(st.integers(-2, 12), st.floats(-1, 1e6), st.just(float("nan")),
                                      st.sampled_from(["8", "llama", "none", "linear", "smollm", ""])),
                            max_size=3),
       drop=st.lists(st.sampled_from(METADATA_KEYS[:7] + TENSOR_NAMES), max_size=2),
       poison=st.one_of(st.none(), st.tuples(st.sampled_from(TENSOR_NAMES),
                                             st.sampled_from([np.nan, np.inf, -np.inf]))))
def test_gguf_random_metadata_and_tensors(scratch, d, heads, kv, layers, vocab, meta, drop, poison):
    path = tiny_gguf(fresh(scratch, "m.gguf"), d=d, heads=heads, kv=kv, layers=layers, vocab=vocab,
                     meta=meta, drop=tuple(drop), poison=poison)
    check_gguf(path)


def test_gguf_truncated_and_garbage_headers(tmp_path, valid_gguf_bytes):
    cases = {"empty.gguf": b"", "magic_only.gguf": b"GGUF", "version.gguf": b"GGUF\x03\x00\x00\x00",
             "half.gguf": valid_gguf_bytes[:len(valid_gguf_bytes) // 2],
             "header.gguf": valid_gguf_bytes[:40], "bad_version.gguf": b"GGUF\x63\x00\x00\x00" + b"\0" * 32}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(InputError, match="not a GGUF file|truncated or corrupt") as err:
            read_gguf(path)
        assert str(path) in str(err.value)
        assert "download or copy it again" in str(err.value) or "pass a llama.cpp .gguf file" in str(err.value)


@pytest.mark.parametrize("meta, drop, message", [
    ({"llama.embedding_length": "8"}, (), "'llama.embedding_length' is '8', expected an integer"),
    ({}, ("llama.block_count",), "GGUF metadata lacks 'llama.block_count'"),
    ({"llama.attention.head_count": 3}, (), "does not split into 3 heads|not divisible"),
    ({"llama.attention.head_count": 0}, (), "'llama.attention.head_count' is 0"),
    ({}, ("blk.0.attn_q.weight",), "tensor 'blk.0.attn_q.weight' is missing"),
])
def test_gguf_metadata_regressions(tmp_path, meta, drop, message):
    path = tiny_gguf(tmp_path / "m.gguf", meta=meta, drop=drop)
    with pytest.raises(InputError, match=message) as err:
        read_gguf(path)
    assert str(path) in str(err.value)


def test_gguf_nan_tensor_is_refused_and_not_cached(tmp_path):
    path = tiny_gguf(tmp_path / "nan.gguf", poison=("blk.0.ffn_up.weight", np.nan))
    with pytest.raises(InputError, match=r"tensor 'blk.0.ffn_up.weight' holds 1 non-finite values "
                                         r"\(NaN or inf; first nan at index \(4, 0\)\)") as err:
        read_gguf(path)
    assert str(path) in str(err.value) and "download it again" in str(err.value)
    before = set(os.listdir(cache_root() / "converted")) if (cache_root() / "converted").exists() else set()
    with pytest.raises(InputError, match="non-finite"):
        jtrust.load(path)  # before: loaded, converted and cached
    after = set(os.listdir(cache_root() / "converted")) if (cache_root() / "converted").exists() else set()
    assert after == before


def test_gguf_corrupt_quantized_bytes_are_refused(tmp_path):
    """Corrupted tensor bytes: a Q8_0 block scale overwritten with an f16 infinity dequantizes
    to inf/NaN, which loaded (and was cached) before."""
    path = tiny_gguf(tmp_path / "q8.gguf", d=32, q8=True)
    reader = gguf.GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
    offset = int(tensor.data_offset)
    del reader
    blob = bytearray(path.read_bytes())
    blob[offset:offset + 2] = struct.pack("<e", np.inf)  # the first block's scale
    path.write_bytes(bytes(blob))
    with pytest.raises(InputError, match="tensor 'blk.0.ffn_gate.weight' holds .* non-finite") as err:
        read_gguf(path)
    assert str(path) in str(err.value)


# ------------------------------------------------------------------ safetensors

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "C64", "XYZ", 3]
HEADER_ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPES),
    "shape": st.one_of(st.lists(st.integers(-1, 4), max_size=3), st.text(max_size=3)),
    "data_offsets": st.one_of(st.lists(st.integers(-1, 64), min_size=0, max_size=3), st.none()),
})
HEADERS = st.dictionaries(st.one_of(st.sampled_from(["w", "b", "__metadata__"]), st.text(max_size=4)),
                          st.one_of(HEADER_ENTRY, JSON_VALUES), max_size=3)


@PROPERTY
@given(header=st.one_of(HEADERS.map(lambda h: json.dumps(h).encode()), st.binary(max_size=80)),
       size_delta=st.sampled_from([0, 0, 0, -1, 1, 2**40, 2**63]),
       body=st.binary(max_size=64))
def test_safetensors_random_headers(scratch, header, size_delta, body):
    size = max(0, min(len(header) + size_delta, 2**64 - 1))
    path = fresh(scratch, "model.safetensors")
    path.write_bytes(struct.pack("<Q", size) + header + body)
    check_safetensors(path)


@PROPERTY
@given(data=st.binary(max_size=200))
def test_safetensors_any_bytes(scratch, data):
    path = fresh(scratch, "model.safetensors")
    path.write_bytes(data)
    check_safetensors(path)


def check_safetensors(path):
    try:
        tensors = read_safetensors(path)
    except InputError as e:
        assert str(path) in str(e)
        return
    assert all(w.dtype == np.float32 and np.isfinite(w).all() for w in tensors.values())


@PROPERTY
@given(values=st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1,
                       max_size=6), dtype=st.sampled_from([np.float32, np.float16]))
@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_safetensors_values_finite_or_refused(scratch, values, dtype):
    path = fresh(scratch, "model.safetensors")
    safetensors.numpy.save_file({"w": np.array(values, dtype)}, str(path))
    finite = np.isfinite(np.array(values, dtype).astype(np.float32)).all()
    if finite:
        assert read_safetensors(path)["w"].tolist() == np.array(values, dtype).astype(np.float32).tolist()
    else:
        with pytest.raises(InputError, match=r"tensor 'w' holds \d+ non-finite values"):
            read_safetensors(path)


def test_safetensors_truncated_and_garbage(tmp_path):
    good = tmp_path / "good.safetensors"
    safetensors.numpy.save_file({"w": np.ones((4, 4), np.float32)}, str(good))
    blob = good.read_bytes()
    for name, data in {"truncated.safetensors": blob[:-10], "header.safetensors": blob[:20],
                       "garbage.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
                       "huge.safetensors": struct.pack("<Q", 2**62) + b"{}"}.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(InputError, match="unreadable safetensors file .*download or copy it "
                                             "again") as err:
            read_safetensors(path)
        assert str(path) in str(err.value)


# ------------------------------------------------------------------ Hugging Face directories


def hf_dir(path: pathlib.Path, tensors: dict | None = None) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(LLAMA))
    if tensors is not None:
        safetensors.numpy.save_file(tensors, str(path / "model.safetensors"))
    return path


class NotATensor:
    """A pickled object that weights_only loading must refuse."""


def test_refused_pickle_gives_no_weights_only_false_advice(tmp_path):
    path = hf_dir(tmp_path / "pickled")
    torch.save({"w": torch.zeros(2), "extra": NotATensor()}, path / "pytorch_model.bin")
    with pytest.raises(InputError) as err:
        read_hf_dir(path)
    message = str(err.value)
    assert str(path / "pytorch_model.bin") in message
    assert "NotATensor object" in message and "never unpickles untrusted files" in message
    assert "convert the checkpoint to safetensors" in message.lower()
    assert "weights_only=False" not in message and "set to `False`" not in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no torch text chained


@PROPERTY
@given(data=st.one_of(st.binary(max_size=120),
                      st.binary(max_size=120).map(lambda b: b"PK\x03\x04" + b),
                      st.binary(max_size=120).map(lambda b: b"\x80\x02" + b)))
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_torch_bin_any_bytes(scratch, data):
    path = hf_dir(fresh(scratch, "dir"))
    (path / "pytorch_model.bin").write_bytes(data)
    try:
        read_hf_dir(path)
    except InputError as e:  # the config is fine and there is no tokenizer: never a success
        assert str(path) in str(e)
        assert "weights_only=False" not in str(e)


def test_torch_bin_with_nan_is_refused(tmp_path):
    path = hf_dir(tmp_path / "nan")
    torch.save({"w": torch.tensor([1.0, float("nan")])}, path / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"tensor 'w' holds 1 non-finite values") as err:
        read_hf_dir(path)
    assert str(path / "pytorch_model.bin") in str(err.value)


def sharded(path: pathlib.Path, weight_map: dict, shards: dict) -> pathlib.Path:
    hf_dir(path)
    for name, tensors in shards.items():
        safetensors.numpy.save_file(tensors, str(path / name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def test_sharded_index_problems(tmp_path):
    w = {"a": np.ones(2, np.float32)}
    cases = [
        ("missing shard", {"a": "model-1.safetensors", "b": "model-2.safetensors"},
         {"model-1.safetensors": w}, MissingInput,
         "model-2.safetensors: shard named in model.safetensors.index.json is missing"),
        ("outside the directory", {"a": "../model-1.safetensors"}, {"model-1.safetensors": w},
         InputError, r"weight_map\['a'\] is '../model-1.safetensors', expected the file name"),
        ("tensor not in its shard", {"a": "model-1.safetensors", "b": "model-1.safetensors"},
         {"model-1.safetensors": w}, InputError, "model-1.safetensors: lacks tensor 'b'"),
        ("no weight_map", None, {}, InputError, "no 'weight_map' object"),
        ("not a string", {"a": 3}, {}, InputError, r"weight_map\['a'\] is 3"),
    ]
    for i, (case, weight_map, shards, error, message) in enumerate(cases):
        path = sharded(tmp_path / f"case{i}", weight_map, shards)
        if weight_map is None:
            (path / "model.safetensors.index.json").write_text("[]")
            message = "holds a JSON list, expected an object"
        with pytest.raises(error, match=message) as err:
            read_hf_dir(path)
        assert str(path) in str(err.value), case


def test_bad_tokenizer_file(tmp_path):
    path = hf_dir(tmp_path / "tok", {"w": np.ones(2, np.float32)})
    (path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable tokenizer"):
        read_hf_dir(path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(MissingInput, match="tokenizer.json: missing"):
        read_hf_dir(path)


def test_neox_qkv_of_the_wrong_size_is_an_input_error():
    c = config_from_hf(NEOX, source="config.json")
    with pytest.raises(InputError, match="attention.query_key_value.weight' has shape \\(5, 64\\), "
                                         "which does not fit the gpt_neox config"):
        hf_to_params({"gpt_neox.layers.0.attention.query_key_value.weight": np.ones((5, 64), np.float32),
                      "gpt_neox.embed_in.weight": np.ones((300, 64), np.float32),
                      "gpt_neox.final_layer_norm.weight": np.ones(64, np.float32),
                      "gpt_neox.final_layer_norm.bias": np.ones(64, np.float32),
                      "embed_out.weight": np.ones((300, 64), np.float32),
                      **{f"gpt_neox.layers.{i}.{n}": np.ones(64, np.float32) for i in range(3) for n in
                         ("input_layernorm.weight", "input_layernorm.bias",
                          "post_attention_layernorm.weight", "post_attention_layernorm.bias")}},
                     c, source="config.json")


def test_jtrust_config_from_dict_names_the_file():
    good = json.loads(config_from_hf(LLAMA).to_json())
    assert ModelConfig.from_dict(good) == config_from_hf(LLAMA)
    for bad, message in [({**good, "d_model": "64"}, "'d_model' is \"64\" \\(a string\\), expected int"),
                         ({"family": "llama"}, r"fields \['vocab_size', .* are missing"),
                         ({**good, "n_kv_heads": 0}, "n_kv_heads=0 must be positive"),
                         ({**good, "colour": 1}, "unknown ModelConfig fields \\['colour'\\]"),
                         ([1], "holds a list")]:
        with pytest.raises(InputError, match=message) as err:
            ModelConfig.from_dict(bad, source="run/jtrust_config.json")
        assert str(err.value).startswith("run/jtrust_config.json: ")
