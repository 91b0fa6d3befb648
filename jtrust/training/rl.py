"""On-policy fine-tuning with a known reward: RLOO (REINFORCE leave-one-out) with a KL penalty
to the base model, through the generation engine and the generic training step (LoRA or full).

"Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in
LLMs" (Ahmadian et al., arXiv 2402.14740). A reward is any callable texts [n] -> array [n]
(the training layer never imports an analysis); the reference is the model before tuning.
Iteration s, with batch_size = (prompts per step) * k:

  1. prompts: batch_size / k of them, `batch_indices(n_prompts, batch_size / k, s, seed)`;
  2. rollout: the current policy (base + adapters, merged) continues each prompt k times
     through `jtrust.runtime.generate` (KV cache, one prefill per prompt, temperature 1, no
     top-k / top-p: the samples come from pi itself) with key fold_in(key(seed), s); sample i
     is cut to L_i new tokens, L_i uniform in [min_new_tokens, max_new_tokens] (the first L
     tokens of a sample are a sample of L tokens: one compiled program for every length);
  3. score: r_i = reward(continuation texts)_i, and over the continuation's tokens (its stop
     token included) KL_i = sum_t log pi(y_t) - log pi_ref(y_t): log pi as the engine drew the
     tokens (`Generation.logprobs`), log pi_ref from a forward pass of the reference;
     R_i = r_i - kl_coef * KL_i    (the KL folded into the reward per sequence, as TRL's RLOOTrainer)
  4. advantage: A_i = R_i - mean of R over the other k - 1 samples of the same prompt;
  5. update: one optimizer step of `make_train_step` on
       loss = -(1 / batch_size) sum_i A_i sum_t log pi(y_it)      (A held fixed)
     whose gradient is the RLOO policy-gradient estimate; the rows are `Examples` whose loss
     weights hold A_i on the continuation's tokens (objective `POLICY_GRADIENT`).

The data of step s is a pure function of (parameters at step s, seed, s), so a run stopped and
resumed from a checkpoint repeats the straight run. `fit` is not reused as it stands: it asks
`batches(step)` for a step's data by the step alone and keeps the (donated) state to itself,
while a rollout needs the current parameters. So `rloo` drives `make_train_step`,
`make_optimizer` and `lm_loss` itself and keeps the run directory as `fit` does
(`jtrust.io.runs`): the manifest check, the lock, checkpoints/<step>/{params (merged), state},
metrics.jsonl (one "train" record per iteration), so `jtrust.load(out_dir)` reads a series.

    run = rloo(model, prompts, sentiment_reward, TrainConfig(steps=12, batch_size=32, learning_rate=2e-3,
               lora=LoraConfig(rank=16)), RLConfig(k=4, kl_coef=0.05), "runs/rloo")
    after = evaluate_policy(run.model, heldout, sentiment_reward, RLConfig(k=4), reference=model.params,
                            key=jax.random.key(1))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from scipy import stats

from jtrust.core import store
from jtrust.core.errors import InputError
from jtrust.io import runs
from jtrust.models import lora as lora_lib
from jtrust.models.config import ModelConfig
from jtrust.models.model import Model
from jtrust.runtime.generate import Sampling, encode_prompts, generate
from jtrust.training.lm import (Examples, Objective, TrainResult, full_params, lm_loss, take,
                               token_examples, token_log_probs)
from jtrust.training.loop import (RUN_FORMAT, TrainConfig, TrainState, batch_indices, make_optimizer,
                                  make_train_step, schedule)

# texts [n] (continuations only) -> rewards [n]
Reward = Callable[[Sequence[str]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """The RLOO settings beside `TrainConfig` (steps, batch_size = prompts per step * k, learning
    rate, LoRA, save_steps, seed)."""
    k: int = 4  # samples per prompt; the baseline of each is the mean of the other k - 1
    kl_coef: float = 0.05  # beta in R = r - beta * KL (TRL's RLOO default 0.05; the paper's PPO: 0.5)
    min_new_tokens: int = 8  # continuation lengths, uniform in [min, max] (the paper: 8-20)
    max_new_tokens: int = 20
    normalize_advantages: bool = False  # TRL's option: advantages scaled to zero mean, unit std per batch

    def __post_init__(self):
        if self.k < 2:
            raise InputError(f"RLOO needs k >= 2 samples per prompt (the baseline is the mean of the "
                             f"other k - 1), not k={self.k}")
        if self.kl_coef < 0:
            raise InputError(f"kl_coef must be >= 0, not {self.kl_coef}")
        if not 1 <= self.min_new_tokens <= self.max_new_tokens:
            raise InputError(f"need 1 <= min_new_tokens <= max_new_tokens, got {self.min_new_tokens}, "
                             f"{self.max_new_tokens}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# the estimator

def rloo_advantages(rewards: np.ndarray) -> np.ndarray:
    """[P, k] rewards of k samples per prompt -> [P, k] advantages R_i - mean_{j != i} R_j."""
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise InputError(f"rewards must be [prompts, k >= 2], got shape {rewards.shape}")
    k = rewards.shape[1]
    baseline = (rewards.sum(1, keepdims=True) - rewards) / (k - 1)
    return rewards - baseline


def _policy_gradient(params, reference, batch: Examples, *, config, dtype):
    """(sum_i A_i * NLL_i, rows, {}): batch.weights hold A_i on row i's continuation tokens."""
    _, nll = token_log_probs(params, batch, config=config, dtype=dtype)
    return jnp.sum(nll * batch.weights.astype(jnp.float32)), jnp.float32(batch.tokens.shape[0]), {}


