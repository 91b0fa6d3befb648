"""The training loop every method reuses, for any parameter pytree.

`fit(loss_fn, trainable, batches, config, out_dir)` trains a pytree (a language model or its
LoRA adapters, a sparse autoencoder, a probe, a reward model) and leaves a resumable run
directory (`jtrust.io.runs`). A loss states the model-specific part once:

  loss_fn(trainable, frozen, batch) -> (numerator, weight, metrics)

and a step minimizes sum(numerator) / sum(weight) over its micro-batches, so accumulating gives
the full batch's gradient (for token losses: the token-weighted mean over the whole step).
One step = `accumulation` micro-batches scanned inside one compiled program. `batches(step)` is
a pure function of the step (every leaf [accumulation, micro, ...]), so a resumed run sees the
data a straight run would have seen and ends with the same parameters. With a `Mesh`, batches
are split over its 'data' (and 'fsdp') axes and the state is laid out by
`jtrust.runtime.sharding`: replicated on a data-only mesh (data parallel: XLA inserts the
gradient all-reduce), decoder weights and their gradients and Adam moments split over 'fsdp' /
'model' when the mesh has them (XLA gathers each weight where it is used). Language-model
training (`jtrust.training.lm.train`) is one such loss.
Process 0 holds the run directory's lock (`jtrust.core.store.lock_dir`) for the whole call, so
a second run into the same directory waits up to `wait` seconds, then stops naming the first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.sharding import NamedSharding, PartitionSpec

from jtrust.core import store
from jtrust.core.errors import InputError
from jtrust.io import runs
from jtrust.models import decoder
from jtrust.models import lora as lora_lib
from jtrust.runtime import distributed, sharding

RUN_FORMAT = 1
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# loss_fn(trainable, frozen, batch) -> (numerator, weight, metrics): see the module docstring
LossFn = Callable[[Any, Any, Any], tuple[jax.Array, jax.Array, dict]]
# post_update(trainable, array_metrics) -> trainable: see make_train_step
PostUpdate = Callable[[Any, dict], Any]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 32  # sequences per optimizer step, over all devices and micro-batches
    accumulation: int = 1  # micro-batches per step; must divide batch_size
    learning_rate: float = 3e-4
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" (decays to min_lr_ratio * learning_rate) | "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0  # AdamW, on weight matrices only (not norms or biases)
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0  # global-norm clip; 0 = off
    dtype: str = "float32"  # compute dtype; parameters and optimizer state stay float32
    lora: lora_lib.LoraConfig | None = None  # train adapters only, base weights frozen
    save_steps: tuple[int, ...] = ()  # the checkpoint series (step 0 = before training); the last step is always saved
    eval_every: int = 0  # also evaluate every N steps (0: only at save steps)
    log_every: int = 10
    seed: int = 0  # data order and adapter initialisation

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.accumulation < 1:
            raise InputError("steps, batch_size and accumulation must be >= 1")
        if self.batch_size % self.accumulation:
            raise InputError(f"batch_size={self.batch_size} is not a multiple of accumulation={self.accumulation}")
        if self.schedule not in ("cosine", "constant"):
            raise InputError(f"schedule must be 'cosine' or 'constant', not {self.schedule!r}")
        if self.dtype not in DTYPES:
            raise InputError(f"dtype must be one of {sorted(DTYPES)}, not {self.dtype!r}")
        bad = [s for s in self.save_steps if not 0 <= s <= self.steps]
        if bad:
            raise InputError(f"save_steps {bad} are outside 0..{self.steps}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return dict(d, lora=lora_lib.to_dict(self.lora) if self.lora else None,
                    save_steps=sorted(set(self.save_steps)))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d, save_steps=tuple(d.get("save_steps", ())))
        d["lora"] = lora_lib.from_dict(d.get("lora"))
        return cls(**d)


def log_spaced_steps(steps: int, count: int, dense_until: int = 0) -> tuple[int, ...]:
    """About `count` save steps: 0, every step up to `dense_until`, then log-spaced to `steps`."""
    grid = set(range(min(dense_until, steps) + 1))
    n = max(count - len(grid), 2)
    while True:
        points = grid | {int(round(s)) for s in np.geomspace(max(dense_until, 1), steps, n)} | {steps}
        if len(points) >= count or n > 10 * count:
            return tuple(sorted(points))
        n += 1


def batch_indices(n_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Rows of step `step` [batch_size]: a seeded permutation per epoch, read in order.
    A pure function of its arguments, which is what makes resumed runs repeat straight ones."""
    positions = step * batch_size + np.arange(batch_size)
    epochs, offsets = np.divmod(positions, n_examples)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n_examples)
        out[epochs == epoch] = perm[offsets[epochs == epoch]]
    return out


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    trainable: Any  # the full parameters, or the LoRA adapters
    opt_state: Any


