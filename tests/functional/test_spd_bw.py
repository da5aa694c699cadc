"""Bures–Wasserstein geometry: parity with pyRiemann, identities, closed forms, gradients, errors (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import concentrated_spd, random_spd

from manifoldnorm import functional as mf
from manifoldnorm.functional import spd_bw as bw

pyr_mean = pytest.importorskip("pyriemann.geometry.mean", reason="pyriemann (dev extra) is the test oracle")
pyr_dist = pytest.importorskip("pyriemann.geometry.distance")
pyr_geo = pytest.importorskip("pyriemann.geometry.geodesic")
pyr_ts = pytest.importorskip("pyriemann.geometry.tangentspace")

F64 = torch.float64


def _np(X: torch.Tensor) -> np.ndarray:
    return X.detach().numpy()


def _sym(n: int, *shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(*shape, n, n, generator=g, dtype=F64)
    return scale * 0.5 * (V + V.mT)


def _inner(P: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    r"""BW metric :math:`g_P(U, V) = \tfrac12 \mathrm{tr}(\mathcal L_P[U] V)`."""
    return 0.5 * torch.diagonal(bw.lyapunov_solve(P, U) @ V, dim1=-2, dim2=-1).sum(-1)


# ---- parity with pyRiemann --------------------------------------------------------------------------------------

def test_distance_matches_pyriemann(seed: int) -> None:
    A = random_spd(6, n=5, seed=seed, cond=100.0)
    B = random_spd(6, n=5, seed=seed + 10, cond=100.0)
    expected = np.array([pyr_dist.distance_wasserstein(a, b) for a, b in zip(_np(A), _np(B), strict=True)])
    np.testing.assert_allclose(_np(bw.distance_bw(A, B)), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_np(bw.sqdistance_bw(A, B)), expected**2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_mean_matches_pyriemann(seed: int, weighted: bool) -> None:
    X = concentrated_spd(12, 5, sigma=0.6, seed=seed)
    w = torch.rand(12, dtype=F64, generator=torch.Generator().manual_seed(seed)) + 0.1 if weighted else None
    ref = pyr_mean.mean_wasserstein(_np(X), tol=1e-13, maxiter=500, sample_weight=None if w is None else w.numpy())
    ours = bw.mean_bw(X, weights=w, steps=500, tol=1e-15)
    np.testing.assert_allclose(_np(ours), ref, rtol=1e-10, atol=1e-11)


def test_geodesic_log_exp_match_pyriemann(seed: int) -> None:
    A = random_spd(4, n=5, seed=seed, cond=50.0)
    B = random_spd(4, n=5, seed=seed + 5, cond=50.0)
    V = bw.logmap_bw(A, B)
    for i in range(4):
        a, b = _np(A[i]), _np(B[i])
        np.testing.assert_allclose(_np(bw.geodesic_bw(A[i], B[i], 0.3)), pyr_geo.geodesic_wasserstein(a, b, 0.3),
                                   atol=1e-12)
        np.testing.assert_allclose(_np(V[i]), pyr_ts.log_map_wasserstein(b, a), atol=1e-11)
        np.testing.assert_allclose(_np(bw.expmap_bw(A[i], V[i])), pyr_ts.exp_map_wasserstein(_np(V[i]), a),
                                   atol=1e-11)


# ---- identities -------------------------------------------------------------------------------------------------

def test_exp_log_round_trips(seed: int) -> None:
    P = random_spd(5, n=4, seed=seed, cond=20.0)
    X = random_spd(5, n=4, seed=seed + 1, cond=20.0)
    torch.testing.assert_close(bw.expmap_bw(P, bw.logmap_bw(P, X)), X, atol=1e-11, rtol=1e-11)
    V = _sym(4, 5, seed=seed, scale=0.1)  # small enough for I + L_P[V] > 0
    torch.testing.assert_close(bw.logmap_bw(P, bw.expmap_bw(P, V)), V, atol=1e-11, rtol=1e-11)
    # |Log_P X|_P = d(P, X)
    torch.testing.assert_close(_inner(P, bw.logmap_bw(P, X), bw.logmap_bw(P, X)), bw.sqdistance_bw(P, X))


def test_geodesic_endpoints_and_constant_speed(seed: int) -> None:
    A = random_spd(3, n=4, seed=seed, cond=30.0)
    B = random_spd(3, n=4, seed=seed + 7, cond=30.0)
    torch.testing.assert_close(bw.geodesic_bw(A, B, 0.0), A, atol=1e-12, rtol=0)
    torch.testing.assert_close(bw.geodesic_bw(A, B, 1.0), B, atol=1e-11, rtol=0)
    d = bw.distance_bw(A, B)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=F64)
    gt = bw.geodesic_bw(A, B, t)  # one time per matrix
    torch.testing.assert_close(bw.distance_bw(A, gt), t * d, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(bw.distance_bw(gt, B), (1 - t) * d, rtol=1e-9, atol=1e-10)
    # the geodesic is the exponential of t * Log
    torch.testing.assert_close(bw.geodesic_bw(A, B, 0.4), bw.expmap_bw(A, 0.4 * bw.logmap_bw(A, B)),
                               atol=1e-11, rtol=1e-11)


def test_commuting_matrices_closed_forms() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(6, 4, generator=g, dtype=F64) + 0.2, torch.rand(6, 4, generator=g, dtype=F64) + 0.2
    A, B = torch.diag_embed(a), torch.diag_embed(b)
    torch.testing.assert_close(bw.sqdistance_bw(A, B), (a.sqrt() - b.sqrt()).square().sum(-1))
    torch.testing.assert_close(bw.geodesic_bw(A, B, 0.3), torch.diag_embed((0.7 * a.sqrt() + 0.3 * b.sqrt()) ** 2))
    torch.testing.assert_close(bw.logmap_bw(A, B), torch.diag_embed(2 * (a * b).sqrt() - 2 * a))
    w = torch.rand(6, generator=g, dtype=F64) + 0.1
    mean = (w.unsqueeze(-1) * a.sqrt()).sum(0) / w.sum()
    torch.testing.assert_close(bw.mean_bw(A, weights=w), torch.diag_embed(mean**2), atol=1e-12, rtol=1e-12)


def test_mean_is_the_fixed_point_and_zeroes_the_mean_log(seed: int) -> None:
    X = concentrated_spd(10, 4, sigma=0.8, seed=seed)
    w = torch.rand(10, dtype=F64, generator=torch.Generator().manual_seed(seed)) + 0.1
    G = bw.mean_bw(X, weights=w, steps=300, tol=1e-15)
    wn = (w / w.sum()).view(-1, 1, 1)
    S = mf.sym_sqrtm(G)
    torch.testing.assert_close((wn * mf.sym_sqrtm(S @ X @ S)).sum(0), G, atol=1e-11, rtol=1e-11)
    torch.testing.assert_close((wn * bw.logmap_bw(G, X)).sum(0), torch.zeros_like(G), atol=1e-10, rtol=0)


def test_mean_dim_weights_steps_and_init_semantics() -> None:
    X = concentrated_spd(8, 3, sigma=0.5, seed=1)
    X2 = torch.stack([X, random_spd(8, n=3, seed=2)], dim=1)  # (N, 2, n, n)
    G = bw.mean_bw(X2, dim=0)
    torch.testing.assert_close(G[0], bw.mean_bw(X))
    torch.testing.assert_close(bw.mean_bw(X2.transpose(0, 1), dim=1), G)
    torch.testing.assert_close(bw.mean_bw(X2.transpose(0, 1), dim=-1), G)
    # weights (N,) and broadcastable weights agree; integer multiplicities equal repetition
    w = torch.tensor([1.0, 2.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0], dtype=F64)
    torch.testing.assert_close(bw.mean_bw(X2, weights=w), bw.mean_bw(X2, weights=w.view(8, 1).expand(8, 2)))
    rep = torch.cat([X, X[1:2], X[4:5], X[4:5]])
    torch.testing.assert_close(bw.mean_bw(X, weights=w, tol=1e-14, steps=200), bw.mean_bw(rep, tol=1e-14, steps=200))
    # one step from the arithmetic mean, and tol=0 runs every step
    A = X.mean(0)
    S, Si = mf.sym_sqrtm_invsqrtm(A)
    H = mf.sym_sqrtm(S @ X @ S).mean(0)
    torch.testing.assert_close(bw.mean_bw(X, steps=1), Si @ H @ H @ Si)
    G1 = bw.mean_bw(X, steps=1)
    torch.testing.assert_close(bw.mean_bw(X, steps=3, tol=0.0), bw.mean_bw(X, steps=2, tol=0.0, init=G1))


def test_generalized_distance() -> None:
    A, B, M = random_spd(4, n=4, seed=1), random_spd(4, n=4, seed=2), random_spd(4, n=4, seed=3)
    eye = torch.eye(4, dtype=F64).expand(4, 4, 4)
    torch.testing.assert_close(bw.distance_gbw(A, B, eye), bw.distance_bw(A, B))
    # Han et al.: d_M^2 = tr(M^-1 A) + tr(M^-1 B) - 2 tr (A^1/2 M^-1 B M^-1 A^1/2)^1/2
    Mi = torch.linalg.inv(M)
    Ah = mf.sym_sqrtm(A)
    tr = lambda X: torch.diagonal(X, dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    d2 = tr(Mi @ A) + tr(Mi @ B) - 2 * tr(mf.sym_sqrtm(mf.sym(Ah @ Mi @ B @ Mi @ Ah)))
    torch.testing.assert_close(bw.distance_gbw(A, B, M) ** 2, d2, rtol=1e-10, atol=1e-12)
    # congruence invariance d_{CMC^T}(CAC^T, CBC^T) = d_M(A, B)
    C = torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(0)) + 3 * torch.eye(4, dtype=F64)
    cong = lambda X: mf.sym(C @ X @ C.mT)  # noqa: E731
    torch.testing.assert_close(bw.distance_gbw(cong(A), cong(B), cong(M)), bw.distance_gbw(A, B, M))


# ---- Lyapunov solve and parallel transport --------------------------------------------------------------------

def test_lyapunov_solve_residual_and_broadcasting() -> None:
    P = random_spd(3, n=5, seed=4, cond=100.0)
    V = _sym(5, 2, 3, seed=1)
    L = bw.lyapunov_solve(P, V)
    assert L.shape == (2, 3, 5, 5)
    torch.testing.assert_close(P @ L + L @ P, V, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(bw.lyapunov_solve(torch.eye(5, dtype=F64), V), V / 2)


def test_transport_is_an_isometry_and_inverts(seed: int) -> None:
    P = random_spd(2, n=4, seed=seed, cond=20.0)
    U, V = _sym(4, 2, seed=seed), _sym(4, 2, seed=seed + 1)
    eye = torch.eye(4, dtype=F64)
    TU, TV = bw.transport_bw_to_identity(P, U), bw.transport_bw_to_identity(P, V)
    torch.testing.assert_close(_inner(eye, TU, TV), _inner(P, U, V))
    torch.testing.assert_close(bw.transport_bw_from_identity(P, TU), U, atol=1e-12, rtol=1e-12)
    # transports the velocity of the geodesic from P to I: Log_I P is -Gamma(Log_P I)
    torch.testing.assert_close(bw.transport_bw_to_identity(P, bw.logmap_bw(P, eye.expand_as(P))),
                               -bw.logmap_bw(eye.expand_as(P), P), atol=1e-11, rtol=1e-11)


def test_transport_matches_pole_ladder() -> None:
    """The closed form is the Levi-Civita transport: a fine pole ladder (Exp/Log only) converges to it."""
    P = random_spd(n=4, seed=0, cond=5.0)
    eye = torch.eye(4, dtype=F64)
    V = _sym(4, seed=2)
    K = 60
    pts = [bw.geodesic_bw(P, eye, k / K) for k in range(K + 1)]
    W = V / K
    for A, B in zip(pts[:-1], pts[1:], strict=True):
        Y = bw.geodesic_bw(bw.expmap_bw(A, W), bw.geodesic_bw(A, B, 0.5), 2.0)
        W = -bw.logmap_bw(B, Y)
    exact = bw.transport_bw_to_identity(P, V)
    assert float(torch.linalg.norm(K * W - exact) / torch.linalg.norm(exact)) < 1e-4


# ---- gradients ---------------------------------------------------------------------------------------------------

def _spd_arg(X: torch.Tensor) -> torch.Tensor:
    return X.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("at_identity", [False, True])
def test_gradcheck_maps(at_identity: bool) -> None:
    P = torch.eye(3, dtype=F64) if at_identity else random_spd(n=3, seed=1)
    X, V = random_spd(2, n=3, seed=2), _sym(3, 2, seed=3, scale=0.3)
    S = mf.sym
    args = (_spd_arg(P), _spd_arg(X))
    assert torch.autograd.gradcheck(lambda p, x: bw.logmap_bw(S(p), S(x)), args)
    assert torch.autograd.gradcheck(lambda p, v: bw.expmap_bw(S(p), S(v)), (_spd_arg(P), _spd_arg(V)))
    assert torch.autograd.gradcheck(lambda p, v: bw.lyapunov_solve(S(p), S(v)), (_spd_arg(P), _spd_arg(V)))
    assert torch.autograd.gradcheck(lambda p, v: bw.transport_bw_to_identity(S(p), S(v)), (_spd_arg(P), _spd_arg(V)))
    assert torch.autograd.gradcheck(lambda p, v: bw.transport_bw_from_identity(S(p), S(v)),
                                    (_spd_arg(P), _spd_arg(V)))
    t = torch.tensor([0.3, 0.8], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, x, t: bw.geodesic_bw(S(p), S(x), t), (*args, t))
    assert torch.autograd.gradcheck(lambda p, x: bw.distance_bw(S(p), S(x)), args)


def test_distance_gradient_at_coincident_points_is_finite() -> None:
    A = random_spd(n=4, seed=5).requires_grad_(True)
    bw.distance_bw(A, A.detach()).backward()
    # d is not differentiable at A == B; round-off leaves d^2 ~ eps, so the gradient is finite and ~ sqrt(eps)
    assert torch.isfinite(A.grad).all() and float(A.grad.abs().max()) < 1e-6
    Z = torch.diag(torch.tensor([1.0, 4.0], dtype=F64)).requires_grad_(True)
    bw.distance_bw(Z, Z.detach()).backward()  # exact cancellation: d^2 == 0, subgradient 0
    assert torch.equal(Z.grad, torch.zeros_like(Z))
    B = torch.eye(3, dtype=F64, requires_grad=True)  # repeated eigenvalues everywhere
    bw.sqdistance_bw(B, 2.0 * torch.eye(3, dtype=F64)).backward()
    # d^2(B, 2I) = tr B + 6 - 2 sqrt2 tr B^1/2 -> gradient (1 - sqrt2 B^-1/2) = (1 - sqrt 2) I at B = I
    torch.testing.assert_close(B.grad, (1 - 2**0.5) * torch.eye(3, dtype=F64))


def test_mean_gradient_by_unrolling() -> None:
    X = concentrated_spd(4, 3, sigma=0.4, seed=1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: bw.mean_bw(mf.sym(x), steps=3, tol=0.0), (X,))


# ---- errors -------------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors() -> None:
    A = random_spd(2, n=3)
    with pytest.raises(ValueError, match="square"):
        bw.distance_bw(torch.ones(2, 3, 4, dtype=F64), A)
    with pytest.raises(ValueError, match="same size"):
        bw.distance_bw(A, random_spd(2, n=4))
    with pytest.raises(ValueError, match="broadcast"):
        bw.logmap_bw(A, random_spd(3, n=3))
    with pytest.raises(TypeError, match="floating"):
        bw.geodesic_bw(A.long(), A, 0.5)
    with pytest.raises(ValueError, match="steps"):
        bw.mean_bw(A, steps=0)
    with pytest.raises(ValueError, match="entries"):
        bw.mean_bw(A, weights=torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="batch dimension"):
        bw.mean_bw(A, dim=1)
    with pytest.raises(ValueError, match="batch of matrices"):
        bw.mean_bw(A[0])
    with pytest.raises(ValueError, match="M"):
        bw.distance_gbw(A, A, random_spd(2, n=4))
