"""SO(3) math: exp/log identities and parity (torch, scipy), gradients at 0 and near π, distance, means."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck
from torch.autograd.functional import jacobian

from manifoldnorm.functional.so3 import (
    check_rotation,
    distance_so3,
    geodesic_so3,
    left_mul,
    mean_so3,
    mean_so3_chordal,
    project_so3,
    so3_exp,
    so3_exp_ref,
    so3_hat,
    so3_log,
    so3_log_ref,
    so3_vee,
)

Rotation = pytest.importorskip("scipy.spatial.transform").Rotation

F64 = torch.float64
EYE = torch.eye(3, dtype=F64)


def _rotvecs(n: int, seed: int, angles: torch.Tensor | None = None) -> torch.Tensor:
    """Random axes with the given angles (default: uniform in [0, π))."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.randn(n, 3, generator=g, dtype=F64)
    axis = axis / torch.linalg.vector_norm(axis, dim=-1, keepdim=True)
    if angles is None:
        angles = torch.rand(n, generator=g, dtype=F64) * math.pi * 0.999
    return axis * angles.unsqueeze(-1)


def _all_regimes(seed: int) -> torch.Tensor:
    """Angles 0, ~1e-8, ~1e-3, mid range and within 1e-3 of π."""
    g = torch.Generator().manual_seed(seed + 100)
    angles = torch.cat([torch.zeros(4, dtype=F64), torch.full((4,), 1e-8, dtype=F64),
                        torch.rand(8, generator=g, dtype=F64) * 1e-3, torch.rand(24, generator=g, dtype=F64) * 3.0,
                        math.pi - torch.rand(8, generator=g, dtype=F64) * 1e-3])
    return _rotvecs(angles.numel(), seed, angles)


def _scipy_random(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(Rotation.random(n, random_state=seed).as_matrix())


def test_hat_and_vee(seed: int) -> None:
    w, x = _rotvecs(10, seed), _rotvecs(10, seed + 1)
    W = so3_hat(w)
    torch.testing.assert_close(W, -W.mT)
    torch.testing.assert_close((W @ x.unsqueeze(-1)).squeeze(-1), torch.linalg.cross(w, x))
    torch.testing.assert_close(so3_vee(W), w)
    torch.testing.assert_close(so3_vee(W + EYE), w)  # the symmetric part is ignored


def test_exp_matches_matrix_exp_and_scipy(seed: int) -> None:
    w = _all_regimes(seed)
    R = so3_exp(w)
    torch.testing.assert_close(R, torch.linalg.matrix_exp(so3_hat(w)), atol=1e-14, rtol=0)
    torch.testing.assert_close(R, so3_exp_ref(w), atol=1e-14, rtol=0)
    np.testing.assert_allclose(R.numpy(), Rotation.from_rotvec(w.numpy()).as_matrix(), atol=1e-14)
    torch.testing.assert_close(so3_exp(so3_hat(w), skew=True), R)
    torch.testing.assert_close(R.mT @ R, EYE.expand_as(R), atol=1e-14, rtol=0)
    assert torch.allclose(torch.linalg.det(R), torch.ones(len(w), dtype=F64))


def test_log_inverts_exp_in_every_regime(seed: int) -> None:
    w = _all_regimes(seed)
    torch.testing.assert_close(so3_log(so3_exp(w)), w, atol=1e-14, rtol=0)
    # rotations built independently (scipy), including near π
    Rs = torch.from_numpy(Rotation.from_rotvec(w.numpy()).as_matrix())
    torch.testing.assert_close(so3_log(Rs), w, atol=1e-14, rtol=0)


def test_exp_of_log_is_identity_and_matches_scipy(seed: int) -> None:
    R = _scipy_random(64, seed)
    w = so3_log(R)
    torch.testing.assert_close(so3_exp(w), R, atol=1e-14, rtol=0)
    ref = torch.from_numpy(Rotation.from_matrix(R.numpy()).as_rotvec())
    torch.testing.assert_close(w, ref, atol=1e-12, rtol=0)
    assert float(torch.linalg.vector_norm(w, dim=-1).max()) <= math.pi + 1e-12


def test_log_at_exactly_pi_has_angle_pi() -> None:
    R = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=F64))
    w = so3_log(R)
    torch.testing.assert_close(w.abs(), torch.tensor([0.0, 0.0, math.pi], dtype=F64))
    torch.testing.assert_close(so3_exp(w), R, atol=1e-14, rtol=0)


