"""SinkGD: stateless gradient descent with a Sinkhorn-like multi-normalization of each matrix gradient.

Matrices only (Linear weights ``(out, in)``; conv weights are treated as ``(out, in·kh·kw)`` and reshaped back at the
end). Biases, gains and other vectors belong to AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from manifoldnorm.optim._base import MatrixOptimizer
from manifoldnorm.optim._newton_schulz import as_matrix
from manifoldnorm.optim._validate import check_options
from manifoldnorm.optim.registry import register_optimizer

__all__ = ["SinkGD", "sinkhorn_normalize", "sinkgd_update"]


def _check_iters(iters: int) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")


def sinkhorn_normalize(G: Tensor, iters: int = 5, eps: float = 1e-8) -> Tensor:
    r"""Alternately rescale the rows of ``G`` to norm :math:`\sqrt{n}` and its columns to norm :math:`\sqrt{m}`.

    Scetbon, Ma, Gong, Meeds (2025), "Gradient Multi-Normalization for Stateless and Scalable LLM Training"
    (arXiv 2502.06742), the square-root Sinkhorn normalization ("SR-Sinkhorn", Algorithm 3) used by SinkGD
    (Algorithm 4). For :math:`X_0 = G` of shape
    ``(m, n)`` (``(out, in)``) and :math:`L` = ``iters``:

    .. math::

        X \leftarrow \sqrt{n}\; \operatorname{diag}(\lVert X_{i,:}\rVert_2)^{-1} X, \qquad
        X \leftarrow \sqrt{m}\; X \operatorname{diag}(\lVert X_{:,j}\rVert_2)^{-1}
        \qquad (L \text{ times}).

    Each pass is a positive diagonal rescaling, so signs and zero pattern of :math:`G` are kept and the result is
    :math:`D_r G D_c`. Its squared entries follow the Sinkhorn iteration for row sums :math:`n` and column sums
    :math:`m`; at the fixed point every row has norm :math:`\sqrt{n}` and every column norm :math:`\sqrt{m}`, so
    :math:`\lVert X\rVert_F^2 = mn`, i.e. entries of RMS 1 (the scale of an Adam or sign update). Since the last
    pass normalizes the columns, :math:`\lVert X\rVert_F = \sqrt{mn}` holds exactly after any :math:`L \ge 1`
    (for a gradient without zero columns); the row norms approach :math:`\sqrt{n}` as :math:`L` grows.

    Parameters
    ----------
    G : Tensor, shape (..., m, n)
        Real floating-point matrices (batched over leading dimensions).
    iters : int, default 5
        Number :math:`L` of row-then-column passes.
    eps : float, default 1e-8
        Lower bound of every row/column norm in the division: an all-zero row or column stays zero.

    Returns
    -------
    Tensor, shape (..., m, n)
        Same dtype as ``G``; the norms and scalings are computed in at least float32.

    Notes
    -----
    The scaling (rows to :math:`\sqrt{n}`, columns to :math:`\sqrt{m}`) is the paper's; it makes the update
    invariant to the scale of the gradient and gives it RMS 1, so learning rates are in Adam units. Third-party
    ports differ by factors :math:`\sqrt{m}` to :math:`\sqrt{mn}` (unit rows/columns, or unit Frobenius norm).
    Deviations: norms are clamped at :math:`\epsilon` (``max(norm, eps)``) rather than having :math:`\epsilon`
    added, so the result is exactly scale-invariant for gradients whose norms exceed :math:`\epsilon`.
    """
    if not isinstance(G, Tensor):
        raise TypeError(f"sinkhorn_normalize expects a Tensor, got {type(G).__name__}")
    if G.dim() < 2:
        raise ValueError(f"sinkhorn_normalize needs matrices of shape (..., m, n); got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise TypeError(f"sinkhorn_normalize needs a real floating-point tensor, got dtype {G.dtype}")
    _check_iters(iters)
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    m, n = G.shape[-2:]
    X = G.to(torch.promote_types(G.dtype, torch.float32))
    sqrt_m, sqrt_n = math.sqrt(m), math.sqrt(n)
    for _ in range(iters):
        X = X * (sqrt_n / torch.linalg.vector_norm(X, dim=-1, keepdim=True).clamp(min=eps))
        X = X * (sqrt_m / torch.linalg.vector_norm(X, dim=-2, keepdim=True).clamp(min=eps))
    return X.to(G.dtype)


def sinkgd_update(grad: Tensor, iters: int = 5, eps: float = 1e-8) -> Tensor:
    r"""SinkGD's direction for one weight: :func:`sinkhorn_normalize` of the ``(out, -1)`` gradient matrix.

    The optimizer steps :math:`W \leftarrow W(1-\eta\lambda) - \eta\, \mathrm{SR\text{-}Sinkhorn}_L(G)`.

    Parameters
    ----------
    grad : Tensor, shape (out, in) or (out, in, kh, kw, ...)
        Gradient; read only. Conv gradients are normalized as the matrix ``(out, in·kh·kw)``.
    iters, eps
        Passed to :func:`sinkhorn_normalize`.

    Returns
    -------
    Tensor
        The normalized gradient with the shape and dtype of ``grad``.
    """
    return sinkhorn_normalize(as_matrix(grad, "SinkGD"), iters, eps).reshape(grad.shape)


class SinkGD(MatrixOptimizer):
    r"""SinkGD: stateless descent along the Sinkhorn-normalized gradient (Scetbon et al., 2025).

    Per matrix :math:`W` (conv weights as ``(out, in·kh·kw)``):

    .. math::

        W_t = W_{t-1}(1 - \eta\lambda) - \eta\, \mathrm{SR\text{-}Sinkhorn}_L(G_t)

    No optimizer state at all (no moments): ``state_dict()["state"]`` stays empty, memory equals plain SGD's.

    Parameters
    ----------
    params : iterable
        Matrices (ndim >= 2) or parameter groups; vectors raise a ValueError (send them to AdamW).
    lr : float, default 1e-3
        :math:`\eta`. The normalized update has entries of RMS about 1, so this is in Adam units.
    iters : int, default 5
        :math:`L`, row/column normalization passes.
    weight_decay : float, default 0.0
        Decoupled weight decay :math:`\lambda` (multiplied by :math:`\eta`).
    eps : float, default 1e-8
        Lower bound of the row/column norms.

    Notes
    -----
    Deviations: the paper's SinkGD has no weight decay; the decoupled ``weight_decay`` here is an extension and is
    off by default. Conv weights are flattened to ``(out, in·kh·kw)`` (the paper treats linear layers only).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        iters: int = 5,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
    ) -> None:
        check_options(dict(lr=lr, iters=iters, weight_decay=weight_decay, eps=eps), owner="SinkGD")
        super().__init__(params, dict(lr=lr, iters=iters, weight_decay=weight_decay, eps=eps))

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        lr, wd = float(group["lr"]), group["weight_decay"]
        X = sinkgd_update(p.grad, group["iters"], group["eps"])
        p.mul_(1 - lr * wd)
        p.add_(X, alpha=-lr)


register_optimizer("sinkgd", SinkGD, "euclidean")
