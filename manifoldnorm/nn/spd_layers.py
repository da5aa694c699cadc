r"""SPDNet building blocks: BiMap, ReEig, LogEig (Huang & Van Gool, AAAI 2017) and a covariance pooling layer.

All layers act on stacks ``(..., n, n)``; typical inputs are ``(N, n, n)`` or ``(N, C, n, n)``.
"""

from __future__ import annotations

import math

import geoopt
import torch
from torch import Tensor, nn

from manifoldnorm import functional as mf

from ._common import check_positive_int

__all__ = ["BiMap", "ReEig", "LogEig", "CovPool", "vech", "stiefel_init_"]


def stiefel_init_(weight: Tensor) -> Tensor:
    """Fill ``weight`` of shape ``(..., n, p)``, ``n >= p``, with Haar-random orthonormal columns in place.

    QR factorization of a Gaussian matrix with the signs of ``diag(R)`` folded into ``Q`` (Mezzadri 2007), so
    the result is uniformly distributed on the Stiefel manifold.
    """
    with torch.no_grad():
        g = torch.randn(weight.shape, dtype=torch.float64, device=weight.device)
        q, r = torch.linalg.qr(g)
        sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        weight.copy_(q * sign.unsqueeze(-2))
    return weight


class BiMap(nn.Module):
    r"""Bilinear map :math:`Y = W^\top X W` with :math:`W` on the Stiefel manifold.

    Huang & Van Gool, "A Riemannian Network for SPD Matrix Learning", AAAI 2017 (BiMap layer). With
    :math:`W^\top W = I_p` and :math:`X` SPD, :math:`Y` is SPD of size ``p = out_dim``.

    Parameters
    ----------
    in_dim, out_dim : int
        Input and output matrix sizes, ``out_dim <= in_dim``.
    channels : int
        ``1``: one ``(in_dim, out_dim)`` weight shared by all leading dimensions of the input. ``C > 1``: a
        ``(C, in_dim, out_dim)`` weight, one per channel of a ``(N, C, n, n)`` input.
    dtype : torch.dtype
        Parameter dtype (float64 by default, as in all SPD reference code).

    Shapes
    ------
    ``(..., in_dim, in_dim)`` -> ``(..., out_dim, out_dim)``; computed in the promoted dtype of input and weight.

    Notes
    -----
    ``weight`` is a ``geoopt.ManifoldParameter`` on ``geoopt.Stiefel()`` (canonical metric), so geoopt's
    Riemannian optimizers keep it orthonormal. Initialised Haar-uniformly (:func:`stiefel_init_`).

    Deviations
    ----------
    The output is symmetrised (:math:`\tfrac12(Y+Y^\top)`) against round-off. Reference initialisations differ
    (SVD of a uniform matrix, or :math:`R(R^\top R)^{-1/2}`); any orthonormal start is valid.
    """

    def __init__(self, in_dim: int, out_dim: int, channels: int = 1, dtype: torch.dtype = torch.float64,
                 device=None) -> None:
        super().__init__()
        check_positive_int(in_dim, "in_dim", "BiMap")
        check_positive_int(out_dim, "out_dim", "BiMap")
        check_positive_int(channels, "channels", "BiMap")
        if out_dim > in_dim:
            raise ValueError(
                f"BiMap: out_dim={out_dim} must not exceed in_dim={in_dim} (W must have orthonormal columns)"
            )
        self.in_dim, self.out_dim, self.channels = in_dim, out_dim, channels
        shape = (in_dim, out_dim) if channels == 1 else (channels, in_dim, out_dim)
        self.weight = geoopt.ManifoldParameter(torch.empty(shape, dtype=dtype, device=device),
                                               manifold=geoopt.Stiefel())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw a new Haar-random orthonormal weight."""
        stiefel_init_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[-1] != self.in_dim or x.shape[-2] != self.in_dim:
            raise ValueError(
                f"BiMap: expected input of shape (..., {self.in_dim}, {self.in_dim}), got {tuple(x.shape)}"
            )
        if self.channels > 1 and (x.dim() < 4 or x.shape[-3] != self.channels):
            raise ValueError(
                f"BiMap: built for channels={self.channels}; expected (N, {self.channels}, n, n), "
                f"got {tuple(x.shape)}"
            )
        dtype = torch.promote_types(x.dtype, self.weight.dtype)
        W = self.weight.to(dtype)
        return mf.sym(W.transpose(-1, -2) @ x.to(dtype) @ W)

    def extra_repr(self) -> str:
        return f"{self.in_dim}, {self.out_dim}, channels={self.channels}"


class ReEig(nn.Module):
    r"""Eigenvalue rectification :math:`Y = U \max(\Lambda, \epsilon I) U^\top`.

    Huang & Van Gool, AAAI 2017 (ReEig layer); ``(..., n, n)`` -> ``(..., n, n)``. The backward is the
    Daleckii–Krein formula of :func:`manifoldnorm.functional.sym_reeig` (exact at repeated eigenvalues).

    Deviations
    ----------
    None in the forward; the reference backward (per-matrix SVD, blind division at equal eigenvalues) is
    replaced by the exact Loewner-matrix backward.
    """

    def __init__(self, threshold: float = 1e-4) -> None:
        super().__init__()
        if not float(threshold) > 0:
            raise ValueError(f"ReEig: threshold must be positive, got {threshold}")
        self.threshold = float(threshold)

    def forward(self, x: Tensor) -> Tensor:
        return mf.sym_reeig(x, self.threshold)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:g}"


_TRIU_CACHE: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}


def vech(S: Tensor) -> Tensor:
    r"""Isometric half-vectorisation of symmetric matrices ``(..., n, n)`` -> ``(..., n(n+1)/2)``.

    Upper triangle in row-major order, off-diagonal entries multiplied by :math:`\sqrt2`, so that
    :math:`\|\mathrm{vech}(S)\|_2 = \|S\|_F`.
    """
    n = S.shape[-1]
    key = (n, str(S.device))
    if key not in _TRIU_CACHE:
        rows, cols = torch.triu_indices(n, n, device=S.device)
        w = torch.full(rows.shape, math.sqrt(2.0), dtype=torch.float64, device=S.device)
        w[rows == cols] = 1.0
        _TRIU_CACHE[key] = (rows * n + cols, w)
    flat_idx, w = _TRIU_CACHE[key]
    return S.flatten(-2)[..., flat_idx] * w.to(S.dtype)


class LogEig(nn.Module):
    r"""Matrix logarithm followed by isometric half-vectorisation.

    Huang & Van Gool, AAAI 2017, LogEig layer (:math:`\log X = U\log(\Lambda)U^\top`), then :func:`vech`:
    ``(..., n, n)`` -> ``(..., n(n+1)/2)`` with :math:`\|\mathrm{LogEig}(X)\|_2 = \|\log X\|_F`, i.e. the AIM
    (and LEM) distance of :math:`X` to the identity.

    Deviations
    ----------
    The original SPDNet flattens all :math:`n^2` entries; like TSMNet we keep the :math:`n(n+1)/2` independent
    ones with :math:`\sqrt2`-weighted off-diagonals (same Euclidean geometry, no duplicated features).
    """

    def forward(self, x: Tensor) -> Tensor:
        return vech(mf.sym_logm(x))


class CovPool(nn.Module):
    r"""Covariance pooling of raw signals ``(..., C, T)`` -> SPD matrices ``(..., C, C)``.

    .. math::

        S = \frac{1}{T - 1}\,(X - \bar X)(X - \bar X)^\top,\qquad
        \Sigma = (1-\rho)\,S + \rho\,\mu I + \epsilon\,\mu I,\qquad \mu = \operatorname{tr}(S)/C,

    with shrinkage :math:`\rho` (Ledoit & Wolf style, towards the scaled identity) and a relative ridge
    :math:`\epsilon` that makes :math:`\Sigma` positive definite even when ``T < C``.

    Parameters
    ----------
    center : bool
        Subtract the temporal mean (divide by ``T - 1``); otherwise :math:`XX^\top / T`.
    shrinkage : float
        :math:`\rho \in [0, 1]`.
    eps : float
        Relative ridge :math:`\epsilon \ge 0` (scale-invariant: multiplied by the mean eigenvalue :math:`\mu`).
    dtype : torch.dtype, optional
        Compute (and return) in this dtype; default float64 as the SPD part downstream.

    Deviations
    ----------
    TSMNet's pooling has no shrinkage and no ridge; the relative ridge is our addition so that the output is
    SPD for any signal scale.
    """

    def __init__(self, center: bool = True, shrinkage: float = 0.0, eps: float = 1e-5,
                 dtype: torch.dtype | None = torch.float64) -> None:
        super().__init__()
        if not 0.0 <= float(shrinkage) <= 1.0:
            raise ValueError(f"CovPool: shrinkage must lie in [0, 1], got {shrinkage}")
        if not float(eps) >= 0.0:
            raise ValueError(f"CovPool: eps must be >= 0, got {eps}")
        self.center, self.shrinkage, self.eps, self.dtype = bool(center), float(shrinkage), float(eps), dtype

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"CovPool: expected signals of shape (..., C, T), got {tuple(x.shape)}")
        T = x.shape[-1]
        if T < 2:
            raise ValueError(f"CovPool: need at least 2 time samples, got T={T}")
        if self.dtype is not None:
            x = x.to(self.dtype)
        if self.center:
            x = x - x.mean(dim=-1, keepdim=True)
            S = x @ x.transpose(-1, -2) / (T - 1)
        else:
            S = x @ x.transpose(-1, -2) / T
        C = S.shape[-1]
        mu = (torch.diagonal(S, dim1=-2, dim2=-1).sum(-1) / C).unsqueeze(-1).unsqueeze(-1)
        eye = torch.eye(C, dtype=S.dtype, device=S.device)
        S = (1.0 - self.shrinkage) * S + (self.shrinkage + self.eps) * mu * eye
        return mf.sym(S)

    def extra_repr(self) -> str:
        return f"center={self.center}, shrinkage={self.shrinkage:g}, eps={self.eps:g}"
