"""jtrust.training.loop: the loop against a PyTorch AdamW loop on the same tiny Llama, resuming after a
crash and after a SIGKILL, data parallel on 8 fake devices, LoRA, bfloat16, the run as a series."""

from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jtrust
from jtrust.models import lora as lora_lib
from jtrust import training as T
from jtrust.io.convert import hf_to_params
from jtrust.io.loading import save
from jtrust.io.runs import run_steps
from helpers import make_tiny_hf_dir, random_tokens

HERE = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(jtrust model, torch model, packed examples) for one tiny random Llama."""
    path = tmp_path_factory.mktemp("train") / "llama"
    torch_model = make_tiny_hf_dir(path, "llama", seed=3)
    examples = T.packed_examples(random_tokens((40 * 17,), seed=1), seq_len=16)
    return jtrust.load(path), torch_model, examples


def test_packed_and_prompt_answer_examples():
    ex = T.packed_examples(np.arange(35), seq_len=4)  # 7 windows of 5
    assert ex.tokens.shape == (7, 4)
    np.testing.assert_array_equal(ex.tokens[1], [5, 6, 7, 8])
    np.testing.assert_array_equal(ex.targets[1], [6, 7, 8, 9])
    import tokenizers
    from jtrust.models.tokenizer import Tokenizer
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {"<eos>": 0, "q": 1, "a": 2, "b": 3}, unk_token="<eos>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = Tokenizer(backend, bos_id=None, eos_id=0, pad_id=0)
    ex = T.prompt_answer_examples(tok, [("q q", "a b")], seq_len=6)
    # sequence q q a b <eos>: inputs q q a b, targets q a b <eos>; loss on a, b, <eos> only
    np.testing.assert_array_equal(ex.tokens[0], [1, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(ex.targets[0, :4], [1, 2, 3, 0])
    np.testing.assert_array_equal(ex.weights[0], [0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(ex.mask[0], [1, 1, 1, 1, 0, 0])
    with pytest.raises(ValueError, match="raise seq_len"):
        T.prompt_answer_examples(tok, [("q q q q", "a b")], seq_len=4)


def test_batch_indices_cover_each_epoch_once_and_are_pure():
    rows = np.concatenate([T.batch_indices(10, 4, s, seed=7) for s in range(5)])  # two epochs
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:20]) == list(range(10))
    np.testing.assert_array_equal(T.batch_indices(10, 4, 3, seed=7), rows[12:16])
    assert not np.array_equal(T.batch_indices(10, 4, 0, seed=8), rows[:4])


def test_schedule_and_save_steps_closed_forms():
    config = T.TrainConfig(steps=110, learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lr = T.schedule(config)
    assert float(lr(5)) == pytest.approx(0.5)
    for s in (10, 40, 110):  # cosine from 1 to 0.1 over the 100 steps after warm-up
        t = (s - 10) / 100
        assert float(lr(s)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)), rel=1e-6)
    steps = T.log_spaced_steps(600, 32, dense_until=10)
    assert len(steps) >= 32 and steps[0] == 0 and steps[-1] == 600
    assert set(range(11)) <= set(steps) and sum(s <= 300 for s in steps) > 3 * sum(s > 300 for s in steps)


def test_loop_matches_a_pytorch_adamw_loop(tiny, tmp_path):
    """Loss per step and parameters after 3 steps equal torch.optim.AdamW on the HF model (same
    batches, clipping, weight decay on matrices only); jtrust accumulates 2 micro-batches."""
    import torch
    model, torch_model, examples = tiny
    config = T.TrainConfig(steps=3, batch_size=8, accumulation=2, learning_rate=3e-3,
                           schedule="constant", weight_decay=0.1, grad_clip=0.5, log_every=1)
    result = T.train(model, examples, config, tmp_path / "run", progress=False)

    torch_model = copy.deepcopy(torch_model).train()  # the fixture's copy stays untrained
    decay = [p for p in torch_model.parameters() if p.ndim >= 2]
    no_decay = [p for p in torch_model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95))
    torch_losses = []
    for step in range(3):
        rows = T.batch_indices(len(examples.tokens), 8, step, seed=0)
        x = torch.tensor(examples.tokens[rows], dtype=torch.long)
        y = torch.tensor(examples.targets[rows], dtype=torch.long)
        logits = torch_model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 0.5)
        opt.step()
        torch_losses.append(loss.item())
    losses = [m["loss"] for m in result.metrics if m["kind"] == "train"]
    np.testing.assert_allclose(losses, torch_losses, rtol=1e-5)
    expected = hf_to_params({k: v.detach().numpy() for k, v in torch_model.state_dict().items()},
                            model.config)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), model.params, expected)
    assert max(jax.tree.leaves(moved)) > 5e-3  # the parameters did move
    # Adam divides each gradient by its own scale, so the few elements whose gradient is at float
    # noise (~1e-9 here) may move differently, by less than one step (lr); all others within 2e-5
    diffs = np.concatenate([np.abs(np.asarray(a) - b).ravel() for a, b in
                            zip(jax.tree.leaves(result.model.params), jax.tree.leaves(expected))])
    assert np.sum(diffs > 2e-5) <= 1e-4 * diffs.size and diffs.max() < 3e-3


def test_gradient_matches_pytorch_autograd(tiny):
    import torch
    model, torch_model, examples = tiny
    batch = T.take(examples, np.arange(8))
    grads = jax.grad(lambda p: (lambda s, n: s / n)(*T.token_loss_sum(p, batch, config=model.config)))(model.params)
    torch_model = torch_model.eval()
    torch_model.zero_grad()
    logits = torch_model(input_ids=torch.tensor(batch.tokens, dtype=torch.long)).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      torch.tensor(batch.targets, dtype=torch.long).reshape(-1)).backward()
    expected = hf_to_params({k: v.grad.numpy() for k, v in torch_model.named_parameters()}, model.config)
    torch_model.zero_grad()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=1e-5 * np.abs(b).max()),
                 grads, expected)


def _straight_and_interrupted(model, examples, config, tmp_path):
    straight = T.train(model, examples, config, tmp_path / "straight", progress=False)
    with pytest.raises(RuntimeError, match="crash at step 5"):
        def crash(m):
            if m.name == "step6":
                raise RuntimeError("crash at step 5")
            return {}
        T.train(model, examples, config, tmp_path / "resumed", progress=False, evals=[crash])
    return straight


def test_resume_after_a_crash_repeats_the_straight_run(tiny, tmp_path):
    model, _, examples = tiny
    config = T.TrainConfig(steps=9, batch_size=8, learning_rate=3e-3, warmup_steps=2,
                           save_steps=(0, 2, 4, 6, 8), log_every=1)
    straight = _straight_and_interrupted(model, examples, config, tmp_path)
    # the crash came while step 6 was evaluated, before it was saved: resume from 4
    assert jtrust.load(tmp_path / "resumed").names == ["step0", "step2", "step4"]
    resumed = T.train(model, examples, config, tmp_path / "resumed", progress=False)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 resumed.model.params, straight.model.params)
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in straight.metrics]
    series = jtrust.load(tmp_path / "resumed")
    assert series.names == ["step0", "step2", "step4", "step6", "step8", "step9"]
    last = series.checkpoints[-1].load()
    assert last.config == model.config and last.name == "step9"
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 last.params, straight.model.params)
    with pytest.raises(ValueError, match="another train config"):
        T.train(model, examples, T.TrainConfig(steps=9, batch_size=4), tmp_path / "resumed", progress=False)


KILLED_CHILD = textwrap.dedent("""
    import sys, time, pickle
    import jtrust
    from jtrust import training as T
    checkpoint, examples_file, out = sys.argv[1:4]
    model = jtrust.load(checkpoint)
    with open(examples_file, "rb") as f:
        examples = pickle.load(f)
    config = T.TrainConfig(**pickle.loads(bytes.fromhex(sys.argv[4])))
    slow = lambda m: time.sleep(0.3) or {}  # leaves time to be killed mid-run
    T.train(model, examples, config, out, progress=False, evals=[slow])
