"""The training loop every method reuses: pre-training, fine-tuning (full or LoRA), unlearning,
detoxification. `train(model, examples, config, out_dir)` leaves a checkpoint *series* that
`jtrust.load(out_dir)` reads.

One step = `accumulation` micro-batches scanned inside one compiled program; the loss is the
token-weighted mean over the whole step, so accumulating gives the full batch's gradient.
Batches are a pure function of (seed, step), so a resumed run sees the data a straight run
would have seen and ends with the same parameters. With a `Mesh`, batches are split over its
'data' axis and the state is replicated (data parallel; XLA inserts the gradient all-reduce).

Layout of out_dir:
  jtrust_run.json                 model config, train config, base checkpoint (for resume checks)
  tokenizer.json, jtrust_tokenizer.json
  metrics.jsonl                   one JSON object per logged step or evaluation
  checkpoints/<step>/params       full model parameters (LoRA merged): what `jtrust.load` reads
  checkpoints/<step>/state        step, trainable parameters, optimizer state: what resume reads
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from jtrust import lora as lora_lib
from jtrust.loading import RUN_MARKER, content_hash
from jtrust.model import Model
from jtrust.models.config import ModelConfig
from jtrust.models.decoder import forward
from jtrust.tokenizer import Tokenizer

RUN_FORMAT = 1
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
            raise ValueError("steps, batch_size and accumulation must be >= 1")
        if self.batch_size % self.accumulation:
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of accumulation={self.accumulation}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', not {self.schedule!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {self.dtype!r}")
        bad = [s for s in self.save_steps if not 0 <= s <= self.steps]
        if bad:
            raise ValueError(f"save_steps {bad} are outside 0..{self.steps}")

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


# ---------------------------------------------------------------------------------------------
# data

class Examples(NamedTuple):
    """Training rows, all [N, T]: input ids, attention mask, next-token targets, loss weights."""

    tokens: np.ndarray
    mask: np.ndarray
    targets: np.ndarray
    weights: np.ndarray


def packed_examples(ids: np.ndarray, seq_len: int) -> Examples:
    """Non-overlapping windows of a token stream [n] (documents joined by EOS): [n // (T+1), T]."""
    ids = np.asarray(ids, np.int32)
    n = len(ids) // (seq_len + 1)
    if n == 0:
        raise ValueError(f"{len(ids)} tokens are fewer than one window of {seq_len + 1}")
    windows = ids[: n * (seq_len + 1)].reshape(n, seq_len + 1)
    ones = np.ones((n, seq_len), np.int32)
    return Examples(windows[:, :-1], ones, windows[:, 1:], ones.astype(np.float32))


def prompt_answer_examples(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], seq_len: int,
                           ) -> Examples:
    """Supervised pairs: the loss covers the answer tokens and the closing EOS, not the prompt.
    Rows are right-padded to seq_len; pairs longer than that are an error."""
    if not pairs:
        raise ValueError("no (prompt, answer) pairs to train on")
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    rows, weights = [], []
    for prompt, answer in pairs:
        p, a = tokenizer.encode(prompt), tokenizer.backend.encode(answer, add_special_tokens=False).ids + eos
        seq = p + a
        if len(seq) > seq_len + 1:
            raise ValueError(f"a pair has {len(seq)} tokens, more than seq_len + 1 = {seq_len + 1}: "
                             f"{prompt[:60]!r}; raise seq_len or shorten it")
        rows.append(seq)
        weights.append([0.0] * (len(p) - 1) + [1.0] * len(a))  # weight of predicting token i+1
    N = len(rows)
    tokens = np.full((N, seq_len), tokenizer.pad_id, np.int32)
    targets = np.full((N, seq_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((N, seq_len), np.int32)
    w = np.zeros((N, seq_len), np.float32)
    for i, (seq, wt) in enumerate(zip(rows, weights)):
        tokens[i, : len(seq) - 1] = seq[:-1]
        targets[i, : len(seq) - 1] = seq[1:]
        mask[i, : len(seq) - 1] = 1
        w[i, : len(wt)] = wt
    return Examples(tokens, mask, targets, w)


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


def take(examples: Examples, rows: np.ndarray) -> Examples:
    return Examples(*(a[rows] for a in examples))


# ---------------------------------------------------------------------------------------------
# loss and step

def token_log_probs(params: Any, batch: Examples, *, config: ModelConfig, dtype=jnp.float32,
                    ) -> tuple[jax.Array, jax.Array]:
    """(next-token log-probabilities [B, T, V], NLL of the targets [B, T]), float32."""
    logits = forward(params, batch.tokens, batch.mask, config=config, dtype=dtype).logits
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch.targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return logp, nll


def token_loss_sum(params: Any, batch: Examples, *, config: ModelConfig, dtype=jnp.float32,
                   ) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted next-token NLL, sum of weights) over a batch [B, T]; float32 scalars."""
    _, nll = token_log_probs(params, batch, config=config, dtype=dtype)
    w = batch.weights.astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)


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


def full_params(trainable: Any, frozen: Any, config: TrainConfig) -> Any:
    """The model's parameters: the trainable ones, or the frozen base with adapters merged."""
    return lora_lib.merge(frozen, trainable, config.lora) if config.lora else trainable


class Objective(NamedTuple):
    """What a step minimizes. fn(params, reference, batch, *, config, dtype) -> (numerator,
    weight, metrics): the step minimizes sum(numerator) / sum(weight) over its micro-batches.
    `batch` is one micro-batch of the examples (an Examples, or a dict of them by stream name);
    `reference` is the frozen reference parameters given to `train` (or None). The name goes
    into the run manifest, so a resumed run cannot silently change objective."""
    name: str
    fn: Callable


def _nll(params, reference, batch, *, config, dtype):
    total, count = token_loss_sum(params, batch, config=config, dtype=dtype)
    return total, count, {}


NLL = Objective("nll", _nll)  # token-weighted next-token NLL: pre-training and fine-tuning


def make_train_step(model_config: ModelConfig, config: TrainConfig,
                    optimizer: optax.GradientTransformation, objective: Objective = NLL) -> Callable:
    """step(state, frozen, reference, micro_batches [A, b, T]) -> (state, metrics); pure, for jit."""
    dtype = DTYPES[config.dtype]

    def loss_sum(trainable, frozen, reference, batch):
        value, weight, aux = objective.fn(full_params(trainable, frozen, config), reference, batch,
                                          config=model_config, dtype=dtype)
        return value, (weight, aux)

    def step(state: TrainState, frozen: Any, reference: Any, micro_batches):
        def one(carry, batch):
            grads, loss, count = carry
            (l, (n, aux)), g = jax.value_and_grad(loss_sum, has_aux=True)(state.trainable, frozen,
                                                                          reference, batch)
            return (jax.tree.map(jnp.add, grads, g), loss + l, count + n), aux

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        (grads, loss, count), aux = jax.lax.scan(one, (zeros, 0.0, 0.0), micro_batches)
        count = jnp.maximum(count, 1e-9)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss / count, "grad_norm": optax.global_norm(grads),
                   **{k: v.mean() for k, v in aux.items()}}
        return TrainState(state.step + 1, trainable, opt_state), metrics

    return step


