r"""Lie group structures on SPD matrices used by :class:`~manifoldnorm.nn.LieBatchNorm`.

Chen, Song, Liu & Sebe, "A Lie Group Approach to Riemannian Batch Normalization", ICLR 2024, Sec. 5.1-5.2.
Each metric is the pull-back of a simple geometry through a deformation :math:`\phi`; every operation below acts
in the codomain of :math:`\phi`:

* AIM: :math:`\phi(X) = X^\theta`, group operation :math:`P \odot Q = L_P Q L_P^\top`,
  :math:`d^2(Z, E) = \theta^{-2}[\alpha\|\log Z\|_F^2 + \beta \log^2\det Z]`, Karcher mean, AIM geodesic.
* LEM: :math:`\phi(X) = \log X`, :math:`P \odot Q = P + Q`,
  :math:`d^2(Z, E) = \alpha\|Z\|_F^2 + \beta\,\mathrm{tr}(Z)^2`, arithmetic mean, straight lines.
* LCM: :math:`\phi(X) = \psi(X^\theta)`, :math:`P \odot Q = P + Q`, :math:`d^2(Z, E) = \theta^{-2}\|Z\|_F^2`,
  arithmetic mean, straight lines.
* CRIM (Cholesky right-invariant metric, the LieBN toolbox's extension): the Cholesky factors form a group,
  :math:`P \star Q = (L_P L_Q)(L_P L_Q)^\top = L_P Q L_P^\top`, for which AIM is left-invariant; CRIM is the
  right-invariant metric :math:`d(X, Y) = d_{\mathrm{AIM}}(\iota(X), \iota(Y))` with the group inversion
  :math:`\iota(P) = L_P^{-1} L_P^{-\top}`. Since :math:`\iota` is an anti-isomorphism
  (:math:`\iota(X \star Y) = \iota(Y) \star \iota(X)`), LieBN with right translations under CRIM is LieBN-AIM in
  the coordinates :math:`\phi(X) = \iota(X^\theta)`: centering :math:`X \star M^{-1}` becomes
  :math:`\phi(M)^{-1} \star \phi(X)` and biasing :math:`X \star B` becomes :math:`\phi(B) \star \phi(X)`.

(:math:`L_P = \mathrm{chol}(P)`; :math:`\psi` is :func:`manifoldnorm.functional.cholesky_log`.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from manifoldnorm import functional as mf

__all__ = ["SPDLieGroup", "make_group", "cholesky_group_inverse", "LIE_METRICS"]


def _per_channel(c: Tensor) -> Tensor:
    """Broadcast a ``(C,)`` or ``(N, C)`` factor over ``(N, C, n, n)`` stacks."""
    return c.unsqueeze(-1).unsqueeze(-1)


class SPDLieGroup:
    """Codomain operations of one deformed metric (no state; ``theta``, ``alpha``, ``beta`` fixed)."""

    name = ""

    def __init__(self, theta: float, alpha: float, beta: float) -> None:
        self.theta, self.alpha, self.beta = float(theta), float(alpha), float(beta)

    # deformation ------------------------------------------------------------------------------------------
    def _pow(self, X: Tensor, p: float) -> Tensor:
        return X if p == 1.0 else mf.sym_powm(X, p)

    def deform(self, X: Tensor) -> Tensor:  # phi
        raise NotImplementedError

    def undeform(self, Z: Tensor) -> Tensor:  # phi^{-1}
        raise NotImplementedError

    # statistics ----------------------------------------------------------------------------------------------
    def mean(self, Z: Tensor, karcher_steps: int, tol: float | None = 0.0) -> Tensor:
        """Fréchet mean over dim 0 of a ``(N, C, ...)`` stack (arithmetic for the flat metrics).

        ``karcher_steps`` and ``tol`` (early stop, see :func:`manifoldnorm.functional.mean_aim`; ``0``: always
        run every step) only matter for the Karcher flow of AIM.
        """
        return Z.mean(dim=0)

    def sqdist_identity(self, Z: Tensor) -> Tensor:
        """Squared distance of each codomain element to the identity, ``(..., n, n)`` -> ``(...)``."""
        raise NotImplementedError

    def dispersion(self, Z: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """Squared distances to the identity and a scaling function ``c -> Exp_E(c Log_E Z)`` sharing work."""
        return self.sqdist_identity(Z), lambda c: self.scale(Z, c)

    def geodesic(self, R: Tensor, M: Tensor, t: float) -> Tensor:
        """Point ``t`` on the geodesic from ``R`` to ``M`` (codomain); a straight line for the flat metrics."""
        return R + t * (M - R)

    # group action --------------------------------------------------------------------------------------------
    def center(self, Z: Tensor, M: Tensor) -> Tensor:
        r"""Left translation by the inverse of ``M``: :math:`M^{-1} \\odot Z`."""
        return Z - M

    def translate(self, B: Tensor, Z: Tensor) -> Tensor:
        r"""Left translation by ``B``: :math:`B \\odot Z`."""
        return Z + B

    def scale(self, Z: Tensor, c: Tensor) -> Tensor:
        r""":math:`\\mathrm{Exp}_E(c\\,\\mathrm{Log}_E Z)` with one factor per channel (``(C,)`` or ``(N, C)``)."""
        return _per_channel(c) * Z


class _AIM(SPDLieGroup):
    name = "aim"

    def deform(self, X: Tensor) -> Tensor:
        return self._pow(X, self.theta)

    def undeform(self, Z: Tensor) -> Tensor:
        return self._pow(Z, 1.0 / self.theta)

    def mean(self, Z: Tensor, karcher_steps: int, tol: float | None = 0.0) -> Tensor:
        return mf.mean_aim(Z, dim=0, karcher_steps=karcher_steps, tol=tol)

    def _sqdist_from_eigvals(self, lam: Tensor) -> Tensor:
        log_lam = torch.log(lam)
        d2 = self.alpha * log_lam.square().sum(-1)
        if self.beta != 0.0:
            d2 = d2 + self.beta * log_lam.sum(-1).square()
        return d2 / self.theta**2

    def sqdist_identity(self, Z: Tensor) -> Tensor:
        # eigenvalues only: the eigvalsh backward U diag(g) U^T has no divided differences
        return self._sqdist_from_eigvals(torch.linalg.eigvalsh(Z))

    def dispersion(self, Z: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        # one eigh serves the variance (eigenvalues) and the scaling Z^c
        E = mf.sym_eig(Z)
        return self._sqdist_from_eigvals(E.eigvals()), lambda c: E.powm(c)

    def geodesic(self, R: Tensor, M: Tensor, t: float) -> Tensor:
        return mf.geodesic_aim(R, M, t)

    def center(self, Z: Tensor, M: Tensor) -> Tensor:
        L = torch.linalg.cholesky(M)
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
        L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
        return mf.congruence(L_inv, Z)

    def translate(self, B: Tensor, Z: Tensor) -> Tensor:
        return mf.congruence(torch.linalg.cholesky(B), Z)

    def scale(self, Z: Tensor, c: Tensor) -> Tensor:
        return mf.sym_powm(Z, c)


class _LEM(SPDLieGroup):
    name = "lem"

    def deform(self, X: Tensor) -> Tensor:
        return mf.sym_logm(X)

    def undeform(self, Z: Tensor) -> Tensor:
        return mf.sym_expm(Z)

    def sqdist_identity(self, Z: Tensor) -> Tensor:
        d2 = self.alpha * Z.square().sum((-1, -2))
        if self.beta != 0.0:
            d2 = d2 + self.beta * torch.diagonal(Z, dim1=-2, dim2=-1).sum(-1).square()
        return d2


class _LCM(SPDLieGroup):
    name = "lcm"

    def deform(self, X: Tensor) -> Tensor:
        return mf.cholesky_log(self._pow(X, self.theta))

    def undeform(self, Z: Tensor) -> Tensor:
        Y = mf.cholesky_exp(Z)  # C C^T: symmetric up to round-off, no extra symmetrisation pass
        return Y if self.theta == 1.0 else self._pow(mf.sym(Y), 1.0 / self.theta)

    def sqdist_identity(self, Z: Tensor) -> Tensor:
        return Z.square().sum((-1, -2)) / self.theta**2


def cholesky_group_inverse(P: Tensor) -> Tensor:
    r"""Inverse in the Cholesky group, :math:`\iota(P) = L^{-1}L^{-\top}` with :math:`L = \mathrm{chol}(P)`.

    An involution of the SPD manifold (:math:`\mathrm{chol}(\iota(P)) = L^{-1}`), differentiable through
    ``torch.linalg.cholesky`` and a triangular solve.
    """
    L = torch.linalg.cholesky(P)
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
    K = torch.linalg.solve_triangular(L, eye, upper=False)
    return mf.sym(K @ K.transpose(-1, -2))


class _CRIM(_AIM):
    name = "crim"

    def deform(self, X: Tensor) -> Tensor:
        return cholesky_group_inverse(self._pow(X, self.theta))

    def undeform(self, Z: Tensor) -> Tensor:
        return self._pow(cholesky_group_inverse(Z), 1.0 / self.theta)


_GROUPS: dict[str, type[SPDLieGroup]] = {"aim": _AIM, "lem": _LEM, "lcm": _LCM, "crim": _CRIM}
#: metric names accepted by :class:`~manifoldnorm.nn.LieBatchNorm`
LIE_METRICS: tuple[str, ...] = tuple(_GROUPS)


def make_group(metric: str, theta: float, alpha: float, beta: float) -> SPDLieGroup:
    """Instantiate the codomain operations of ``metric`` (validated by the caller)."""
    return _GROUPS[metric](theta, alpha, beta)
