"""Memory planning: per-device bytes of a task on a (data, fsdp, model) mesh, before running it.

`estimate(config, task, sizes, shape)` counts, per device, from the shapes alone:

    parameters   every weight, split by `jtrust.runtime.sharding`'s rules
    gradients    float32 copies of the trained weights, split the same way: three in a training
                 step (the micro-batches' running sum, this micro-batch's, the optimizer's update),
                 two for attribution (the result and the backward pass's per-layer buffer)
    optimizer    Adam's two moments, split the same way (train)
    kv_cache     keys and values of every layer: the prompts' cache (an input) and the samples'
                 (prompts x samples rows, the output), rows split over data x fsdp (generate)
    activations  the largest live set of intermediates (formulas in `_activations`; an estimate)

`compiled(config, task, mesh, shape)` lowers and compiles the very program jtrust runs for the
task (extraction's forward, generation's decode loop, the training step, the gradient of a batch)
on abstract parameters (`jax.eval_shape`: nothing is allocated) and returns XLA's memory analysis
per device, which the estimate is checked against. Compiling needs the mesh's devices to exist;
on CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=N` makes N (the `jtrust plan` command
re-runs itself with enough of them). `smallest_mesh` finds the fewest devices on which a task
fits a device of a given size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jtrust.core.errors import InputError
from jtrust.models.config import ModelConfig, config_from_hf
from jtrust.models.decoder import init_cache, init_params
from jtrust.runtime import sharding

TASKS = ("extract", "generate", "train", "attribute")
PARTS = ("parameters", "gradients", "optimizer", "kv_cache", "activations")
GIB = 2 ** 30

# model shapes from the checkpoints' published config.json files (no weights needed to plan)
SHAPES: dict[str, dict] = {
    "llama-2-7b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000,
                       hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2),
    "mistral-7b": dict(architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=32000,
                       hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                       rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the task processes: `batch` rows of `seq_len` tokens (train, attribute, extract); for
    generate, `batch` prompts of `seq_len` tokens, `samples` each, `new_tokens` new tokens."""
    batch: int = 8
    seq_len: int = 512
    samples: int = 1
    new_tokens: int = 64
    dtype: str = "float32"  # parameters' dtype (training keeps float32 weights and moments)

    def __post_init__(self):
        for name in ("batch", "seq_len", "samples", "new_tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise InputError(f"dtype must be float32 or bfloat16, not {self.dtype!r}")


def model_config(spec: str) -> ModelConfig:
    """A shape name (`SHAPES`), a Hugging Face config.json (or the folder holding one), or
    anything `jtrust.load` reads (its config only is used)."""
    if spec in SHAPES:
        return config_from_hf(SHAPES[spec], spec)
    path = pathlib.Path(spec)
    file = path / "config.json" if path.is_dir() else path
    if file.suffix == ".json" and file.is_file():
        hf = json.loads(file.read_text())
        return ModelConfig.from_dict(hf, file) if "family" in hf else config_from_hf(hf, file)
    from jtrust.io.loading import load
    try:
        return load(spec).config
    except InputError as e:
        raise InputError(f"{e}; or give a shape name ({', '.join(SHAPES)}) or a config.json") from None


@functools.lru_cache(maxsize=16)  # smallest_mesh estimates dozens of meshes of one model
def abstract_params(config: ModelConfig, dtype: str = "float32") -> Any:
    """The parameter tree as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    shapes = jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)), shapes)


def estimate(config: ModelConfig, task: str, sizes: dict[str, int], shape: Shape = Shape()) -> dict[str, int]:
    """Per-device bytes of each part (`PARTS`) and their "total", from shapes alone."""
    _check_task(task)
    groups = sizes["data"] * sizes["fsdp"]
    if task in ("train", "attribute") and shape.batch % groups:
        raise InputError(f"batch {shape.batch} does not split over data x fsdp = {groups} devices "
                         "(training and attribution need a multiple)")
    mesh = jax.sharding.AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)
    params = abstract_params(config, "float32" if task == "train" else shape.dtype)
    weights = sharding.per_device_bytes(params, mesh)
    f32 = sharding.per_device_bytes(abstract_params(config), mesh)
    parts = dict.fromkeys(PARTS, 0)
    parts["parameters"] = weights
    if task in ("train", "attribute"):
        parts["gradients"] = (3 if task == "train" else 2) * f32
    if task == "train":
        parts["optimizer"] = 2 * f32
    if task == "generate":
        rows = _per_device_rows(shape.batch, sizes) + _per_device_rows(shape.batch * shape.samples, sizes)
        slots = shape.seq_len - 1 + shape.new_tokens
        parts["kv_cache"] = 2 * config.n_layers * rows * slots * config.n_kv_heads * config.head_dim * 4
    parts["activations"] = _activations(config, task, sizes, shape)
    parts["total"] = sum(parts[p] for p in PARTS)
    return parts


def _per_device_rows(rows: int, sizes: dict[str, int]) -> int:
    return -(-rows // (sizes["data"] * sizes["fsdp"]))


def _activations(config: ModelConfig, task: str, sizes: dict[str, int], shape: Shape) -> int:
    """The live intermediates' bytes on one device (float32 compute), counted tensor by tensor:

    one block's forward: the residual stream, its normed copy and the block's output [R, T, d];
      q, k, v [R, T, (H + 2K) h / m]; attention scores and probabilities [R, H / m, T, T]; the
      MLP's gate, up and their product [R, T, F / m] (attention and MLP are not live together);
      with fsdp > 1, the block's gathered weights (split over model only);
    train / attribute (no rematerialisation): every layer keeps for the backward pass its input and
      two normed copies and the attention output [R, T, 4d], q, k, v and the pre-projection heads
      [R, T, (2H + 2K) h / m], the attention probabilities [R, H / m, T, T] and the MLP's three
      [R, T, F / m]; plus the logits and their log-softmax [R, T, V / m];
    extract: the captured last-token residuals [L, R, d]; generate: the prefill of B rows, then
      per decode step the logits [R, V], their softmax and the sampler's copy in blocks, and with fsdp > 1
      the embedding table gathered for the step's lookup [V / m, d].
    R = rows per device, T = tokens, m = the model axis' size.
    """
    m, c = sizes["model"], config
    heads = c.n_heads / m
    qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim / m

    def block(rows: int, length: int) -> float:
        resid = 3 * rows * length * c.d_model
        attention = rows * length * qkv + 2 * rows * heads * length * length
        mlp = 3 * rows * length * c.d_ff / m
        gathered = _block_weight_elements(c) / m if sizes["fsdp"] > 1 else 0
        return resid + max(attention, mlp) + gathered

    if task in ("train", "attribute"):
        rows, length = _per_device_rows(shape.batch, sizes), shape.seq_len
        saved = rows * length * (4 * c.d_model + (2 * c.n_heads + 2 * c.n_kv_heads) * c.head_dim / m + 3 * c.d_ff / m)
        saved += rows * heads * length * length
        logits = 2 * rows * length * c.vocab_size / m
        return int(4 * (c.n_layers * saved + logits + block(rows, length)))
    if task == "extract":
        rows = _per_device_rows(shape.batch, sizes)
        return int(4 * (block(rows, shape.seq_len) + c.n_layers * rows * c.d_model))
    prompts = _per_device_rows(shape.batch, sizes)
    rows = _per_device_rows(shape.batch * shape.samples, sizes)
    prefill = block(prompts, shape.seq_len)
    decode = block(rows, 1) + 3 * rows * c.vocab_size  # logits, their softmax, the sampler's blocks
    table = c.vocab_size * c.d_model / m if sizes["fsdp"] > 1 else 0
    return int(4 * (max(prefill, decode) + table))


def _block_weight_elements(c: ModelConfig) -> int:
    attention = c.d_model * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.d_model
    mlp = (3 if c.mlp == "swiglu" else 2) * c.d_model * c.d_ff
    return attention + mlp


# ---------------------------------------------------------------------------------------------
# XLA's own figures

def compiled(config: ModelConfig, task: str, mesh: Mesh, shape: Shape = Shape()) -> dict[str, int]:
    """XLA's memory analysis of the task's program compiled for `mesh` (per device): argument,
    output, alias (donated), temp bytes, and their "total" = argument + output - alias + temp."""
    _check_task(task)
    with sharding.keep_rows_split(mesh):
        lowered = _lower(config, task, mesh, shape)
    m = lowered.compile().memory_analysis()
    out = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
               alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes)
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _lower(config: ModelConfig, task: str, mesh: Mesh, shape: Shape):
    rows = NamedSharding(mesh, sharding.rows_spec(mesh))
    whole = NamedSharding(mesh, PartitionSpec())

    def placed(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    def ids(batch: int, length: int, dtype=jnp.int32, split=rows):
        return jax.ShapeDtypeStruct((batch, length), dtype, sharding=split)

    params = abstract_params(config, "float32" if task == "train" else shape.dtype)
    params = placed(params, sharding.tree_shardings(params, mesh))
    groups = sharding.row_groups(mesh)
    if task == "extract":
        from jtrust.models.decoder import Capture
        from jtrust.models.model import forward_jit
        batch = -(-shape.batch // groups) * groups
        return forward_jit.lower(params, ids(batch, shape.seq_len), ids(batch, shape.seq_len, bool),
                                 config=config, capture=Capture(("resid_post",), "last"),
                                 upto_layer=config.n_layers - 1, logits=False)
    if task == "generate":
        from jtrust.runtime.generate import Sampling, _decode
        prompts = shape.batch
        while (prompts * shape.samples) % groups:  # as `generate` pads the prompts
            prompts += 1
        split = rows if prompts % groups == 0 else whole
        cache = jax.eval_shape(lambda: init_cache(config, prompts, shape.seq_len - 1 + shape.new_tokens))
        kv = NamedSharding(mesh, PartitionSpec(None, *split.spec))
        cache = placed(cache, type(cache)(kv, kv, split))
        key = jax.eval_shape(lambda: jax.random.key(0))
        return _decode.lower(params, ids(prompts, shape.seq_len, split=split),
                             ids(prompts, shape.seq_len, bool, split=split), cache, key, (),
                             config=config, sampling=Sampling(1.0, top_p=0.9), max_new_tokens=shape.new_tokens,
                             n_samples=shape.samples, stop_ids=(config.eos_token_id or 0,), pad_id=0, mesh=mesh,
                             return_logits=False)
    from jtrust.training.lm import Examples, lm_loss
    from jtrust.training.loop import TrainConfig, TrainState, state_shardings, make_optimizer, make_train_step
    batch = -(-shape.batch // groups) * groups
    train_config = TrainConfig(steps=1, batch_size=batch)
    loss = lm_loss(config, train_config)
    frozen = {"base": None, "reference": None}
    if task == "attribute":  # the gradient of a batch's loss, the step every attribution method repeats
        examples = Examples(*(ids(batch, shape.seq_len, dtype) for dtype in (jnp.int32, bool, jnp.int32, jnp.float32)))
        grad = jax.jit(jax.grad(lambda p, b: loss(p, frozen, b)[0]), out_shardings=sharding.tree_shardings(params, mesh))
        return grad.lower(params, examples)
    optimizer = make_optimizer(train_config)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(optimizer.init, params))
    shardings = state_shardings(state, optimizer, mesh)
    state = placed(state, shardings)
    micro = NamedSharding(mesh, PartitionSpec(None, *sharding.rows_spec(mesh)))
    examples = Examples(*(jax.ShapeDtypeStruct((1, batch, shape.seq_len), dtype, sharding=micro)
                          for dtype in (jnp.int32, bool, jnp.int32, jnp.float32)))
    step = jax.jit(make_train_step(loss, optimizer), donate_argnums=0, out_shardings=(shardings, whole))
    return step.lower(state, frozen, examples)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise InputError(f"task {task!r}: choose one of {', '.join(TASKS)}")


# ---------------------------------------------------------------------------------------------
# which mesh a task needs

def candidate_meshes(devices: int) -> list[dict[str, int]]:
    """Layouts of `devices` devices worth comparing: all fsdp, fsdp x model 2 / 4 / 8 (tensor
    parallelism within a host), and data parallel over one fsdp group."""
    out = [dict(data=1, fsdp=devices, model=1)]
    out += [dict(data=1, fsdp=devices // m, model=m) for m in (2, 4, 8) if devices % m == 0 and devices > m]
    out += [dict(data=devices, fsdp=1, model=1)] if devices > 1 else []
    return out


def smallest_mesh(config: ModelConfig, task: str, device_bytes: int, shape: Shape = Shape(),
                  max_devices: int = 1024, verify=None) -> tuple[dict[str, int], int] | None:
    """(sizes, bytes per device) of the fewest devices (powers of two) on which the task fits
    `device_bytes`, the layout with the least per device first; None if none up to max_devices.
    verify(sizes) -> bytes (e.g. XLA's compiled total) confirms a layout the estimate accepts;
    one it refuses is passed over."""
    devices = 1
    while devices <= max_devices:
        fits = []
        for sizes in candidate_meshes(devices):
            try:
                total = estimate(config, task, sizes, shape)["total"]
            except InputError:  # an axis that does not divide a dimension
                continue
            if total <= device_bytes:
                fits.append((total, sizes))
        for total, sizes in sorted(fits, key=lambda f: f[0]):
            measured = total if verify is None else verify(sizes)
            if measured <= device_bytes:
                return sizes, measured
        devices *= 2
    return None


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def mesh_text(sizes: dict[str, int]) -> str:
    """{"data": 1, "fsdp": 4, "model": 2} -> "fsdp=4,model=2" (the --mesh flag's form)."""
    return ",".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "data=1"


def fake_cpu_devices_env(n: int) -> dict[str, str]:
    """The environment of a child process with `n` fake CPU devices (for compiling a mesh of n)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={n}"]))



def report(spec: str, task: str, sizes: dict[str, int], shape: Shape = Shape(), compile: bool = False,
           device_gib: tuple[float, ...] = (16, 32)) -> list[str]:
    """The `jtrust plan` printout: the estimate by part on `sizes`, XLA's compiled figure when
    `compile` (the process needs the devices), and the smallest mesh per device size (verified
    by compiling when `compile` and this process has the devices)."""
    _check_task(task)
    config = model_config(spec)
    what = (f"{shape.batch} prompts x {shape.samples} samples, {shape.seq_len} prompt + {shape.new_tokens} new tokens"
            if task == "generate" else f"batch {shape.batch} x {shape.seq_len} tokens")
    weights = "float32" if task == "train" else shape.dtype
    lines = [f"plan: {spec}, task {task}, mesh {mesh_text(sizes)} ({devices_text(sizes)}), {what}, {weights} weights"]
    parts = estimate(config, task, sizes, shape)
    lines += [f"  {name:<12} {gib(parts[name]):>8} GiB per device" for name in (*PARTS, "total")]
    if compile:
        xla = compiled(config, task, sharding.make_mesh(**sizes), shape)
        lines.append("  XLA compiled: " + ", ".join(f"{k} {gib(v)}" for k, v in xla.items()) + " GiB per device "
                     f"(estimate / XLA = {parts['total'] / xla['total']:.2f})")

        def verify(candidate):
            if math.prod(candidate.values()) > len(jax.devices()):
                return estimate(config, task, candidate, shape)["total"]  # no devices to compile for
            return compiled(config, task, sharding.make_mesh(**candidate), shape)["total"]
    else:
        verify = None
    for size in device_gib:
        found = smallest_mesh(config, task, int(size * GIB), shape, verify=verify)
        lines.append(f"  on {size:g} GiB devices: " + (
            f"mesh {mesh_text(found[0])} ({devices_text(found[0])}), {gib(found[1])} GiB per device"
            if found else "does not fit on up to 1024 devices"))
    return lines


def devices_text(sizes: dict[str, int]) -> str:
    n = math.prod(sizes.values())
    return f"{n} device" + ("s" if n > 1 else "")
