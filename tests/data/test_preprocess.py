"""Band-pass filter, covariance estimators (parity with pyRiemann / scikit-learn), Riemannian re-centring."""

from __future__ import annotations

import numpy as np
import pytest
from pyriemann.geometry.covariance import covariances as pr_covariances
from pyriemann.geometry.mean import mean_riemann
from sklearn.covariance import ledoit_wolf, oas

from manifoldnorm.data import CHUNK_TRIALS, bandpass, bandpass_covariances, covariances, recenter, riemannian_mean


def _trials(n=6, c=5, t=64, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((c, c))
    return mix @ rng.standard_normal((n, c, t)) + rng.standard_normal((n, c, 1))  # correlated, non-zero mean


def _random_spd(n, c, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, c, 3 * c))
    return A @ np.swapaxes(A, -1, -2) / (3 * c) * np.exp(spread * rng.standard_normal((n, 1, 1)))


@pytest.mark.parametrize("shape", [(6, 5, 64), (4, 8, 6), (3, 3, 200), (2, 22, 384)])
@pytest.mark.parametrize("estimator", ["oas", "lwf", "scm"])
def test_covariance_parity_with_pyriemann(shape, estimator):
    X = _trials(*shape, seed=sum(shape))
    ours = covariances(X, estimator=estimator)
    ref = pr_covariances(X, estimator=estimator)
    assert ours.dtype == np.float64 and ours.shape == shape[:1] + shape[1:2] * 2
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())


