"""The named activation sites of a decoder block, as data.

`SITES` maps a site name to a `Site`: a one-line description and the trailing width
of that activation given the model's config. The decoder hands every site's value to
`site(name, value)` once per block; captures (`decoder.Capture`) and edits
(`interventions.Intervention`) refer to sites by name only, so adding a site is one
entry here plus one `site(...)` call in `decoder.py`.

Per block l (0-based), in the order the block computes them, with d = d_model,
H = n_heads, h = head_dim, f = d_ff (an activation is [B, T, width]):
  resid_pre   [d]    the block's input (the residual stream before block l)
  attn_in     [d]    ln1(resid_pre): the input of the q, k, v projections
  attn_heads  [H*h]  every head's output before the output projection, heads
                     concatenated head-major: reshape(..., H, h) gives head i at [..., i, :];
                     the input of o
  attn_out    [d]    the attention output after its output projection
  mlp_in      [d]    ln2(x): the input of gate / up (x = resid_pre with a parallel
                     residual, resid_pre + attn_out otherwise)
  mlp_hidden  [f]    act(gate) * up (swiglu) or act(up) (gelu): the input of down
  mlp_out     [d]    the MLP output after its down projection
  resid_post  [d]    the block's output (TracingLLM's representation of layer l)

`LINEAR_INPUTS` names the site holding each linear layer's input (layer names as in
`jtrust.models.lora.PROJECTIONS`); `linear_width` gives each layer's output width, the
shape of its output tap (`decoder.forward(..., taps=...)`). Together they give what
K-FAC / influence functions need per layer: input activations and output gradients.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from jtrust.core.errors import InputError
from jtrust.models.config import ModelConfig


class Site(NamedTuple):
    doc: str  # one line: what the activation is
    width: Callable[[ModelConfig], int]  # trailing dimension of the activation


_d_model = lambda c: c.d_model
_heads = lambda c: c.n_heads * c.head_dim
_d_ff = lambda c: c.d_ff

SITES: dict[str, Site] = {
    "resid_pre": Site("the block's input (the residual stream before block l)", _d_model),
    "attn_in": Site("ln1(resid_pre): the input of the q, k, v projections", _d_model),
    "attn_heads": Site("per-head attention outputs, heads concatenated [..., H*h]: the input of o",
                       _heads),
    "attn_out": Site("the attention output after its output projection", _d_model),
    "mlp_in": Site("ln2 of the MLP's input: the input of gate / up", _d_model),
    "mlp_hidden": Site("act(gate) * up (swiglu) or act(up) (gelu): the input of down", _d_ff),
    "mlp_out": Site("the MLP output after its down projection", _d_model),
    "resid_post": Site("the block's output (TracingLLM's representation of layer l)", _d_model),
}

# The residual stream and the two sublayer writes into it (the sites jtrust had first):
# resid_post = resid_pre + attn_out + mlp_out, every one of width d_model.
RESIDUAL_SITES = ("resid_pre", "attn_out", "mlp_out", "resid_post")

# linear layer -> the site that is its input
LINEAR_INPUTS = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "attn_heads",
                 "gate": "mlp_in", "up": "mlp_in", "down": "mlp_hidden"}

# linear layer -> its output width (q: H*h; k, v: K*h with K = n_kv_heads)
_LINEAR_OUT = {"q": _heads, "k": lambda c: c.n_kv_heads * c.head_dim,
               "v": lambda c: c.n_kv_heads * c.head_dim, "o": _d_model,
               "gate": _d_ff, "up": _d_ff, "down": _d_model}


def width(site: str, config: ModelConfig) -> int:
    """Trailing dimension of `site`'s activation for `config`."""
    check_site(site)
    return SITES[site].width(config)


def check_site(site: str) -> None:
    if site not in SITES:
        raise InputError(f"unknown site {site!r}; choose from {tuple(SITES)}")


def linears(config: ModelConfig) -> tuple[str, ...]:
    """The linear layers a block of `config` has (gelu MLPs have no gate), in LINEAR_INPUTS order."""
    return tuple(n for n in LINEAR_INPUTS if n != "gate" or config.mlp == "swiglu")


def linear_width(name: str, config: ModelConfig) -> int:
    """Output width of linear layer `name` (q, k, v, o, gate, up, down) for `config`."""
    if name not in linears(config):
        raise InputError(f"no linear layer {name!r} in a {config.family} ({config.mlp}) block; "
                         f"it has {linears(config)}")
    return _LINEAR_OUT[name](config)