def schedule(config: TrainConfig) -> optax.Schedule:
    """Learning rate by step: linear warm-up, then cosine decay or constant."""
    lr = config.learning_rate
    decay = max(config.steps - config.warmup_steps, 1)
    main = (optax.cosine_decay_schedule(lr, decay, alpha=config.min_lr_ratio)
            if config.schedule == "cosine" else optax.constant_schedule(lr))
    if not config.warmup_steps:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, config.warmup_steps), main],
                                [config.warmup_steps])


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with weight decay on weight matrices (kernels,
    embeddings, LoRA factors), not on norms or biases."""
    # by name, not rank: stacked norm scales are [L, d] but must not decay
    matrices = lambda tree: jax.tree_util.tree_map_with_path(
        lambda path, x: getattr(path[-1], "key", None) in ("kernel", "embedding", "a", "b"), tree)
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip else []
    parts.append(optax.adamw(schedule(config), b1=config.b1, b2=config.b2,
                             weight_decay=config.weight_decay, mask=matrices))
    return optax.chain(*parts)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    post_update: PostUpdate | None = None) -> Callable:
    """step(state, frozen, micro_batches [A, b, ...]) -> (state, metrics); pure, for jit.

    The loss's scalar metrics are logged (their mean over micro-batches); its array metrics
    (each [A, ...] after the scan) are not, but go with the updated parameters to
    `post_update(trainable, arrays) -> trainable`, applied after the optimizer step: a
    projection (unit-norm dictionary rows) or bookkeeping the gradient cannot do (a sparse
    autoencoder's tokens since each latent fired)."""

    def loss_sum(trainable, frozen, batch):
        value, weight, aux = loss_fn(trainable, frozen, batch)
        return value, (weight, aux)

    def step(state: TrainState, frozen: Any, micro_batches):
        with decoder.first_order_products():  # traced here: the backward's products as XLA:CPU likes them
            return _step(state, frozen, micro_batches)

    def _step(state: TrainState, frozen: Any, micro_batches):
        def one(carry, batch):
            grads, loss, count = carry
            (l, (n, aux)), g = jax.value_and_grad(loss_sum, has_aux=True)(state.trainable, frozen, batch)
            return (jax.tree.map(jnp.add, grads, g), loss + l, count + n), aux

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        (grads, loss, count), aux = jax.lax.scan(one, (zeros, 0.0, 0.0), micro_batches)
        count = jnp.maximum(count, 1e-9)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        if post_update is not None:
            trainable = post_update(trainable, {k: v for k, v in aux.items() if v.ndim > 1})
        metrics = {"loss": loss / count, "grad_norm": optax.global_norm(grads),
                   **{k: v.mean() for k, v in aux.items() if v.ndim == 1}}
        return TrainState(state.step + 1, trainable, opt_state), metrics

    return step


class FitResult(NamedTuple):
    state: TrainState  # after the last step of this call
    run_dir: pathlib.Path
    metrics: list[dict]  # everything in metrics.jsonl
    step: int  # optimizer steps taken in all (config.steps once finished)


def fit(loss_fn: LossFn, trainable: Any, batches: Callable[[int], Any], config: TrainConfig,
        out_dir, *, manifest: dict, frozen: Any = None, files: dict[str, str] | None = None,
        on_checkpoint: Callable[[int, TrainState], tuple[dict, dict]] | None = None,
        items_per_step: tuple[str, float] | None = None, mesh: jax.sharding.Mesh | None = None,
        progress: bool = True, stop_after: int | None = None, wait: float = 0.0,
        post_update: PostUpdate | None = None) -> FitResult:
    """Train `trainable` (any pytree) by `loss_fn` and keep its checkpoints in `out_dir`.

    batches(step): the step's micro-batches, a pytree whose leaves are [accumulation, micro, ...].
    manifest: what identifies the run (data hash, model, objective...); `config` is added. An
      out_dir holding a run with another manifest is refused; the same run resumes from its last
      checkpoint. files: {name: text} written beside the manifest (e.g. a tokenizer).
    frozen: inputs the loss reads but does not train (base weights, a reference model).
    on_checkpoint(step, state) -> (metrics, pytrees): called at save steps and every
      `eval_every` steps; the metrics go to metrics.jsonl, the pytrees (e.g. {"params": the
      merged model}) are saved beside the state at save steps.
    items_per_step: ("tokens", n) logs n / seconds as "tokens_per_s".
    stop_after: end after that many steps of this call (used to test resuming).
    post_update: applied to the parameters after every optimizer step (`make_train_step`).
    wait: seconds to wait for another process training into out_dir to finish (then InputError).
    """
    out = pathlib.Path(out_dir)
    with contextlib.ExitStack() as locked:
        _open_run(out, {"format": RUN_FORMAT, **manifest, "train_config": config.to_dict()}, files,
                  locked, wait)
        return _fit(loss_fn, trainable, batches, config, out, frozen, on_checkpoint, items_per_step,
                    mesh, progress, stop_after, post_update)


def _open_run(out: pathlib.Path, manifest: dict, files: dict[str, str] | None,
              locked: contextlib.ExitStack, wait: float) -> None:
    """On process 0: lock `out` (held by `locked`), remove what a killed run left half-written
    and start or check the run there; every process raises if that failed."""
    error = None
    if jax.process_index() == 0:
        try:
            locked.enter_context(store.lock_dir(out, wait))
            store.clean_temp(out)
            runs.start_run(out, manifest, files)
        except (ValueError, OSError) as e:  # raised below, after the others learn of it
            error = e
    if jax.process_count() > 1:
        ok = distributed.broadcast_from_process_0(np.array([error is None], np.int32))[0]
        if error is None and not ok:
            raise InputError(f"process 0 could not open {out}; its error says why")
    if error is not None:
        raise error


def _fit(loss_fn, trainable, batches, config, out, frozen, on_checkpoint, items_per_step, mesh,
         progress, stop_after, post_update) -> FitResult:
    import orbax.checkpoint as ocp

    optimizer = make_optimizer(config)
    init = lambda t: TrainState(jnp.zeros((), jnp.int32), t, optimizer.init(t))
    layout = metric_sharding = batch_sharding = None
    if mesh is None:
        state = init(trainable)
    else:
        sharding.check_mesh(mesh)
        micro, groups = config.batch_size // config.accumulation, sharding.row_groups(mesh)
        if micro % groups:
            raise InputError(f"micro-batch {micro} does not split over the mesh's {groups} data x fsdp "
                             "devices; choose batch_size / accumulation divisible by it")
        layout = state_shardings(jax.eval_shape(init, trainable), optimizer, mesh)
        metric_sharding = NamedSharding(mesh, PartitionSpec())
        batch_sharding = NamedSharding(mesh, PartitionSpec(None, *sharding.rows_spec(mesh)))  # [A, micro, ...]
        # the moments are made in their shards: never a whole copy on one device
        state = jax.jit(init, out_shardings=layout)(distributed.place(trainable, layout.trainable))
        frozen = distributed.place(frozen, sharding.tree_shardings(frozen, mesh))

    save_steps = set(config.save_steps) | {config.steps}
    manager = runs.checkpoint_manager(out, save_steps)
    start = manager.latest_step()
    metrics = runs.read_metrics(out)
    if start is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = manager.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        state = TrainState(*restored["state"])
        metrics = [m for m in metrics if m["step"] <= start]
        runs.write_metrics(out, metrics)
        if start >= config.steps:
            manager.close()
            return FitResult(state, out, metrics, config.steps)
    start = start or 0

    step_fn = jax.jit(make_train_step(loss_fn, optimizer, post_update), donate_argnums=0,
                      out_shardings=(layout, metric_sharding) if mesh is not None else None)

    def checkpoint(step: int, state: TrainState) -> None:
        if not (step in save_steps or (config.eval_every and step % config.eval_every == 0)):
            return  # most steps: no callback (e.g. no LoRA merge)
        record, pytrees = on_checkpoint(step, state) if on_checkpoint else ({}, {})
        if record:
            record = {"step": step, "kind": "eval", **record}
            metrics.append(record)
            runs.append_metric(out, record)
        if step in save_steps:
            manager.save(step, args=ocp.args.Composite(
                **{k: ocp.args.StandardSave(v) for k, v in pytrees.items()},
                state=ocp.args.StandardSave(state)))

    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    try:  # on an exception, finish the saves already started: the next run resumes from them
        if start == 0 and 0 in save_steps:
            checkpoint(0, state)
        bar = tqdm.tqdm(range(start, end), initial=start, total=config.steps, desc="train", unit="step",
                        disable=not progress)
        window_items, window_start = 0.0, time.perf_counter()
        for step in bar:
            batch = batches(step)
            if mesh is not None:
                batch = distributed.put(batch, batch_sharding)
            with sharding.keep_rows_split(mesh):  # traced on the first call: rows stay split in the blocks
                state, out_metrics = step_fn(state, frozen, batch)
            done = step + 1
            window_items += items_per_step[1] if items_per_step else 0.0
            if done % config.log_every == 0 or done == config.steps:
                loss = float(out_metrics["loss"])  # waits for the step: the timing below is honest
                elapsed = time.perf_counter() - window_start
                record = {"step": done, "kind": "train", "loss": loss,
                          **{k: float(v) for k, v in out_metrics.items() if k != "loss"},
                          "learning_rate": float(schedule(config)(done - 1)),
                          "seconds": elapsed}  # the window's wall time, saves included: summed, the run's
                if items_per_step:
                    record[f"{items_per_step[0]}_per_s"] = window_items / max(elapsed, 1e-9)
                metrics.append(record)
                runs.append_metric(out, record)
                bar.set_postfix(loss=f"{loss:.3f}")
                window_items, window_start = 0.0, time.perf_counter()
            checkpoint(done, state)
        bar.close()
    finally:
        manager.wait_until_finished()
        manager.close()
    return FitResult(state, out, metrics, end)


def state_shardings(state: TrainState, optimizer: optax.GradientTransformation, mesh) -> TrainState:
    """Where each part of the state lives on `mesh`: the trainable tree by `jtrust.runtime.sharding`'s
    rules (decoder weights split over fsdp / model, anything else replicated), each optimizer
    moment like the parameter it belongs to, counters replicated."""
    params = sharding.tree_shardings(state.trainable, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(optimizer, lambda _, s: s, state.opt_state, params,
                                transform_non_params=lambda _: replicated)
    return TrainState(replicated, params, opt)