# ---------------------------------------------------------------------------------------------
# evaluation

def perplexity_eval(examples: Examples, batch_size: int = 16, name: str = "val") -> Callable[[Model], dict]:
    """An evaluation callback: token-weighted mean NLL and perplexity of `examples`."""
    if len(examples.tokens) == 0:
        raise ValueError("the evaluation set is empty")
    loss_fn = jax.jit(token_loss_sum, static_argnames=("config", "dtype"))

    def evaluate(model: Model) -> dict[str, float]:
        total, count = 0.0, 0.0
        for start in range(0, len(examples.tokens), batch_size):
            rows = start + np.arange(batch_size)
            real = rows < len(examples.tokens)  # the last batch is padded (one shape: one compile)
            batch = take(examples, np.where(real, rows, 0))
            batch = batch._replace(weights=batch.weights * real[:, None])
            s, n = loss_fn(model.params, batch, config=model.config)
            total, count = total + float(s), count + float(n)
        loss = total / max(count, 1.0)
        return {f"{name}_loss": loss, f"{name}_ppl": float(np.exp(loss))}

    return evaluate


# ---------------------------------------------------------------------------------------------
# the loop

@dataclasses.dataclass(frozen=True)
class TrainResult:
    model: Model  # the final parameters (LoRA merged)
    run_dir: pathlib.Path
    metrics: list[dict]  # everything in metrics.jsonl


