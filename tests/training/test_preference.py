"""jtrust.training.preference and jtrust.data.preferences: the DPO loss, rewards and gradient
against the same quantities computed in PyTorch on the transformers model (sequences built from
the tokenizer file directly, the loss written out as TRL's `dpo_loss` does), log 2 at step 0, a
LoRA run that learns a planted preference on held-out pairs, the pair rows (truncation), the
held-out figures' intervals, and the HH-RLHF reader on synthetic files and the bundled one."""

from __future__ import annotations

import copy
import gzip
import json
import math

import jax
import numpy as np
import pytest
import tokenizers
import torch

import jtrust
from helpers import assert_grads_match_torch, make_tiny_hf_dir, tiny_tokenizer_json
from jtrust import training as T
from jtrust.core.stats import clopper_pearson
from jtrust.core.errors import InputError
from jtrust.data.preferences import PreferencePair, read_pairs, split_pairs
from jtrust.io.convert import hf_to_params
from jtrust.models.lora import LoraConfig
from jtrust.models.tokenizer import Tokenizer
from jtrust.training import preference as P

WORDS = "the quick brown fox jumps over lazy dog trust but verify large language models".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(jtrust model, torch model) of one tiny random Llama with the tiny BPE tokenizer."""
    path = tmp_path_factory.mktemp("preference") / "llama"
    torch_model = make_tiny_hf_dir(path, "llama", seed=7)
    return jtrust.load(path), torch_model


def _dialogue_pairs(n, seed, chosen_end="", rejected_end=""):
    """n random two-turn dialogues with replies of random words (+ the given endings)."""
    rng = np.random.default_rng(seed)
    words = lambda k: " ".join(rng.choice(WORDS, k))
    pairs = []
    for _ in range(n):
        prompt = f"\n\nHuman: {words(1)}\n\nAssistant: {words(1)}\n\nHuman: {words(1)}\n\nAssistant:"
        body = " " + words(2)
        pairs.append(PreferencePair(prompt, body + chosen_end, body + rejected_end))
    return pairs


# ---------------------------------------------------------------------------------------------
# the objective against PyTorch

def _torch_dpo(policy, reference, pairs, eos, beta):
    """TRL's sigmoid dpo_loss on sequence log-probabilities of the reply tokens (+ EOS), each
    sequence run alone (no padding) from the tokenizer file's ids."""
    backend = tokenizers.Tokenizer.from_str(tiny_tokenizer_json())

    def logps(model):
        out = []
        for prompt, *replies in pairs:
            p = backend.encode(prompt).ids
            for reply in replies:
                ids = torch.tensor(p + backend.encode(reply).ids + [eos])
                logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].double(), -1)
                out.append(logp.gather(-1, ids[1:, None])[len(p) - 1:].sum())
        return torch.stack(out).reshape(-1, 2)  # [B, (chosen, rejected)]

    pi = logps(policy)
    with torch.no_grad():
        ref = logps(reference)
    logits = (pi[:, 0] - pi[:, 1]) - (ref[:, 0] - ref[:, 1])
    losses = -torch.nn.functional.logsigmoid(beta * logits)
    return losses.mean(), beta * (pi[:, 0] - ref[:, 0]).detach(), beta * (pi[:, 1] - ref[:, 1]).detach()


def test_dpo_loss_rewards_and_gradient_match_pytorch(tiny):
    model, torch_model = tiny
    pairs = _dialogue_pairs(4, seed=0, chosen_end=" fox.", rejected_end=" dog")
    batch = P.pair_examples(model.tokenizer, pairs, seq_len=72)
    ref_torch = copy.deepcopy(torch_model)  # a reference that differs, as after the first step
    with torch.no_grad():
        for p in ref_torch.parameters():
            p.add_(0.02 * torch.randn_like(p))
    reference = hf_to_params({k: v.numpy() for k, v in ref_torch.state_dict().items()}, model.config)
    beta = 0.1
    objective = P.dpo_objective(beta)

    def loss_fn(params):
        total, weight, metrics = objective.fn(params, reference, batch, config=model.config, dtype=np.float32)
        return total / weight, metrics
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(model.params)
    logps = jax.jit(lambda params: P.pair_log_probs(params, batch, config=model.config))
    terms = P.dpo_terms(*logps(model.params), *logps(reference), beta)

    torch_model.zero_grad()
    expected, chosen, rejected = _torch_dpo(torch_model, ref_torch, pairs, torch_model.config.eos_token_id, beta)
    expected.backward()
    assert float(loss) == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(terms.chosen_rewards, chosen.numpy(), atol=2e-5)
    np.testing.assert_allclose(terms.rejected_rewards, rejected.numpy(), atol=2e-5)
    np.testing.assert_allclose(terms.margins, (chosen - rejected).numpy(), atol=3e-5)
    assert float(metrics["reward_margin"]) == pytest.approx((chosen - rejected).mean().item(), abs=3e-5)
    assert float(metrics["reward_accuracy"]) == float(((chosen - rejected) > 0).double().mean())
    assert_grads_match_torch(grads, torch_model, model.config)


