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
