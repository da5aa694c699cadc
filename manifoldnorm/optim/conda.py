"""Conda: Adam run in the basis of the first moment's singular vectors (column-normalized Adam).

Matrices only (Linear weights ``(out, in)``; conv weights are treated as ``(out, in·kh·kw)`` and reshaped back at the
end). Biases, gains and other vectors belong to AdamW.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from manifoldnorm.optim._base import MatrixOptimizer
from manifoldnorm.optim._newton_schulz import as_matrix
from manifoldnorm.optim._validate import check_options
from manifoldnorm.optim.registry import register_optimizer

__all__ = ["Conda", "conda_update", "conda_basis"]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: the SVD and the rotations never run in half precision."""
    return torch.promote_types(dtype, torch.float32)


def conda_basis(M: Tensor) -> Tensor:
    r"""Orthonormal basis of the smaller side of ``M``: its right singular vectors if ``m >= n``, else its left ones.

    With :math:`M = U \Sigma V^\top` (Wang et al., 2025, Conda's projection step; the rule of the authors' code,
    ``conda_torch/projector.py``: ``Vh`` when rows >= cols, ``U`` otherwise): :math:`Q = V` for a tall or square
    ``M``, :math:`Q = U` for a wide one. The choice matters beyond memory: Conda normalizes element-wise in the
    rotated coordinates, and element-wise normalization is not rotation invariant, so on a square matrix the
    left and the right basis (both full rotations) give different updates (the first steps on a random 48x48
    gradient differ by 83% of their norm); the square case follows the authors' code.

    Parameters
    ----------
    M : Tensor, shape (m, n)
        The first moment viewed as a matrix.

    Returns
    -------
    Tensor, shape (k, k) with k = min(m, n)
        :math:`Q` with orthonormal columns, computed by ``torch.linalg.svd`` in at least float32 (float32 for
        half/float32 input, float64 for float64 input) and returned in that dtype.

    Raises
    ------
    ValueError
        If ``M`` is not a matrix or holds NaN/Inf (the SVD would fail or return garbage).
    """
    if M.dim() != 2:
        raise ValueError(f"conda_basis expects a matrix (m, n), got shape {tuple(M.shape)}")
    M = M.to(_work_dtype(M.dtype))
    if not bool(torch.isfinite(M).all()):
        raise ValueError("Conda: the first moment holds NaN or Inf; cannot take its SVD (check the gradients)")
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return Vh.mT if M.shape[0] >= M.shape[1] else U