def test_reference_equal_to_policy_gives_log2_and_zero_margins(tiny):
    model, _ = tiny
    batch = P.pair_examples(model.tokenizer, _dialogue_pairs(3, 1, " fox."), seq_len=72)
    objective = jax.jit(lambda p, r: P.dpo_objective(0.1).fn(p, r, batch, config=model.config, dtype=np.float32))
    total, weight, metrics = objective(model.params, model.params)
    assert float(weight) == 3 and float(total / weight) == pytest.approx(math.log(2), abs=1e-7)
    assert float(metrics["reward_margin"]) == 0 and float(metrics["reward_accuracy"]) == 0
    with pytest.raises(InputError, match="reference=model.params"):
        P.dpo_objective(0.1).fn(model.params, None, batch, config=model.config, dtype=np.float32)
    with pytest.raises(InputError, match="beta"):
        P.dpo_objective(0.0)


# ---------------------------------------------------------------------------------------------
# a planted preference is learned (LoRA, reference = the base)

def test_lora_dpo_learns_a_planted_preference_on_held_out_pairs(tiny, tmp_path):
    """Chosen replies end with "?", rejected ones with "!" after the same words; the base
    prefers "!" on most held-out pairs. 12 LoRA steps make "?" the model's preference."""
    model, _ = tiny
    train_ex = P.pair_examples(model.tokenizer, _dialogue_pairs(64, 2, "?", "!"), seq_len=72)
    held_ex = P.pair_examples(model.tokenizer, _dialogue_pairs(40, 3, "?", "!"), seq_len=72)
    config = T.TrainConfig(steps=12, batch_size=8, learning_rate=2e-2, schedule="constant", log_every=1,
                           lora=LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down")), save_steps=(0, 12))
    run = T.train(model, train_ex, config, tmp_path / "dpo", objective=P.dpo_objective(0.1),
                  reference=model.params, evals=[P.preference_eval(held_ex, model.params, 0.1)],
                  progress=False)
    logs = [m for m in run.metrics if m["kind"] == "train"]
    before, after = [m for m in run.metrics if m["kind"] == "eval"]
    # step 0: the policy is the reference (LoRA's b = 0): loss log 2, every margin 0
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs[0]["reward_margin"] == pytest.approx(0, abs=1e-6)
    assert before["pref_accuracy"] == 0 and before["pref_margin"] == 0
    assert before["pref_logp_accuracy"] == before["pref_reference_logp_accuracy"] <= 0.35
    assert before["pref_logp_accuracy_high"] < 0.5  # the base's preference is the other way
    assert after["pref_accuracy"] >= 0.95 and after["pref_accuracy_low"] > 0.8
    assert after["pref_logp_accuracy"] >= 0.95 and after["pref_margin"] > 0.3
    assert after["pref_reference_logp_accuracy"] == before["pref_reference_logp_accuracy"]
    assert logs[-1]["loss"] < 0.6 * math.log(2) and logs[-1]["reward_accuracy"] == 1
    assert jtrust.load(tmp_path / "dpo").names == ["step0", "step12"]  # a checkpoint series


# ---------------------------------------------------------------------------------------------
# pair rows

def _word_tokenizer():
    vocab = {w: i for i, w in enumerate(["<eos>", "Human", "Assistant", ":", "a", "b", "c"])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return Tokenizer(backend, bos_id=None, eos_id=0, pad_id=0)


def test_pair_rows_layout_and_left_truncation():
    tok = _word_tokenizer()
    H, A, C, a, b, c = 1, 2, 3, 4, 5, 6
    prompt = "\n\nHuman: a\n\nAssistant: b\n\nHuman: a a\n\nAssistant:"  # 12 tokens, last turn 6
    full = [H, C, a, A, C, b, H, C, a, a, A, C]
    ex = P.pair_examples(tok, [(prompt, " b b", " c")], seq_len=20)
    assert ex.tokens.shape == (1, 40)
    # chosen: prompt + b b <eos>; the loss covers b, b, <eos>
    np.testing.assert_array_equal(ex.tokens[0, :14], full + [b, b])
    np.testing.assert_array_equal(ex.targets[0, :14], full[1:] + [b, b, 0])
    np.testing.assert_array_equal(ex.weights[0, :20], [0] * 11 + [1] * 3 + [0] * 6)
    # rejected, in columns 20..39: prompt + c <eos>
    np.testing.assert_array_equal(ex.mask[0, 20:], [1] * 13 + [0] * 7)
    np.testing.assert_array_equal(ex.targets[0, 31:33], [c, 0])
    np.testing.assert_array_equal(ex.weights[0, 20:], [0] * 11 + [1] * 2 + [0] * 7)
    rows = T.ungroup(ex, 2)
    np.testing.assert_array_equal(rows.tokens, np.stack([ex.tokens[0, :20], ex.tokens[0, 20:]]))
    # room for 8 prompt tokens (11 - 3): the dialogue starts at its last human turn
    ex = P.pair_examples(tok, [(prompt, " b b", " c")], seq_len=10)
    np.testing.assert_array_equal(ex.tokens[0, :8], [H, C, a, a, A, C, b, b])
    np.testing.assert_array_equal(ex.weights[0, :10], [0] * 5 + [1] * 3 + [0] * 2)
    # replies keep their first max_response = 2 tokens; room for 5 (7 - 2): the last 5 tokens
    ex = P.pair_examples(tok, [(prompt, " b b", " c")], seq_len=6, max_response=2)
    np.testing.assert_array_equal(ex.tokens[0, :6], [C, a, a, A, C, b])
    np.testing.assert_array_equal(ex.targets[0, :6], [a, a, A, C, b, b])
    np.testing.assert_array_equal(ex.weights[0, :6], [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(ex.targets[0, 6:], [a, a, A, C, c, 0])
    with pytest.raises(InputError, match="max_response"):
        P.pair_examples(tok, [(prompt, " b", " c")], seq_len=6, max_response=6)
    with pytest.raises(InputError, match="empty prompt"):
        P.pair_examples(tok, [("", " b", " c")], seq_len=6)


def test_preference_metrics_and_interval():
    policy = np.array([[-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.5], [-1.0, -1.0]])
    reference = np.array([[-2.0, -2.0], [-3.0, -2.0], [-1.0, -2.0], [-1.0, -1.0]])
    m = P.preference_metrics(policy, reference, beta=0.5, name="h")
    margins = 0.5 * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))  # .5 -.5 -.25 0
    assert m["h_n"] == 4 and m["h_margin"] == pytest.approx(margins.mean())
    assert m["h_accuracy"] == 0.25 and m["h_logp_accuracy"] == 0.5 and m["h_reference_logp_accuracy"] == 0.25
    for key, k in (("accuracy", 1), ("logp_accuracy", 2), ("reference_logp_accuracy", 1)):
        low, high = clopper_pearson(k, 4, 0.95)
        assert (m[f"h_{key}_low"], m[f"h_{key}_high"]) == pytest.approx((float(low), float(high)), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# the reader

def _row(prompt, chosen, rejected):
    return {"chosen": prompt + chosen, "rejected": prompt + rejected}


def test_reader_on_synthetic_files(tmp_path):
    one = "\n\nHuman: hi\n\nAssistant:"
    two = "\n\nHuman: how?\n\nAssistant: like so\n\nHuman: and then?\n\nAssistant:"
    rows = [_row(one, " hello", " go away"),
            {"chosen": one + " yes", "rejected": "\n\nHuman: bye\n\nAssistant: no"},  # prompts differ
            _row(two, " ", " rude"),  # empty reply
            _row(two, " same", " same"),  # equal replies
            _row(two, " then this", " never")]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = read_pairs(path)
    assert data.pairs == [(one, " hello", " go away"), (two, " then this", " never")]
    assert data.rows.tolist() == [0, 4]
    assert data.dropped == {"prompts differ": 1, "empty reply": 1, "equal replies": 1}
    gz = tmp_path / "pairs.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert read_pairs(gz).pairs == data.pairs

    def bad(text, match, name="bad.jsonl"):
        p = tmp_path / name
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
        with pytest.raises(InputError, match=match):
            read_pairs(p)
    bad("", "holds no rows")
    bad(json.dumps(rows[0]) + "\n{not json\n", "line 2.*not valid JSON")
    bad(json.dumps({"chosen": one + " a"}) + "\n", "line 1: 'rejected' is missing")
    bad(json.dumps({"chosen": one + " a", "rejected": 3}) + "\n", "'rejected' is a number")
    bad(json.dumps({"chosen": "hi there", "rejected": "hi"}) + "\n", "no 'Assistant:' turn")
    bad(json.dumps(rows[1]) + "\n", "none of its 1 rows is a usable pair")
    bad(b"not gzip at all", "not a readable gzip file", "bad.jsonl.gz")
    with pytest.raises(InputError, match="no preference file"):
        read_pairs(tmp_path / "absent.jsonl")


def test_reader_on_the_bundled_hh_rlhf_and_split():
    data = read_pairs()
    assert data.name == "hh_rlhf" and len(data.pairs) == 2303  # 2312 rows in the file
    assert data.dropped == {"prompts differ": 5, "empty reply": 4, "equal replies": 0}
    assert all(p.prompt.startswith("\n\nHuman:") and p.prompt.endswith("\n\nAssistant:") for p in data.pairs)
    assert all(p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected for p in data.pairs)
    split = split_pairs(data.pairs, heldout=0.1, seed=0)
    assert len(split.train) + len(split.heldout) == 2303 and 225 <= len(split.heldout) <= 235
    assert not {p.prompt for p in split.train} & {p.prompt for p in split.heldout}
    assert split_pairs(data.pairs, 0.1, 0) == split  # deterministic
    assert split_pairs(data.pairs, 0.1, 1).heldout != split.heldout
    assert len(split_pairs(data.pairs, heldout=100, seed=0).heldout) >= 100
    with pytest.raises(InputError, match="heldout"):
        split_pairs(data.pairs, heldout=1.5)