def test_references_agree_in_the_mid_range(seed: int) -> None:
    w = _rotvecs(32, seed, torch.linspace(0.1, 3.0, 32, dtype=F64))
    R = so3_exp(w)
    torch.testing.assert_close(so3_log_ref(R), so3_log(R), atol=1e-12, rtol=0)


def test_float32_accuracy(seed: int) -> None:
    w = _all_regimes(seed)
    R32 = so3_exp(w.float())
    assert R32.dtype == torch.float32
    torch.testing.assert_close(R32.double(), so3_exp(w), atol=1e-6, rtol=0)
    mid = _rotvecs(32, seed, torch.linspace(0.0, 3.0, 32, dtype=F64))
    torch.testing.assert_close(so3_log(so3_exp(mid).float()).double(), mid, atol=2e-5, rtol=0)


@pytest.mark.parametrize("angle", [0.0, 1e-8, 0.7, math.pi - 1e-3])
def test_gradients_are_exact_from_zero_to_near_pi(seed: int, angle: float) -> None:
    w = _rotvecs(1, seed, torch.tensor([angle], dtype=F64))[0]
    assert gradcheck(so3_exp, (w.clone().requires_grad_(True),), eps=1e-6, atol=1e-8)
    R = so3_exp(w).detach().requires_grad_(True)
    assert gradcheck(so3_log, (R,), eps=1e-6, atol=1e-8)
    # on the group, d log(exp(w)) / dw is the identity
    J = jacobian(lambda v: so3_log(so3_exp(v)), w)
    torch.testing.assert_close(J, EYE, atol=1e-9, rtol=0)


def test_mixed_batch_gradients_match_single_element_gradients(seed: int) -> None:
    # a batch spanning every regime evaluates all branches on all elements (the branch-free accelerator path);
    # unused branches must contribute nothing, not even NaN
    w = _all_regimes(seed)
    G = torch.randn(len(w), 3, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))
    wb = w.clone().requires_grad_(True)
    Rb = so3_exp(wb)
    ((so3_log(Rb) * G[:, 0]).sum() + (Rb * G).sum()).backward()
    assert torch.isfinite(wb.grad).all()
    for i in (0, 5, 10, 20, len(w) - 1):
        wi = w[i].clone().requires_grad_(True)
        Ri = so3_exp(wi)
        ((so3_log(Ri) * G[i, 0]).sum() + (Ri * G[i]).sum()).backward()
        torch.testing.assert_close(wb.grad[i], wi.grad, atol=1e-12, rtol=1e-10)


def test_log_gradient_at_identity_is_the_vee_map() -> None:
    R = EYE.clone().requires_grad_(True)
    G = torch.tensor([0.3, -1.2, 0.5], dtype=F64)
    (so3_log(R) * G).sum().backward()
    torch.testing.assert_close(R.grad, 0.5 * so3_hat(G))
    assert torch.isfinite(R.grad).all()