# the loss whose gradient is the REINFORCE / RLOO estimate (advantages in the weights)
POLICY_GRADIENT = Objective("rloo_policy_gradient", _policy_gradient)


# ---------------------------------------------------------------------------------------------
# rollouts

@functools.partial(jax.jit, static_argnames=("config",))
def _sum_log_probs(params, batch: Examples, config: ModelConfig) -> jax.Array:
    """[B] sum over the weighted tokens of log p(target), float32."""
    _, nll = token_log_probs(params, batch, config=config)
    return -jnp.sum(nll * batch.weights, axis=1)


def sequence_log_probs(params: Any, examples: Examples, *, config: ModelConfig, chunk: int = 16,
                       ) -> np.ndarray:
    """[N] float64: log p(continuation | prompt) of every row (summed over weight-1 tokens), in
    chunks of `chunk` rows (the last one padded: one compiled shape)."""
    N = len(examples.tokens)
    out = []
    for start in range(0, N, chunk):
        rows = np.minimum(start + np.arange(chunk), N - 1)
        out.append(np.asarray(_sum_log_probs(params, take(examples, rows), config))[: N - start])
    return np.concatenate(out).astype(np.float64)


class Rollout(NamedTuple):
    """R = prompts * k rows, prompt-major (the k samples of prompt p are rows p*k .. p*k + k-1)."""
    examples: Examples  # [R, T] prompt + continuation; weights 1 on the continuation's tokens
    texts: list[str]  # [R] the continuations as the reward read them (stop token dropped)
    rewards: np.ndarray  # [R] float64
    policy_logp: np.ndarray  # [R] float64 sum over the continuation's tokens of log pi (the engine's)
    reference_logp: np.ndarray  # [R] float64 the same under the reference (a forward pass)
    new_tokens: np.ndarray  # [R] int continuation lengths (stop token included)

    @property
    def kl(self) -> np.ndarray:
        """[R] per-sequence KL estimate sum_t log pi - log pi_ref (its mean is KL(pi || pi_ref))."""
        return self.policy_logp - self.reference_logp