@pytest.mark.parametrize("t", [4, 30, 500])
def test_oas_and_lwf_parity_with_sklearn(t):
    X = _trials(3, 7, t, seed=t)
    for i in range(3):
        np.testing.assert_allclose(covariances(X[i], "oas"), oas(X[i].T)[0], rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(covariances(X[i], "lwf"), ledoit_wolf(X[i].T)[0], rtol=1e-10, atol=1e-13)


def test_covariances_are_spd_even_with_few_samples_and_batched():
    X = _trials(2, 10, 5).reshape(1, 2, 10, 5)  # T < C: the sample covariance is singular
    C = covariances(X, "oas")
    assert C.shape == (1, 2, 10, 10)
    assert np.linalg.eigvalsh(C).min() > 0
    assert np.linalg.eigvalsh(covariances(X, "scm")).min() < 1e-10


def test_covariance_errors():
    with pytest.raises(ValueError, match="valid names are"):
        covariances(_trials(), "mcd")
    bad = _trials()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        covariances(bad)
    with pytest.raises(ValueError, match="shape"):
        covariances(np.zeros(5))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("estimator", ["oas", "lwf", "scm"])
def test_chunked_covariances_equal_the_unchunked(dtype, estimator):
    """Chunks bound the memory (no float64 copy of all trials); every trial is computed alone, so the chunk size
    does not change a value (to 1e-12 relative; in practice bitwise)."""
    X = _trials(37, 6, 80, seed=3).astype(dtype)
    whole = covariances(X, estimator, chunk_size=len(X))
    for chunk in (1, 5, 36, 100, None):
        np.testing.assert_allclose(covariances(X, estimator, chunk_size=chunk), whole, rtol=1e-12, atol=0)
    X4 = X[:36].reshape(4, 9, 6, 80)  # leading axes are chunked as one
    np.testing.assert_allclose(covariances(X4, estimator, chunk_size=7), whole[:36].reshape(4, 9, 6, 6),
                               rtol=1e-12, atol=0)
    assert CHUNK_TRIALS >= 1


def test_chunked_bandpass_equals_the_unchunked_and_keeps_float32():
    X = _trials(21, 4, 256, seed=5).astype(np.float32)
    whole = bandpass(X, 128.0, 8.0, 30.0, chunk_size=len(X))
    assert whole.dtype == np.float32  # float32 trials stay float32 (filtered in float64, one chunk at a time)
    for chunk in (1, 4, None):
        np.testing.assert_array_equal(bandpass(X, 128.0, 8.0, 30.0, chunk_size=chunk), whole)
    assert bandpass(X.astype(np.float64), 128.0, 8.0, 30.0).dtype == np.float64
    with pytest.raises(ValueError, match="chunk_size"):
        bandpass(X, 128.0, chunk_size=0)


@pytest.mark.parametrize("estimator", ["oas", "lwf"])
def test_bandpass_covariances_equal_the_two_steps(estimator):
    """The fused pipeline (filter a chunk, round it to the input dtype, reduce it) gives the two-step values."""
    X = _trials(19, 5, 256, seed=7).astype(np.float32)
    two_steps = covariances(bandpass(X, 128.0, 8.0, 30.0, order=4), estimator)
    for chunk in (1, 6, None):
        fused = bandpass_covariances(X, 128.0, (8.0, 30.0), 4, estimator, chunk_size=chunk)
        assert fused.dtype == np.float64
        np.testing.assert_allclose(fused, two_steps, rtol=1e-12, atol=0)
    np.testing.assert_allclose(bandpass_covariances(X, 128.0, None, 4, estimator), covariances(X, estimator),
                               rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="valid names are"):
        bandpass_covariances(X, 128.0, (8.0, 30.0), 4, "mcd")


def test_bandpass_passes_band_and_is_zero_phase():
    sfreq, t = 128.0, np.arange(512) / 128.0
    inband = np.sin(2 * np.pi * 12 * t)
    out_low, out_high = np.sin(2 * np.pi * 2 * t), np.sin(2 * np.pi * 50 * t)
    X = np.stack([inband, out_low, out_high])[None].astype(np.float32)
    Y = bandpass(X, sfreq, 8.0, 30.0)
    assert Y.dtype == np.float32 and Y.shape == X.shape
    mid = slice(128, 384)  # away from the edges
    np.testing.assert_allclose(Y[0, 0, mid], inband[mid], atol=0.02)  # unit gain, no phase shift
    assert np.abs(Y[0, 1, mid]).max() < 0.01 and np.abs(Y[0, 2, mid]).max() < 0.01
    assert bandpass(X.astype(np.int64), sfreq).dtype == np.float64


@pytest.mark.parametrize("fmin, fmax", [(0.0, 30.0), (30.0, 8.0), (8.0, 64.0), (8.0, 80.0)])
def test_bandpass_bad_band(fmin, fmax):
    with pytest.raises(ValueError, match="fmin"):
        bandpass(_trials(), 128.0, fmin, fmax)


def test_riemannian_mean_parity_with_pyriemann():
    C = _random_spd(20, 6, seed=1, spread=0.8)
    np.testing.assert_allclose(riemannian_mean(C), mean_riemann(C, tol=1e-12, maxiter=200), rtol=1e-8, atol=1e-12)


def test_riemannian_mean_identities():
    C = _random_spd(1, 5, seed=2)
    np.testing.assert_allclose(riemannian_mean(np.repeat(C, 4, 0)), C[0], rtol=1e-10)
    A, B = _random_spd(2, 4, seed=3)
    # Mean of two matrices is the geodesic midpoint A^{1/2} (A^{-1/2} B A^{-1/2})^{1/2} A^{1/2}.
    w, V = np.linalg.eigh(A)
    a_h, a_ih = (V * np.sqrt(w)) @ V.T, (V / np.sqrt(w)) @ V.T
    w2, V2 = np.linalg.eigh(a_ih @ B @ a_ih)
    mid = a_h @ ((V2 * np.sqrt(w2)) @ V2.T) @ a_h
    np.testing.assert_allclose(riemannian_mean(np.stack([A, B])), mid, rtol=1e-9)


def test_recenter_makes_each_domain_mean_identity():
    C = np.concatenate([_random_spd(15, 5, seed=4), 3.0 * _random_spd(10, 5, seed=5)])
    domain = np.r_[np.zeros(15, int), np.ones(10, int)]
    R = recenter(C, domain)
    assert R.shape == C.shape and np.linalg.eigvalsh(R).min() > 0
    np.testing.assert_allclose(R, np.swapaxes(R, -1, -2))
    for d in (0, 1):
        np.testing.assert_allclose(riemannian_mean(R[domain == d]), np.eye(5), atol=1e-8)
        np.testing.assert_allclose(mean_riemann(R[domain == d]), np.eye(5), atol=1e-6)


def test_recenter_removes_congruence_up_to_rotation():
    """Re-centred matrices of G C G^T and of C differ by an orthogonal change of basis (same spectra)."""
    C = _random_spd(12, 4, seed=6)
    G = np.random.default_rng(7).standard_normal((4, 4)) + 3 * np.eye(4)
    R1, R2 = recenter(C), recenter(G @ C @ G.T)
    np.testing.assert_allclose(np.linalg.eigvalsh(R1), np.linalg.eigvalsh(R2), rtol=1e-8)


def test_recenter_errors():
    C = _random_spd(4, 3)
    with pytest.raises(ValueError, match="shape"):
        recenter(C, np.zeros(3))
    bad = C.copy()
    bad[0, 0, 1] += 1.0
    with pytest.raises(ValueError, match="symmetric"):
        recenter(bad)
    neg = C.copy()
    neg[0] = -np.eye(3)
    with pytest.raises(ValueError, match="positive definite"):
        recenter(neg)
