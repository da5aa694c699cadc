"""Cholesky log/exp (LCM deformation): written-out backward vs plain autograd through torch.linalg.cholesky."""

from __future__ import annotations

import pytest
import torch
from conftest import random_spd

from manifoldnorm import functional as mf

F64 = torch.float64


def _sym_path(fn, X: torch.Tensor):
    """``fn`` along symmetric perturbations of ``X`` (the Cholesky map reads the lower triangle only)."""
    return lambda S: fn(X + 0.1 * (S + S.mT))


@pytest.mark.parametrize("cond", [10.0, 1e6])
def test_cholesky_log_backward_matches_autograd(seed: int, cond: float) -> None:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(4, 6, 6, generator=g, dtype=F64))
    lam = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), 6, dtype=F64)
    X = (Q * lam) @ Q.mT
    X = 0.5 * (X + X.mT)
    G = torch.randn(4, 6, 6, generator=g, dtype=F64)
    Xa, Xb = X.clone().requires_grad_(), X.clone().requires_grad_()
    (mf.cholesky_log(Xa) * G).sum().backward()
    (mf.cholesky_log_ref(Xb) * G).sum().backward()
    torch.testing.assert_close(mf.cholesky_log(X), mf.cholesky_log_ref(X), rtol=1e-13, atol=1e-13)
    scale = float(Xb.grad.abs().max())
    torch.testing.assert_close(Xa.grad, Xb.grad, rtol=1e-9, atol=1e-11 * scale)
    torch.testing.assert_close(Xa.grad, Xa.grad.mT, rtol=0, atol=1e-12 * scale)  # symmetric, as torch.s


def test_cholesky_log_gradcheck(seed: int) -> None:
    X = random_spd(3, n=5, seed=seed)
    S = torch.zeros(3, 5, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(_sym_path(mf.cholesky_log, X), (S,))


def test_cholesky_exp_gradcheck_and_parity(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    T = torch.randn(3, 5, 5, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(mf.cholesky_exp, (T,))
    G = torch.randn(3, 5, 5, generator=g, dtype=F64)
    a = torch.autograd.grad((mf.cholesky_exp(T) * G).sum(), T)[0]
    b = torch.autograd.grad((mf.cholesky_exp_ref(T) * G).sum(), T)[0]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(a, torch.tril(a))  # only the lower triangle is read


def test_cholesky_maps_are_inverse_and_once_differentiable() -> None:
    X = random_spd(4, n=5, seed=3)
    torch.testing.assert_close(mf.cholesky_exp(mf.cholesky_log(X)), X, rtol=1e-12, atol=1e-12)
    T = torch.randn(2, 4, 4, dtype=F64, requires_grad=True)
    (gT,) = torch.autograd.grad(mf.cholesky_exp(T).sum(), T, create_graph=True)
    with pytest.raises(RuntimeError):
        gT.sum().backward()  # second derivatives go through cholesky_exp_ref
