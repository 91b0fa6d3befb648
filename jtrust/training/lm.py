"""Language-model training through the generic loop: token examples, next-token losses, the
objectives (NLL; unlearning in `jtrust.training.unlearn`), LoRA, perplexity evaluations.

`train(model, examples, config, out_dir)` leaves a checkpoint *series* that `jtrust.load(out_dir)`
reads: besides the generic run files (`jtrust.io.runs`) each saved step holds the model's full
parameters (LoRA merged) under checkpoints/<step>/params, and the run keeps the tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jtrust.core.errors import InputError
from jtrust.core import store
from jtrust.models import lora as lora_lib
from jtrust.models.config import ModelConfig
from jtrust.models.decoder import forward
from jtrust.models.model import Model
from jtrust.models.tokenizer import Tokenizer
from jtrust.runtime import distributed, sharding
from jtrust.training.loop import DTYPES, TrainConfig, TrainState, batch_indices, fit


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
        raise InputError(f"{len(ids)} tokens are fewer than one window of {seq_len + 1}")
    windows = ids[: n * (seq_len + 1)].reshape(n, seq_len + 1)
    ones = np.ones((n, seq_len), np.int32)
    return Examples(windows[:, :-1], ones, windows[:, 1:], ones.astype(np.float32))


def prompt_answer_examples(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], seq_len: int,
                           ) -> Examples:
    """Supervised pairs: the loss covers the answer tokens and the closing EOS, not the prompt.
    Rows are right-padded to seq_len; pairs longer than that are an error."""
    if not pairs:
        raise InputError("no (prompt, answer) pairs to train on")
    prompts, answers = [], []
    for prompt, answer in pairs:
        p, a = tokenizer.encode(prompt), answer_ids(tokenizer, answer)
        if len(p) + len(a) > seq_len + 1:
            raise InputError(f"a pair has {len(p) + len(a)} tokens, more than seq_len + 1 = {seq_len + 1}: "
                             f"{prompt[:60]!r}; raise seq_len or shorten it")
        prompts.append(p), answers.append(a)
    return token_examples(prompts, answers, seq_len, tokenizer.pad_id)


def answer_ids(tokenizer: Tokenizer, answer: str) -> list[int]:
    """An answer's token ids as it follows a prompt (no BOS), closed by EOS."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return tokenizer.backend.encode(answer, add_special_tokens=False).ids + eos


def token_examples(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], seq_len: int,
                   pad_id: int) -> Examples:
    """Rows prompt + answer (token ids, len <= seq_len + 1 each), right-padded to [N, seq_len];
    weight 1 on predicting each answer token, 0 on the prompt."""
    N = len(prompts)
    tokens = np.full((N, seq_len), pad_id, np.int32)
    targets = np.full((N, seq_len), pad_id, np.int32)
    mask = np.zeros((N, seq_len), np.int32)
    w = np.zeros((N, seq_len), np.float32)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        seq = list(p) + list(a)
        if len(seq) > seq_len + 1 or not p or not a:
            raise InputError(f"row {i}: a prompt and an answer of at most seq_len + 1 = {seq_len + 1} "
                             f"tokens together are needed, got {len(p)} + {len(a)}")
        tokens[i, : len(seq) - 1] = seq[:-1]
        targets[i, : len(seq) - 1] = seq[1:]
        mask[i, : len(seq) - 1] = 1
        w[i, len(p) - 1: len(seq) - 1] = 1.0  # the weight of predicting token i + 1
    return Examples(tokens, mask, targets, w)


def take(examples: Examples, rows: np.ndarray) -> Examples:
    return Examples(*(a[rows] for a in examples))


def group_rows(parts: Sequence[Examples]) -> Examples:
    """G Examples of the same [N, T] -> grouped rows [N, G * T] (member g in columns g*T:(g+1)*T),
    so the members of a group (a preference pair, an anchor's paraphrases) stay in one row
    through shuffling and micro-batching."""
    return Examples(*(np.concatenate(arrays, axis=1) for arrays in zip(*parts)))


def ungroup(batch: Examples, groups: int) -> Examples:
    """Grouped rows [B, G * T] -> sequence rows [G * B, T]: every row's member 0, then member 1, ..."""
    T = batch.tokens.shape[1] // groups
    return Examples(*(jnp.concatenate([a[:, g * T:(g + 1) * T] for g in range(groups)]) for a in batch))


# ---------------------------------------------------------------------------------------------
# losses

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


