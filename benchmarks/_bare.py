r"""The bare formulas of LieBN's training step: the same output as the layer, in the fewest eager calls.

For the ``norms`` benchmark's ``bare ms`` column: a LieBN training step (batch statistics, the batch mean
detached, the batch variance differentiated, θ = 1, α = 1, β = 0, one Karcher step) written as plain-autograd
PyTorch with nothing else than Algorithm 1 asks for: the output and the update of the running mean (along the
metric's geodesic, kept in the codomain of the deformation: log-Cholesky coordinates under LCM, the matrix
logarithm under LEM, the SPD matrix under AIM) and running variance. No input checks, no degenerate-batch rule,
no dtype handling, no SPD copy of the codomain means, no refusal of second derivatives, autograd's own backward of
``cholesky`` and ``eigh``. What the layer adds to the formula costs ``ms - bare ms``. A same-run target
``new/old`` below ``bare/old`` is out of reach of a layer that runs Algorithm 1 with its safeguards unless it
needs fewer eager calls than this plain transcription of the formula.

Chen, Song, Liu & Sebe, "A Lie Group Approach to Riemannian Batch Normalization", ICLR 2024, Alg. 1 with the
SPD instantiations of Sec. 5.2: LCM (log-Cholesky coordinates, group operation ``+``), LEM (matrix logarithm,
``+``) and AIM (Cholesky congruence :math:`L^{-1} X L^{-\top}`, scaling :math:`Z^c`, Eq. 14).
``tests/benchmarks/test_bare.py`` checks each against the layer in float64 (output, gradients, running statistics).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["BARE", "bare_call"]


def _psi(L: Tensor) -> Tensor:
    """Log-Cholesky coordinates of a Cholesky factor: strictly lower part plus the log of the diagonal."""
    return L.tril(-1) + torch.diag_embed(torch.diagonal(L, dim1=-2, dim2=-1).log())


def _psi_inv_spd(A: Tensor) -> Tensor:
    """The SPD matrix ``C Cᵀ`` of log-Cholesky coordinates ``A`` (``C``: strict lower part, exp of the diagonal)."""
    C = A.tril(-1) + torch.diag_embed(torch.diagonal(A, dim1=-2, dim2=-1).exp())
    return C @ C.mT


def _recon(U: Tensor, vals: Tensor) -> Tensor:
    """``U diag(vals) Uᵀ``."""
    return (U * vals.unsqueeze(-2)) @ U.mT


def _sym_fn(X: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``U diag(fn(λ)) Uᵀ`` through autograd's ``eigh``."""
    lam, U = torch.linalg.eigh(X)
    return _recon(U, fn(lam))


def _sqrt_pair(X: Tensor) -> tuple[Tensor, Tensor]:
    """``(X^{1/2}, X^{-1/2})`` from one ``eigh``."""
    lam, U = torch.linalg.eigh(X)
    return _recon(U, lam.sqrt()), _recon(U, lam.rsqrt())


def _factor(d2: Tensor, shift: Tensor, eps: float) -> Tensor:
    """``s / sqrt(mean d² + eps)`` broadcast over the matrices (``(C,)`` statistics over the batch dim 0)."""
    return (shift / torch.sqrt(d2.mean(0) + eps)).unsqueeze(-1).unsqueeze(-1)


def _running_var(st: dict, d2: Tensor) -> None:
    """``r <- (1 - m) r + m v`` (no graph)."""
    with torch.no_grad():
        st["r"].mul_(1.0 - st["momentum"]).add_(st["momentum"] * d2.mean(0))


def _flat(x: Tensor, W: Tensor, shift: Tensor, eps: float, st: dict, phi: Callable[[Tensor], Tensor],
          phi_inv: Callable[[Tensor], Tensor]) -> Tensor:
    """A flat metric (group operation ``+`` in the codomain of ``phi``): centre, scale, bias; running mean
    ``R <- R + m (M - R)`` in the codomain."""
    Z = phi(x)
    M = Z.detach().mean(0)
    Zc = Z - M
    d2 = Zc.square().sum((-2, -1))
    with torch.no_grad():
        st["R"].add_(M - st["R"], alpha=st["momentum"])
    _running_var(st, d2)
    return phi_inv(phi(W) + _factor(d2, shift, eps) * Zc)


def _lcm(x: Tensor, W: Tensor, shift: Tensor, eps: float, st: dict) -> Tensor:
    return _flat(x, W, shift, eps, st, lambda X: _psi(torch.linalg.cholesky(X)), _psi_inv_spd)


def _lem(x: Tensor, W: Tensor, shift: Tensor, eps: float, st: dict) -> Tensor:
    return _flat(x, W, shift, eps, st, lambda X: _sym_fn(X, torch.log), lambda A: _sym_fn(A, torch.exp))


def _aim(x: Tensor, W: Tensor, shift: Tensor, eps: float, st: dict) -> Tensor:
    with torch.no_grad():  # one Karcher step from the arithmetic mean, then the whitening L^{-1}, L = chol(M)
        half, ihalf = _sqrt_pair(x.mean(0))
        T = _sym_fn(ihalf @ x @ ihalf, torch.log).mean(0)
        M = half @ _sym_fn(T, torch.exp) @ half
        L = torch.linalg.cholesky(M)
        K = torch.linalg.solve_triangular(L, torch.eye(L.shape[-1], dtype=L.dtype, device=L.device), upper=False)
    lam, U = torch.linalg.eigh(K @ x @ K.mT)
    d2 = lam.log().square().sum(-1)
    with torch.no_grad():  # R <- R^1/2 (R^-1/2 M R^-1/2)^m R^1/2
        m, R = st["momentum"], st["R"]
        rh, rih = _sqrt_pair(R)
        R.copy_(rh @ _sym_fn(rih @ M @ rih, lambda e: e.pow(m)) @ rh)
    _running_var(st, d2)
    F = torch.linalg.cholesky(W) @ U
    return _recon(F, lam.pow(_factor(d2, shift, eps).squeeze(-1)))


#: norm -> its bare formula ``(x, weight, shift, eps, stats) -> y``; ``stats``: ``{"R", "r", "momentum"}``, the
#: running mean (codomain) and variance, updated in place
BARE: dict[str, Callable[[Tensor, Tensor, Tensor, float, dict], Tensor]] = {
    "liebn_lcm": _lcm, "liebn_lem": _lem, "liebn_aim": _aim,
}


def bare_call(name: str, layer: nn.Module) -> tuple[Callable[[Tensor], Tensor], dict] | None:
    """``(x -> y, stats)``: the bare formula of ``name`` with ``layer``'s parameters and a copy of its running
    statistics (``stats["R"]`` in the codomain, ``stats["r"]``; updated at every call), for a layer in the setting
    the formula covers (θ = 1, α = 1, β = 0, one Karcher step, batch statistics); ``None`` otherwise."""
    fn = BARE.get(name)
    if fn is None or getattr(layer, "channels", 1) != 1 or (layer.theta, layer.alpha, layer.beta) != (1.0, 1.0, 0.0):
        return None
    if layer.karcher_steps != 1 or layer.train_momentum != 1.0 or not layer.detach_mean or layer.detach_var:
        return None
    W, shift, eps = layer.weight, layer.shift, layer.eps
    with torch.no_grad():
        st = {"R": layer.running_mean_phi.detach().clone(), "r": layer.running_var.detach().clone(),
              "momentum": layer.momentum}
    return (lambda x: fn(x, W, shift, eps, st)), st