def conda_update(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    basis: Tensor | None,
    step: int,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    update_proj_gap: int = 2000,
    scale: float = 0.25,
) -> tuple[Tensor, Tensor]:
    r"""Conda's direction for one weight: Adam in the rotated basis of the first moment's singular vectors.

    Wang, Zhou, Dong, Li, Li, Zhou, Lao, Fang, Lin (2025), "Conda: Column-Normalized Adam for Training Large
    Language Models Faster" (arXiv 2509.24218), the Conda update rule. With the gradient :math:`G_t` viewed as an
    ``(m, n)`` matrix and :math:`Q_t` (``k × k``, ``k = min(m, n)``) from :func:`conda_basis`, write
    :math:`R(X) = X Q` if :math:`m \ge n` (:math:`Q = V`) and :math:`R(X) = Q^\top X` otherwise (:math:`Q = U`); a
    rotation, no rank is dropped:

    .. math::

        M_t &= \beta_1 M_{t-1} + (1-\beta_1) G_t, \qquad
        Q_t = \begin{cases} \mathrm{basis}(M_t) & (t-1) \bmod T = 0 \\ Q_{t-1} & \text{otherwise}\end{cases} \\
        V_t &= \beta_2 V_{t-1} + (1-\beta_2)\, R(G_t)^{\odot 2}, \qquad
        N_t = \frac{R(M_t) / (1-\beta_1^t)}{\sqrt{V_t / (1-\beta_2^t)} + \epsilon} \\
        D_t &= s\, R^{-1}(N_t) = s \cdot \begin{cases} N_t Q_t^\top & m \ge n \\ Q_t N_t & m < n \end{cases}

    The optimizer then steps :math:`W \leftarrow W(1-\eta\lambda) - \eta D_t`.

    Parameters
    ----------
    grad : Tensor, shape (out, in) or (out, in, kh, kw, ...)
        :math:`G_t`; read only. Conv gradients are used as the matrix ``(out, in·kh·kw)``.
    exp_avg : Tensor, same shape as ``grad``
        :math:`M_{t-1}` (unrotated), overwritten in place with :math:`M_t`.
    exp_avg_sq : Tensor, shape (m, n)
        :math:`V_{t-1}` in rotated coordinates, overwritten in place with :math:`V_t`.
    basis : Tensor of shape (k, k) or None
        :math:`Q_{t-1}`; ``None`` before the first step (a refresh is then forced).
    step : int
        :math:`t \ge 1`, the index of this step (bias corrections, refresh schedule).
    betas : (float, float)
        :math:`(\beta_1, \beta_2)`.
    eps : float
        :math:`\epsilon`, added to the bias-corrected :math:`\sqrt{\hat V_t}`.
    update_proj_gap : int
        :math:`T`: the basis is recomputed at steps 1, T+1, 2T+1, ...
    scale : float
        :math:`s`, multiplies the rotated-back direction.

    Returns
    -------
    direction : Tensor
        :math:`D_t` with the shape and dtype of ``grad``.
    basis : Tensor, shape (k, k)
        :math:`Q_t` (a new tensor on refresh steps, the input otherwise); dtype at least float32.

    Notes
    -----
    Choices the paper leaves open, fixed as in the authors' code (``conda_torch``): the SVD is of the *updated*
    first moment :math:`M_t`, not of :math:`G_t`; both :math:`M_t` and :math:`G_t` are rotated every step (the
    moment is stored unrotated); :math:`V` is kept in rotated coordinates and is *not* re-rotated when the basis
    changes (as GaLore); the refresh happens at steps :math:`1, T+1, 2T+1, \dots`; the smaller side is kept, so
    tall matrices use the right singular vectors, wide ones the left, and square ones the right (``m >= n``). The
    side matters: the normalization by :math:`\sqrt{V_t}` is element-wise, hence basis dependent, so a square
    matrix's update depends on which of its two singular bases is used (see :func:`conda_basis`).

    Deviations: :math:`\epsilon` is added to the bias-corrected :math:`\sqrt{\hat V_t}` as in the paper's update
    (the authors' code folds :math:`\sqrt{1-\beta_2^t}` into the step size, i.e. uses
    :math:`\epsilon\sqrt{1-\beta_2^t}`); the SVD runs in float64 for float64 weights (float32 otherwise, as the
    code); the basis is kept in that precision rather than cast to the weight's dtype; conv weights are flattened
    (the authors' code rejects them).
    """
    G = as_matrix(grad, "Conda")
    m, n = G.shape
    if exp_avg.shape != grad.shape:
        raise ValueError(f"exp_avg must have the gradient's shape {tuple(grad.shape)}, got {tuple(exp_avg.shape)}")
    if exp_avg_sq.shape != (m, n):
        raise ValueError(f"exp_avg_sq must have shape ({m}, {n}) for a gradient of shape {tuple(grad.shape)}, "
                         f"got {tuple(exp_avg_sq.shape)}")
    k = min(m, n)
    if basis is not None and basis.shape != (k, k):
        raise ValueError(f"basis must have shape ({k}, {k}) for a gradient of shape {tuple(grad.shape)}, "
                         f"got {tuple(basis.shape)}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap < 1:
        raise ValueError(f"update_proj_gap must be a positive int, got {update_proj_gap!r}")
    beta1, beta2 = betas

    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    M = as_matrix(exp_avg, "Conda")
    if basis is None or (step - 1) % update_proj_gap == 0:
        basis = conda_basis(M)
    work = basis.dtype
    wide = m < n  # the authors' rule: right basis when rows >= cols, left basis otherwise

    def rotate(X: Tensor) -> Tensor:
        X = X.to(work)
        return basis.mT @ X if wide else X @ basis

    G_rot = rotate(G)
    exp_avg_sq.mul_(beta2).addcmul_(G_rot.to(exp_avg_sq.dtype), G_rot.to(exp_avg_sq.dtype), value=1 - beta2)
    m_hat = rotate(M) / (1 - beta1**step)
    v_hat = exp_avg_sq.to(work) / (1 - beta2**step)
    N = m_hat / (v_hat.sqrt() + eps)
    D = basis @ N if wide else N @ basis.mT
    return (scale * D).reshape(grad.shape).to(grad.dtype), basis


class Conda(MatrixOptimizer):
    r"""Conda: Adam in the periodically refreshed singular basis of the first moment (Wang et al., 2025).

    Per matrix :math:`W` (conv weights as ``(out, in·kh·kw)``), with :math:`D_t` from :func:`conda_update`:

    .. math::

        W_t = W_{t-1}(1 - \eta\lambda) - \eta\, D_t

    State per matrix: ``step`` (int), ``exp_avg`` (weight shape and dtype), ``exp_avg_sq`` (``(m, n)``, weight
    dtype, rotated coordinates) and ``basis`` (``(k, k)``, at least float32; kept in that dtype through
    ``load_state_dict``). Memory is AdamW's plus :math:`k^2`.

    Parameters
    ----------
    params : iterable
        Matrices (ndim >= 2) or parameter groups; vectors raise a ValueError (send them to AdamW).
    lr : float, default 1e-3
        :math:`\eta`.
    betas : (float, float), default (0.9, 0.999)
        Adam's :math:`(\beta_1, \beta_2)`.
    eps : float, default 1e-8
        :math:`\epsilon` of the denominator.
    weight_decay : float, default 0.0
        Decoupled weight decay :math:`\lambda` (multiplied by :math:`\eta`).
    update_proj_gap : int, default 2000
        :math:`T`, steps between SVD refreshes of the basis (the paper's scripts use 2000; the authors' command
        line default is 50).
    scale : float, default 0.25
        :math:`s`, multiplies the direction (the paper's setting; the authors' class default is 1.0).

    Notes
    -----
    Deviations: see :func:`conda_update`. The weight decay is applied before the update, as AdamW (the authors'
    code decays after it; the difference is :math:`\eta^2\lambda D_t`). The authors' optimizer also runs plain Adam on
    groups without ``update_proj_gap``; here such parameters go to AdamW through the composite optimizer.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        update_proj_gap: int = 2000,
        scale: float = 0.25,
    ) -> None:
        check_options(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, update_proj_gap=update_proj_gap,
                           scale=scale), owner="Conda")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        update_proj_gap=update_proj_gap, scale=scale)
        super().__init__(params, defaults)

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        lr, wd = float(group["lr"]), group["weight_decay"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros(as_matrix(p, "Conda").shape, dtype=p.dtype, device=p.device)
            state["basis"] = None
        state["step"] += 1
        D, state["basis"] = conda_update(
            p.grad, state["exp_avg"], state["exp_avg_sq"], state["basis"], state["step"],
            betas=group["betas"], eps=group["eps"], update_proj_gap=group["update_proj_gap"],
            scale=group["scale"])
        p.mul_(1 - lr * wd)
        p.add_(D, alpha=-lr)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict; each basis keeps its saved precision (the base class would cast it to the weight's)."""
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        id_to_param = dict(zip(saved_ids, params, strict=False))  # lengths: checked by the base class
        bases = {id_to_param[k]: s["basis"] for k, s in state_dict["state"].items()
                 if k in id_to_param and isinstance(s.get("basis"), Tensor)}
        super().load_state_dict(state_dict)
        for p, basis in bases.items():
            self.state[p]["basis"] = basis.to(device=p.device, dtype=_work_dtype(p.dtype), copy=True)


register_optimizer("conda", Conda, "euclidean")
