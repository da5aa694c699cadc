"""SPD metrics: parity with pyRiemann, invariances, identities, gradients, dispatcher errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import concentrated_spd, random_spd

from manifoldnorm import functional as mf

pyr_mean = pytest.importorskip("pyriemann.geometry.mean", reason="pyriemann (dev extra) is the test oracle")
pyr_dist = pytest.importorskip("pyriemann.geometry.distance")
pyr_geo = pytest.importorskip("pyriemann.geometry.geodesic")

F64 = torch.float64


def _np(X: torch.Tensor) -> np.ndarray:
    return X.detach().numpy()


@pytest.mark.parametrize("sigma", [0.3, 1.0])
def test_mean_aim_matches_pyriemann(seed: int, sigma: float) -> None:
    X = concentrated_spd(16, 6, sigma=sigma, seed=seed)
    ref = pyr_mean.mean_riemann(_np(X), tol=1e-14, maxiter=500)
    ours = mf.mean_aim(X, karcher_steps=200, tol=1e-13)
    np.testing.assert_allclose(_np(ours), ref, rtol=1e-10, atol=1e-10)


def test_weighted_means_match_pyriemann(seed: int) -> None:
    X = concentrated_spd(12, 5, sigma=0.5, seed=seed)
    w = torch.rand(12, dtype=F64, generator=torch.Generator().manual_seed(seed)) + 0.1
    ref = pyr_mean.mean_riemann(_np(X), tol=1e-14, maxiter=500, sample_weight=w.numpy())
    np.testing.assert_allclose(_np(mf.mean_aim(X, weights=w, karcher_steps=200, tol=1e-13)), ref, atol=1e-10)
    ref = pyr_mean.mean_logeuclid(_np(X), sample_weight=w.numpy())
    np.testing.assert_allclose(_np(mf.mean_lem(X, weights=w)), ref, rtol=1e-10, atol=1e-10)


def test_closed_form_means_match_pyriemann(seed: int) -> None:
    X = random_spd(10, n=5, seed=seed, cond=50.0)
    np.testing.assert_allclose(_np(mf.mean_lem(X)), pyr_mean.mean_logeuclid(_np(X)), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(_np(mf.mean_lcm(X)), pyr_mean.mean_logchol(_np(X)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "metric,ref",
    [("aim", "distance_riemann"), ("lem", "distance_logeuclid"), ("lcm", "distance_logchol")],
)
def test_distances_match_pyriemann(metric: str, ref: str, seed: int) -> None:
    A = random_spd(6, n=5, seed=seed, cond=100.0)
    B = random_spd(6, n=5, seed=seed + 10, cond=100.0)
    ours = mf.distance(A, B, metric=metric)
    expected = np.array([getattr(pyr_dist, ref)(a, b) for a, b in zip(_np(A), _np(B), strict=True)])
    np.testing.assert_allclose(_np(ours), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "metric,ref", [("aim", "geodesic_riemann"), ("lem", "geodesic_logeuclid"), ("lcm", "geodesic_logchol")]
)
def test_geodesics_match_pyriemann(metric: str, ref: str) -> None:
    A, B = random_spd(n=5, seed=1), random_spd(n=5, seed=2)
    for t in (0.0, 0.1, 0.5, 1.0):
        expected = getattr(pyr_geo, ref)(_np(A), _np(B), t)
        np.testing.assert_allclose(_np(mf.geodesic(A, B, t, metric=metric)), expected, rtol=1e-10, atol=1e-10)


def test_aim_congruence_invariance(seed: int) -> None:
    A, B = random_spd(4, n=5, seed=seed), random_spd(4, n=5, seed=seed + 1)
    W = torch.randn(5, 5, dtype=F64, generator=torch.Generator().manual_seed(seed)) + 3 * torch.eye(5, dtype=F64)
    WA, WB = W @ A @ W.T, W @ B @ W.T
    torch.testing.assert_close(mf.distance_aim(WA, WB), mf.distance_aim(A, B), rtol=1e-10, atol=1e-10)
    X = concentrated_spd(8, 5, seed=seed)
    M = mf.mean_aim(X, karcher_steps=100, tol=1e-13)
    WM = mf.mean_aim(W @ X @ W.T, karcher_steps=100, tol=1e-13)
    torch.testing.assert_close(WM, W @ M @ W.T, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("metric", mf.METRICS)
def test_mean_of_identical_matrices_is_that_matrix(metric: str) -> None:
    P = random_spd(n=6, seed=4, cond=1e3)
    X = P.expand(7, 6, 6).clone()
    torch.testing.assert_close(mf.mean(X, metric=metric), P, rtol=1e-10, atol=1e-10)


def test_karcher_mean_of_identical_matrices_has_finite_gradient() -> None:
    X = torch.eye(4, dtype=F64).expand(5, 4, 4).clone().requires_grad_()
    mf.mean_aim(X, karcher_steps=3).sum().backward()
    assert torch.isfinite(X.grad).all()
    # exact, not merely finite: at N identical matrices the mean moves by the average perturbation,
    # d mean = (1/N) sum_i dX_i, so <G, mean> has gradient G/N for every matrix (all eigenvalues tied at I)
    for A in (torch.eye(4, dtype=F64), random_spd(n=4, seed=3)):
        X = A.expand(5, 4, 4).clone().requires_grad_()
        G = mf.sym(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=F64))
        (mf.mean_aim(X, karcher_steps=3) * G).sum().backward()
        torch.testing.assert_close(X.grad, (G / 5).expand(5, 4, 4), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("metric", mf.METRICS)
def test_mean_is_zero_of_the_gradient_of_the_variance(metric: str, seed: int) -> None:
    """The Fréchet mean minimises sum_i d^2(M, X_i): its gradient w.r.t. M vanishes there."""
    X = concentrated_spd(9, 4, sigma=0.6, seed=seed)
    M = mf.mean(X, metric=metric, **({"karcher_steps": 200, "tol": 1e-13} if metric == "aim" else {}))
    M = M.clone().requires_grad_()
    var = (mf.distance(M.expand_as(X), X, metric=metric) ** 2).sum()
    (g,) = torch.autograd.grad(var, M)
    assert float(g.abs().max()) < 1e-8


def test_exp_log_maps_are_inverse(seed: int) -> None:
    P, X = random_spd(3, n=5, seed=seed), random_spd(3, n=5, seed=seed + 7)
    torch.testing.assert_close(mf.expmap_aim(P, mf.logmap_aim(P, X)), X, rtol=1e-10, atol=1e-10)
    # the norm of the log map in the metric at P equals the distance
    V = mf.logmap(P, X)
    Pi = mf.sym_invsqrtm(P)
    torch.testing.assert_close(
        torch.linalg.matrix_norm(Pi @ V @ Pi), mf.distance_aim(P, X), rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(mf.cholesky_exp(mf.cholesky_log(X)), X, rtol=1e-12, atol=1e-12)


def test_geodesic_endpoints_and_tensor_time() -> None:
    A, B = random_spd(3, n=4, seed=0), random_spd(3, n=4, seed=1)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64, requires_grad=True)
    for metric in mf.METRICS:
        G = mf.geodesic(A, B, t, metric=metric)
        torch.testing.assert_close(G[0], A[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(G[2], B[2], rtol=1e-10, atol=1e-10)
        # the midpoint is equidistant
        torch.testing.assert_close(
            mf.distance(A[1], G[1], metric), mf.distance(G[1], B[1], metric), rtol=1e-9, atol=1e-10
        )
        G.sum().backward()
        assert torch.isfinite(t.grad).all()


def test_karcher_tolerance_is_checked_after_the_update() -> None:
    X = concentrated_spd(8, 4, sigma=0.3, seed=0)
    one = mf.mean_aim(X, karcher_steps=1, tol=1e3)  # huge tol: stops after exactly one applied step
    arith = X.mean(0)
    assert float(mf.distance_aim(one, arith)) > 1e-3
    torch.testing.assert_close(one, mf.mean_aim(X, karcher_steps=1, tol=0.0))


def test_per_channel_means_over_dim0() -> None:
    X = random_spd(6, 3, n=4, seed=2)
    for metric in mf.METRICS:
        M = mf.mean(X, metric=metric)
        assert M.shape == (3, 4, 4)
        torch.testing.assert_close(M[1], mf.mean(X[:, 1], metric=metric), rtol=1e-9, atol=1e-10)


def test_gradcheck_metrics() -> None:
    A = random_spd(2, n=3, seed=0).requires_grad_()
    B = random_spd(2, n=3, seed=1).requires_grad_()
    for metric in mf.METRICS:
        assert torch.autograd.gradcheck(lambda a, b, m=metric: mf.distance(mf.sym(a), mf.sym(b), m), (A, B))
        assert torch.autograd.gradcheck(lambda a, m=metric: mf.mean(mf.sym(a), metric=m, dim=0), (A,))


def test_dispatcher_errors_list_valid_names() -> None:
    X = random_spd(3, n=3)
    with pytest.raises(ValueError, match="aim, lem, lcm"):
        mf.mean(X, metric="euclid")
    with pytest.raises(ValueError, match="valid names: aim"):
        mf.logmap(X[0], X[1], metric="lem")
    with pytest.raises(ValueError, match="batch dimension"):
        mf.mean(X, dim=1)
    with pytest.raises(ValueError, match="karcher_steps"):
        mf.mean_aim(X, karcher_steps=0)
    with pytest.raises(ValueError, match="weights has 2 entries"):
        mf.mean_lem(X, weights=torch.ones(2))


def test_graph_free_karcher_flow_and_geodesic_are_bit_identical() -> None:
    """Without an autograd graph (statistics, running means) the batch-norm Karcher flow and the AIM geodesic skip
    the spectral functions' plumbing: the same values, bit for bit."""
    X = concentrated_spd(7, 4, sigma=0.5, seed=3).reshape(7, 1, 4, 4)
    w = torch.rand(7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    A, B = random_spd(2, n=4, seed=5), random_spd(2, n=4, seed=6)
    for steps in (1, 3):
        for weights in (None, w):
            plain = mf.mean_aim(X, dim=0, weights=weights, karcher_steps=steps, tol=0.0)
            graph = mf.mean_aim(X.clone().requires_grad_(), dim=0, weights=weights, karcher_steps=steps, tol=0.0)
            assert torch.equal(plain, graph.detach())
    for t in (0.3, torch.tensor(0.7, dtype=torch.float64), torch.tensor([0.2, 0.9], dtype=torch.float64)):
        plain = mf.geodesic_aim(A, B, t)
        graph = mf.geodesic_aim(A.clone().requires_grad_(), B, t)
        assert torch.equal(plain, graph.detach())


def test_karcher_step_tangents() -> None:
    from manifoldnorm.functional.spd_aim import karcher_step_tangents

    X = concentrated_spd(6, 3, sigma=0.4, seed=2).reshape(6, 1, 3, 3)
    G, Si, T = karcher_step_tangents(X, 2)
    assert torch.equal(G, mf.mean_aim(X, dim=0, karcher_steps=2, tol=0.0))
    # the last step: G = S exp(mean T) S with S = Si^{-1}, T_i = log(Si X_i Si)
    torch.testing.assert_close(T, mf.sym_logm(mf.congruence(Si, X)), rtol=1e-12, atol=1e-12)
    S = torch.linalg.inv(Si)
    torch.testing.assert_close(G, mf.congruence(S, mf.sym_expm(T.mean(dim=0))), rtol=1e-12, atol=1e-12)