def lm_loss(model_config: ModelConfig, config: TrainConfig, objective: Objective = NLL) -> Callable:
    """The generic loop's loss_fn for a language model: frozen = {"base": base parameters when
    training LoRA adapters (else None), "reference": the objective's reference parameters}."""
    dtype = DTYPES[config.dtype]

    def loss_fn(trainable, frozen, batch):
        params = full_params(trainable, frozen["base"], config)
        return objective.fn(params, frozen["reference"], batch, config=model_config, dtype=dtype)

    return loss_fn


# ---------------------------------------------------------------------------------------------
# evaluation

def perplexity_eval(examples: Examples, batch_size: int = 16, name: str = "val") -> Callable[[Model], dict]:
    """An evaluation callback: token-weighted mean NLL and perplexity of `examples`."""
    if len(examples.tokens) == 0:
        raise InputError("the evaluation set is empty")
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
# the run

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
    streams = dict(examples) if isinstance(examples, Mapping) else {"": examples}
    if not streams:
        raise InputError("no example streams given")
    for name, ex in streams.items():
        _check_examples(ex, model.config, config, name)
    data_hash = (store.arrays_hash(examples) if not isinstance(examples, Mapping) else store.text_hash(
        "".join(f"{k}:{store.arrays_hash(streams[k])}" for k in sorted(streams))))
    manifest = {"model_config": json.loads(model.config.to_json()), "examples_sha256": data_hash,
                "base": {"name": model.name, "checkpoint_hash": model.checkpoint_hash}}
    if objective is not NLL:
        manifest["objective"] = objective.name

    trainable = (lora_lib.init_adapters(model.params, config.lora, jax.random.key(config.seed))
                 if config.lora else jax.tree.map(jnp.copy, model.params))  # the step donates its state
    frozen = {"base": model.params if config.lora else None, "reference": reference}
    if mesh is not None:  # placed here too: the checkpoints merge adapters into this copy of the base
        frozen = distributed.place(frozen, sharding.tree_shardings(frozen, mesh))

    def batches(step: int):
        batch = {name: _micro_batches(ex, config, step, i) for i, (name, ex) in enumerate(streams.items())}
        return batch[""] if "" in batch else batch

    def on_checkpoint(step: int, state: TrainState) -> tuple[dict, dict]:
        current = _as_model(model, state, frozen["base"], config, step)
        record = {}
        for evaluate in evals:
            record.update(evaluate(current))
        return record, {"params": current.params}

    tokens = sum(config.batch_size * ex.tokens.shape[1] for ex in streams.values())
    result = fit(lm_loss(model.config, config, objective), trainable, batches, config, out_dir,
                 manifest=manifest, frozen=frozen, files=model.tokenizer.to_files(),
                 on_checkpoint=on_checkpoint, items_per_step=("tokens", tokens), mesh=mesh,
                 progress=progress, stop_after=stop_after)
    final = _as_model(model, result.state, frozen["base"], config, result.step)
    return TrainResult(final, result.run_dir, result.metrics)


def _micro_batches(examples: Examples, config: TrainConfig, step: int, stream: int) -> Examples:
    """The step's rows of one stream as [accumulation, micro, T]; stream i > 0 shuffles with its
    own seed, so streams of equal size do not move in lockstep."""
    rows = batch_indices(len(examples.tokens), config.batch_size, step, config.seed + 1_000_003 * stream)
    micro = config.batch_size // config.accumulation
    return Examples(*(a.reshape(config.accumulation, micro, *a.shape[1:]) for a in take(examples, rows)))


def _as_model(model: Model, state: TrainState, base: Any, config: TrainConfig, step: int) -> Model:
    return model.with_params(full_params(state.trainable, base, config), name=f"step{step}",
                             checkpoint_hash=f"{model.checkpoint_hash}-train-step{step}")


def _check_examples(examples: Examples, model_config: ModelConfig, config: TrainConfig,
                    stream: str = "") -> None:
    what = f"the {stream!r} examples" if stream else "the examples"
    if len(examples.tokens) == 0:
        raise InputError(f"no training examples in {what}")
    shapes = {a.shape for a in examples}
    if len(shapes) != 1 or len(examples.tokens.shape) != 2:
        raise InputError(f"{what} must be four [N, T] arrays, got shapes {sorted(shapes)}")
    top = int(max(examples.tokens.max(), examples.targets.max()))
    if top >= model_config.vocab_size or min(examples.tokens.min(), examples.targets.min()) < 0:
        raise InputError(f"token id {top} in {what} is outside the model's vocabulary of "
                         f"{model_config.vocab_size}: they were tokenized for another model")
    if not examples.weights.sum() > 0:
        raise InputError(f"every loss weight in {what} is zero: nothing to train on")
