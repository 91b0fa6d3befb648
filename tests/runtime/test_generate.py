"""`jtrust.runtime.generate` against independent oracles: Hugging Face `generate`, no-cache
recomputation with the pure forward, numpy sampling distributions, and a multi-device run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch

from helpers import random_tokens, tiny_tokenizer_json
from jtrust.runtime.generate import Sampling, generate, sequence_logprobs
from jtrust.models.model import Model
from jtrust.models.config import config_from_hf
from jtrust.io.convert import hf_to_params
from jtrust.models.interventions import Intervention, at_layer
from jtrust.models.tokenizer import Tokenizer

PAD = 0
PROMPT_LENGTHS = (5, 11, 2, 8)
STANDARD_N = 8  # most tests share these prompt shapes and N, so they share compiled programs


def build(torch_model, stop_ids=(), eos_id=None, chat_template=None) -> Model:
    """A jtrust Model with the torch model's weights and the tiny tokenizer (pad 0, bos 1)."""
    config = config_from_hf(torch_model.config.to_dict())
    tensors = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    params = jax.tree.map(jnp.asarray, hf_to_params(tensors, config))
    tok = Tokenizer(tokenizers.Tokenizer.from_str(tiny_tokenizer_json()), bos_id=1, eos_id=eos_id,
                    pad_id=PAD, stop_ids=stop_ids, chat_template=chat_template)
    return Model(config, params, tok, "tiny", "hash")


def prompts(lengths=PROMPT_LENGTHS, seed=0) -> list[list[int]]:
    return [random_tokens((n,), seed=seed + i).tolist() for i, n in enumerate(lengths)]


STANDARD_PROMPTS = prompts((5, 9), seed=8)  # greedy continuations of both rows vary


@pytest.fixture(scope="module")
def llama(tiny_checkpoints) -> Model:
    return build(tiny_checkpoints["llama"][1])


def full_logits(model: Model, seqs: list[list[int]], interventions=()) -> np.ndarray:
    """No-cache oracle: last-token logits [B, vocab] of a right-padded full forward."""
    T = 32  # fixed length: one compiled program for every step of a reference loop
    tokens = np.full((len(seqs), T), PAD, np.int32)
    mask = np.zeros((len(seqs), T), np.int32)
    for b, s in enumerate(seqs):
        tokens[b, :len(s)], mask[b, :len(s)] = s, 1
    logits = np.asarray(model.apply(tokens, mask, interventions=tuple(interventions)).logits)
    return logits[np.arange(len(seqs)), [len(s) - 1 for s in seqs]]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox", "gpt2"])
def test_greedy_matches_hugging_face(tiny_checkpoints, family):
    hf = tiny_checkpoints[family][1]
    model = build(hf, stop_ids=(2,), eos_id=2)
    ps, N = prompts(), 10
    P = max(map(len, ps))
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in ps])
    attention = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in ps])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=attention, do_sample=False, max_new_tokens=N,
                          eos_token_id=2, pad_token_id=PAD)[:, P:].numpy()
    ref = np.pad(ref, ((0, 0), (0, N - ref.shape[1])), constant_values=PAD)  # HF stops when all rows do
    out = generate(model, ps, max_new_tokens=N, key=None, sampling=Sampling())
    assert out.tokens.shape == (len(ps), 1, N)
    np.testing.assert_array_equal(out.tokens[:, 0], ref)
    ref_len = [list(r).index(2) + 1 if 2 in r else N for r in ref]
    np.testing.assert_array_equal(out.lengths[:, 0], ref_len)
    assert out.prompt_ids == ps


