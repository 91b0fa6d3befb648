"""jtrust.training.rl: RLOO advantages against their closed form, the policy-gradient loss and
its gradient against the same loss written in PyTorch on the transformers model, a rollout's
lengths, rewards and log-probabilities against the engine's, a bandit whose reward (the count
of one token) rises under a few LoRA iterations, and a stopped run resumed equal to a straight one."""

from __future__ import annotations


import jax
import numpy as np
import pytest
import tokenizers
import torch

import jtrust
from helpers import assert_grads_match_torch, make_tiny_hf_dir, random_llama, random_tokens
from jtrust import training as T
from jtrust.core.errors import InputError
from jtrust.models.config import ModelConfig
from jtrust.models.lora import LoraConfig
from jtrust.models.tokenizer import Tokenizer
from jtrust.runtime.generate import Sampling, generate
from jtrust.training import rl as R

WORDS = ["<pad>", "a", "b", "c", "d", "e", "f", "g", "h"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(jtrust model, torch model) of a tiny random Llama with the tiny BPE tokenizer."""
    path = tmp_path_factory.mktemp("rl") / "llama"
    torch_model = make_tiny_hf_dir(path, "llama", seed=11)
    return jtrust.load(path), torch_model


@pytest.fixture(scope="module")
def bandit():
    """A tiny random Llama over 9 words (no stop token): the reward is known by construction."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)},
                                                               unk_token="<pad>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = Tokenizer(backend, bos_id=None, eos_id=None, pad_id=0)
    config = ModelConfig(family="llama", vocab_size=len(WORDS), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, d_ff=64, norm="rms", norm_eps=1e-5, position="rope", rotary_dim=8,
                         max_positions=64)
    return random_llama(config, tok, name="bandit")


def count_a(texts):
    """The bandit's reward: how many times the word "a" occurs."""
    return np.array([t.split().count("a") for t in texts], np.float64)


BANDIT_PROMPTS = ["b c", "d", "e f g", "h b", "c c d", "g", "f e", "d h b c", "b", "e e", "h", "c g f"]


# ---------------------------------------------------------------------------------------------
# the estimator

def test_rloo_advantages_closed_form():
    rewards = np.random.default_rng(0).normal(size=(5, 4))
    want = np.array([[r[i] - np.mean(np.delete(r, i)) for i in range(4)] for r in rewards])
    got = R.rloo_advantages(rewards)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, 4 / 3 * (rewards - rewards.mean(1, keepdims=True)), atol=1e-12)
    np.testing.assert_allclose(got.sum(1), 0, atol=1e-12)  # an unbiased baseline: zero-sum per prompt
    with pytest.raises(InputError, match="k >= 2"):
        R.rloo_advantages(np.ones((3, 1)))
    with pytest.raises(InputError, match="k >= 2"):
        R.RLConfig(k=1)


