"""The one configuration type every model family shares.

A family is a set of choices (normalisation, positions, residual layout, MLP);
`ModelConfig` names them explicitly so one `Decoder` serves Llama-like models,
GPT-NeoX (Pythia) and GPT-2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from jtrust.core.errors import InputError

FAMILIES = ("llama", "gpt_neox", "gpt2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    norm: str  # "rms" | "layer"
    norm_eps: float
    position: str  # "rope" | "learned"
    rope_theta: float = 10000.0
    rotary_dim: int = 0  # leading dims of each head that rotate (partial rotary in NeoX)
    max_positions: int = 2048
    parallel_residual: bool = False  # NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    mlp: str = "swiglu"  # "swiglu" | "gelu" (exact erf) | "gelu_tanh"
    qkv_bias: bool = False
    out_bias: bool = False  # bias on attention output and MLP projections
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise InputError(f"unsupported model family {self.family!r}; jtrust supports {FAMILIES}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                     "max_positions"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name}={getattr(self, name)} must be positive")
        if self.n_heads % self.n_kv_heads:
            raise InputError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.position == "rope" and not 0 < self.rotary_dim <= self.head_dim:
            raise InputError(f"rotary_dim={self.rotary_dim} must be in (0, head_dim={self.head_dim}]")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | os.PathLike | None = None) -> "ModelConfig":
        """The config `to_json` wrote; `source` (its file) names it in errors."""
        where = f"{source}: " if source is not None else ""
        if not isinstance(d, dict):
            raise InputError(f"{where}holds {_kind(d)}, expected a ModelConfig object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise InputError(f"{where}unknown ModelConfig fields {sorted(unknown)}")
        missing = [n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING]
        if missing:
            raise InputError(f"{where}ModelConfig fields {missing} are missing; the file is "
                             "incomplete: re-create it with `jtrust convert`")
        for name, value in d.items():
            kinds = _FIELD_TYPES[fields[name].type]
            if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
                raise InputError(f"{where}ModelConfig field {name!r} is {_short(value)} "
                                 f"({_kind(value)}), expected {fields[name].type}")
        try:
            return cls(**d)
        except InputError as err:
            raise InputError(f"{where}{err}") from None


def config_from_hf(hf: dict[str, Any], source: str | os.PathLike | None = None) -> ModelConfig:
    """Translate a Hugging Face `config.json` dict into a `ModelConfig`.

    `source` (the config.json or checkpoint path) names the file in errors: a missing key, a
    value of the wrong type ("64" for 64), a non-positive size, heads that do not divide the
    width or an unsupported architecture raise `InputError` naming it and the key.
    """
    where = str(source) if source is not None else "the Hugging Face config"
    if not isinstance(hf, dict):
        raise InputError(f"{where}: holds {_kind(hf)}, expected a JSON object of settings "
                         "(the config.json written by save_pretrained)")
    c = _Keys(hf, where)
    model_type = c.opt_str("model_type")
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise InputError(f"{where}: 'architectures' is {_short(archs)}, expected a list of class "
                         "names such as [\"LlamaForCausalLM\"]")
    hf = _flatten_rope(hf, where)
    c = _Keys(hf, where)
    ids = dict(bos_token_id=c.token_id("bos_token_id"), eos_token_id=c.token_id("eos_token_id"),
               pad_token_id=c.token_id("pad_token_id"))
    if model_type in ("llama", "mistral", "qwen2") or any(
            a.startswith(("Llama", "Mistral", "Qwen2")) for a in archs):
        if hf.get("rope_scaling"):
            raise InputError(f"{where}: rope_scaling={hf['rope_scaling']} is not supported yet; "
                             "jtrust reads models with plain RoPE only")
        act = c.opt_str("hidden_act", "silu")
        if act != "silu":
            raise InputError(f"{where}: hidden_act={act!r}: llama-like models need 'silu'")
        d, n_heads = c.size("hidden_size"), c.size("num_attention_heads")
        n_kv = c.size("num_key_value_heads", n_heads)
        head_dim = c.size("head_dim", None)
        if head_dim is None:
            head_dim = _divide(where, d, "hidden_size", n_heads, "num_attention_heads")
        _multiple(where, n_heads, n_kv)
        _even(where, head_dim, "head_dim")
        bias = c.flag("attention_bias", False)
        return ModelConfig(
            family="llama", vocab_size=c.size("vocab_size"), d_model=d,
            n_layers=c.size("num_hidden_layers"), n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=head_dim, d_ff=c.size("intermediate_size"), norm="rms",
            norm_eps=c.positive("rms_norm_eps", 1e-6), position="rope",
            rope_theta=c.positive("rope_theta", 10000.0), rotary_dim=head_dim,
            max_positions=c.size("max_position_embeddings", 2048), mlp="swiglu",
            qkv_bias=model_type == "qwen2" or bias, out_bias=bias and model_type != "qwen2",
            tie_embeddings=c.flag("tie_word_embeddings", False), **ids)
    if model_type == "gpt_neox":
        d, n_heads = c.size("hidden_size"), c.size("num_attention_heads")
        head_dim = _divide(where, d, "hidden_size", n_heads, "num_attention_heads")
        pct = c.positive("rotary_pct", 0.25)
        rotary_dim = int(head_dim * pct)
        if not 0 < rotary_dim <= head_dim or rotary_dim % 2:
            raise InputError(f"{where}: rotary_pct={pct} gives {rotary_dim} rotary dims of "
                             f"head_dim={head_dim}; expected an even number in (0, {head_dim}]")
        return ModelConfig(
            family="gpt_neox", vocab_size=c.size("vocab_size"), d_model=d,
            n_layers=c.size("num_hidden_layers"), n_heads=n_heads, n_kv_heads=n_heads,
            head_dim=head_dim, d_ff=c.size("intermediate_size"), norm="layer",
            norm_eps=c.positive("layer_norm_eps", 1e-5), position="rope",
            rope_theta=c.positive("rotary_emb_base", c.positive("rope_theta", 10000.0)),
            rotary_dim=rotary_dim, max_positions=c.size("max_position_embeddings", 2048),
            parallel_residual=c.flag("use_parallel_residual", True),
            mlp=_gelu_kind(c.opt_str("hidden_act", "gelu"), where, "hidden_act"),
            qkv_bias=c.flag("attention_bias", True), out_bias=True,
            tie_embeddings=c.flag("tie_word_embeddings", False), **ids)
    if model_type == "gpt2":
        d, n_heads = c.size("n_embd"), c.size("n_head")
        return ModelConfig(
            family="gpt2", vocab_size=c.size("vocab_size"), d_model=d, n_layers=c.size("n_layer"),
            n_heads=n_heads, n_kv_heads=n_heads,
            head_dim=_divide(where, d, "n_embd", n_heads, "n_head"),
            d_ff=c.size("n_inner", 4 * d), norm="layer",
            norm_eps=c.positive("layer_norm_epsilon", 1e-5), position="learned",
            max_positions=c.size("n_positions"),
            mlp=_gelu_kind(c.opt_str("activation_function", "gelu_new"), where,
                           "activation_function"), qkv_bias=True,
            out_bias=True, tie_embeddings=True, **ids)
    raise InputError(
        f"{where}: unsupported architecture model_type={model_type!r} architectures={archs}; "
        "jtrust supports llama-like (llama, mistral, qwen2), gpt_neox and gpt2")


_REQUIRED = object()
# ModelConfig's annotations (strings, under `from __future__ import annotations`) -> types
_FIELD_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
                "int | None": (int, type(None))}


class _Keys:
    """Typed reads of a config dict; a wrong or missing value is an InputError naming the key.
    A key set to null counts as absent (its default applies)."""

    def __init__(self, hf: dict[str, Any], where: str):
        self.hf, self.where = hf, where

    def _get(self, key: str, default, expected: str):
        value = self.hf.get(key)
        if value is None:
            if default is _REQUIRED:
                raise InputError(f"{self.where}: missing key {key!r} ({expected}); the config is "
                                 "incomplete: use the config.json the checkpoint was saved with")
            return default, False
        return value, True

    def _wrong(self, key: str, value, expected: str) -> InputError:
        return InputError(f"{self.where}: {key!r} is {_short(value)} ({_kind(value)}), expected "
                          f"{expected}; correct it in the config")

    def size(self, key: str, default=_REQUIRED) -> int:
        expected = "a positive integer"
        value, given = self._get(key, default, expected)
        if not given:
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(key, value, expected)
        if value <= 0:
            raise InputError(f"{self.where}: {key!r} is {value}, expected {expected}")
        return value

    def positive(self, key: str, default=_REQUIRED) -> float:
        expected = "a positive number"
        value, given = self._get(key, default, expected)
        if not given:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._wrong(key, value, expected)
        if not 0 < value < math.inf:
            raise InputError(f"{self.where}: {key!r} is {value}, expected {expected}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value, given = self._get(key, default, "true or false")
        if given and not isinstance(value, bool):
            raise self._wrong(key, value, "true or false")
        return value

    def opt_str(self, key: str, default: str | None = None) -> str | None:
        value, given = self._get(key, default, "a string")
        if given and not isinstance(value, str):
            raise self._wrong(key, value, "a string")
        return value

    def token_id(self, key: str) -> int | None:
        """A token id, or the first of a list of them (eos_token_id may list several)."""
        value, _ = self._get(key, None, "a token id")
        first = value[0] if isinstance(value, list) and value else None if value == [] else value
        if first is not None and (isinstance(first, bool) or not isinstance(first, int)):
            raise self._wrong(key, value, "a token id (an integer) or a list of them")
        return first


def _divide(where: str, width: int, width_key: str, heads: int, heads_key: str) -> int:
    if width % heads:
        raise InputError(f"{where}: {width_key}={width} is not divisible by {heads_key}={heads}; "
                         "the config is inconsistent: use the config.json the checkpoint was saved "
                         "with")
    return width // heads


def _multiple(where: str, n_heads: int, n_kv: int) -> None:
    if n_heads % n_kv:
        raise InputError(f"{where}: num_attention_heads={n_heads} is not a multiple of "
                         f"num_key_value_heads={n_kv}; the config is inconsistent")


def _even(where: str, value: int, key: str) -> None:
    if value % 2:
        raise InputError(f"{where}: {key}={value} is odd; rotary embeddings need an even head_dim")


def _kind(value) -> str:
    names = {list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _short(value) -> str:
    text = json.dumps(value) if isinstance(value, (str, list, dict)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _flatten_rope(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """transformers >= 5 nests rope settings in `rope_parameters`; read them as top-level keys."""
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise InputError(f"{where}: 'rope_parameters' is {_short(rope)}, expected an object")
    if rope.get("rope_type", "default") != "default":
        raise InputError(f"{where}: rope_type={rope['rope_type']!r} is not supported yet (only "
                         "'default')")
    out = dict(hf)
    if "rope_theta" in rope:
        out["rope_theta"] = out["rotary_emb_base"] = rope["rope_theta"]
    if "partial_rotary_factor" in rope:
        out["rotary_pct"] = rope["partial_rotary_factor"]
    return out


def _gelu_kind(act: str, where: str, key: str) -> str:
    if act == "gelu":
        return "gelu"
    if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return "gelu_tanh"
    raise InputError(f"{where}: unsupported activation {key}={act!r}; jtrust supports gelu, "
                     "gelu_new, gelu_pytorch_tanh and gelu_fast here")