def rollout(policy: Model, reference: Any, prompt_ids: Sequence[Sequence[int]], reward: Reward,
            rl: RLConfig, key: jax.Array, *, seq_len: int, chunk: int = 16) -> Rollout:
    """Sample rl.k continuations of each prompt from `policy` (temperature 1), cut sample i to
    L_i ~ U[min_new_tokens, max_new_tokens] tokens (or its stop token), score them with
    `reward`, and take their log-probabilities under the policy (the engine's, which drew them:
    no second forward) and under the `reference` parameters (a forward pass; none when
    `reference is policy.params`: the KL is then 0).

    seq_len: the rows' length, at least len(longest prompt) + max_new_tokens - 1 over every
      prompt the run will see (one value per run: one compiled program)."""
    tok = policy.tokenizer
    pad_to = seq_len + 1 - rl.max_new_tokens  # the longest prompt the rows have room for
    if max(len(p) for p in prompt_ids) > pad_to:
        raise InputError(f"a prompt has {max(len(p) for p in prompt_ids)} tokens; seq_len={seq_len} leaves "
                         f"room for {pad_to} beside {rl.max_new_tokens} new tokens; raise seq_len")
    gen_key, length_key = jax.random.split(key)
    g = generate(policy, [list(p) for p in prompt_ids], max_new_tokens=rl.max_new_tokens, n_samples=rl.k,
                 sampling=Sampling(temperature=1.0), key=gen_key, pad_prompts_to=pad_to)
    P, k = g.lengths.shape
    caps = np.asarray(jax.random.randint(length_key, (P, k), rl.min_new_tokens, rl.max_new_tokens + 1))
    lengths = np.minimum(g.lengths, caps).reshape(-1)
    new = [row[:n].tolist() for row, n in zip(g.tokens.reshape(P * k, -1), lengths)]
    texts = [tok.decode(ids) for ids in new]  # special tokens (the stop) skipped
    rewards = np.asarray(reward(texts), np.float64).reshape(-1)
    if rewards.shape != (P * k,) or not np.all(np.isfinite(rewards)):
        raise InputError(f"the reward returned {rewards.shape} values (finite: {np.isfinite(rewards).all()}) "
                         f"for {P * k} texts; it must return one finite number per text")
    prompts = [list(prompt_ids[i // k]) for i in range(P * k)]
    examples = token_examples(prompts, new, seq_len, tok.pad_id)
    kept = np.arange(rl.max_new_tokens)[None, :] < lengths[:, None]  # [R, N] the tokens cut to L_i
    policy_logp = np.where(kept, g.logprobs.reshape(P * k, -1), 0.0).sum(1, dtype=np.float64)
    reference_logp = (policy_logp if reference is policy.params else
                      sequence_log_probs(reference, examples, config=policy.config, chunk=chunk))
    return Rollout(examples, texts, rewards, policy_logp, reference_logp, lengths)


def policy_gradient_batch(ro: Rollout, rl: RLConfig) -> tuple[Examples, np.ndarray, np.ndarray]:
    """(rows whose loss weights are the advantages on continuation tokens [R, T], advantages [R],
    KL-penalized rewards R [R]) of a rollout."""
    penalized = ro.rewards - rl.kl_coef * ro.kl
    advantages = rloo_advantages(penalized.reshape(-1, rl.k)).reshape(-1)
    if rl.normalize_advantages:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    weights = ro.examples.weights * advantages[:, None].astype(np.float32)
    return ro.examples._replace(weights=weights), advantages, penalized


# ---------------------------------------------------------------------------------------------
# the run

def rloo(model: Model, prompts: Sequence[str] | Sequence[Sequence[int]], reward: Reward, config: TrainConfig,
         rl: RLConfig, out_dir: str | os.PathLike, *, reward_name: str | None = None,
         evals: Sequence[Callable[[Model], dict]] = (), progress: bool = True,
         stop_after: int | None = None, wait: float = 0.0) -> TrainResult:
    """RLOO fine-tuning of `model` on `prompts` (texts, continued as plain text, or id lists) by
    `reward`, with a KL penalty to `model` itself; the checkpoint series goes to `out_dir`.

    config.batch_size = sequences per step = (prompts per step) * rl.k; config.accumulation
      splits them into micro-batches for the update (the advantages use the whole batch).
    reward_name: what the manifest records for the reward (default: its module and name), so a
      rerun with another reward into the same directory is refused.
    evals: called with the current model at save steps (merged parameters), e.g. `reward_eval`.
    Every iteration appends one "train" record to metrics.jsonl: reward (mean r), reward_std,
    kl (mean per-sequence KL), penalized_reward (mean R), advantage_abs, new_tokens, loss,
    grad_norm, learning_rate, seconds. An unfinished run with the same settings resumes from
    its last checkpoint and repeats the straight run; `stop_after` ends after that many
    iterations of this call (used to test resuming).
    """
    if config.batch_size % rl.k:
        raise InputError(f"batch_size={config.batch_size} must be a multiple of k={rl.k}: each step "
                         "samples k continuations of batch_size / k prompts")
    prompt_ids = encode_prompts(model.tokenizer, prompts, chat=False)
    seq_len = max(len(p) for p in prompt_ids) + rl.max_new_tokens - 1
    if seq_len + 1 > model.config.max_positions:
        raise InputError(f"the longest prompt + max_new_tokens = {seq_len + 1} tokens exceeds the "
                         f"model's {model.config.max_positions} positions; shorten the prompts")
    if reward_name is None:
        reward_name = f"{getattr(reward, '__module__', '?')}.{getattr(reward, '__qualname__', type(reward).__name__)}"
    out = pathlib.Path(out_dir)
    manifest = {"format": RUN_FORMAT, "model_config": json.loads(model.config.to_json()),
                "base": {"name": model.name, "checkpoint_hash": model.checkpoint_hash},
                "prompts_sha256": store.text_hash(json.dumps(prompt_ids)), "objective": POLICY_GRADIENT.name,
                "reward": reward_name, "rl_config": rl.to_dict(), "train_config": config.to_dict()}
    with contextlib.ExitStack() as locked:
        locked.enter_context(store.lock_dir(out, wait))
        store.clean_temp(out)
        runs.start_run(out, manifest, model.tokenizer.to_files())
        return _rloo(model, prompt_ids, reward, config, rl, out, seq_len, evals, progress, stop_after)


def _rloo(model, prompt_ids, reward, config, rl, out, seq_len, evals, progress, stop_after) -> TrainResult:
    base = model.params  # the reference of the KL, and the frozen weights under LoRA
    trainable = (lora_lib.init_adapters(base, config.lora, jax.random.key(config.seed))
                 if config.lora else jax.tree.map(jnp.copy, base))  # the step donates its state
    frozen = {"base": base if config.lora else None, "reference": None}
    optimizer = make_optimizer(config)
    state = TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))
    step_fn = jax.jit(make_train_step(lm_loss(model.config, config, POLICY_GRADIENT), optimizer),
                      donate_argnums=0)
    micro = config.batch_size // config.accumulation
    prompts_per_step = config.batch_size // rl.k

    def current(step: int, state: TrainState) -> Model:
        return model.with_params(_merge(state.trainable, frozen["base"], config=config), name=f"step{step}",
                                 checkpoint_hash=f"{model.checkpoint_hash}-rloo-step{step}")

    save_steps = set(config.save_steps) | {config.steps}
    manager = runs.checkpoint_manager(out, save_steps)
    start = manager.latest_step()
    metrics = runs.read_metrics(out)
    if start is not None:
        state = TrainState(*runs.restore_state(out, start, state))
        metrics = [m for m in metrics if m["step"] <= start]
        runs.write_metrics(out, metrics)
    start = start or 0

    def log(record: dict) -> None:
        metrics.append(record)
        runs.append_metric(out, record)

    def checkpoint(step: int, state: TrainState) -> None:
        if step not in save_steps:
            return
        policy = current(step, state)
        record = {}
        for evaluate in evals:
            record.update(evaluate(policy))
        if record:
            log({"step": step, "kind": "eval", **record})
        manager.save(step, args=_save_args(params=policy.params, state=state))

    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    try:  # on an exception, finish the saves already started: the next run resumes from them
        if start == 0:
            checkpoint(0, state)
        bar = tqdm.tqdm(range(start, end), initial=start, total=config.steps, desc="rloo", unit="step",
                        disable=not progress)
        for step in bar:
            began = time.perf_counter()
            rows = batch_indices(len(prompt_ids), prompts_per_step, step, config.seed)
            ro = rollout(current(step, state), base, [prompt_ids[i] for i in rows], reward, rl,
                         jax.random.fold_in(jax.random.key(config.seed), step), seq_len=seq_len, chunk=micro)
            batch, advantages, penalized = policy_gradient_batch(ro, rl)
            batch = Examples(*(a.reshape(config.accumulation, micro, *a.shape[1:]) for a in batch))
            state, out_metrics = step_fn(state, frozen, batch)
            record = {"step": step + 1, "kind": "train", "loss": float(out_metrics["loss"]),
                      "grad_norm": float(out_metrics["grad_norm"]),
                      "learning_rate": float(schedule(config)(step)),
                      "reward": float(ro.rewards.mean()), "reward_std": float(ro.rewards.std()),
                      "kl": float(ro.kl.mean()), "penalized_reward": float(penalized.mean()),
                      "advantage_abs": float(np.abs(advantages).mean()),
                      "new_tokens": float(ro.new_tokens.mean()), "seconds": time.perf_counter() - began}
            log(record)
            bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}")
            checkpoint(step + 1, state)
        bar.close()
    finally:
        manager.wait_until_finished()
        manager.close()
    return TrainResult(current(end, state), out, metrics)


