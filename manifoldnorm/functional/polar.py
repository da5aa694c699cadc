r"""Special orthogonal polar factor (closest rotation) with a well-conditioned backward.

For :math:`X = U \Sigma V^\top` (SVD) the closest rotation in Frobenius norm is
:math:`Q = U D V^\top`, :math:`D = \operatorname{diag}(1, \dots, 1, \det UV^\top)` (Kabsch/Umeyama; the chordal
L2 projection of Hartley et al., "Rotation Averaging", IJCV 2013). With signed singular values
:math:`\sigma' = D\sigma` and :math:`K = U^\top dX\, V`, the differential is

.. math::

    dQ = U D\, \Omega\, V^\top,\qquad \Omega_{ij} = \frac{(DK)_{ij} - (DK)_{ji}}{\sigma'_i + \sigma'_j},

so the backward of :math:`L(Q)` is :math:`\partial L/\partial X = U D\, \Lambda V^\top`,
:math:`\Lambda_{ij} = (H_{ij} - H_{ji})/(\sigma'_i + \sigma'_j)`, :math:`H = D U^\top G V`. Only sums of
singular values appear: unlike autograd through :func:`torch.linalg.svd` (differences
:math:`\sigma_i^2 - \sigma_j^2`), it stays finite when singular values coincide, e.g. for the average of a
concentrated batch of rotations. Once differentiable: a second derivative raises ``NotImplementedError`` (the
backward treats the SVD as constant).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import anchor_inputs, once_differentiable

__all__ = ["project_so"]


def _factors(X: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(U D, signed singular values, V, Q)`` of the special orthogonal polar decomposition."""
    U, S, Vh = torch.linalg.svd(X)
    d = torch.linalg.det(U @ Vh)
    sign = torch.ones_like(S)
    sign[..., -1] = d
    UD = U * sign.unsqueeze(-2)
    return UD, S * sign, Vh.mT, UD @ Vh


class _ProjectSO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X: Tensor) -> Tensor:  # noqa: ANN001
        anchor_inputs(ctx, X)
        UD, S, V, Q = _factors(X)
        ctx.save_for_backward(UD, S, V)
        return Q

    @staticmethod
    @once_differentiable(
        "project_so",
        "For second derivatives project with plain autograd (U, S, Vh = torch.linalg.svd(X); fix the sign of the "
        "last column of U by det(U @ Vh); return U @ Vh), exact while the singular values are distinct; or keep "
        "create_graph=False.",
    )
    def backward(ctx, G: Tensor) -> Tensor:  # noqa: ANN001
        UD, S, V = ctx.saved_tensors
        H = UD.mT @ G @ V
        denom = S.unsqueeze(-1) + S.unsqueeze(-2)
        tiny = torch.finfo(S.dtype).tiny
        denom = torch.where(denom.abs() < tiny, torch.full_like(denom, tiny), denom)
        return UD @ ((H - H.mT) / denom) @ V.mT


def project_so(X: Tensor) -> Tensor:
    r"""Closest rotation in Frobenius norm (special orthogonal polar factor) of ``(..., n, n)`` matrices.

    :math:`U \operatorname{diag}(1, \dots, 1, \det UV^\top) V^\top` for :math:`X = U\Sigma V^\top`. The backward
    (module docstring) involves only :math:`1/(\sigma'_i + \sigma'_j)`: finite for repeated singular values,
    singular only where the projection itself is discontinuous (:math:`\sigma'_i + \sigma'_j = 0`, e.g. a
    reflection with two equal smallest singular values).
    """
    return _ProjectSO.apply(X)