def test_distance_is_the_angle_and_bi_invariant(seed: int) -> None:
    A, B, G, H = (_scipy_random(16, seed + k) for k in range(4))
    d = distance_so3(A, B)
    ref = (Rotation.from_matrix(A.numpy()).inv() * Rotation.from_matrix(B.numpy())).magnitude()
    np.testing.assert_allclose(d.numpy(), ref, atol=1e-12)
    torch.testing.assert_close(distance_so3(G @ A, G @ B), d, atol=1e-12, rtol=0)
    torch.testing.assert_close(distance_so3(A @ H, B @ H), d, atol=1e-12, rtol=0)
    torch.testing.assert_close(distance_so3(B, A), d, atol=1e-12, rtol=0)
    torch.testing.assert_close(distance_so3(A, A), torch.zeros(16, dtype=F64), atol=1e-7, rtol=0)


def test_geodesic(seed: int) -> None:
    A, B = _scipy_random(8, seed), _scipy_random(8, seed + 1)
    torch.testing.assert_close(geodesic_so3(A, B, 0.0), A, atol=1e-14, rtol=0)
    torch.testing.assert_close(geodesic_so3(A, B, 1.0), B, atol=1e-12, rtol=0)
    t = torch.rand(8, dtype=F64, generator=torch.Generator().manual_seed(seed))
    P = geodesic_so3(A, B, t)
    d = distance_so3(A, B)
    torch.testing.assert_close(distance_so3(A, P), t * d, atol=1e-12, rtol=0)
    torch.testing.assert_close(distance_so3(P, B), (1 - t) * d, atol=1e-12, rtol=0)


