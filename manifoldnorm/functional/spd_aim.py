r"""Affine-invariant metric (AIM) on the SPD manifold.

Pennec, Fillard & Ayache, "A Riemannian framework for tensor computing", IJCV 2006:

.. math::

    d(A, B) = \|\log(A^{-1/2} B A^{-1/2})\|_F,\qquad
    \mathrm{Log}_P X = P^{1/2}\log(P^{-1/2} X P^{-1/2}) P^{1/2},\qquad
    \mathrm{Exp}_P V = P^{1/2}\exp(P^{-1/2} V P^{-1/2}) P^{1/2},

    \gamma(t) = A^{1/2}(A^{-1/2} B A^{-1/2})^t A^{1/2}.

The Fréchet (Karcher) mean is computed by the Karcher flow (Pennec 2006, Eq. 8 with unit step):
:math:`G \leftarrow G^{1/2}\exp\big(\sum_i w_i \log(G^{-1/2} X_i G^{-1/2})\big) G^{1/2}`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._batch import BatchSum, SplitBatchMean, batch_dim, default_tol, normalized_weights, raw_weights, weighted_sum
from .spectral import sym, sym_expm, sym_logm, sym_powm, sym_sqrtm_invsqrtm

__all__ = ["distance_aim", "mean_aim", "geodesic_aim", "logmap_aim", "expmap_aim", "congruence"]


def congruence(W: Tensor, X: Tensor) -> Tensor:
    r""":math:`W X W^\top` for broadcastable stacks ``(..., n, n)``, symmetrised against round-off."""
    return sym(W @ X @ W.transpose(-1, -2))


def _whiten(A: Tensor, B: Tensor) -> Tensor:
    r""":math:`L^{-1} B L^{-\top}` with :math:`L = \mathrm{chol}(A)`: same spectrum as :math:`A^{-1/2}BA^{-1/2}`."""
    L = torch.linalg.cholesky(A)
    shape = torch.broadcast_shapes(L.shape, B.shape)
    L = L.expand(shape)
    Y = torch.linalg.solve_triangular(L, B.expand(shape), upper=False)
    Z = torch.linalg.solve_triangular(L, Y.transpose(-1, -2), upper=False)
    return sym(Z)


def distance_aim(A: Tensor, B: Tensor) -> Tensor:
    r"""Affine-invariant Riemannian distance :math:`\|\log(A^{-1/2} B A^{-1/2})\|_F`.

    Parameters
    ----------
    A, B : Tensor, shape (..., n, n)
        SPD matrices (broadcastable).

    Returns
    -------
    Tensor, shape (...)

    Notes
    -----
    The congruence uses the Cholesky factor of ``A`` (:math:`L^{-1} B L^{-\top}` has the eigenvalues of
    :math:`A^{-1}B`), which is cheaper than :math:`A^{-1/2}` and gives the same distance.
    """
    return torch.linalg.matrix_norm(sym_logm(_whiten(A, B)))


def logmap_aim(P: Tensor, X: Tensor) -> Tensor:
    r"""Riemannian logarithm :math:`\mathrm{Log}_P X = P^{1/2}\log(P^{-1/2} X P^{-1/2})P^{1/2}`, ``(..., n, n)``."""
    S, Si = sym_sqrtm_invsqrtm(P)
    return congruence(S, sym_logm(congruence(Si, X)))


def expmap_aim(P: Tensor, V: Tensor) -> Tensor:
    r"""Riemannian exponential :math:`\mathrm{Exp}_P V = P^{1/2}\exp(P^{-1/2} V P^{-1/2})P^{1/2}`, ``(..., n, n)``."""
    S, Si = sym_sqrtm_invsqrtm(P)
    return congruence(S, sym_expm(congruence(Si, V)))


def geodesic_aim(A: Tensor, B: Tensor, t: Tensor | float) -> Tensor:
    r"""Point :math:`A^{1/2}(A^{-1/2} B A^{-1/2})^t A^{1/2}` of the AIM geodesic from ``A`` (t=0) to ``B`` (t=1).

    ``t`` may be a float or a tensor broadcastable to the batch shape (differentiable).
    """
    S, Si = sym_sqrtm_invsqrtm(A)
    C = congruence(Si, B)
    if isinstance(t, Tensor) and t.dim() > 0:
        t = t.expand(C.shape[:-2])
    return congruence(S, sym_powm(C, t))


def mean_aim(
    X: Tensor,
    dim: int = 0,
    weights: Tensor | None = None,
    karcher_steps: int = 50,
    tol: float | None = None,
    init: Tensor | None = None,
    *,
    reduce: BatchSum | None = None,
) -> Tensor:
    r"""Weighted Fréchet (Karcher) mean under the affine-invariant metric.

    Parameters
    ----------
    X : Tensor, shape (..., N, ..., n, n)
        SPD matrices; the mean is taken over the batch dimension ``dim``.
    dim : int
        Batch dimension to reduce (not one of the last two).
    weights : Tensor, optional
        Non-negative weights, shape ``(N,)`` or broadcastable to ``X.shape[:-2]``; normalised to sum to one.
    karcher_steps : int
        Maximum number of Karcher-flow iterations (unit step size). ``karcher_steps=1`` is the single step used
        by Riemannian batch norms (Brooks et al. 2019; Chen et al. 2024).
    tol : float, optional
        Stop when :math:`\max \|\sum_i w_i\log(G^{-1/2}X_iG^{-1/2})\|_F \le` ``tol``. The test is made **after**
        the update of that iteration, so every performed step is applied. Default ``max(1e-10, 50 eps)``.
        ``tol=0`` always runs ``karcher_steps`` iterations (no host synchronisation).
    init : Tensor, optional
        Starting point (default: the weighted arithmetic mean).
    reduce : callable, optional
        For a batch split into parts (e.g. one per process), ``X`` being this part: ``reduce(t)`` returns the sum
        of ``t`` over all parts (differentiably, called in the same order by every part). The arithmetic mean
        and each Karcher step then use the weighted sums over the union, so every part computes the same mean
        of the whole batch: one ``reduce`` per iteration plus one for the starting point (which also carries
        the total weight). A part may be empty. ``None``: ``X`` is the whole batch.

    Returns
    -------
    Tensor
        The mean, with ``dim`` removed.

    Notes
    -----
    Differentiable by unrolling the iterations. The flow with unit step converges for the concentrated batches
    met in practice; it is not guaranteed for arbitrary dispersion (Pennec 2006).
    """
    if karcher_steps < 1:
        raise ValueError(f"karcher_steps must be >= 1, got {karcher_steps}")
    d = batch_dim(X, dim)
    if reduce is None:
        w = normalized_weights(X, d, weights)

        def average(T: Tensor) -> Tensor:
            return weighted_sum(T, d, w)
    else:
        average = SplitBatchMean(raw_weights(X, d, weights), d, reduce)
    tol = default_tol(X.dtype) if tol is None else float(tol)
    G = average(X) if init is None else init
    for _ in range(karcher_steps):
        S, Si = sym_sqrtm_invsqrtm(G)
        T = average(sym_logm(congruence(Si.unsqueeze(d), X)))
        G = congruence(S, sym_expm(T))
        if tol > 0 and float(torch.linalg.matrix_norm(T.detach()).max()) <= tol:
            break
    return G
