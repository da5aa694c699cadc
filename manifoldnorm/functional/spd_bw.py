r"""Bures–Wasserstein (BW) and generalized BW (GBW) geometry of SPD matrices.

The BW metric is the 2-Wasserstein distance between centred Gaussians (Bhatia, Jain & Lim, "On the
Bures–Wasserstein distance between positive definite matrices", Expo. Math. 2019, Eq. 1; Malagò, Montrucchio &
Pistone, "Wasserstein Riemannian geometry of Gaussian densities", Inf. Geom. 2018):

.. math::

    d^2(A, B) &= \mathrm{tr} A + \mathrm{tr} B - 2\,\mathrm{tr}(A^{1/2} B A^{1/2})^{1/2},\\
    \mathrm{Log}_P X &= (PX)^{1/2} + (XP)^{1/2} - 2P,\qquad
    \mathrm{Exp}_P V = P + V + \mathcal L_P[V]\, P\, \mathcal L_P[V],\\
    \gamma(t) &= (1-t)^2 A + t^2 B + t(1-t)\big[(AB)^{1/2} + (BA)^{1/2}\big],

with :math:`\mathcal L_P[V]` the solution :math:`L` of the Lyapunov equation :math:`PL + LP = V` and
:math:`(AB)^{1/2} = A^{1/2}(A^{1/2}BA^{1/2})^{1/2}A^{-1/2}`. These are the BW operations restated in the
preliminaries of Wang, Jin, Chen, Luo & Wu, "Learning to Normalize on the SPD Manifold under Bures-Wasserstein
Geometry", CVPR 2025 (GBWBN), which builds its batch norm from them.
The generalized BW metric with an SPD parameter :math:`M` (Han, Mishra, Jawanpuria & Gao, "Learning with
symmetric positive definite matrices via generalized Bures-Wasserstein geometry", GSI 2023) is the pull-back of
BW by the congruence :math:`X \mapsto M^{-1/2} X M^{-1/2}`.

Matrix functions go through :mod:`manifoldnorm.functional.spectral` (one ``eigh`` per matrix, exact gradients
at repeated eigenvalues); distances need eigenvalues only (``eigvalsh``, whose gradient has no eigenvalue gaps);
the parallel transports and the Lyapunov solve use the operators of :mod:`manifoldnorm.functional._bw_ops`, whose
gradients are exact at :math:`P = I` as well.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._batch import batch_dim, default_tol, normalized_weights, weighted_sum
from ._bw_ops import lyapunov_solve_op, pair_operator
from .spectral import sym, sym_sqrtm, sym_sqrtm_invsqrtm
from .validation import check_square

__all__ = [
    "distance_bw",
    "sqdistance_bw",
    "distance_gbw",
    "mean_bw",
    "geodesic_bw",
    "logmap_bw",
    "expmap_bw",
    "lyapunov_solve",
    "transport_bw_to_identity",
    "transport_bw_from_identity",
]


def _pair(A: Tensor, B: Tensor, names: str = "A, B") -> None:
    a, b = names.split(", ")
    check_square(A, a)
    check_square(B, b)
    if A.shape[-1] != B.shape[-1]:
        raise ValueError(f"{a} and {b} must hold matrices of the same size, got {tuple(A.shape)} and {tuple(B.shape)}")
    pairs = zip(reversed(A.shape[:-2]), reversed(B.shape[:-2]), strict=False)
    if any(x != y and x != 1 and y != 1 for x, y in pairs):
        raise ValueError(f"batch shapes of {a} {tuple(A.shape)} and {b} {tuple(B.shape)} do not broadcast")


def _trace(X: Tensor) -> Tensor:
    return torch.diagonal(X, dim1=-2, dim2=-1).sum(-1)


def sqdistance_bw(A: Tensor, B: Tensor) -> Tensor:
    r"""Squared BW distance :math:`\mathrm{tr}A + \mathrm{tr}B - 2\,\mathrm{tr}(A^{1/2}BA^{1/2})^{1/2}`.

    Parameters
    ----------
    A, B : Tensor, shape (..., n, n)
        SPD matrices (broadcastable).

    Returns
    -------
    Tensor, shape (...)
        Clamped at 0 (round-off can make it slightly negative near :math:`A = B`).

    Notes
    -----
    Bhatia et al. 2019, Eq. 1. :math:`\mathrm{tr}(A^{1/2}BA^{1/2})^{1/2} = \sum_i \sqrt{\mu_i}` for
    the eigenvalues :math:`\mu_i` of :math:`L^\top B L` (:math:`A = LL^\top`, similar to :math:`AB`): one
    Cholesky and one ``eigvalsh``, whose gradient needs no eigenvalue gaps. The difference suffers cancellation
    when :math:`A \approx B` (absolute error of order :math:`\mathrm{eps}\cdot\mathrm{tr}A`).
    """
    _pair(A, B)
    L = torch.linalg.cholesky(A)
    mu = torch.linalg.eigvalsh(sym(L.transpose(-1, -2) @ B @ L))
    d2 = _trace(A) + _trace(B) - 2.0 * torch.sqrt(mu.clamp_min(0.0)).sum(-1)
    return d2.clamp_min(0.0)


def _safe_sqrt(d2: Tensor) -> Tensor:
    """``sqrt`` with gradient 0 (a subgradient) where ``d2 == 0`` instead of ``inf``."""
    pos = d2 > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, d2, torch.ones_like(d2))), torch.zeros_like(d2))


def distance_bw(A: Tensor, B: Tensor) -> Tensor:
    r"""Bures–Wasserstein distance :math:`d(A, B)`, ``(..., n, n)`` → ``(...)``.

    See :func:`sqdistance_bw`. The distance is not differentiable at :math:`A = B` (like :math:`|x|` at 0); there
    the returned gradient is 0, a subgradient, instead of the ``inf``/``nan`` of a plain ``sqrt``.
    """
    return _safe_sqrt(sqdistance_bw(A, B))


def distance_gbw(A: Tensor, B: Tensor, M: Tensor) -> Tensor:
    r"""Generalized BW distance :math:`d_{\mathrm{BW}}(M^{-1/2}AM^{-1/2}, M^{-1/2}BM^{-1/2})`, ``(...)``.

    Han et al., GSI 2023 (GBW metric parameterised by the SPD matrix :math:`M`; :math:`M = I` gives BW), the
    metric of GBWBN. ``A``, ``B``, ``M``: SPD ``(..., n, n)``, broadcastable.
    """
    _pair(A, M, "A, M")
    _pair(B, M, "B, M")
    Mi = sym_sqrtm_invsqrtm(M)[1]
    return distance_bw(sym(Mi @ A @ Mi), sym(Mi @ B @ Mi))


def lyapunov_solve(P: Tensor, V: Tensor) -> Tensor:
    r"""Solve the Lyapunov equation :math:`PL + LP = V` in the eigenbasis of ``P``.

    Parameters
    ----------
    P : Tensor, shape (..., n, n)
        SPD matrices.
    V : Tensor, shape (..., n, n)
        Symmetric right-hand sides (broadcastable with ``P``).

    Returns
    -------
    Tensor, shape (..., n, n)
        :math:`L = U[(U^\top V U)_{ij}/(\lambda_i + \lambda_j)]U^\top` for :math:`P = U\Lambda U^\top`
        (the :math:`\mathcal L_P` of the BW exponential, Malagò et al. 2018).

    Notes
    -----
    Backward from the implicit equation (no eigenvalue gaps): exact at repeated eigenvalues of ``P``. Once
    differentiable: a second derivative raises ``NotImplementedError``.
    """
    _pair(P, V, "P, V")
    return lyapunov_solve_op(P, V)


def logmap_bw(P: Tensor, X: Tensor) -> Tensor:
    r"""BW Riemannian logarithm :math:`\mathrm{Log}_P X = (PX)^{1/2} + (XP)^{1/2} - 2P`, ``(..., n, n)``.

    Malagò et al. 2018, Prop. 9. :math:`(PX)^{1/2} = P^{1/2}(P^{1/2}XP^{1/2})^{1/2}P^{-1/2}`
    (two ``eigh``: ``P`` and the congruence).
    """
    _pair(P, X, "P, X")
    S, Si = sym_sqrtm_invsqrtm(P)
    C = S @ sym_sqrtm(sym(S @ X @ S)) @ Si
    return C + C.transpose(-1, -2) - 2.0 * P


def expmap_bw(P: Tensor, V: Tensor) -> Tensor:
    r"""BW Riemannian exponential :math:`\mathrm{Exp}_P V = P + V + \mathcal L_P[V]\,P\,\mathcal L_P[V]`.

    Parameters
    ----------
    P : Tensor, shape (..., n, n)
        SPD base points.
    V : Tensor, shape (..., n, n)
        Symmetric tangent vectors (broadcastable).

    Returns
    -------
    Tensor, shape (..., n, n)
        Equal to :math:`(I + L) P (I + L)` with :math:`L = \mathcal L_P[V]`: positive semi-definite, and SPD
        unless :math:`I + L` is singular. It is the inverse of :func:`logmap_bw` while :math:`I + L \succ 0`
        (the geodesic is minimizing up to time 1).

    Notes
    -----
    Malagò et al. 2018, Eq. 36.
    """
    L = lyapunov_solve(P, V)
    return sym(P + V + L @ P @ L)


def geodesic_bw(A: Tensor, B: Tensor, t: Tensor | float) -> Tensor:
    r"""Point :math:`\gamma(t)` of the BW geodesic from ``A`` (t=0) to ``B`` (t=1).

    .. math::

        \gamma(t) = (1-t)^2 A + t^2 B + t(1-t)\big[(AB)^{1/2} + (BA)^{1/2}\big],\qquad
        (AB)^{1/2} = A^{1/2}(A^{1/2}BA^{1/2})^{1/2}A^{-1/2}.

    Bhatia et al. 2019; Malagò et al. 2018. ``A``, ``B``: SPD ``(..., n, n)``
    (broadcastable); ``t``: a float or a tensor broadcastable to the batch shape (differentiable).
    """
    _pair(A, B)
    S, Si = sym_sqrtm_invsqrtm(A)
    C = S @ sym_sqrtm(sym(S @ B @ S)) @ Si
    if isinstance(t, Tensor) and t.dim() > 0:
        t = t.unsqueeze(-1).unsqueeze(-1)
    return sym((1 - t) ** 2 * A + t**2 * B + t * (1 - t) * (C + C.transpose(-1, -2)))


def transport_bw_to_identity(P: Tensor, V: Tensor) -> Tensor:
    r"""BW parallel transport of :math:`V \in T_P` to :math:`T_I` along the geodesic from ``P`` to :math:`I`.

    .. math::

        \Gamma_{P\to I}(V) = U\Big[\sqrt{\tfrac{2}{\lambda_i+\lambda_j}} \circ (U^\top V U)\Big]U^\top,\qquad
        P = U\,\mathrm{diag}(\lambda)\,U^\top.

    GBWBN, parallel transport between :math:`P` and the identity. ``P`` and :math:`I` commute, so the geodesic
    :math:`((1-t)P^{1/2} + tI)^2` stays in :math:`P`'s eigenbasis, and the transported field keeps
    :math:`(U^\top V U)_{ij}/\sqrt{\lambda_i(t)+\lambda_j(t)}` constant (horizontal lift in the quotient
    :math:`GL(n)/O(n)`); the map is an isometry :math:`T_P \to T_I`. Gradients are exact at :math:`P = I`.
    """
    _pair(P, V, "P, V")
    return pair_operator(P, V, math.sqrt(2.0), -0.5)


def transport_bw_from_identity(P: Tensor, V: Tensor) -> Tensor:
    r"""BW parallel transport of :math:`V \in T_I` to :math:`T_P` along the geodesic from :math:`I` to ``P``.

    Inverse of :func:`transport_bw_to_identity`:
    :math:`U[\sqrt{(\lambda_i+\lambda_j)/2} \circ (U^\top V U)]U^\top` (GBWBN).
    """
    _pair(P, V, "P, V")
    return pair_operator(P, V, math.sqrt(0.5), 0.5)


def mean_bw(
    X: Tensor,
    dim: int = 0,
    weights: Tensor | None = None,
    steps: int = 50,
    tol: float | None = None,
    init: Tensor | None = None,
) -> Tensor:
    r"""Weighted BW barycenter (Fréchet mean) by the fixed-point iteration of Álvarez-Esteban et al.

    .. math::

        G \leftarrow G^{-1/2}\Big(\sum_i w_i\,(G^{1/2} X_i G^{1/2})^{1/2}\Big)^2 G^{-1/2}.

    Álvarez-Esteban, del Barrio, Cuesta-Albertos & Matrán, "A fixed-point approach to barycenters in Wasserstein
    space", J. Math. Anal. Appl. 2016, Thm. 4.2; the batch mean of GBWBN. The barycenter is the unique SPD
    :math:`G` with :math:`\sum_i w_i (G^{1/2}X_iG^{1/2})^{1/2} = G`
    (equivalently :math:`\sum_i w_i \mathrm{Log}_G X_i = 0`).

    Parameters
    ----------
    X : Tensor, shape (..., N, ..., n, n)
        SPD matrices; the mean is taken over the batch dimension ``dim``.
    dim : int
        Batch dimension to reduce (not one of the last two).
    weights : Tensor, optional
        Non-negative weights, shape ``(N,)`` or broadcastable to ``X.shape[:-2]``; normalised to sum to one.
    steps : int
        Maximum number of iterations (``steps=1``: the single step of the GBWBN reference code).
    tol : float, optional
        Stop when the relative change :math:`\max\|G_{k+1} - G_k\|_F / \|G_k\|_F \le` ``tol``, tested after the
        update. Default ``max(1e-10, 50 eps)``; ``tol=0`` always runs ``steps`` iterations (no host sync).
    init : Tensor, optional
        Starting point (default: the weighted arithmetic mean).

    Returns
    -------
    Tensor
        The barycenter, with ``dim`` removed.

    Notes
    -----
    Each iteration costs one batched ``eigh`` (and one of :math:`G`). Differentiable by unrolling. The iteration
    converges from any SPD start (Álvarez-Esteban et al. 2016, Thm. 4.2), linearly.
    """
    check_square(X, "X")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    d = batch_dim(X, dim)
    w = normalized_weights(X, d, weights)
    tol = default_tol(X.dtype) if tol is None else float(tol)
    G = weighted_sum(X, d, w) if init is None else init
    for _ in range(steps):
        S, Si = sym_sqrtm_invsqrtm(G)
        H = weighted_sum(sym_sqrtm(sym(S.unsqueeze(d) @ X @ S.unsqueeze(d))), d, w)
        G_new = sym(Si @ H @ H @ Si)
        if tol > 0:
            with torch.no_grad():
                change = torch.linalg.matrix_norm(G_new - G) / torch.linalg.matrix_norm(G)
            G = G_new
            if float(change.max()) <= tol:
                break
        else:
            G = G_new
    return G