_merge = jax.jit(full_params, static_argnames=("config",))


def _save_args(**pytrees):
    import orbax.checkpoint as ocp
    return ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in pytrees.items()})


# ---------------------------------------------------------------------------------------------
# evaluation

class PolicyEval(NamedTuple):
    """n samples of each of P held-out prompts."""
    rewards: np.ndarray  # [P, n] float64
    kl: np.ndarray  # [P, n] float64 per-sequence KL estimate against the reference
    texts: list[list[str]]  # [P][n]


def evaluate_policy(model: Model, prompts: Sequence[str] | Sequence[Sequence[int]], reward: Reward, rl: RLConfig,
                    *, reference: Any, key: jax.Array, prompts_per_batch: int = 8, chunk: int = 16,
                    seq_len: int | None = None) -> PolicyEval:
    """rl.k samples of every prompt from `model`, cut to lengths as in training, scored by
    `reward` and against `reference` (parameters). Batch b draws with fold_in(key, b), so two
    models evaluated with the same key share their length draws. The last batch is padded with
    copies of the first prompt (one compiled program), which are dropped."""
    ids = encode_prompts(model.tokenizer, prompts, chat=False)
    seq_len = seq_len or max(len(p) for p in ids) + rl.max_new_tokens - 1
    rewards, kl, texts = [], [], []
    for b, start in enumerate(range(0, len(ids), prompts_per_batch)):
        part = ids[start: start + prompts_per_batch]
        real = len(part)
        part = part + [ids[0]] * (prompts_per_batch - real)
        ro = rollout(model, reference, part, reward, rl, jax.random.fold_in(key, b), seq_len=seq_len, chunk=chunk)
        rewards.append(ro.rewards.reshape(-1, rl.k)[:real])
        kl.append(ro.kl.reshape(-1, rl.k)[:real])
        texts += [ro.texts[p * rl.k:(p + 1) * rl.k] for p in range(real)]
    return PolicyEval(np.concatenate(rewards), np.concatenate(kl), texts)


