"""jtrust's influence scores against kronfluence (the PyTorch EK-FAC reference, Grosse et al. 2023)
on the same tiny random llama checkpoint, modules and rows: identity, diagonal, K-FAC and EK-FAC.

Both sides fit on the empirical Fisher (the training rows' own targets), normalize the
covariances by the number of real tokens (attention mask 1) and the eigenvalue corrections by the
number of rows, and damp each module by 0.1 x its mean eigenvalue (jtrust `damping=0.1`,
kronfluence `damping_factor=None`). The loss and the measurement are the same on both sides: the
sum over rows of the weighted next-token NLL (`weights`), with `mask` only as the attention mask.
"""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import scipy.stats

import jtrust
from jtrust.analysis import attribution as attr
from jtrust.training.lm import Examples

torch = pytest.importorskip("torch")
kronfluence = pytest.importorskip("kronfluence")

LAYERS = (0, 2)
TORCH_NAMES = {"q": "self_attn.q_proj", "down": "mlp.down_proj"}
N_TRAIN, N_QUERY, T = 12, 4, 10


def rows(n: int, seed: int) -> Examples:
    """Random rows, right-padded to T (mask 0) with 0-3 pad positions, and about a third of the
    real positions unweighted (weight 0: not in the loss, still attended to)."""
    r = np.random.default_rng(seed)
    tokens = r.integers(3, 300, (n, T)).astype(np.int32)
    lengths = T - r.integers(0, 4, n)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    tokens = tokens * mask  # pad id 0
    weights = (r.random((n, T)) > 0.33).astype(np.float32) * mask
    weights[:, 0] = 1.0  # every row has a weighted token
    targets = r.integers(3, 300, (n, T)).astype(np.int32) * mask
    return Examples(tokens, mask, targets, weights)


TRAIN, QUERIES = rows(N_TRAIN, 0), rows(N_QUERY, 1)


def jtrust_scores(model, method: str) -> np.ndarray:
    task = attr.Task(modules=attr.Modules(names=("q", "down"), layers=LAYERS))
    return attr.scores(model, TRAIN, QUERIES, task=task,
                       options=attr.Options(method=method, damping=0.1), progress=False)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, examples: Examples):
        self.examples = examples

    def __len__(self):
        return self.examples.tokens.shape[0]

    def __getitem__(self, i):
        e = self.examples
        return {"input_ids": torch.as_tensor(e.tokens[i], dtype=torch.long),
                "attention_mask": torch.as_tensor(e.mask[i], dtype=torch.long),
                "targets": torch.as_tensor(e.targets[i], dtype=torch.long),
                "weights": torch.as_tensor(e.weights[i], dtype=torch.float32)}


def _weighted_nll(batch, model):
    """Sum over rows of the weighted next-token NLL: jtrust's `row_nll` summed over the batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -torch.gather(logp, -1, batch["targets"][..., None])[..., 0]
    return torch.sum(nll * batch["weights"])


class _Task(kronfluence.Task):
    def compute_train_loss(self, batch, model, sample=False):
        # `sample` is ignored on purpose: jtrust fits its curvature on the empirical Fisher (the
        # rows' own targets), so kronfluence must too (for factors it calls this with sample=True
        # unless FactorArguments(use_empirical_fisher=True); both give the same loss here).
        del sample
        return _weighted_nll(batch, model)

    def compute_measurement(self, batch, model):
        return _weighted_nll(batch, model)

    def get_influence_tracked_modules(self):
        return [f"model.layers.{l}.{TORCH_NAMES[n]}" for n in ("q", "down") for l in LAYERS]

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


def kronfluence_scores(torch_model, method: str, out_dir) -> np.ndarray:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    task = _Task()
    model = prepare_model(copy.deepcopy(torch_model).float().eval(), task)  # wraps modules in place
    analyzer = Analyzer(analysis_name="oracle", model=model, task=task, cpu=True, disable_tqdm=True,
                        output_dir=str(out_dir))
    train, queries = _Rows(TRAIN), _Rows(QUERIES)
    analyzer.fit_all_factors(factors_name=method, dataset=train, per_device_batch_size=N_TRAIN,
                             factor_args=FactorArguments(strategy=method, use_empirical_fisher=True),
                             overwrite_output_dir=True)
    analyzer.compute_pairwise_scores(scores_name=method, factors_name=method, query_dataset=queries,
                                     train_dataset=train, per_device_query_batch_size=N_QUERY,
                                     per_device_train_batch_size=N_TRAIN,
                                     score_args=ScoreArguments(damping_factor=None),
                                     overwrite_output_dir=True)
    return analyzer.load_pairwise_scores(method)["all_modules"].double().numpy()


@pytest.fixture(scope="module")
def both(tiny_checkpoints, tmp_path_factory):
    import kronfluence.utils.state
    directory, torch_model = tiny_checkpoints["llama"]
    model = jtrust.load(str(directory))
    out = tmp_path_factory.mktemp("kronfluence")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        # speed only: kronfluence calls gc.collect() ~10 times per step (0.6 s each in a process
        # holding jax and the whole suite), and one thread is fastest for 64-wide matrices
        patch.setattr(kronfluence.utils.state, "gc", types.SimpleNamespace(collect=lambda: 0))
        torch.set_num_threads(1)
        try:
            return {m: (jtrust_scores(model, m), kronfluence_scores(torch_model, m, out))
                    for m in ("identity", "diagonal", "kfac", "ekfac")}
        finally:
            torch.set_num_threads(threads)


# Per method: the largest |jtrust - kronfluence| relative to the largest |score|. Measured (float32
# forward/backward on both sides, float64 factors): identity 9e-7, diagonal 1.5e-6, kfac 6e-6,
# ekfac 2e-5; Spearman 1.000000 for all four (the issue asks >= 0.9 for ekfac).
MAX_RELATIVE = {"identity": 1e-5, "diagonal": 1e-5, "kfac": 1e-4, "ekfac": 1e-4}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # kronfluence's torch.cuda.amp.GradScaler
@pytest.mark.parametrize("method", list(MAX_RELATIVE))
def test_scores_match_kronfluence(both, method):
    ours, theirs = both[method]
    assert ours.shape == theirs.shape == (N_QUERY, N_TRAIN)
    rho = scipy.stats.spearmanr(ours.ravel(), theirs.ravel()).statistic
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"{method}: spearman {rho:.6f}, max relative error {rel:.2e}")
    assert rho >= 0.999, (method, rho)
    assert rel <= MAX_RELATIVE[method], (method, rel)
