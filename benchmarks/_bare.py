r"""The bare formulas of LieBN's training step: the same output as the layer, in the fewest eager calls.

For the ``norms`` benchmark's ``bare ms`` column: a LieBN training step (batch statistics, the batch mean
detached, the batch variance differentiated, θ = 1, α = 1, β = 0, one Karcher step) written as plain-autograd
PyTorch with nothing else: no running statistics, no input checks, no degenerate-batch rule, no dtype handling,
autograd's own backward of ``cholesky`` and ``eigh``. What the layer does on top of the formula costs
``ms - bare ms``; a same-run target ``new/old`` below ``bare/old`` cannot be met by any eager implementation with
this many calls (the formula itself costs more).

Chen, Song, Liu & Sebe, "A Lie Group Approach to Riemannian Batch Normalization", ICLR 2024, Alg. 1 with the
SPD instantiations of Sec. 5.2: LCM (log-Cholesky coordinates, group operation ``+``), LEM (matrix logarithm,
``+``) and AIM (Cholesky congruence :math:`L^{-1} X L^{-\top}`, scaling :math:`Z^c`, Eq. 14).
``tests/benchmarks/test_bare.py`` checks each against the layer in float64 (output and input gradient).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["BARE", "bare_call"]


def _psi(L: Tensor) -> Tensor:
    """Log-Cholesky coordinates of a Cholesky factor: strictly lower part plus the log of the diagonal."""
    return L.tril(-1) + torch.diag_embed(torch.diagonal(L, dim1=-2, dim2=-1).log())


def _sym_fn(X: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``U diag(fn(λ)) Uᵀ`` through autograd's ``eigh``."""
    lam, U = torch.linalg.eigh(X)
    return (U * fn(lam).unsqueeze(-2)) @ U.mT


def _factor(d2: Tensor, shift: Tensor, eps: float) -> Tensor:
    """``s / sqrt(mean d² + eps)`` broadcast over the matrices (``(C,)`` statistics over the batch dim 0)."""
    return (shift / torch.sqrt(d2.mean(0) + eps)).unsqueeze(-1).unsqueeze(-1)


def _lcm(x: Tensor, W: Tensor, shift: Tensor, eps: float) -> Tensor:
    Z = _psi(torch.linalg.cholesky(x))
    Zc = Z - Z.detach().mean(0)
    A = _psi(torch.linalg.cholesky(W)) + _factor(Zc.square().sum((-2, -1)), shift, eps) * Zc
    C = A.tril(-1) + torch.diag_embed(torch.diagonal(A, dim1=-2, dim2=-1).exp())
    return C @ C.mT


def _lem(x: Tensor, W: Tensor, shift: Tensor, eps: float) -> Tensor:
    Z = _sym_fn(x, torch.log)
    Zc = Z - Z.detach().mean(0)
    A = _sym_fn(W, torch.log) + _factor(Zc.square().sum((-2, -1)), shift, eps) * Zc
    return _sym_fn(A, torch.exp)


def _aim(x: Tensor, W: Tensor, shift: Tensor, eps: float) -> Tensor:
    with torch.no_grad():  # one Karcher step from the arithmetic mean, then the whitening L^{-1}, L = chol(M)
        mu, V = torch.linalg.eigh(x.mean(0))
        half, ihalf = (V * mu.sqrt().unsqueeze(-2)) @ V.mT, (V * mu.rsqrt().unsqueeze(-2)) @ V.mT
        T = _sym_fn(ihalf @ x @ ihalf, torch.log).mean(0)
        M = half @ _sym_fn(T, torch.exp) @ half
        L = torch.linalg.cholesky(M)
        K = torch.linalg.solve_triangular(L, torch.eye(L.shape[-1], dtype=L.dtype, device=L.device), upper=False)
    lam, U = torch.linalg.eigh(K @ x @ K.mT)
    c = _factor(lam.log().square().sum(-1), shift, eps)
    F = torch.linalg.cholesky(W) @ U
    return (F * lam.pow(c.squeeze(-1)).unsqueeze(-2)) @ F.mT


#: norm -> its bare formula ``(x, weight, shift, eps) -> y``
BARE: dict[str, Callable[[Tensor, Tensor, Tensor, float], Tensor]] = {
    "liebn_lcm": _lcm, "liebn_lem": _lem, "liebn_aim": _aim,
}


def bare_call(name: str, layer: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """``x -> y``: the bare formula of ``name`` with ``layer``'s parameters, for a layer in the setting the formula
    covers (θ = 1, α = 1, β = 0, one Karcher step, batch statistics); ``None`` otherwise."""
    fn = BARE.get(name)
    if fn is None or getattr(layer, "channels", 1) != 1 or (layer.theta, layer.alpha, layer.beta) != (1.0, 1.0, 0.0):
        return None
    if layer.karcher_steps != 1 or layer.train_momentum != 1.0 or not layer.detach_mean or layer.detach_var:
        return None
    W, shift, eps = layer.weight, layer.shift, layer.eps
    return lambda x: fn(x, W, shift, eps)
