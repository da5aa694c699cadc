"""The fused kernels of the Lie-group norms against plain autograd (float64 gradcheck and parity)."""

from __future__ import annotations

import pytest
import torch

from manifoldnorm import functional as mf
from manifoldnorm.functional._lie_groups import _ChannelScale, _LCMFinish, make_group, sq_frobenius

F64 = torch.float64


def test_sq_frobenius_gradcheck() -> None:
    Z = torch.randn(3, 2, 4, 4, dtype=F64, requires_grad=True)
    torch.testing.assert_close(sq_frobenius(Z), Z.square().sum((-1, -2)))
    assert torch.autograd.gradcheck(sq_frobenius, (Z,))
    assert torch.autograd.gradgradcheck(sq_frobenius, (Z,))


@pytest.mark.parametrize("c_shape", [(2,), (3, 2)])
def test_channel_scale_gradcheck(c_shape: tuple[int, ...]) -> None:
    Z = torch.randn(3, 2, 4, 4, dtype=F64, requires_grad=True)
    c = torch.rand(c_shape, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(_ChannelScale.apply, (Z, c))


@pytest.mark.parametrize("c_shape", [(2,), (3, 2)])
def test_lcm_finish_matches_composition(c_shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    Z = torch.tril(torch.randn(3, 2, 4, 4, generator=g, dtype=F64)).requires_grad_()
    B = torch.tril(torch.randn(2, 4, 4, generator=g, dtype=F64)).requires_grad_()
    c = (0.5 + torch.rand(c_shape, generator=g, dtype=F64)).requires_grad_()
    # the kernel is defined on lower-triangular Z and B (the codomain of the Cholesky log)
    assert torch.autograd.gradcheck(lambda z, c, b: _LCMFinish.apply(torch.tril(z), c, torch.tril(b)), (Z, c, B))
    G = torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    fused = _LCMFinish.apply(Z, c, B)
    plain = mf.cholesky_exp_ref(c.reshape(*c.shape, 1, 1) * Z + B)
    torch.testing.assert_close(fused, plain, rtol=1e-13, atol=1e-13)
    ga = torch.autograd.grad((fused * G).sum(), (Z, c, B))
    gb = torch.autograd.grad((plain * G).sum(), (Z, c, B))
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_lcm_dispersion_scaler_fuses_only_at_theta_one() -> None:
    X = mf.cholesky_log(torch.eye(3, dtype=F64) + 0.1 * torch.ones(2, 1, 3, 3, dtype=F64))
    B = torch.zeros(1, 3, 3, dtype=F64)
    c = torch.ones(1, dtype=F64)
    for theta in (1.0, 0.5):
        grp = make_group("lcm", theta, 1.0, 0.0)
        _, scaler = grp.dispersion(X)
        torch.testing.assert_close(scaler(c, B), grp.undeform(grp.translate(B, grp.scale(X, c))))
        torch.testing.assert_close(scaler(c), grp.scale(X, c))


@pytest.mark.parametrize("metric", ["lem", "lcm", "crim", "aim"])
def test_undeform_of_statistics_equals_undeform(metric: str) -> None:
    grp = make_group(metric, 1.0, 1.0, 0.0)
    X = torch.stack([torch.eye(3, dtype=F64) + 0.2 * torch.ones(3, 3, dtype=F64), 2.0 * torch.eye(3, dtype=F64)])
    Z = grp.deform(X.unsqueeze(1))
    assert torch.equal(grp.undeform_stats(Z), grp.undeform(Z))


def test_cholesky_grad_with_the_half_folded_in() -> None:
    from manifoldnorm.functional.spd_pullback import cholesky_grad

    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 4, 4, generator=g, dtype=F64)
    L = torch.linalg.cholesky(A @ A.mT + torch.eye(4, dtype=F64))
    gL = torch.randn(3, 4, 4, generator=g, dtype=F64)
    assert torch.equal(cholesky_grad(gL.clone(), L), cholesky_grad(0.5 * gL, L, halved=True))
    P = (L @ L.mT).requires_grad_()
    (expect,) = torch.autograd.grad((torch.linalg.cholesky(P) * gL).sum(), P)
    torch.testing.assert_close(cholesky_grad(gL.clone(), L), mf.sym(expect), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", ["lem", "lcm", "aim", "spdmbn"])
@pytest.mark.parametrize("eta,detach_var", [(1.0, False), (0.6, True)])
def test_fused_kernels_parameter_gradcheck(kernel: str, eta: float, detach_var: bool) -> None:
    """The fused training steps of LieBN and SPDMBN: gradients of the bias and the dispersion (the statistics do
    not depend on them) are the derivatives; input gradients are checked against the composed group operations in
    tests/nn."""
    from manifoldnorm.functional import _liebn_ops as ops

    g = torch.Generator().manual_seed(1)
    A = torch.randn(5, 2, 3, 3, generator=g, dtype=F64)
    X = A @ A.mT / 3 + torch.eye(3, dtype=F64)
    B = torch.randn(2, 3, 3, generator=g, dtype=F64)
    W0 = (B @ B.mT / 3 + torch.eye(3, dtype=F64)).requires_grad_()
    s0 = torch.tensor([0.7, 1.3], dtype=F64, requires_grad=True)
    T = torch.eye(3, dtype=F64).expand(2, 3, 3).clone() if kernel in ("aim", "spdmbn") else torch.zeros(2, 3, 3,
                                                                                                         dtype=F64)
    t, r = torch.tensor([0.5, 2.0], dtype=F64), torch.ones(2, dtype=F64)

    def f(W: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        cfg = ops.StepConfig(eta, T, t, r, 1e-5, 1.0, 0.0, detach_var)
        if kernel in ("aim", "spdmbn"):
            M = mf.mean_aim(X, dim=0, karcher_steps=1, tol=0.0)
            centre = M if eta == 1.0 else mf.geodesic_aim(T, M, eta)
            return getattr(ops, f"{kernel}_step")(X, mf.sym(W), s, M, centre, cfg)
        return getattr(ops, f"{kernel}_step")(X, mf.sym(W), s, cfg)

    assert torch.autograd.gradcheck(f, (W0, s0), eps=1e-6, atol=1e-6, rtol=1e-5)