def mean_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean of values [n] (n >= 2)."""
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or len(values) < 2:
        raise InputError(f"an interval needs at least 2 values in a 1-d array, got shape {values.shape}")
    mean = float(values.mean())
    half = float(stats.t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return mean, mean - half, mean + half


def reward_change(before: PolicyEval, after: PolicyEval, confidence: float = 0.95) -> dict[str, float]:
    """Held-out reward before vs after tuning, paired by prompt (the unit of independence: the
    samples of one prompt are correlated): per-prompt mean rewards, their difference's t
    interval and two-sided p-value (paired t-test), and the mean KL of each side."""
    b, a = before.rewards.mean(1), after.rewards.mean(1)
    if b.shape != a.shape:
        raise InputError(f"before and after cover {len(b)} and {len(a)} prompts; evaluate both on the same prompts")
    diff, low, high = mean_interval(a - b, confidence)
    out = {"prompts": len(b), "samples_per_prompt": before.rewards.shape[1], "confidence": confidence,
           "reward_before": float(b.mean()), "reward_after": float(a.mean()),
           "difference": diff, "difference_low": low, "difference_high": high,
           "p_value": float(stats.ttest_rel(a, b).pvalue) if np.any(a != b) else 1.0,
           "kl_before": float(before.kl.mean()), "kl_after": float(after.kl.mean())}
    for name, side in (("before", b), ("after", a)):
        _, out[f"reward_{name}_low"], out[f"reward_{name}_high"] = mean_interval(side, confidence)
    return out


def reward_eval(prompts: Sequence[str] | Sequence[Sequence[int]], reward: Reward, rl: RLConfig, *,
                reference: Any, key: jax.Array, name: str = "heldout", prompts_per_batch: int = 8,
                chunk: int = 16) -> Callable[[Model], dict]:
    """An evaluation callback for `rloo(..., evals=[...])`: {name}_reward (+ _low, _high: t
    interval over per-prompt means) and {name}_kl of `evaluate_policy` with a fixed key."""
    def evaluate(model: Model) -> dict[str, float]:
        ev = evaluate_policy(model, prompts, reward, rl, reference=reference, key=key,
                             prompts_per_batch=prompts_per_batch, chunk=chunk)
        mean, low, high = mean_interval(ev.rewards.mean(1))
        return {f"{name}_reward": mean, f"{name}_reward_low": low, f"{name}_reward_high": high,
                f"{name}_kl": float(ev.kl.mean())}
    return evaluate