def test_policy_gradient_batch_folds_the_kl_into_the_reward():
    ex = T.token_examples([[5, 6], [5], [7, 8, 9], [7]], [[1, 2], [3], [4, 4, 4], [2, 2]], 6, 0)
    ro = R.Rollout(ex, ["x"] * 4, np.array([1.0, 2.0, 0.5, 0.0]), np.array([-1.0, -2.0, -3.0, -4.0]),
                   np.array([-1.5, -2.0, -2.0, -4.0]), np.array([2, 1, 3, 2]))
    rl = R.RLConfig(k=2, kl_coef=0.5)
    batch, adv, penalized = R.policy_gradient_batch(ro, rl)
    np.testing.assert_allclose(ro.kl, [0.5, 0.0, -1.0, 0.0])
    np.testing.assert_allclose(penalized, [0.75, 2.0, 1.0, 0.0])
    np.testing.assert_allclose(adv, [-1.25, 1.25, 1.0, -1.0])
    # row layout: prompt 5 6 + continuation 1 2 -> inputs 5 6 1, targets 6 1 2, weights on 1 2
    np.testing.assert_array_equal(ex.tokens[0, :3], [5, 6, 1])
    np.testing.assert_array_equal(ex.targets[0, :3], [6, 1, 2])
    np.testing.assert_array_equal(ex.weights[0], [0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(ex.weights[1], [1, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(batch.weights[0], [0, -1.25, -1.25, 0, 0, 0])
    np.testing.assert_allclose(batch.weights[2], [0, 0, 1, 1, 1, 0])
    normalized = R.policy_gradient_batch(ro, R.RLConfig(k=2, kl_coef=0.5, normalize_advantages=True))[1]
    np.testing.assert_allclose(normalized, (adv - adv.mean()) / adv.std(), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# the loss and its gradient against PyTorch

def test_policy_gradient_loss_and_gradient_match_pytorch(tiny):
    model, torch_model = tiny
    rng = np.random.default_rng(1)
    prompts = [random_tokens((n,), seed=s).tolist() for n, s in ((3, 0), (5, 1), (2, 2), (4, 3))]
    conts = [random_tokens((n,), seed=10 + s).tolist() for n, s in ((6, 0), (2, 1), (8, 2), (4, 3))]
    advantages = rng.normal(size=4)
    ex = T.token_examples(prompts, conts, seq_len=16, pad_id=model.tokenizer.pad_id)
    batch = ex._replace(weights=ex.weights * advantages[:, None].astype(np.float32))

    def loss_fn(params):
        total, weight, _ = R.POLICY_GRADIENT.fn(params, None, batch, config=model.config, dtype=np.float32)
        return total / weight
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(model.params)
    logp = R.sequence_log_probs(model.params, ex, config=model.config, chunk=3)

    torch_model.zero_grad()
    sums = []
    for p, c in zip(prompts, conts):  # each sequence alone, unpadded
        ids = torch.tensor(p + c)
        lp = torch.log_softmax(torch_model(input_ids=ids[None]).logits[0, :-1].double(), -1)
        sums.append(lp.gather(-1, ids[1:, None])[len(p) - 1:].sum())
    sums = torch.stack(sums)
    expected = -(torch.tensor(advantages) * sums).mean()
    expected.backward()
    assert float(loss) == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(logp, sums.detach().numpy(), rtol=1e-5, atol=1e-4)
    assert_grads_match_torch(grads, torch_model, model.config)


# ---------------------------------------------------------------------------------------------
# rollouts

def test_rollout_lengths_rewards_and_log_probs_agree_with_the_engine(tiny):
    model, _ = tiny
    prompts = [model.tokenizer.encode(t) for t in ("Trust, but", "The quick brown", "What is")]
    rl = R.RLConfig(k=3, min_new_tokens=2, max_new_tokens=6)
    key = jax.random.key(4)
    lengths_of = lambda texts: np.array([len(t) for t in texts], np.float64)
    seq_len = max(map(len, prompts)) + rl.max_new_tokens - 1
    ro = R.rollout(model, model.params, prompts, lengths_of, rl, key, seq_len=seq_len, chunk=4)
    assert ro.examples.tokens.shape == (9, seq_len) and len(ro.texts) == 9
    stop = set(model.tokenizer.stop_ids) | {model.tokenizer.eos_id}
    # the same samples from the engine (rollout draws them with the first half of split(key))
    g = generate(model, prompts, max_new_tokens=6, n_samples=3, sampling=Sampling(temperature=1.0),
                 key=jax.random.split(key)[0], pad_prompts_to=seq_len + 1 - 6)
    for i, n in enumerate(ro.new_tokens):
        p, s = divmod(i, 3)
        ended = int(g.tokens[p, s, n - 1]) in stop
        assert (2 <= n <= 6 or ended) and n <= g.lengths[p, s]
        np.testing.assert_array_equal(ro.examples.targets[i][ro.examples.weights[i] > 0], g.tokens[p, s, :n])
        assert ro.texts[i] == model.tokenizer.decode(g.tokens[p, s, :n])
        assert ro.policy_logp[i] == pytest.approx(g.logprobs[p, s, :n].sum(dtype=np.float64), rel=1e-9)
    assert len(set(ro.new_tokens.tolist())) > 1  # lengths are drawn, not all max_new_tokens
    np.testing.assert_array_equal(ro.rewards, lengths_of(ro.texts))
    np.testing.assert_array_equal(ro.kl, 0.0)  # the policy is its reference: no forward, zero
    # the engine's log-probabilities are the training forward's (cache vs no cache)
    forward = R.sequence_log_probs(model.params, ro.examples, config=model.config, chunk=4)
    np.testing.assert_allclose(ro.policy_logp, forward, atol=2e-4)
    copy = jax.tree.map(lambda x: x + 0, model.params)  # equal values, another pytree: a forward
    again = R.rollout(model, copy, prompts, lengths_of, rl, key, seq_len=seq_len, chunk=4)
    np.testing.assert_allclose(again.reference_logp, forward, rtol=1e-6, atol=1e-6)
    assert np.abs(again.kl).max() < 2e-4 and again.texts == ro.texts
    with pytest.raises(InputError, match="one finite number per text"):
        R.rollout(model, model.params, prompts, lambda texts: np.zeros(2), rl, key, seq_len=seq_len)
    with pytest.raises(InputError, match="raise seq_len"):
        R.rollout(model, model.params, prompts, lengths_of, rl, key, seq_len=seq_len - 1)


# ---------------------------------------------------------------------------------------------
# runs

def _config(steps, **kw):
    return T.TrainConfig(**{**dict(steps=steps, batch_size=32, accumulation=2, learning_rate=2e-2,
                                   schedule="constant", lora=LoraConfig(rank=4, alpha=8.0,
                                   targets=("q", "v", "o", "up", "down")), save_steps=(0, steps)), **kw})


BANDIT_RL = R.RLConfig(k=4, kl_coef=0.02, min_new_tokens=4, max_new_tokens=8)


def test_bandit_reward_rises_with_an_interval(bandit, tmp_path):
    """reward = count of "a" in 4-8 new tokens: about 8/9 * 6 / 9 = 0.6 under the random model."""
    heldout = ["c d", "h", "e b g", "f f", "g c", "b h d", "d", "e", "c", "h h", "f b", "g e d", "b b", "c",
               "d e f", "g h"]
    # the training shapes (8 prompts x 4 samples, rows of 4 + 8 - 1 tokens, 16-row chunks): no new compiles
    evaluate = lambda m: R.evaluate_policy(m, heldout, count_a, BANDIT_RL, reference=bandit.params,
                                           key=jax.random.key(9), prompts_per_batch=8, chunk=16, seq_len=11)
    run = R.rloo(bandit, BANDIT_PROMPTS, count_a, _config(10), BANDIT_RL, tmp_path / "bandit", progress=False)
    change = R.reward_change(evaluate(bandit), evaluate(run.model))
    logs = [m for m in run.metrics if m["kind"] == "train"]
    assert len(logs) == 10 and abs(logs[0]["kl"]) < 1e-4  # step 0: the policy is the base (LoRA's b = 0)
    assert np.mean([m["reward"] for m in logs[-3:]]) > np.mean([m["reward"] for m in logs[:3]]) + 0.5
    assert change["kl_before"] == 0.0 and change["kl_after"] > 0
    assert change["difference_low"] > 0.5 and change["p_value"] < 1e-3, change
    assert change["reward_after_low"] > change["reward_before_high"]
    assert jtrust.load(tmp_path / "bandit").names == ["step0", "step10"]  # a checkpoint series
    tuned = jtrust.load(tmp_path / "bandit").checkpoints[-1].load()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 tuned.params, run.model.params)


def test_resumed_run_equals_a_straight_one(bandit, tmp_path):
    config = _config(4, save_steps=(0, 2, 4))
    straight = R.rloo(bandit, BANDIT_PROMPTS, count_a, config, BANDIT_RL, tmp_path / "a", progress=False)
    first = R.rloo(bandit, BANDIT_PROMPTS, count_a, config, BANDIT_RL, tmp_path / "b", progress=False, stop_after=2)
    assert [m["step"] for m in first.metrics] == [1, 2]
    resumed = R.rloo(bandit, BANDIT_PROMPTS, count_a, config, BANDIT_RL, tmp_path / "b", progress=False)
    drop = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]
    assert drop(resumed.metrics) == drop(straight.metrics)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 resumed.model.params, straight.model.params)
    # the same directory with other settings is refused
    with pytest.raises(InputError, match="another rl config"):
        R.rloo(bandit, BANDIT_PROMPTS, count_a, config, R.RLConfig(k=4, kl_coef=0.5, min_new_tokens=4,
               max_new_tokens=8), tmp_path / "b", progress=False)
    with pytest.raises(InputError, match="multiple of k"):
        R.rloo(bandit, BANDIT_PROMPTS, count_a, _config(4, batch_size=30, accumulation=1), BANDIT_RL,
               tmp_path / "c", progress=False)


def test_mean_interval_and_reward_change_closed_forms():
    x = np.array([1.0, 2.0, 4.0, 7.0])
    mean, low, high = R.mean_interval(x, 0.95)
    half = 3.182446305284263 * np.std(x, ddof=1) / 2  # t_{0.975, 3}
    assert (mean, low, high) == pytest.approx((3.5, 3.5 - half, 3.5 + half), rel=1e-9)
    before = R.PolicyEval(np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]), np.zeros((3, 2)), [])
    after = R.PolicyEval(np.array([[1.0, 2.0], [2.0, 3.0], [2.0, 2.0]]), np.ones((3, 2)), [])
    c = R.reward_change(before, after)
    assert c["difference"] == pytest.approx(7 / 6) and c["kl_after"] == 1.0  # per-prompt differences 1, 1.5, 1
    half = 4.302652729911275 * np.std([1.0, 1.5, 1.0], ddof=1) / np.sqrt(3)  # t_{0.975, 2}
    assert (c["difference_low"], c["difference_high"]) == pytest.approx((7 / 6 - half, 7 / 6 + half), rel=1e-9)
    assert c["p_value"] == pytest.approx(0.0198039, rel=1e-4)  # t = 7 on 2 degrees of freedom
    with pytest.raises(InputError, match="at least 2"):
        R.mean_interval(np.array([1.0]))
