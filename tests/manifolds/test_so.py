"""SpecialOrthogonal manifold: geometry identities and geoopt optimizers staying on SO(n)."""

from __future__ import annotations

import math

import geoopt
import pytest
import torch

from manifoldnorm.functional.so3 import distance_so3, so3_exp, so3_hat
from manifoldnorm.manifolds import SpecialOrthogonal

F64 = torch.float64


def _random(*shape: int, seed: int) -> torch.Tensor:
    return SpecialOrthogonal().random(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _orthogonality_error(X: torch.Tensor) -> float:
    n = X.shape[-1]
    return float((X.mT @ X - torch.eye(n, dtype=X.dtype)).abs().max())


@pytest.mark.parametrize("n", [2, 3, 5])
def test_random_points_and_projections(seed: int, n: int) -> None:
    M = SpecialOrthogonal()
    X = _random(7, n, n, seed=seed)
    assert isinstance(X, geoopt.ManifoldTensor) and X.manifold == M
    M.assert_check_point_on_manifold(X)
    assert _orthogonality_error(X) < 1e-13 and bool((torch.linalg.det(X) > 0).all())
    g = torch.Generator().manual_seed(seed)
    U = M.proju(X, torch.randn(7, n, n, dtype=F64, generator=g))
    M.assert_check_vector_on_tangent(X, U)
    torch.testing.assert_close(M.proju(X, U), U)  # idempotent
    torch.testing.assert_close(M.egrad2rgrad(X, U), U)
    # projx: closest rotation, fixes reflections
    P = M.projx(X + 1e-3 * torch.randn(7, n, n, dtype=F64, generator=g))
    M.assert_check_point_on_manifold(P)
    flipped = X.clone()
    flipped[..., 0] = -flipped[..., 0]
    M.assert_check_point_on_manifold(M.projx(flipped))
    with pytest.raises(ValueError, match="det"):
        M.assert_check_point_on_manifold(flipped)


@pytest.mark.parametrize("n", [3, 4])
def test_exp_retraction_inner_transport(seed: int, n: int) -> None:
    M = SpecialOrthogonal()
    X = _random(5, n, n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    U = M.proju(X, torch.randn(5, n, n, dtype=F64, generator=g))
    V = M.proju(X, torch.randn(5, n, n, dtype=F64, generator=g))
    Y = M.expmap(X, U)
    M.assert_check_point_on_manifold(Y)
    torch.testing.assert_close(Y, X @ torch.linalg.matrix_exp(X.mT @ U), atol=1e-13, rtol=0)
    Z = M.retr(X, U)
    M.assert_check_point_on_manifold(Z)
    # retraction agrees with the exponential map to first order
    small = 1e-4 * U
    assert float((M.retr(X, small) - M.expmap(X, small)).abs().max()) < 1e-10
    torch.testing.assert_close(M.inner(X, U, V), (U * V).sum((-1, -2)))
    assert M.inner(X, U, keepdim=True).shape == (5, 1, 1)
    T = M.transp(X, Y, U)
    M.assert_check_vector_on_tangent(Y, T)


def test_so3_logmap_and_distance(seed: int) -> None:
    M = SpecialOrthogonal()
    X, Y = _random(6, 3, 3, seed=seed), _random(6, 3, 3, seed=seed + 1)
    U = M.logmap(X, Y)
    M.assert_check_vector_on_tangent(X, U)
    torch.testing.assert_close(M.expmap(X, U), Y, atol=1e-12, rtol=0)
    torch.testing.assert_close(M.dist(X, Y), math.sqrt(2.0) * distance_so3(X, Y))
    torch.testing.assert_close(M.dist(X, Y), M.norm(X, U))
    with pytest.raises(NotImplementedError, match="3x3"):
        M.logmap(_random(4, 4, seed=0), _random(4, 4, seed=1))


def test_origin_and_shape_checks() -> None:
    M = SpecialOrthogonal()
    torch.testing.assert_close(M.origin(2, 3, 3, dtype=F64), torch.eye(3, dtype=F64).expand(2, 3, 3))
    with pytest.raises(ValueError, match="square"):
        M.random(3, 4)
    ok, reason = M.check_point(torch.zeros(3, 4), explain=True)
    assert not ok and "square" in reason


def _target_rotations(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return so3_exp(torch.randn(4, 3, generator=g, dtype=F64))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_riemannian_optimizers_stay_on_so3(seed: int, optimizer: str) -> None:
    target = _target_rotations(seed)
    W = geoopt.ManifoldParameter(_random(4, 3, 3, seed=seed + 10), manifold=SpecialOrthogonal())
    if optimizer == "sgd":
        opt = geoopt.optim.RiemannianSGD([W], lr=0.05, momentum=0.9)
    else:
        opt = geoopt.optim.RiemannianAdam([W], lr=0.05)
    start = float(distance_so3(W.detach(), target).max())
    for _ in range(300):
        opt.zero_grad()
        loss = (W - target).square().sum()
        loss.backward()
        opt.step()
    assert _orthogonality_error(W.detach()) < 1e-12
    assert bool((torch.linalg.det(W.detach()) > 0.999999).all())
    assert float(distance_so3(W.detach(), target).max()) < 1e-3 < start


def test_riemannian_adam_stays_on_so4_with_cayley_retraction(seed: int) -> None:
    W = geoopt.ManifoldParameter(_random(2, 4, 4, seed=seed), manifold=SpecialOrthogonal())
    target = _random(2, 4, 4, seed=seed + 1)
    opt = geoopt.optim.RiemannianAdam([W], lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        (W - target).square().sum().backward()
        opt.step()
    assert _orthogonality_error(W.detach()) < 1e-12
    assert bool((torch.linalg.det(W.detach()) > 0.999999).all())


def test_bias_parameter_gradient_is_tangent() -> None:
    W = geoopt.ManifoldParameter(torch.eye(3, dtype=F64), manifold=SpecialOrthogonal())
    x = torch.tensor([0.2, -0.1, 0.4], dtype=F64)
    (W @ so3_exp(x)).sum().backward()
    rgrad = W.manifold.egrad2rgrad(W.detach(), W.grad)
    W.manifold.assert_check_vector_on_tangent(W.detach(), rgrad)
    torch.testing.assert_close(rgrad, -rgrad.mT)  # skew at the identity
    assert torch.allclose(so3_hat(torch.zeros(3, dtype=F64)), torch.zeros(3, 3, dtype=F64))
