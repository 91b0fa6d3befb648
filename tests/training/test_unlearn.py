"""jtrust.training.unlearn: every objective (GA, GD, NPO, each with and without entropy optimization)
against the same formula written in PyTorch on the transformers model (loss and gradient),
and `train` with two example streams and a reference model, resumed after a crash."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch

import jtrust
from helpers import make_tiny_hf_dir, random_tokens
from jtrust import training as T
from jtrust.io.convert import hf_to_params
from jtrust.training.unlearn import unlearning_objective


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("unlearn") / "llama"
    torch_model = make_tiny_hf_dir(path, "llama", seed=5)
    rng = np.random.default_rng(0)

    def stream(seed, n=12, T_=16):
        ex = T.packed_examples(random_tokens((n * (T_ + 1),), seed=seed), seq_len=T_)
        w = (rng.random(ex.weights.shape) < 0.6).astype(np.float32)  # answer tokens only
        return ex._replace(weights=w)
    return jtrust.load(path), torch_model, {"forget": stream(1), "retain": stream(2)}


def _torch_loss(model, ref_model, batch, method, entropy, beta=0.05, lf=1.0, lr=-0.25):
    """The published formulas, token-weighted over answer tokens."""
    def stats(m, ex):
        logits = m(input_ids=torch.tensor(ex.tokens, dtype=torch.long)).logits.double()
        logp = torch.log_softmax(logits, -1)
        nll = -logp.gather(-1, torch.tensor(ex.targets, dtype=torch.long)[..., None])[..., 0]
        ent = -(logp.exp() * logp).sum(-1)
        w = torch.tensor(ex.weights, dtype=torch.float64)
        return (nll * w).sum() / w.sum(), (nll * w).sum(1), (ent * w).sum() / w.sum()
    f_nll, f_seq, f_ent = stats(model, batch["forget"])
    r_nll, _, r_ent = stats(model, batch["retain"])
    if method == "ga":
        loss = -f_nll
    elif method == "gd":
        loss = r_nll - f_nll
    else:
        with torch.no_grad():
            _, ref_seq, _ = stats(ref_model, batch["forget"])
        loss = -(2 / beta) * torch.nn.functional.logsigmoid(beta * (f_seq - ref_seq)).mean() + r_nll
    if entropy:
        loss = loss + lf * f_ent + lr * r_ent
    return loss


@pytest.mark.parametrize("method", ["ga", "gd", "npo"])
@pytest.mark.parametrize("entropy", [False, True])
def test_objective_loss_and_gradient_match_pytorch(tiny, method, entropy):
    model, torch_model, streams = tiny
    batch = {k: T.take(v, np.arange(4)) for k, v in streams.items()}
    # the reference differs from the trained model, as it does after the first unlearning step
    ref_torch = copy.deepcopy(torch_model)
    with torch.no_grad():
        for p in ref_torch.parameters():
            p.add_(0.02 * torch.randn_like(p))
    reference = hf_to_params({k: v.numpy() for k, v in ref_torch.state_dict().items()}, model.config)
    objective = unlearning_objective(method, entropy=entropy)
    fn = lambda p: objective.fn(p, reference, batch, config=model.config, dtype=np.float32)[0]
    loss, grads = jax.value_and_grad(fn)(model.params)
    torch_model = torch_model.eval()
    torch_model.zero_grad()
    expected_loss = _torch_loss(torch_model, ref_torch, batch, method, entropy)
    expected_loss.backward()
    assert float(loss) == pytest.approx(expected_loss.item(), rel=1e-5, abs=1e-6)
    expected = hf_to_params({k: v.grad.numpy() for k, v in torch_model.named_parameters()}, model.config)
    torch_model.zero_grad()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=2e-5 * np.abs(b).max()),
                 grads, expected)


def test_two_stream_training_resumes_after_a_crash(tiny, tmp_path):
    """NPO + entropy over forget/retain streams: the forget NLL rises, and a run that crashed
    at step 4 and resumed ends with the straight run's parameters and log."""
    model, _, streams = tiny
    objective = unlearning_objective("npo", entropy=True)
    config = T.TrainConfig(steps=6, batch_size=4, accumulation=2, learning_rate=1e-2, schedule="constant",
                           save_steps=(0, 2, 4, 6), log_every=1)
    kwargs = dict(objective=objective, reference=model.params, progress=False)
    straight = T.train(model, streams, config, tmp_path / "straight", **kwargs)
    logs = [m for m in straight.metrics if m["kind"] == "train"]
    assert logs[-1]["forget_nll"] > logs[0]["forget_nll"] + 0.1
    assert {"retain_nll", "forget_entropy", "retain_entropy"} <= set(logs[0])

    def crash(m):
        if m.name == "step4":
            raise RuntimeError("crash")
        return {}
    with pytest.raises(RuntimeError):
        T.train(model, streams, config, tmp_path / "resumed", evals=[crash], **kwargs)
    resumed = T.train(model, streams, config, tmp_path / "resumed", **kwargs)
    jax.tree.map(np.testing.assert_array_equal, resumed.model.params, straight.model.params)
    with pytest.raises(ValueError, match="objective"):  # the same directory, another objective
        T.train(model, streams, config, tmp_path / "resumed", objective=unlearning_objective("ga"),
                progress=False)
    with pytest.raises(ValueError, match="no training examples in the 'retain' examples"):
        T.train(model, {"forget": streams["forget"], "retain": T.take(streams["retain"], np.arange(0))},
                config, tmp_path / "empty", **kwargs)
