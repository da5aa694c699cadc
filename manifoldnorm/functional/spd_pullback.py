r"""Pull-back (flat) metrics on the SPD manifold: Log-Euclidean (LEM) and Log-Cholesky (LCM).

Both are pull-backs of a Euclidean metric through a diffeomorphism :math:`\phi` onto a vector space, so the
Fréchet mean, geodesics and distances are closed form in the codomain:

.. math::

    d(A, B) = \|\phi(A) - \phi(B)\|_F,\quad \bar X = \phi^{-1}\big(\textstyle\sum_i w_i \phi(X_i)\big),\quad
    \gamma(t) = \phi^{-1}\big((1-t)\phi(A) + t\phi(B)\big).

* LEM (Arsigny et al., "Geometric means in a novel vector space structure on symmetric positive-definite
  matrices", SIAM J. Matrix Anal. Appl. 2007): :math:`\phi = \log`.
* LCM (Lin, "Riemannian geometry of symmetric positive definite matrices via Cholesky decomposition", SIAM J.
  Matrix Anal. Appl. 2019, Prop. 8 / Eq. 5): :math:`\phi = \psi`,
  :math:`\psi(P) = \lfloor L\rfloor + \log \mathbb{D}(L)` with :math:`L = \mathrm{chol}(P)`, strictly lower
  part :math:`\lfloor\cdot\rfloor` and diagonal part :math:`\mathbb{D}`; :math:`\psi^{-1}(X) = CC^\top`,
  :math:`C = \lfloor X\rfloor + \exp\mathbb{D}(X)`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import anchor_inputs, once_differentiable
from ._batch import batch_dim, normalized_weights, weighted_sum
from .spectral import sym, sym_expm, sym_logm

__all__ = [
    "cholesky_log",
    "cholesky_exp",
    "cholesky_exp_ref",
    "cholesky_log_ref",
    "distance_lem",
    "mean_lem",
    "geodesic_lem",
    "distance_lcm",
    "mean_lcm",
    "geodesic_lcm",
]


class _CholeskyLog(torch.autograd.Function):
    r""":math:`\psi(P)` with the Cholesky backward of Murray (2016, Eq. 10) written out for this map.

    With :math:`\bar L` the gradient of :math:`L` (the strictly lower part of :math:`\bar Z`, its diagonal
    divided by :math:`L_{ii}`), :math:`\bar P = \mathrm{sym}(L^{-\top}\Phi(L^\top\bar L)L^{-1})` where
    :math:`\Phi` keeps the lower triangle and halves the diagonal: one product and two triangular solves, no
    intermediate copies of the generic autograd graph (clone, in-place diagonal, ``tril``).
    """

    @staticmethod
    def forward(ctx, P: Tensor) -> Tensor:  # type: ignore[override]
        anchor_inputs(ctx, P)
        L = torch.linalg.cholesky(P)  # already zero above the diagonal
        ctx.save_for_backward(L)
        Z = L.clone()
        dZ = Z.diagonal(dim1=-2, dim2=-1)
        dZ.log_()
        return Z

    @staticmethod
    @once_differentiable("cholesky_log", "For second derivatives use cholesky_log_ref (plain autograd through "
                         "torch.linalg.cholesky), or keep create_graph=False.")
    def backward(ctx, gZ: Tensor) -> Tensor:  # type: ignore[override]
        (L,) = ctx.saved_tensors
        gL = torch.tril(gZ)
        gL.diagonal(dim1=-2, dim2=-1).div_(L.diagonal(dim1=-2, dim2=-1))
        return cholesky_grad(gL, L)


def cholesky_grad(gL: Tensor, L: Tensor, halved: bool = False) -> Tensor:
    r"""Gradient of :math:`P` from the gradient ``gL`` of its Cholesky factor :math:`L` (Murray 2016, Eq. 10):
    :math:`\bar P = \mathrm{sym}(L^{-\top}\Phi(L^\top\bar L)L^{-1})`, :math:`\Phi` keeping the lower triangle
    and halving the diagonal. Only the lower triangle of ``gL`` matters; ``gL`` is overwritten (scratch space).
    ``halved``: ``gL`` holds :math:`\bar L / 2` (a caller folding the factor into its own scaling saves a pass).
    """
    # sym(L^{-T} Phi L^{-1}) = L^{-T} sym(Phi) L^{-1}; sym(Phi) = (T + T^T) / 2 with T = tril(L^T gL) / 2
    # and its diagonal halved once more. In-place steps: at n ~ 100 fresh buffers cost more than the flops.
    T = (L.mT @ gL).tril_()
    if not halved:
        T.mul_(0.5)
    T.diagonal(dim1=-2, dim2=-1).mul_(0.5)
    S = torch.add(T, T.mT, out=gL)
    # the solves read the symmetric S and the column-major factor of torch.linalg.cholesky: no layout copies
    Y = torch.linalg.solve_triangular(L.mT, S.mT, upper=True)  # L^{-T} S
    return torch.linalg.solve_triangular(L, Y, upper=False, left=False)  # (L^{-T} S) L^{-1}


class _CholeskyExp(torch.autograd.Function):
    r""":math:`\psi^{-1}(X) = CC^\top`; backward :math:`\bar C = \lfloor(\bar Y + \bar Y^\top) C\rfloor`, diagonal
    times :math:`C_{ii}` (one product instead of the two of the generic ``C @ C.mT`` backward)."""

    @staticmethod
    def forward(ctx, X: Tensor) -> Tensor:  # type: ignore[override]
        anchor_inputs(ctx, X)
        C = torch.tril(X)
        C.diagonal(dim1=-2, dim2=-1).exp_()
        ctx.save_for_backward(C)
        return C @ C.mT

    @staticmethod
    @once_differentiable("cholesky_exp", "For second derivatives use cholesky_exp_ref (plain autograd), or keep "
                         "create_graph=False.")
    def backward(ctx, gY: Tensor) -> Tensor:  # type: ignore[override]
        (C,) = ctx.saved_tensors
        return cholesky_exp_grad(gY, C)


def cholesky_exp_grad(gY: Tensor, C: Tensor) -> Tensor:
    r"""Gradient of :math:`\psi^{-1}` with respect to its (lower-triangular) argument, given :math:`C` and
    :math:`\bar Y`: :math:`\lfloor(\bar Y + \bar Y^\top) C\rfloor` with the diagonal times :math:`C_{ii}`."""
    gC = ((gY + gY.mT) @ C).tril_()
    gC.diagonal(dim1=-2, dim2=-1).mul_(C.diagonal(dim1=-2, dim2=-1))
    return gC


def cholesky_log(P: Tensor) -> Tensor:
    r""":math:`\psi(P) = \lfloor L\rfloor + \mathrm{diag}(\log \mathrm{diag} L)`, :math:`L = \mathrm{chol}(P)`.

    Maps SPD matrices ``(..., n, n)`` to lower-triangular matrices (Lin 2019). Only the lower triangle of ``P``
    is read (as by ``torch.linalg.cholesky``); the gradient is symmetric. Once differentiable (second derivatives:
    :func:`cholesky_log_ref`).
    """
    return _CholeskyLog.apply(P)


def cholesky_exp(X: Tensor) -> Tensor:
    r"""Inverse of :func:`cholesky_log`: :math:`CC^\top` with :math:`C = \lfloor X\rfloor + \exp\mathbb{D}(X)`.

    Only the lower triangle of ``X`` is read; the gradient is lower triangular. Once differentiable (second
    derivatives: :func:`cholesky_exp_ref`).
    """
    return _CholeskyExp.apply(X)


def cholesky_log_ref(P: Tensor) -> Tensor:
    """:func:`cholesky_log` by plain autograd through ``torch.linalg.cholesky`` (reference for tests)."""
    L = torch.linalg.cholesky(P)
    return torch.tril(L, -1) + torch.diag_embed(torch.log(torch.diagonal(L, dim1=-2, dim2=-1)))


def cholesky_exp_ref(X: Tensor) -> Tensor:
    """:func:`cholesky_exp` by plain autograd (reference for tests)."""
    C = torch.tril(X, -1) + torch.diag_embed(torch.exp(torch.diagonal(X, dim1=-2, dim2=-1)))
    return C @ C.mT


def _lerp(a: Tensor, b: Tensor, t: Tensor | float) -> Tensor:
    if isinstance(t, Tensor) and t.dim() > 0:
        t = t.unsqueeze(-1).unsqueeze(-1)
    return a + t * (b - a)


def distance_lem(A: Tensor, B: Tensor) -> Tensor:
    r"""Log-Euclidean distance :math:`\|\log A - \log B\|_F`; ``(..., n, n)`` → ``(...)``."""
    return torch.linalg.matrix_norm(sym_logm(A) - sym_logm(B))


def mean_lem(X: Tensor, dim: int = 0, weights: Tensor | None = None) -> Tensor:
    r"""Log-Euclidean mean :math:`\exp(\sum_i w_i \log X_i)` over batch dimension ``dim`` (closed form)."""
    d = batch_dim(X, dim)
    return sym_expm(sym(weighted_sum(sym_logm(X), d, normalized_weights(X, d, weights))))


def geodesic_lem(A: Tensor, B: Tensor, t: Tensor | float) -> Tensor:
    r"""Log-Euclidean geodesic :math:`\exp((1-t)\log A + t\log B)`."""
    return sym_expm(_lerp(sym_logm(A), sym_logm(B), t))


def distance_lcm(A: Tensor, B: Tensor) -> Tensor:
    r"""Log-Cholesky distance :math:`\|\psi(A) - \psi(B)\|_F` (Lin 2019, Eq. 5)."""
    return torch.linalg.matrix_norm(cholesky_log(A) - cholesky_log(B))


def mean_lcm(X: Tensor, dim: int = 0, weights: Tensor | None = None) -> Tensor:
    r"""Log-Cholesky mean :math:`\psi^{-1}(\sum_i w_i \psi(X_i))` (Lin 2019, Prop. 9; closed form)."""
    d = batch_dim(X, dim)
    return cholesky_exp(weighted_sum(cholesky_log(X), d, normalized_weights(X, d, weights)))


def geodesic_lcm(A: Tensor, B: Tensor, t: Tensor | float) -> Tensor:
    r"""Log-Cholesky geodesic :math:`\psi^{-1}((1-t)\psi(A) + t\psi(B))`."""
    return cholesky_exp(_lerp(cholesky_log(A), cholesky_log(B), t))
