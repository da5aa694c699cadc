"""AdamP and SGDP: momentum optimizers that drop the radial part of the step on scale-invariant weights.

A weight followed by a normalization (BatchNorm, LayerNorm, weight standardization, ...) is scale invariant: the loss
does not change with its norm, so its gradient is orthogonal to it. Momentum then makes the weight norm grow, which
shrinks the effective step size. AdamP/SGDP detect such weights by a small cosine between weight and gradient and
project the step onto the tangent space of the sphere (per output channel or per tensor). Any ndim is accepted;
vectors (ndim < 2) are never projected.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from manifoldnorm.optim._base import StepOptimizer
from manifoldnorm.optim._validate import check_options
from manifoldnorm.optim.registry import register_optimizer

__all__ = ["AdamP", "SGDP", "projection", "adamp_update", "sgdp_update", "SGDP_MOMENTUM_VARIANTS"]

#: SGDP momentum variants: ``"paper"`` (Algorithm 1: the buffer keeps the unprojected momentum) and ``"code"``
#: (clovaai/AdamP ``sgdp.py``: without Nesterov the buffer itself is projected in place).
SGDP_MOMENTUM_VARIANTS: tuple[str, ...] = ("paper", "code")


def check_momentum_variant(variant: str) -> str:
    """Validate an SGDP momentum variant name (one of :data:`SGDP_MOMENTUM_VARIANTS`)."""
    if not isinstance(variant, str):
        raise TypeError(f"momentum_variant must be one of {', '.join(map(repr, SGDP_MOMENTUM_VARIANTS))}, got "
                        f"{variant!r} ({type(variant).__name__})")
    if variant not in SGDP_MOMENTUM_VARIANTS:
        raise ValueError(f"unknown momentum_variant {variant!r}; valid: "
                         f"{', '.join(map(repr, SGDP_MOMENTUM_VARIANTS))}")
    return variant


def _channel_view(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _layer_view(x: Tensor) -> Tensor:
    return x.reshape(1, -1)


def projection(
    p: Tensor, grad: Tensor, perturb: Tensor, delta: float = 0.1, wd_ratio: float = 0.1, eps: float = 1e-8
) -> tuple[Tensor, float]:
    r"""Remove the radial component of ``perturb`` if ``p`` looks scale invariant (Heo et al., ICLR 2021).

    Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
    Scale-Invariant Weights", ICLR 2021, Algorithms 1-2. Two views of ``p`` are tried in order: per output channel
    (rows of ``p.reshape(out, -1)``) and the whole tensor (``p.reshape(1, -1)``). For the first view whose rows
    :math:`w_i, g_i, x_i` (weight, gradient, ``perturb``) of length :math:`d` satisfy

    .. math::

        \max_i \frac{|\langle g_i, w_i\rangle|}{\max(\lVert g_i\rVert, \epsilon)\max(\lVert w_i\rVert, \epsilon)}
        < \frac{\delta}{\sqrt{d}}

    every row is projected, :math:`x_i \leftarrow x_i - \hat w_i \langle \hat w_i, x_i\rangle` with
    :math:`\hat w_i = w_i / (\lVert w_i\rVert + \epsilon)`, and the weight decay is scaled by ``wd_ratio``. If no
    view passes the test, ``perturb`` is returned unchanged with factor 1.

    Parameters
    ----------
    p : Tensor, shape (out, ...), ndim >= 2
        The weight :math:`w`.
    grad : Tensor, same shape
        Its gradient (the cosine test uses the gradient, not ``perturb``).
    perturb : Tensor, same shape
        The optimizer's step direction; not modified.
    delta : float, default 0.1
        :math:`\delta` of the cosine threshold.
    wd_ratio : float, default 0.1
        Weight-decay factor returned when a projection happened.
    eps : float, default 1e-8
        :math:`\epsilon` of the cosine (as ``torch.nn.functional.cosine_similarity``) and of :math:`\hat w`.

    Returns
    -------
    perturb : Tensor
        The (possibly) projected direction, a new tensor.
    wd_factor : float
        ``wd_ratio`` if a projection happened, else 1.0.
    """
    if p.dim() < 2:
        raise ValueError(f"projection applies to weights with ndim >= 2 (vectors are never projected), got shape "
                         f"{tuple(p.shape)}")
    if grad.shape != p.shape or perturb.shape != p.shape:
        raise ValueError(f"p, grad and perturb must have one shape, got {tuple(p.shape)}, {tuple(grad.shape)}, "
                         f"{tuple(perturb.shape)}")
    for view in (_channel_view, _layer_view):
        w = view(p)
        cosine = F.cosine_similarity(view(grad), w, dim=1, eps=eps).abs()
        if bool(cosine.max() < delta / math.sqrt(w.shape[1])):
            w_hat = w / (torch.linalg.vector_norm(w, dim=1, keepdim=True) + eps)
            x = view(perturb)
            x = x - w_hat * (w_hat * x).sum(dim=1, keepdim=True)
            return x.reshape(perturb.shape), wd_ratio
    return perturb.clone(), 1.0


def adamp_update(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    param: Tensor,
    step: int,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    nesterov: bool = False,
) -> tuple[Tensor, float]:
    r"""AdamP's direction for one weight (Heo et al., ICLR 2021, Algorithm 2).

    .. math::

        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
        p_t = \frac{\tilde m_t}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}, \quad
        q_t = \frac{\Pi(p_t)}{1-\beta_1^t}

    with :math:`\tilde m_t = m_t`, or :math:`\beta_1 m_t + (1-\beta_1) g_t` with ``nesterov``, and :math:`\Pi` the
    :func:`projection` (identity for vectors). The optimizer steps
    :math:`w \leftarrow w (1 - \eta\lambda r) - \eta q_t`, :math:`r` the returned weight-decay factor.

    Parameters
    ----------
    grad : Tensor
        :math:`g_t`; read only.
    exp_avg, exp_avg_sq : Tensor, same shape as ``grad``
        :math:`m_{t-1}, v_{t-1}`, overwritten in place with :math:`m_t, v_t`.
    param : Tensor
        The weight :math:`w` (read only), for the projection.
    step : int
        :math:`t \ge 1`.
    betas, eps, delta, wd_ratio, nesterov
        As in :class:`AdamP`.

    Returns
    -------
    direction : Tensor
        :math:`q_t`, shape and dtype of ``grad``.
    wd_factor : float
        ``wd_ratio`` if projected, else 1.0.

    Notes
    -----
    As the authors' code: :math:`\epsilon` added to the bias-corrected :math:`\sqrt{\hat v_t}` (as
    ``torch.optim.Adam``), so without a projection this is Adam's step.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    beta1, beta2 = betas
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    m = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1) if nesterov else exp_avg
    perturb = m / denom
    factor = 1.0
    if param.dim() > 1:
        perturb, factor = projection(param, grad, perturb, delta, wd_ratio, eps)
    return perturb.div_(1 - beta1**step), factor


