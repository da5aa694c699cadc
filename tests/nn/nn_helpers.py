"""Reference formulas (independent of the layers) and small utilities for the norm-layer tests."""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call

from manifoldnorm import functional as mf

F64 = torch.float64


def powm(X: torch.Tensor, p: float) -> torch.Tensor:
    lam, U = torch.linalg.eigh(X)
    return (U * lam.pow(p).unsqueeze(-2)) @ U.mT


def ref_mean(metric: str, X: torch.Tensor, theta: float = 1.0) -> torch.Tensor:
    """Fréchet mean over dim 0 under the θ-deformed metric (α, β do not move the mean)."""
    Xt = powm(X, theta)
    if metric == "aim":
        M = mf.mean_aim(Xt, dim=0, karcher_steps=200, tol=1e-14)
    elif metric == "lem":
        M = mf.mean_lem(Xt, dim=0)
    else:
        M = mf.mean_lcm(Xt, dim=0)
    return powm(M, 1.0 / theta)


def ref_sqdist(metric: str, A: torch.Tensor, B: torch.Tensor, theta: float = 1.0, alpha: float = 1.0,
               beta: float = 0.0) -> torch.Tensor:
    """Squared distance under (θ,α,β)-AIM, (α,β)-LEM or θ-LCM, written from the definitions."""
    if metric == "aim":
        At, Bt = powm(A, theta), powm(B, theta)
        L = torch.linalg.cholesky(At)
        Li = torch.linalg.inv(L)
        lam = torch.linalg.eigvalsh(Li @ Bt @ Li.mT)
        ll = lam.log()
        return (alpha * ll.square().sum(-1) + beta * ll.sum(-1).square()) / theta**2
    if metric == "lem":
        D = mf.sym_logm(A) - mf.sym_logm(B)
        return alpha * D.square().sum((-1, -2)) + beta * torch.diagonal(D, dim1=-2, dim2=-1).sum(-1).square()
    D = mf.cholesky_log(powm(A, theta)) - mf.cholesky_log(powm(B, theta))
    return D.square().sum((-1, -2)) / theta**2


def call_with(layer: torch.nn.Module, x: torch.Tensor, params: dict[str, torch.Tensor], **kw) -> torch.Tensor:
    """Forward of a fresh copy of ``layer`` (buffers untouched) with some parameters replaced."""
    fresh = copy.deepcopy(layer)
    return functional_call(fresh, params, (x,), kw)


def gradcheck_norm(layer: torch.nn.Module, X: torch.Tensor, params: tuple[str, ...] = ("weight", "shift"),
                   **kw) -> bool:
    """float64 gradcheck of ``layer`` w.r.t. its input and the named parameters (SPD ``weight`` symmetrised).

    Uses :func:`call_with`, so the layer's buffers are not touched by the repeated evaluations.
    """
    A = X.detach().clone().requires_grad_(True)
    P = [getattr(layer, name).detach().clone().requires_grad_(True) for name in params]

    def f(A: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        named = {n: (mf.sym(v) if n == "weight" else v) for n, v in zip(params, values, strict=True)}
        return call_with(layer, mf.sym(A), named, **kw)

    return torch.autograd.gradcheck(f, (A, *P), eps=1e-6, atol=1e-6, rtol=1e-5)


def input_grad_norm(layer: torch.nn.Module, X: torch.Tensor, seed: int = 0) -> tuple[float, torch.Tensor]:
    """``||dL/dX||_F`` for ``L = <G, layer(X)>`` with a fixed random direction ``G``."""
    X = X.clone().requires_grad_(True)
    Y = layer(X)
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(Y.shape, generator=g, dtype=Y.dtype)
    (Y * mf.sym(G)).sum().backward()
    return float(X.grad.norm()), Y.detach()
