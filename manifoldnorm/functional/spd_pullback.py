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

from ._batch import batch_dim, normalized_weights, weighted_sum
from .spectral import sym, sym_expm, sym_logm

__all__ = [
    "cholesky_log",
    "cholesky_exp",
    "distance_lem",
    "mean_lem",
    "geodesic_lem",
    "distance_lcm",
    "mean_lcm",
    "geodesic_lcm",
]


def cholesky_log(P: Tensor) -> Tensor:
    r""":math:`\psi(P) = \lfloor L\rfloor + \mathrm{diag}(\log \mathrm{diag} L)`, :math:`L = \mathrm{chol}(P)`.

    Maps SPD matrices ``(..., n, n)`` to lower-triangular matrices (Lin 2019).
    """
    L = torch.linalg.cholesky(P)  # already zero above the diagonal
    Z = L.clone()
    Z.diagonal(dim1=-2, dim2=-1).copy_(torch.log(L.diagonal(dim1=-2, dim2=-1)))
    return Z


def cholesky_exp(X: Tensor) -> Tensor:
    r"""Inverse of :func:`cholesky_log`: :math:`CC^\top` with :math:`C = \lfloor X\rfloor + \exp\mathbb{D}(X)`.

    Only the lower triangle of ``X`` is read.
    """
    C = torch.tril(X)
    C.diagonal(dim1=-2, dim2=-1).copy_(torch.exp(X.diagonal(dim1=-2, dim2=-1)))
    return C @ C.transpose(-1, -2)


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