def sgdp_update(
    grad: Tensor,
    momentum_buffer: Tensor | None,
    param: Tensor,
    *,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    eps: float = 1e-8,
    momentum_variant: str = "paper",
) -> tuple[Tensor, float]:
    r"""SGDP's direction for one weight (Heo et al., ICLR 2021, Algorithm 1).

    .. math::

        b_t = \mu \tilde b_{t-1} + (1-\tau) g_t, \qquad
        v_t = \begin{cases} g_t + \mu b_t & \text{nesterov} \\ b_t & \text{otherwise} \end{cases}, \qquad
        q_t = \Pi(v_t)

    (:math:`b_0 = 0`; without momentum :math:`v_t = g_t`, or :math:`(1-\tau) g_t` with ``"code"``). The stored
    buffer :math:`\tilde b_t` depends on ``momentum_variant``:

    * ``"paper"`` (Algorithm 1): :math:`\tilde b_t = b_t`, the unprojected momentum;
    * ``"code"`` (the authors' ``sgdp.py``, clovaai/AdamP): without Nesterov, :math:`\tilde b_t = q_t = \Pi(b_t)`
      (the code projects the buffer in place, so the momentum accumulates projected steps); with Nesterov
      :math:`\tilde b_t = b_t` as in the paper (the code projects a new tensor there). With ``momentum == 0`` the
      code's buffer is :math:`(1-\tau) g_t`, so the dampening scales the step; ``"paper"`` ignores it there (as
      ``torch.optim.SGD``).

    The optimizer steps :math:`w \leftarrow w\,(1 - \eta\lambda r / (1-\mu)) - \eta q_t`.

    Parameters
    ----------
    grad : Tensor
        :math:`g_t`; read only.
    momentum_buffer : Tensor or None
        :math:`\tilde b_{t-1}`, overwritten in place with :math:`\tilde b_t`; ``None`` when ``momentum == 0``.
    param : Tensor
        The weight (read only), for the projection.
    momentum, dampening, nesterov, delta, wd_ratio, eps, momentum_variant
        As in :class:`SGDP`.

    Returns
    -------
    direction : Tensor
        :math:`q_t`, shape and dtype of ``grad``.
    wd_factor : float
        ``wd_ratio`` if projected, else 1.0.
    """
    code = check_momentum_variant(momentum_variant) == "code"
    if momentum_buffer is not None:
        momentum_buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
        v = grad.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    else:
        v = grad.mul(1 - dampening) if code and dampening != 0 else grad
    if param.dim() < 2:
        return v.clone(), 1.0
    q, factor = projection(param, grad, v, delta, wd_ratio, eps)
    if code and momentum_buffer is not None and not nesterov:
        momentum_buffer.copy_(q)  # the authors' in-place projection of the buffer (a no-op where nothing projects)
    return q, factor


