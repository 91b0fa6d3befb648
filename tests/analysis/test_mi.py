"""Kernel dependence measures against closed forms and a float64 numpy transcription."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from jtrust.analysis import mi
from jtrust.analysis.features import standardize


def numpy_nhsic(a, b, sigma=50.0, eps=1e-5):
    """The formula written out in float64 with explicit H and inverse."""
    def operator(z):
        z = np.asarray(z, np.float64).reshape(len(z), -1)
        n, d = z.shape
        K = np.exp(-cdist(z, z, "sqeuclidean") / (2 * sigma**2 * d))
        Kc = K @ (np.eye(n) - np.ones((n, n)) / n)
        return Kc @ np.linalg.inv(Kc + eps * n * np.eye(n))
    return np.trace(operator(a) @ operator(b))


def numpy_hsic_biased(a, b, sigma):
    n = len(a)
    K = lambda z: np.exp(-cdist(z, z, "sqeuclidean") / (2 * sigma**2))
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K(np.float64(a)) @ H @ K(np.float64(b)) @ H) / (n - 1) ** 2


@pytest.mark.parametrize("n, p, expected", [(200, 0.5, 0.826431), (300, 0.3, 0.798534),
                                            (1000, 0.5, 0.826431)])
def test_nhsic_of_labels_closed_form(n, p, expected):
    y = (np.arange(n) < round(p * n)).astype(np.float32)
    lam = 2 * (1 - np.exp(-1 / (2 * 50.0**2))) * n * p * (1 - p)
    assert (lam / (lam + 1e-5 * n)) ** 2 == pytest.approx(expected, abs=1e-6)  # the closed form's figures
    assert mi.nhsic(y[:, None], y[:, None]) == pytest.approx(expected, abs=2e-4)


def test_nhsic_matches_numpy_formula():
    rng = np.random.RandomState(0)
    x = standardize(rng.randn(150, 32))
    t = standardize(x @ rng.randn(32, 16) + 0.5 * rng.randn(150, 16))
    y = (x[:, 0] > 0).astype(np.float32)
    for a, b in ((x, t), (t, y[:, None]), (x, x)):
        assert mi.nhsic(a, b) == pytest.approx(numpy_nhsic(a, b), rel=1e-2)  # float32 solve


def test_hsic_biased_matches_numpy_and_sees_dependence():
    rng = np.random.RandomState(1)
    x = rng.randn(120, 8)
    dependent = x @ rng.randn(8, 4)
    independent = rng.randn(120, 4)
    for sigma in (1.0, 5.0):
        for b in (dependent, independent):
            assert float(mi.hsic_biased(x, b, sigma)) == pytest.approx(numpy_hsic_biased(x, b, sigma),
                                                                         rel=1e-3, abs=1e-7)
    # at a bandwidth on the scale of the data's distances (|x_i - x_j| ~ 4), dependence shows
    assert mi.hsic_biased(x, dependent, 5.0) > 5 * mi.hsic_biased(x, independent, 5.0)


def test_information_plane_is_per_layer_nhsic():
    rng = np.random.RandomState(2)
    x = rng.randn(80, 24)
    layers = np.stack([x @ rng.randn(24, 24) * s + rng.randn(80, 24) for s in (1.0, 0.3, 0.0)])
    y = (x[:, 1] > 0).astype(np.int32)
    plane = mi.information_plane(x, layers, y)
    for l in range(3):
        t = standardize(layers[l])
        assert plane.i_xt[l] == pytest.approx(numpy_nhsic(standardize(x), t), rel=1e-2)
        assert plane.i_ty[l] == pytest.approx(numpy_nhsic(t, y[:, None].astype(float)), rel=1e-2)
    assert plane.i_xt[0] > plane.i_xt[2]  # the layer built from x shares more with x than noise does