""")


@pytest.mark.slow  # the default suite kills a fit in test_loop.py; this is the LM run's version
def test_resume_after_sigkill_repeats_the_straight_run(tiny, tmp_path):
    import pickle
    model, _, examples = tiny
    kwargs = dict(steps=30, batch_size=8, learning_rate=3e-3, save_steps=tuple(range(0, 31, 2)),
                  log_every=1)
    config = T.TrainConfig(**kwargs)
    src = tmp_path / "model"
    save(model, src)
    with open(tmp_path / "examples.pkl", "wb") as f:
        pickle.dump(examples, f)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(src), str(tmp_path / "examples.pkl"),
                              str(tmp_path / "run"), pickle.dumps(kwargs).hex()], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "checkpoints" / "10").exists():
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the child never reached step 10"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    saved = run_steps(tmp_path / "run")
    assert 10 <= saved[-1] < 30, saved  # killed mid-run
    resumed = T.train(jtrust.load(src), examples, config, tmp_path / "run", progress=False)
    straight = T.train(jtrust.load(src), examples, config, tmp_path / "straight", progress=False)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 resumed.model.params, straight.model.params)
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in straight.metrics]
    assert jtrust.load(tmp_path / "run").names == [f"step{s}" for s in range(0, 31, 2)]


DATA_PARALLEL_CHILD = textwrap.dedent("""
    import sys, pickle, json
    import jax, numpy as np
    import jtrust
    from jtrust import training as T
    from jtrust.core.errors import InputError
    from jtrust.models.lora import LoraConfig
    from jtrust.runtime import sharding
    assert len(jax.devices()) == 8
    checkpoint, examples_file, out = sys.argv[1:4]
    model = jtrust.load(checkpoint)
    with open(examples_file, "rb") as f:
        examples = pickle.load(f)
    config = T.TrainConfig(steps=6, batch_size=16, accumulation=2, learning_rate=3e-3, log_every=1)
    lora = T.TrainConfig(steps=4, batch_size=16, learning_rate=3e-3, log_every=1, lora=LoraConfig(rank=4))
    one = T.train(model, examples, config, out + "/one", progress=False)
    one_lora = T.train(model, examples, lora, out + "/one_lora", progress=False)
    result = {"one": [m["loss"] for m in one.metrics], "one_lora": [m["loss"] for m in one_lora.metrics]}

    def differences(a, b):
        d = np.concatenate([np.abs(np.asarray(x) - np.asarray(y)).ravel()
                            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))])
        return float(d.max()), float(np.mean(d > 2e-5))

    for name, sizes in [("8data", dict(data=8)), ("2data4fsdp", dict(data=2, fsdp=4)),
                        ("2data2fsdp2model", dict(data=2, fsdp=2, model=2))]:
        mesh = sharding.make_mesh(**sizes)
        run = T.train(model, examples, config, out + "/" + name, progress=False, mesh=mesh)
        q = run.model.params["blocks"]["attn"]["q"]["kernel"]
        assert len(q.sharding.device_set) == 8  # the state lives on all 8 devices
        result[name] = {"loss": [m["loss"] for m in run.metrics], "q_shard": list(q.addressable_shards[0].data.shape),
                        "diff": differences(one.model.params, run.model.params)}
        if "model" in sizes:  # LoRA: adapters replicated, the frozen base split by the rules
            run = T.train(model, examples, lora, out + "/lora_" + name, progress=False, mesh=mesh)
            result["lora_" + name] = {"loss": [m["loss"] for m in run.metrics],
                                      "diff": differences(one_lora.model.params, run.model.params)}
    try:
        T.train(model, examples, config, out + "/bad", progress=False, mesh=sharding.make_mesh(data=2, model=3))
    except InputError as e:
        result["bad"] = str(e)
    print(json.dumps(result))