class _ProjectedOptimizer(StepOptimizer):
    def _check(self, p: Tensor) -> None:
        super()._check(p)
        if torch.is_complex(p):
            raise TypeError(f"{type(self).__name__} does not support complex parameters")


class AdamP(_ProjectedOptimizer):
    r"""AdamP: Adam whose step loses its radial component on scale-invariant weights (Heo et al., ICLR 2021).

    Per tensor, with :math:`(q_t, r)` from :func:`adamp_update`:
    :math:`w_t = w_{t-1}(1 - \eta\lambda r) - \eta q_t`. Without a projection (and always for vectors) this is
    ``torch.optim.AdamW`` (``torch.optim.Adam`` for :math:`\lambda = 0`).

    Parameters
    ----------
    params : iterable
        Tensors of any ndim or parameter groups.
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 0.0
        Decoupled weight decay :math:`\lambda`, scaled by ``wd_ratio`` where a projection happened.
    delta : float, default 0.1
        Cosine threshold :math:`\delta` (divided by :math:`\sqrt{d}`).
    wd_ratio : float, default 0.1
    nesterov : bool, default False

    Notes
    -----
    Defaults are the paper's (and the authors' code). The decoupled weight decay and its reduction by ``wd_ratio``
    on projected weights follow the authors' code (the algorithms in the paper show no weight decay).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
    ) -> None:
        check_options(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio,
                           nesterov=nesterov), owner="AdamP")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, delta=delta,
                        wd_ratio=wd_ratio, nesterov=nesterov)
        super().__init__(params, defaults)

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        lr, wd = float(group["lr"]), group["weight_decay"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        q, ratio = adamp_update(p.grad, state["exp_avg"], state["exp_avg_sq"], p, state["step"],
                                betas=group["betas"], eps=group["eps"], delta=group["delta"],
                                wd_ratio=group["wd_ratio"], nesterov=group["nesterov"])
        if wd > 0:
            p.mul_(1 - lr * wd * ratio)
        p.add_(q, alpha=-lr)


class SGDP(_ProjectedOptimizer):
    r"""SGDP: SGD (with momentum) whose step loses its radial component on scale-invariant weights.

    Heo et al., ICLR 2021, Algorithm 1. Per tensor, with :math:`(q_t, r)` from :func:`sgdp_update`:
    :math:`w_t = w_{t-1}(1 - \eta\lambda r/(1-\mu)) - \eta q_t`.

    Parameters
    ----------
    params : iterable
        Tensors of any ndim or parameter groups.
    lr : float
        :math:`\eta` (required, as in the authors' code and ``torch.optim.SGD`` of its time).
    momentum : float, default 0.0
        :math:`\mu`.
    dampening : float, default 0.0
        :math:`\tau`.
    weight_decay : float, default 0.0
        Decoupled weight decay :math:`\lambda`, divided by :math:`1-\mu` and scaled by ``wd_ratio`` where
        projected.
    nesterov : bool, default False
    eps : float, default 1e-8
    delta : float, default 0.1
    wd_ratio : float, default 0.1
    momentum_variant : {"paper", "code"}, default "paper"
        What the momentum buffer holds (see :func:`sgdp_update`): ``"paper"`` the unprojected momentum of
        Algorithm 1; ``"code"`` the projected one, as the authors' ``sgdp.py`` (without Nesterov), which reproduces
        their published runs (momentum 0.9, no Nesterov) step for step.

    Notes
    -----
    Defaults are the authors' code's, except ``momentum_variant``: the default follows the paper's algorithm, the
    written specification of the method (and the form that reduces to ``torch.optim.SGD`` on weights that are
    never projected either way); ``"code"`` is one option away. Deviations: Nesterov requires a momentum and zero
    dampening (as ``torch.optim.SGD``). With ``weight_decay=0``, ``dampening=0`` and
    no projection this is ``torch.optim.SGD``. The buffer starts at zero, so with dampening the first step is
    :math:`(1-\tau) g_1` (``torch.optim.SGD`` starts its buffer at :math:`g_1`).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        eps: float = 1e-8,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        momentum_variant: str = "paper",
    ) -> None:
        check_options(dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                           nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio,
                           momentum_variant=momentum_variant), owner="SGDP")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio,
                        momentum_variant=momentum_variant)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # state dicts saved before the option existed: the paper's variant
            group.setdefault("momentum_variant", "paper")

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        lr, wd, mu = float(group["lr"]), group["weight_decay"], group["momentum"]
        buf = None
        if mu != 0:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
        q, ratio = sgdp_update(p.grad, buf, p, momentum=mu, dampening=group["dampening"],
                               nesterov=group["nesterov"], delta=group["delta"],
                               wd_ratio=group["wd_ratio"], eps=group["eps"],
                               momentum_variant=group["momentum_variant"])
        if wd != 0:
            p.mul_(1 - lr * wd * ratio / (1 - mu))
        p.add_(q, alpha=-lr)


register_optimizer("adamp", AdamP, "euclidean")
register_optimizer("sgdp", SGDP, "euclidean")