def test_cached_logits_equal_full_recomputation(llama):
    ps, N = STANDARD_PROMPTS, STANDARD_N
    out = generate(llama, ps, max_new_tokens=N, key=jax.random.key(1), sampling=Sampling(1.0),
                   return_logits=True)
    for t in range(N):
        seqs = [p + out.tokens[b, 0, :t].tolist() for b, p in enumerate(ps)]
        ref = full_logits(llama, seqs)
        np.testing.assert_allclose(out.logits[:, 0, t], ref, atol=1e-4, rtol=0)
        ref_lp = jax.nn.log_softmax(ref)[np.arange(len(ps)), out.tokens[:, 0, t]]
        np.testing.assert_allclose(out.logprobs[:, 0, t], ref_lp, atol=1e-4)


def next_token_probs(model: Model, prompt: list[int], temperature: float) -> np.ndarray:
    return np.asarray(jax.nn.softmax(full_logits(model, [prompt])[0] / temperature), np.float64)


def sample_tokens(model, prompt, sampling, seed=0, n=4000) -> np.ndarray:
    """[n] next tokens of one prompt, sampled as n_samples of a single prefill."""
    out = generate(model, [prompt], max_new_tokens=1, key=jax.random.key(seed), sampling=sampling,
                   n_samples=n)
    assert out.tokens.shape == (1, n, 1)
    return out.tokens[0, :, 0]


def assert_distribution(tokens: np.ndarray, probs: np.ndarray):
    """Empirical frequencies match probs: max abs diff and a chi-square test (cells with
    expected count < 5 pooled)."""
    n = len(tokens)
    counts = np.bincount(tokens, minlength=len(probs)).astype(np.float64)
    assert np.abs(counts / n - probs).max() < 0.03
    expected = n * probs
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    assert observed[~keep].sum() == 0  # nothing sampled outside the support
    chi2 = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = keep.sum() - 1
    assert chi2 < df + 6 * np.sqrt(2 * df), (chi2, df)


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_sampling_matches_softmax(llama, temperature):
    prompt = prompts()[0]
    tokens = sample_tokens(llama, prompt, Sampling(temperature))
    assert_distribution(tokens, next_token_probs(llama, prompt, temperature))


def test_top_k_stays_in_top_k(llama):
    prompt = prompts()[1]
    probs = next_token_probs(llama, prompt, 1.0)
    top5 = np.argsort(-probs)[:5]
    tokens = sample_tokens(llama, prompt, Sampling(1.0, top_k=5))
    assert set(tokens.tolist()) == set(top5.tolist())
    kept = np.zeros_like(probs)
    kept[top5] = probs[top5]
    assert_distribution(tokens, kept / kept.sum())


def test_top_p_stays_in_nucleus(llama):
    prompt = prompts()[2]
    probs = next_token_probs(llama, prompt, 1.0)
    order = np.argsort(-probs)
    n_keep = int(np.searchsorted(np.cumsum(probs[order]), 0.5) + 1)  # smallest prefix with mass >= p
    nucleus = order[:n_keep]
    tokens = sample_tokens(llama, prompt, Sampling(1.0, top_p=0.5))
    assert set(tokens.tolist()) == set(nucleus.tolist())  # every member, the boundary token too
    kept = np.zeros_like(probs)
    kept[nucleus] = probs[nucleus]
    assert_distribution(tokens, kept / kept.sum())