def _concentrated(N: int, seed: int, sigma: float, shape: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    M = so3_exp(torch.randn(*shape, 3, generator=g, dtype=F64))
    return M, M @ so3_exp(sigma * torch.randn(N, *shape, 3, generator=g, dtype=F64))


@pytest.mark.parametrize("sigma", [0.1, 0.5])
def test_karcher_mean_is_a_critical_point_and_matches_scipy(seed: int, sigma: float) -> None:
    _, R = _concentrated(32, seed, sigma)
    M = mean_so3(R, steps=100, tol=1e-14)
    torch.testing.assert_close(so3_log(M.mT @ R).mean(0), torch.zeros(3, dtype=F64), atol=1e-12, rtol=0)
    # scipy's mean is the chordal L2 mean: identical to ours, and close to the Karcher mean when concentrated
    chordal = Rotation.from_matrix(R.numpy()).mean().as_matrix()
    np.testing.assert_allclose(mean_so3_chordal(R).numpy(), chordal, atol=1e-12)
    assert float(distance_so3(M, torch.from_numpy(chordal))) < 0.4 * sigma**3  # differ at third order
    # the Karcher mean minimises the sum of squared distances
    for k in range(3):
        P = M @ so3_exp(1e-3 * torch.eye(3, dtype=F64)[k])
        assert distance_so3(P, R).square().sum() > distance_so3(M, R).square().sum()


def test_weighted_batched_and_invariant_means(seed: int) -> None:
    _, R = _concentrated(10, seed, 0.6, shape=(4,))
    w = torch.rand(10, dtype=F64, generator=torch.Generator().manual_seed(seed)) + 0.1
    M = mean_so3(R, dim=0, weights=w, steps=100, tol=1e-14)
    assert M.shape == (4, 3, 3)
    crit = (w[:, None, None] * so3_log(left_mul(M.mT, R))).sum(0) / w.sum()
    torch.testing.assert_close(crit, torch.zeros(4, 3, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(mean_so3(R.transpose(0, 1), dim=1, weights=w, steps=100, tol=1e-14), M)
    G, H = _scipy_random(1, seed + 5)[0], _scipy_random(1, seed + 6)[0]
    torch.testing.assert_close(mean_so3(G @ R @ H, weights=w, steps=100, tol=1e-14), G @ M @ H, atol=1e-12,
                               rtol=0)


def test_mean_steps_and_init() -> None:
    M0, R = _concentrated(16, 0, 0.3)
    one = mean_so3(R, steps=1, tol=0.0)
    exact = mean_so3(R, steps=100, tol=1e-14)
    chordal = mean_so3_chordal(R)
    assert float(distance_so3(one, exact)) < float(distance_so3(chordal, exact))
    torch.testing.assert_close(mean_so3(R, init=M0, steps=100, tol=1e-14), exact, atol=1e-12, rtol=0)
    torch.testing.assert_close(mean_so3(R[:1], steps=3), R[0], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="steps"):
        mean_so3(R, steps=0)
    with pytest.raises(ValueError, match="batch dimension"):
        mean_so3(R, dim=1)


@pytest.mark.parametrize("steps", [1, 3])
def test_mean_gradient_through_the_chordal_start_and_karcher_steps(seed: int, steps: int) -> None:
    _, R = _concentrated(5, seed, 0.4)
    w = so3_log(R).detach().requires_grad_(True)
    assert gradcheck(lambda v: mean_so3(so3_exp(v), steps=steps, tol=0.0), (w,), eps=1e-6, atol=1e-8)
    assert gradcheck(lambda v: mean_so3_chordal(so3_exp(v)), (w,), eps=1e-6, atol=1e-8)


def test_polar_projection_backward_is_well_conditioned(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4, 3, 3, generator=g, dtype=F64)
    X = X * torch.linalg.det(X).sign()[:, None, None]  # det > 0
    assert gradcheck(project_so3, (X.clone().requires_grad_(True),), eps=1e-6, atol=1e-8)
    # agrees with plain SVD autograd where that is well-conditioned
    G = torch.randn(4, 3, 3, generator=g, dtype=F64)
    A = X.clone().requires_grad_(True)
    (project_so3(A) * G).sum().backward()
    B = X.clone().requires_grad_(True)
    U, _, Vh = torch.linalg.svd(B)
    ((U @ Vh) * G).sum().backward()
    torch.testing.assert_close(A.grad, B.grad, atol=1e-10, rtol=1e-8)
    # repeated singular values (a scaled rotation, the mean of a tightly concentrated batch): finite, exact
    R = _scipy_random(2, seed)
    for scale in (1.0, 0.9):
        assert gradcheck(project_so3, ((scale * R).requires_grad_(True),), eps=1e-6, atol=1e-8)
    # reflections: the determinant fix flips the smallest singular direction
    with torch.no_grad():
        Xr = -X
    assert gradcheck(project_so3, (Xr.requires_grad_(True),), eps=1e-6, atol=1e-8)


def test_left_mul_and_projection(seed: int) -> None:
    A, X = _scipy_random(4, seed), _scipy_random(20, seed + 1).reshape(5, 4, 3, 3)
    torch.testing.assert_close(left_mul(A, X), A @ X)
    R = _scipy_random(6, seed)
    noisy = R + 1e-3 * torch.randn(6, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))
    P = project_so3(noisy)
    check_rotation(P)
    assert float((P - R).abs().max()) < 5e-3
    torch.testing.assert_close(project_so3(R), R, atol=1e-14, rtol=0)
    reflection = -R
    assert bool((torch.linalg.det(project_so3(reflection)) > 0).all())


def test_check_rotation_errors() -> None:
    R = _scipy_random(5, 0)
    assert check_rotation(R) is R
    check_rotation(R.float())
    with pytest.raises(ValueError, match="orthogonal"):
        check_rotation(R * 1.01)
    bad = R.clone()
    bad[2] = -bad[2]
    with pytest.raises(ValueError, match="determinant"):
        check_rotation(bad)
    bad = R.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        check_rotation(bad)
    with pytest.raises(ValueError, match="shape"):
        check_rotation(torch.eye(4, dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        check_rotation(torch.ones(3, dtype=F64))
    check_rotation(torch.eye(4, dtype=F64), n=None)
    with pytest.raises(TypeError, match="floating"):
        check_rotation(torch.eye(3, dtype=torch.long))
    with pytest.raises(TypeError, match="Tensor"):
        check_rotation(np.eye(3))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        so3_exp(torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match="3x3"):
        so3_log(torch.eye(4, dtype=F64))