def train(model: Model, examples: Examples | Mapping[str, Examples], config: TrainConfig,
          out_dir: str | os.PathLike, *, objective: Objective = NLL, reference: Any = None,
          evals: Sequence[Callable[[Model], dict]] = (), mesh: jax.sharding.Mesh | None = None,
          progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Train `model` on `examples` and keep the checkpoint series in `out_dir`.

    examples: one Examples, or several named streams (e.g. {"forget": ..., "retain": ...}) that
      each give batch_size rows per step in their own seeded order; the objective receives the
      matching Examples or dict.
    objective: what each step minimizes (default: token NLL); reference: frozen parameters the
      objective may read (e.g. NPO's reference model).
    If out_dir holds an unfinished run with the same model, config, objective and data, training
    resumes from its last checkpoint. `evals` are called with the current model at every save
    step (and every `eval_every` steps); their dicts go to metrics.jsonl. `stop_after` ends the
    loop after that many steps of this call (used to test resuming).
    """
    import orbax.checkpoint as ocp
    from jtrust import distributed

    out = pathlib.Path(out_dir)
    streams = dict(examples) if isinstance(examples, Mapping) else {"": examples}
    if not streams:
        raise ValueError("no example streams given")
    for name, ex in streams.items():
        _check_examples(ex, model.config, config, name)
    data_hash = (_examples_hash(examples) if not isinstance(examples, Mapping) else hashlib.sha256(
        "".join(f"{k}:{_examples_hash(streams[k])}" for k in sorted(streams)).encode()).hexdigest())
    manifest = {"format": RUN_FORMAT, "model_config": json.loads(model.config.to_json()),
                "train_config": config.to_dict(), "examples_sha256": data_hash,
                "base": {"name": model.name, "checkpoint_hash": model.checkpoint_hash}}
    if objective is not NLL:
        manifest["objective"] = objective.name
    _start_run(out, manifest, model.tokenizer)

    optimizer = make_optimizer(config)
    frozen = model.params if config.lora else None
    trainable = (lora_lib.init_adapters(model.params, config.lora, jax.random.key(config.seed))
                 if config.lora else jax.tree.map(jnp.copy, model.params))  # the step donates its state
    state = TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))

    replicated = batch_sharding = None
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
        if (config.batch_size // config.accumulation) % mesh.size:
            raise ValueError(f"micro-batch {config.batch_size // config.accumulation} does not split "
                             f"over {mesh.size} devices; choose batch_size / accumulation divisible by it")
        state = distributed.replicate(state, mesh)
        frozen = distributed.replicate(frozen, mesh) if frozen is not None else None
        reference = distributed.replicate(reference, mesh) if reference is not None else None

    save_steps = set(config.save_steps) | {config.steps}
    manager = ocp.CheckpointManager(
        (out / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.SpecificStepsPolicy(save_steps),
            cleanup_tmp_directories=True, max_to_keep=None, create=True))
    start = manager.latest_step()
    metrics = _read_metrics(out)
    if start is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = manager.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        state = TrainState(*restored["state"])
        metrics = [m for m in metrics if m["step"] <= start]
        _write_metrics(out, metrics)
        if start >= config.steps:
            manager.close()
            return TrainResult(_as_model(model, state, frozen, config, config.steps), out, metrics)
    start = start or 0

    step_fn = jax.jit(make_train_step(model.config, config, optimizer, objective), donate_argnums=0,
                      out_shardings=(replicated, replicated) if mesh is not None else None)

    def save_and_eval(step: int, state: TrainState) -> None:
        if not (step in save_steps or (config.eval_every and step % config.eval_every == 0)):
            return  # most steps: no model built, no LoRA merge
        current = _as_model(model, state, frozen, config, step)
        record = {"step": step, "kind": "eval"}
        for evaluate in evals:
            record.update(evaluate(current))
        if len(record) > 2:
            metrics.append(record)
            _append_metric(out, record)
        if step in save_steps:
            manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(current.params), state=ocp.args.StandardSave(state)))

    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    try:  # on an exception, finish the saves already started: the next run resumes from them
        if start == 0 and 0 in save_steps:
            save_and_eval(0, state)
        bar = tqdm.tqdm(range(start, end), initial=start, total=config.steps, desc="train", unit="step",
                        disable=not progress)
        window_tokens, window_start = 0.0, time.perf_counter()
        for step in bar:
            batch = {name: _micro_batches(ex, config, step, i) for i, (name, ex) in enumerate(streams.items())}
            batch = batch[""] if "" in batch else batch
            if mesh is not None:
                batch = distributed.put(batch, batch_sharding)
            state, out_metrics = step_fn(state, frozen, reference, batch)
            done = step + 1
            window_tokens += sum(config.batch_size * ex.tokens.shape[1] for ex in streams.values())
            if done % config.log_every == 0 or done == config.steps:
                loss = float(out_metrics["loss"])  # waits for the step: the timing below is honest
                elapsed = time.perf_counter() - window_start
                record = {"step": done, "kind": "train", "loss": loss,
                          **{k: float(v) for k, v in out_metrics.items() if k != "loss"},
                          "learning_rate": float(schedule(config)(done - 1)),
                          "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
                metrics.append(record)
                _append_metric(out, record)
                bar.set_postfix(loss=f"{loss:.3f}")
                window_tokens, window_start = 0.0, time.perf_counter()
            save_and_eval(done, state)
        bar.close()
    finally:
        manager.wait_until_finished()
        manager.close()
    return TrainResult(_as_model(model, state, frozen, config, end), out, metrics)


def _micro_batches(examples: Examples, config: TrainConfig, step: int, stream: int) -> Examples:
    """The step's rows of one stream as [accumulation, micro, T]; stream i > 0 shuffles with its
    own seed, so streams of equal size do not move in lockstep."""
    rows = batch_indices(len(examples.tokens), config.batch_size, step, config.seed + 1_000_003 * stream)
    micro = config.batch_size // config.accumulation
    return Examples(*(a.reshape(config.accumulation, micro, *a.shape[1:]) for a in take(examples, rows)))


def _as_model(model: Model, state: TrainState, frozen: Any, config: TrainConfig, step: int) -> Model:
    return model.with_params(full_params(state.trainable, frozen, config), name=f"step{step}",
                             checkpoint_hash=f"{model.checkpoint_hash}-train-step{step}")


def _check_examples(examples: Examples, model_config: ModelConfig, config: TrainConfig,
                    stream: str = "") -> None:
    what = f"the {stream!r} examples" if stream else "the examples"
    if len(examples.tokens) == 0:
        raise ValueError(f"no training examples in {what}")
    shapes = {a.shape for a in examples}
    if len(shapes) != 1 or len(examples.tokens.shape) != 2:
        raise ValueError(f"{what} must be four [N, T] arrays, got shapes {sorted(shapes)}")
    top = int(max(examples.tokens.max(), examples.targets.max()))
    if top >= model_config.vocab_size or min(examples.tokens.min(), examples.targets.min()) < 0:
        raise ValueError(f"token id {top} in {what} is outside the model's vocabulary of "
                         f"{model_config.vocab_size}: they were tokenized for another model")
    if not examples.weights.sum() > 0:
        raise ValueError(f"every loss weight in {what} is zero: nothing to train on")


def _examples_hash(examples: Examples) -> str:
    h = hashlib.sha256()
    for a in examples:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _start_run(out: pathlib.Path, manifest: dict, tokenizer: Tokenizer) -> None:
    """Write the run manifest and tokenizer, or check that an existing run is the same run."""
    marker = out / RUN_MARKER
    if jax.process_index() != 0:  # process 0 writes; orbax coordinates the checkpoints itself
        return
    if marker.exists():
        old = json.loads(marker.read_text())
        for key in ("model_config", "train_config", "examples_sha256", "base", "objective"):
            if old.get(key) != manifest.get(key):
                raise ValueError(f"{out} holds a run with another {key.replace('_', ' ')} "
                                 f"({old.get(key)} vs {manifest.get(key)}); resume it with the same "
                                 "settings, or choose another output directory")
        return
    out.mkdir(parents=True, exist_ok=True)
    for fname, text in tokenizer.to_files().items():
        _write_atomic(out / fname, text)
    _write_atomic(marker, json.dumps(manifest, indent=2))  # last: its presence means "a run"


def _write_atomic(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_metrics(out: pathlib.Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            pass
    return records


def _write_metrics(out: pathlib.Path, records: list[dict]) -> None:
    if jax.process_index() != 0:
        return
    _write_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def _append_metric(out: pathlib.Path, record: dict) -> None:
    if jax.process_index() != 0:
        return
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