def test_keys_determine_samples(llama):
    prompt = prompts()[0]
    a, b, c = (sample_tokens(llama, prompt, Sampling(1.0), seed) for seed in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5


def test_samples_of_repeated_cache_equal_separate_prompts(llama):
    """Prefill 2 prompts and repeat the cache 3x == prefill each prompt 3 times (same row keys)."""
    p0, p1 = prompts((4, 7))
    s = Sampling(1.0, top_k=20)
    shared = generate(llama, [p0, p1], max_new_tokens=6, key=jax.random.key(3), sampling=s, n_samples=3)
    separate = generate(llama, [p0] * 3 + [p1] * 3, max_new_tokens=6, key=jax.random.key(3), sampling=s)
    np.testing.assert_array_equal(shared.tokens.reshape(6, 6), separate.tokens[:, 0])
    assert len({tuple(row) for row in shared.tokens.reshape(6, 6)}) == 6  # each row draws its own
    other = generate(llama, [p0, p1], max_new_tokens=6, key=jax.random.key(4), sampling=s, n_samples=3)
    assert (other.tokens != shared.tokens).mean() > 0.5


def test_stop_tokens(tiny_checkpoints, llama):
    ps, N = STANDARD_PROMPTS, STANDARD_N
    free = generate(llama, ps, max_new_tokens=N, sampling=Sampling()).tokens[:, 0]
    # stop row 0 early and row 1 later (both before N): row 0 must emit pad while row 1
    # runs on, and the loop may end early once both are done
    first = [{int(x): t for t, x in reversed(list(enumerate(row)))} for row in free]  # token -> step
    stops = {min((t, x) for x, t in first[0].items() if t >= 1)[1],
             max((t, x) for x, t in first[1].items())[1]}
    model = build(tiny_checkpoints["llama"][1], stop_ids=tuple(sorted(stops)))
    out = generate(model, ps, max_new_tokens=N, sampling=Sampling())
    ends = []
    for b, row in enumerate(free):
        end = next(t for t, x in enumerate(row) if x in stops) + 1
        ends.append(end)
        assert out.lengths[b, 0] == end
        np.testing.assert_array_equal(out.tokens[b, 0, :end], row[:end])
        assert (out.tokens[b, 0, end:] == PAD).all()
        assert (out.logprobs[b, 0, end:] == 0).all()
        assert out.texts[b][0] == model.tokenizer.decode(row[:end - 1])
    assert ends[0] < ends[1] < N


def assert_steered_like_recomputation(model, iv, reference_edits):
    """Greedy steered generation: every step's logits equal a no-cache full forward over the
    prompt and the tokens so far with `reference_edits`, each token is their argmax, and
    the output differs from unsteered generation."""
    ps, N = STANDARD_PROMPTS, STANDARD_N
    steered = generate(model, ps, max_new_tokens=N, sampling=Sampling(), interventions=[iv],
                       return_logits=True)
    plain = generate(model, ps, max_new_tokens=N, sampling=Sampling())
    assert (steered.tokens != plain.tokens).any()
    for t in range(N):
        ref = full_logits(model, [p + steered.tokens[b, 0, :t].tolist() for b, p in enumerate(ps)],
                          reference_edits)
        np.testing.assert_allclose(steered.logits[:, 0, t], ref, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(steered.tokens[:, 0, t], ref.argmax(-1))


def test_intervention_at_every_position_matches_recomputation(llama):
    c = llama.config
    vector = 20.0 * jax.random.normal(jax.random.key(7), (c.d_model,))
    # a middle layer: edits of prompt positions reach the cached keys and values of later layers
    iv = at_layer(c.n_layers, 1, vector, site="resid_post", position="all")
    assert_steered_like_recomputation(llama, iv, (iv,))


def test_last_position_intervention_follows_cached_semantics(llama):
    """position='last' edits the last prompt token, then each new token when it is fed; the
    oracle edits exactly those positions of a full recomputation through a masked splice."""
    c = llama.config
    vector = 8.0 * jax.random.normal(jax.random.key(8), (c.d_model,))
    layer = 0  # an early layer, so edited positions feed later layers' cached keys and values
    iv = at_layer(c.n_layers, layer, vector, site="resid_post", position="last")
    # right-padded rows of full_logits: edit from the last prompt token onwards
    mask = np.stack([np.arange(32) >= len(p) - 1 for p in STANDARD_PROMPTS]).astype(np.float32)

    def masked_add(params, x):  # x [B, T, d]: add the vector where params["mask"] [B, T] is 1
        return x + params["mask"][:, :, None] * params["vector"]

    oracle = Intervention(jnp.zeros((c.n_layers, c.d_model)), iv.scales,
                          fn_params={"mask": jnp.asarray(mask), "vector": vector},
                          site="resid_post", kind="splice", position="all", fn=masked_add)
    assert_steered_like_recomputation(llama, iv, (oracle,))


def test_sequence_logprobs_match_torch(tiny_checkpoints, llama):
    hf = tiny_checkpoints["llama"][1]
    seqs = prompts((7, 3, 12))
    got = sequence_logprobs(llama, seqs)
    batched = sequence_logprobs(llama, seqs, batch_size=2)  # [2, 2] rows: the last padded with a copy
    for s, lp, lp2 in zip(seqs, got, batched):
        np.testing.assert_allclose(lp2, lp, atol=1e-5)
        with torch.no_grad():
            logits = hf(torch.tensor([s])).logits[0].double()
        ref = torch.log_softmax(logits, -1)[torch.arange(len(s) - 1), torch.tensor(s[1:])].numpy()
        np.testing.assert_allclose(lp, ref, atol=1e-4)


def test_chat_prompts_are_rendered(tiny_checkpoints, llama):
    template = "{% for m in messages %}{{ bos_token }}{{ m['content'] }}{% endfor %}"
    model = build(tiny_checkpoints["llama"][1], chat_template=template)
    model = dataclasses.replace(model, tokenizer=dataclasses.replace(model.tokenizer, add_bos=True))
    messages = ["Trust, but verify.", "What is the capital of France?"]
    out = generate(model, messages, max_new_tokens=STANDARD_N, chat=True)
    no_bos = dataclasses.replace(model.tokenizer, add_bos=False)
    # the template writes the BOS; encoding the rendered text must not add a second one
    assert out.prompt_ids == [no_bos.encode("<s>" + m) for m in messages]
    assert all(ids[0] == 1 and ids[1] != 1 for ids in out.prompt_ids)
    by_ids = generate(llama, out.prompt_ids, max_new_tokens=STANDARD_N)
    np.testing.assert_array_equal(out.tokens, by_ids.tokens)
    with pytest.raises(ValueError):
        generate(model, [[5, 6]], max_new_tokens=2, chat=True)


MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, safetensors.numpy
    from jax.sharding import Mesh
    from jtrust.runtime.generate import Sampling, generate
    from jtrust.models.model import Model
    from jtrust.models.config import config_from_hf
    from jtrust.io.convert import hf_to_params
    import tokenizers
    from jtrust.models.tokenizer import Tokenizer
    sys.path.insert(0, "tests")
    from helpers import random_tokens, tiny_tokenizer_json

    path = sys.argv[1]
    config = config_from_hf(json.load(open(path + "/config.json")))
    params = hf_to_params(safetensors.numpy.load_file(path + "/model.safetensors"), config)
    tok = Tokenizer(tokenizers.Tokenizer.from_str(tiny_tokenizer_json()), 1, None, 0)
    model = Model(config, params, tok, "tiny", "hash")
    mesh = Mesh(np.array(jax.devices()), ("data",))
    prompts = [random_tokens((n,), seed=n).tolist() for n in (3, 5, 8, 2, 9, 4, 6, 7)]
    result = {"devices": len(jax.devices())}
    for name, kwargs in [("greedy", dict(prompts=prompts, sampling=Sampling())),
                         ("sampled", dict(prompts=prompts[:3], sampling=Sampling(1.0, top_p=0.9),
                                          n_samples=2, key=jax.random.key(0)))]:
        one = generate(model, max_new_tokens=8, **kwargs)
        sharded = generate(model, max_new_tokens=8, mesh=mesh, **kwargs)
        result[name] = bool(np.array_equal(one.tokens, sharded.tokens)
                            and np.array_equal(one.lengths, sharded.lengths))
        result[name + "_shape"] = list(sharded.tokens.shape)
    print(json.dumps(result))
""")


def test_mesh_sharded_equals_single_device(tiny_checkpoints):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tiny_checkpoints["llama"][0])],
                          env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"devices": 8, "greedy": True, "greedy_shape": [8, 1, 8],
                      "sampled": True, "sampled_shape": [3, 2, 8]}
