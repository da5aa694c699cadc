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
from manifoldnorm.functional._autograd import anchor_inputs, once_differentiable
from manifoldnorm.functional._batch import BatchSum, SplitBatchMean
from manifoldnorm.functional._spectral_checks import _reconstruct_exp
from manifoldnorm.functional.spd_pullback import cholesky_exp_grad

__all__ = ["SPDLieGroup", "make_group", "cholesky_group_inverse", "LIE_METRICS"]


class _SqFrob(torch.autograd.Function):
    r""":math:`\|Z\|_F^2` over the last two dims; backward :math:`2\bar g Z` in one pass (``Z.square().sum()``
    takes three passes over ``Z`` in its backward)."""

    @staticmethod
    def forward(ctx, Z: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(Z)
        return torch.linalg.vector_norm(Z, dim=(-2, -1)).square()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        (Z,) = ctx.saved_tensors
        return Z * (2.0 * g).unsqueeze(-1).unsqueeze(-1)


def sq_frobenius(Z: Tensor) -> Tensor:
    """Squared Frobenius norms ``(..., n, n) -> (...)`` with a one-pass backward."""
    return _SqFrob.apply(Z)


class _ChannelScale(torch.autograd.Function):
    r""":math:`c\,Z` with one factor per channel; the factor's gradient :math:`\sum \bar Y \circ Z` is a
    reduction, without the full-size product the generic ``MulBackward`` materialises."""

    @staticmethod
    def forward(ctx, Z: Tensor, c: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(Z, c)
        return _per_channel(c) * Z

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        Z, c = ctx.saved_tensors
        gZ = _per_channel(c) * g if ctx.needs_input_grad[0] else None
        gc = None
        if ctx.needs_input_grad[1]:
            gc = torch.linalg.vecdot(g.flatten(-2), Z.flatten(-2)).sum_to_size(c.shape)
        return gZ, gc


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

    def undeform_stats(self, Z: Tensor) -> Tensor:
        """:meth:`undeform` of statistics (no autograd graph, no input checks): the same values, fewer steps."""
        with torch.no_grad():
            return self.undeform(Z)

    # statistics ----------------------------------------------------------------------------------------------
    def mean(self, Z: Tensor, karcher_steps: int, tol: float | None = 0.0, reduce: BatchSum | None = None) -> Tensor:
        """Fréchet mean over dim 0 of a ``(N, C, ...)`` stack (arithmetic for the flat metrics).

        ``karcher_steps`` and ``tol`` (early stop, see :func:`manifoldnorm.functional.mean_aim`; ``0``: always
        run every step) only matter for the Karcher flow of AIM. ``reduce``: ``Z`` is one part of a batch split
        into parts and ``reduce`` sums over them (see :func:`~manifoldnorm.functional.mean_aim`); the flat
        metrics then need one ``reduce`` (sum and count together), AIM one per Karcher step plus one.
        """
        if reduce is None:
            return Z.mean(dim=0)
        return SplitBatchMean(torch.ones(Z.shape[0], dtype=Z.dtype, device=Z.device), 0, reduce)(Z)

    def sqdist_identity(self, Z: Tensor) -> Tensor:
        """Squared distance of each codomain element to the identity, ``(..., n, n)`` -> ``(...)``."""
        raise NotImplementedError

    def dispersion(self, Z: Tensor) -> tuple[Tensor, Callable[..., Tensor]]:
        """Squared distances to the identity and a scaling function sharing work with them.

        The function maps ``c`` to :math:`\\mathrm{Exp}_E(c\\,\\mathrm{Log}_E Z)` and ``(c, B)`` (``B`` in the
        codomain) to the biased output :math:`\\phi^{-1}(B \\odot \\mathrm{Exp}_E(c\\,\\mathrm{Log}_E Z))`, which a
        group may compute in one fused step.
        """
        return self.sqdist_identity(Z), lambda c, B=None: self._finish(self.scale(Z, c), B)

    def _finish(self, Zs: Tensor, B: Tensor | None) -> Tensor:
        return Zs if B is None else self.undeform(self.translate(B, Zs))

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
        return _ChannelScale.apply(Z, c)


class _AIM(SPDLieGroup):
    name = "aim"

    def deform(self, X: Tensor) -> Tensor:
        return self._pow(X, self.theta)

    def undeform(self, Z: Tensor) -> Tensor:
        return self._pow(Z, 1.0 / self.theta)

    def mean(self, Z: Tensor, karcher_steps: int, tol: float | None = 0.0, reduce: BatchSum | None = None) -> Tensor:
        return mf.mean_aim(Z, dim=0, karcher_steps=karcher_steps, tol=tol, reduce=reduce)

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
        return self._sqdist_from_eigvals(E.eigvals()), lambda c, B=None: self._finish(E.powm(c), B)

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

    def undeform_stats(self, Z: Tensor) -> Tensor:
        with torch.no_grad():
            lam, U = torch.linalg.eigh(Z)
            return _reconstruct_exp(U, lam)  # as sym_expm

    def sqdist_identity(self, Z: Tensor) -> Tensor:
        d2 = self.alpha * sq_frobenius(Z)
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

    def undeform_stats(self, Z: Tensor) -> Tensor:
        if self.theta != 1.0:
            return super().undeform_stats(Z)
        with torch.no_grad():
            C = torch.tril(Z)
            C.diagonal(dim1=-2, dim2=-1).exp_()
            return C @ C.mT  # as cholesky_exp

    def sqdist_identity(self, Z: Tensor) -> Tensor:
        return sq_frobenius(Z) / self.theta**2

    def dispersion(self, Z: Tensor) -> tuple[Tensor, Callable[..., Tensor]]:
        if self.theta != 1.0:
            return super().dispersion(Z)

        def scaler(c: Tensor, B: Tensor | None = None) -> Tensor:
            return self.scale(Z, c) if B is None else _LCMFinish.apply(Z, c, B)

        return self.sqdist_identity(Z), scaler


class _LCMFinish(torch.autograd.Function):
    r""":math:`\psi^{-1}(cZ + B) = CC^\top`, :math:`C = \lfloor cZ + B\rfloor + \exp\mathbb{D}(cZ + B)`, for
    lower-triangular ``Z`` ``(N, C, n, n)`` and ``B``, per-channel ``c``: scaling, bias and the Cholesky
    exponential in one step, so at n ~ 100 the forward makes one full-size buffer besides the output."""

    @staticmethod
    def forward(ctx, Z: Tensor, c: Tensor, B: Tensor) -> Tensor:  # type: ignore[override]
        anchor_inputs(ctx, Z, c, B)  # a second derivative is refused also when the output enters a loss linearly
        C = torch.addcmul(B, _per_channel(c), Z)
        C.diagonal(dim1=-2, dim2=-1).exp_()
        ctx.save_for_backward(Z, c, C)
        ctx.b_shape = B.shape
        return C @ C.mT

    @staticmethod
    @once_differentiable("LieBatchNorm(metric='lcm') (its fused Cholesky-exponential finish)",
                         "For second derivatives compose the LCM path from manifoldnorm.functional.cholesky_log_ref "
                         "and cholesky_exp_ref (plain autograd), or keep create_graph=False.")
    def backward(ctx, gY: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        Z, c, C = ctx.saved_tensors
        gC = cholesky_exp_grad(gY, C)
        gZ = _per_channel(c) * gC if ctx.needs_input_grad[0] else None
        gc = torch.linalg.vecdot(gC.flatten(-2), Z.flatten(-2)).sum_to_size(c.shape) if ctx.needs_input_grad[1] \
            else None
        gB = gC.sum_to_size(ctx.b_shape) if ctx.needs_input_grad[2] else None
        return gZ, gc, gB


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
