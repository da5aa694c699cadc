r"""The special orthogonal group SO(n) as a geoopt manifold (rotation-valued parameters)."""

from __future__ import annotations

import geoopt
import torch
from geoopt.utils import size2shape
from torch import Tensor

from manifoldnorm.functional.polar import project_so
from manifoldnorm.functional.so3 import so3_exp, so3_hat, so3_log

__all__ = ["SpecialOrthogonal"]


def _skew(A: Tensor) -> Tensor:
    return 0.5 * (A - A.mT)


class SpecialOrthogonal(geoopt.Manifold):
    r"""SO(n) = {R : RᵀR = I, det R = 1} with the metric induced by the embedding in :math:`\mathbb{R}^{n\times n}`.

    Tangent space :math:`T_R = \{R\,\Omega : \Omega^\top = -\Omega\}`, inner product
    :math:`\langle U, V\rangle_R = \operatorname{tr}(U^\top V)` (bi-invariant), projection
    :math:`P_R(U) = R\,\operatorname{skew}(R^\top U)`, exponential map :math:`\mathrm{Exp}_R(U) = R\exp(R^\top U)`
    (Rodrigues' formula for :math:`n = 3`, :func:`torch.linalg.matrix_exp` otherwise). The retraction is the
    exponential map for :math:`n = 3` and the Cayley transform
    :math:`R\,(I - \tfrac12\Omega)^{-1}(I + \tfrac12\Omega)` otherwise; both stay exactly in SO(n), so
    :class:`geoopt.optim.RiemannianSGD` / :class:`~geoopt.optim.RiemannianAdam` keep a
    :class:`geoopt.ManifoldParameter` orthogonal with determinant +1. Vector transport is the projection onto
    the new tangent space.

    Notes
    -----
    The geodesic distance of this metric is :math:`\sqrt2\,\theta` (:meth:`dist`), with :math:`\theta` the
    rotation angle of :math:`A^\top B`; :func:`manifoldnorm.functional.so3.distance_so3` returns :math:`\theta`.
    :meth:`logmap` and :meth:`dist` are implemented for :math:`n = 3`.
    """

    name = "SpecialOrthogonal"
    ndim = 2
    reversible = False

    # stateless: all instances describe the same geometry (geoopt compares the manifolds of tensors)
    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self).__qualname__)

    def _check_shape(self, shape: tuple[int, ...], name: str) -> tuple[bool, str | None]:
        ok, reason = super()._check_shape(shape, name)
        if not ok:
            return False, reason
        if shape[-1] != shape[-2]:
            return False, f"`{name}` should be square (..., n, n), got shape {tuple(shape)}"
        return True, None

    def _check_point_on_manifold(self, x: Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
                                 ) -> tuple[bool, str | None]:
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        if not torch.allclose(x.mT @ x, eye.expand_as(x), atol=atol, rtol=rtol):
            return False, f"`X^T X != I` with atol={atol}, rtol={rtol}"
        if bool((torch.linalg.det(x) <= 0).any()):
            return False, "`det X` is not +1 (a reflection)"
        return True, None

    def _check_vector_on_tangent(self, x: Tensor, u: Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
                                 ) -> tuple[bool, str | None]:
        diff = x.mT @ u + u.mT @ x
        if not torch.allclose(diff, torch.zeros_like(diff), atol=atol, rtol=rtol):
            return False, f"`X^T U + U^T X != 0` with atol={atol}, rtol={rtol}"
        return True, None

    def projx(self, x: Tensor) -> Tensor:
        """Closest rotation (special orthogonal polar factor, SVD with determinant fix)."""
        return project_so(x)

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        return x @ _skew(x.mT @ u)

    def egrad2rgrad(self, x: Tensor, u: Tensor) -> Tensor:
        return self.proju(x, u)

    def inner(self, x: Tensor, u: Tensor, v: Tensor | None = None, *, keepdim: bool = False) -> Tensor:
        if v is None:
            v = u
        return (u * v).sum(dim=(-1, -2), keepdim=keepdim)

    def _exp_skew(self, omega: Tensor) -> Tensor:
        if omega.shape[-1] == 3:
            return so3_exp(omega, skew=True)
        return torch.linalg.matrix_exp(_skew(omega))

    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        return x @ self._exp_skew(x.mT @ u)

    def retr(self, x: Tensor, u: Tensor) -> Tensor:
        if x.shape[-1] == 3:
            return self.expmap(x, u)
        omega = 0.5 * _skew(x.mT @ u)
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        return x @ torch.linalg.solve(eye - omega, eye + omega)

    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        self._need_so3(x, "logmap")
        return x @ so3_hat(so3_log(x.mT @ y))

    def dist(self, x: Tensor, y: Tensor, *, keepdim: bool = False) -> Tensor:
        self._need_so3(x, "dist")
        d = torch.linalg.vector_norm(so3_log(x.mT @ y), dim=-1) * 2.0**0.5
        return d.unsqueeze(-1).unsqueeze(-1) if keepdim else d

    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return self.proju(y, v)

    @staticmethod
    def _need_so3(x: Tensor, what: str) -> None:
        if x.shape[-1] != 3:
            raise NotImplementedError(f"SpecialOrthogonal.{what} is implemented for 3x3 rotations only, "
                                      f"got {x.shape[-1]}x{x.shape[-1]}")

    def random(self, *size, dtype=None, device=None, generator: torch.Generator | None = None,
               **kwargs) -> geoopt.ManifoldTensor:
        """Haar-uniform random rotations (QR of a Gaussian matrix with the sign fix of Mezzadri 2007)."""
        shape = size2shape(*size)
        self._assert_check_shape(shape, "x")
        A = torch.randn(*shape, dtype=dtype, device=device, generator=generator)
        Q, Rr = torch.linalg.qr(A)
        Q = Q * torch.sgn(torch.diagonal(Rr, dim1=-2, dim2=-1)).unsqueeze(-2)
        flip = torch.where(torch.linalg.det(Q) < 0, -1.0, 1.0).to(Q.dtype)
        Q = torch.cat([Q[..., :1] * flip.unsqueeze(-1).unsqueeze(-1), Q[..., 1:]], dim=-1)
        return geoopt.ManifoldTensor(Q, manifold=self)

    def origin(self, *size, dtype=None, device=None, seed: int | None = 42) -> geoopt.ManifoldTensor:
        """Identity rotations of the requested shape (``seed`` is ignored)."""
        shape = size2shape(*size)
        self._assert_check_shape(shape, "x")
        eye = torch.eye(shape[-1], dtype=dtype, device=device).expand(shape).clone()
        return geoopt.ManifoldTensor(eye, manifold=self)