""")


def test_training_on_data_fsdp_and_model_meshes_matches_one_device(tiny, tmp_path):
    """Losses and final parameters on meshes (8 data), (2 data x 4 fsdp), (2 data x 2 fsdp x 2
    model) of 8 fake devices equal one device's, full fine-tuning and LoRA."""
    import pickle
    model, _, examples = tiny
    src = tmp_path / "model"
    save(model, src)
    with open(tmp_path / "examples.pkl", "wb") as f:
        pickle.dump(examples, f)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", DATA_PARALLEL_CHILD, str(src), str(tmp_path / "examples.pkl"),
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(r["one"]) == 6 and r["one"][-1] < r["one"][0]
    d, h = model.config.d_model, model.config.n_heads * model.config.head_dim
    shards = {"8data": [model.config.n_layers, d, h], "2data4fsdp": [model.config.n_layers, d // 4, h],
              "2data2fsdp2model": [model.config.n_layers, d // 2, h // 2]}
    for name in ("8data", "2data4fsdp", "2data2fsdp2model", "lora_2data2fsdp2model"):
        np.testing.assert_allclose(r[name]["loss"], r["one_lora" if "lora" in name else "one"], rtol=1e-5,
                                   err_msg=name)
        # the reductions sum in another order; as in the AdamW oracle test, only elements with
        # noise-level gradients may differ by more than 2e-5, and by less than one step (lr)
        max_diff, frac = r[name]["diff"]
        assert frac <= 1e-4 and max_diff < 3e-3, (name, r[name]["diff"])
        if name in shards:
            assert r[name]["q_shard"] == shards[name], name
    assert "'model' of size 3" in r["bad"] and r["bad"].startswith("parameter ")


def test_lora_trains_adapters_only_and_follows_the_chain_rule(tiny, tmp_path):
    model, _, examples = tiny
    lora = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
    config = T.TrainConfig(steps=4, batch_size=8, learning_rate=1e-2, lora=lora, log_every=1)
    result = T.train(model, examples, config, tmp_path / "lora", progress=False)
    losses = [m["loss"] for m in result.metrics]
    assert losses[-1] < losses[0]
    adapted = {("attn", "q"), ("attn", "v"), ("mlp", "down")}
    for group in ("attn", "mlp"):
        for proj, leaf in result.model.params["blocks"][group].items():
            base = model.params["blocks"][group][proj]["kernel"]
            changed = not np.array_equal(np.asarray(leaf["kernel"]), np.asarray(base))
            assert changed == ((group, proj) in adapted), (group, proj)
    np.testing.assert_array_equal(result.model.params["embed"]["embedding"], model.params["embed"]["embedding"])
    # d loss / d b = scale * a^T (d loss / d W): LoRA's gradient from the full-weight gradient
    adapters = lora_lib.init_adapters(model.params, lora, jax.random.key(0))
    adapters["q"]["b"] = adapters["q"]["b"] + 0.01  # away from b = 0, so a's gradient is non-zero too
    batch = T.take(examples, np.arange(8))
    mean_loss = lambda params: (lambda s, n: s / n)(*T.token_loss_sum(params, batch, config=model.config))
    g_adapters = jax.grad(lambda ad: mean_loss(lora_lib.merge(model.params, ad, lora)))(adapters)
    merged = lora_lib.merge(model.params, adapters, lora)
    g_full = jax.grad(mean_loss)(merged)["blocks"]["attn"]["q"]["kernel"]
    a, b = adapters["q"]["a"], adapters["q"]["b"]
    np.testing.assert_allclose(g_adapters["q"]["b"], lora.scale * jnp.einsum("ldr,ldo->lro", a, g_full),
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(g_adapters["q"]["a"], lora.scale * jnp.einsum("ldo,lro->ldr", g_full, b),
                               rtol=1e-4, atol=1e-7)


def test_bfloat16_compute_follows_float32(tiny, tmp_path):
    model, _, examples = tiny
    base = dict(steps=5, batch_size=8, learning_rate=3e-3, log_every=1)
    f32 = T.train(model, examples, T.TrainConfig(**base), tmp_path / "f32", progress=False)
    bf16 = T.train(model, examples, T.TrainConfig(**base, dtype="bfloat16"), tmp_path / "bf16", progress=False)
    a, b = ([m["loss"] for m in r.metrics] for r in (f32, bf16))
    np.testing.assert_allclose(b, a, rtol=0.02)
    assert a != b  # bfloat16 really was used
    assert jax.tree.leaves(bf16.model.params)[0].dtype == jnp.float32  # master weights stay float32


def test_perplexity_eval_and_bad_input(tiny, tmp_path):
    import torch
    model, torch_model, examples = tiny
    held = T.take(examples, np.arange(5))  # 5 rows, batch 4: a padded last batch
    got = T.perplexity_eval(held, batch_size=4)(model)
    with torch.no_grad():
        logits = torch_model.eval()(input_ids=torch.tensor(held.tokens, dtype=torch.long)).logits
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                torch.tensor(held.targets, dtype=torch.long).reshape(-1))
    assert got["val_loss"] == pytest.approx(nll.item(), rel=1e-5)
    assert got["val_ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    wrong = T.packed_examples(np.full(100, 5000), seq_len=8)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        T.train(model, wrong, T.TrainConfig(steps=1, batch_size=2), tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match="multiple of accumulation"):
        T.TrainConfig(steps=1, batch_size=6, accumulation=4)
