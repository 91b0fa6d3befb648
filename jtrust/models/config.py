"""The one configuration type every model family shares.

A family is a set of choices (normalisation, positions, residual layout, MLP);
`ModelConfig` names them explicitly so one `Decoder` serves Llama-like models,
GPT-NeoX (Pythia) and GPT-2.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

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
            raise ValueError(f"unsupported model family {self.family!r}; jtrust supports {FAMILIES}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.position == "rope" and not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"rotary_dim={self.rotary_dim} must be in (0, head_dim={self.head_dim}]")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**d)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Translate a Hugging Face `config.json` dict into a `ModelConfig`."""
    model_type = hf.get("model_type")
    hf = _flatten_rope(hf)
    archs = hf.get("architectures") or []
    ids = dict(bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")),
               pad_token_id=hf.get("pad_token_id"))
    if model_type in ("llama", "mistral", "qwen2") or any(
            a.startswith(("Llama", "Mistral", "Qwen2")) for a in archs):
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        if hf.get("rope_scaling"):
            raise ValueError(f"rope_scaling={hf['rope_scaling']} is not supported yet")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={hf['hidden_act']!r}: llama-like models need 'silu'")
        return ModelConfig(
            family="llama", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=head_dim,
            d_ff=hf["intermediate_size"], norm="rms", norm_eps=hf.get("rms_norm_eps", 1e-6),
            position="rope", rope_theta=hf.get("rope_theta", 10000.0), rotary_dim=head_dim,
            max_positions=hf.get("max_position_embeddings", 2048), mlp="swiglu",
            qkv_bias=model_type == "qwen2" or hf.get("attention_bias", False),
            out_bias=hf.get("attention_bias", False) and model_type != "qwen2",
            tie_embeddings=hf.get("tie_word_embeddings", False), **ids)
    if model_type == "gpt_neox":
        n_heads = hf["num_attention_heads"]
        head_dim = hf["hidden_size"] // n_heads
        return ModelConfig(
            family="gpt_neox", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"], n_heads=n_heads, n_kv_heads=n_heads,
            head_dim=head_dim, d_ff=hf["intermediate_size"], norm="layer",
            norm_eps=hf.get("layer_norm_eps", 1e-5), position="rope",
            rope_theta=hf.get("rotary_emb_base", hf.get("rope_theta", 10000.0)),
            rotary_dim=int(head_dim * hf.get("rotary_pct", 0.25)),
            max_positions=hf.get("max_position_embeddings", 2048),
            parallel_residual=hf.get("use_parallel_residual", True),
            mlp=_gelu_kind(hf.get("hidden_act", "gelu")), qkv_bias=hf.get("attention_bias", True),
            out_bias=True, tie_embeddings=hf.get("tie_word_embeddings", False), **ids)
    if model_type == "gpt2":
        d = hf["n_embd"]
        n_heads = hf["n_head"]
        return ModelConfig(
            family="gpt2", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"],
            n_heads=n_heads, n_kv_heads=n_heads, head_dim=d // n_heads,
            d_ff=hf.get("n_inner") or 4 * d, norm="layer",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), position="learned",
            max_positions=hf["n_positions"],
            mlp=_gelu_kind(hf.get("activation_function", "gelu_new")), qkv_bias=True,
            out_bias=True, tie_embeddings=True, **ids)
    raise ValueError(
        f"unsupported architecture model_type={model_type!r} architectures={archs}; "
        "jtrust supports llama-like (llama, mistral, qwen2), gpt_neox and gpt2")


def _flatten_rope(hf: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5 nests rope settings in `rope_parameters`; read them as top-level keys."""
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type={rope['rope_type']!r} is not supported yet (only 'default')")
    out = dict(hf)
    if "rope_theta" in rope:
        out["rope_theta"] = out["rotary_emb_base"] = rope["rope_theta"]
    if "partial_rotary_factor" in rope:
        out["rotary_pct"] = rope["partial_rotary_factor"]
    return out


def _gelu_kind(act: str) -> str:
    if act == "gelu":
        return "gelu"
    if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return "gelu_tanh"
    raise ValueError(f"unsupported activation {act!r}")


def _first(x):
    return x[0] if isinstance(x, list) else x
