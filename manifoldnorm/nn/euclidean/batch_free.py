"""Normalizations without (or with only running) batch centering: EvoNorm-B0/S0 and PowerNorm.

EvoNorm layers act on ``(N, C)`` or ``(N, C, *spatial)`` inputs (features in dim 1); PowerNorm acts on
``(..., C)`` inputs (features in the LAST dim, the token layout of transformers). Parameters are cast to the
input dtype, so the output keeps the input's shape and dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .._common import check_momentum, check_positive_int
from ..registry import register_norm

__all__ = ["EvoNormB0", "EvoNormS0", "PowerNorm"]


def _check_eps(eps: float, owner: str) -> float:
    eps = float(eps)
    if not (math.isfinite(eps) and eps > 0.0):
        raise ValueError(f"{owner}: eps must be a finite positive number, got {eps}")
    return eps


def _check_tensor(x: Tensor, owner: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: expected a real floating-point tensor, got dtype {x.dtype}")


def _check_channels_first(x: Tensor, c: int, owner: str) -> None:
    _check_tensor(x, owner)
    if x.ndim < 2:
        raise ValueError(f"{owner}: expected an input of shape (N, C) or (N, C, *spatial) with C = {c}, "
                         f"got a {x.ndim}-d tensor of shape {tuple(x.shape)}")
    if x.shape[1] != c:
        raise ValueError(f"{owner}: expected {c} channels in dim 1, got input of shape {tuple(x.shape)}")


def _per_channel(p: Tensor, x: Tensor) -> Tensor:
    """``(C,)`` parameter reshaped to broadcast against ``(N, C, *spatial)`` in the dtype of ``x``."""
    return p.to(x.dtype).reshape(1, -1, *([1] * (x.ndim - 2)))


class EvoNormB0(nn.Module):
    r"""EvoNorm-B0: batch-dependent normalization-activation with a learned instance-variance gate.

    With :math:`\sigma^2_b` the per-channel batch variance (over ``N`` and the spatial positions) and
    :math:`\sigma^2_i` the per-sample, per-channel instance variance (over the spatial positions):

    .. math::
        y = \frac{x}{\max\!\big(\sqrt{\sigma^2_b + \epsilon},\; v_1 x + \sqrt{\sigma^2_i + \epsilon}\big)}\,
            \gamma + \beta

    Liu, Brock, Simonyan, Le, "Evolving Normalization-Activation Layers", NeurIPS 2020, Table 1 / Fig. 1
    (EvoNorm-B0). Both variances are biased (divide by the count); the batch variance is differentiated
    through in training mode; in eval mode the running variance replaces :math:`\sigma^2_b`.

    Parameters
    ----------
    num_features : int
        Number of channels ``C``.
    eps : float, default 1e-5
    momentum : float, default 0.1
        Weight of the new batch in the running variance (PyTorch convention):
        ``running_var = (1 - momentum) * running_var + momentum * unbiased_batch_var``.
    dtype, device
        Of the parameters (``weight`` = :math:`\gamma` ones, ``bias`` = :math:`\beta` zeros, ``v1`` ones, all
        ``(C,)``) and of the buffers ``running_var`` (ones) and ``num_batches_tracked``.

    Shapes
    ------
    ``x``: ``(N, C)`` or ``(N, C, *spatial)`` (features in dim 1) -> same shape and dtype; ``domain`` is
    accepted and ignored.

    Deviations
    ----------
    The running variance is updated with the unbiased batch variance (``n / (n - 1)``), as in
    :class:`torch.nn.BatchNorm1d`. For ``(N, C)`` inputs (no spatial dims) the instance variance is taken over a
    single value and is 0, so the second argument of the max is :math:`v_1 x + \sqrt{\epsilon}`.
    """

    feature_dim = 1

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        owner = "EvoNormB0"
        self.num_features = check_positive_int(num_features, "num_features", owner)
        self.eps = _check_eps(eps, owner)
        if momentum is None:
            raise TypeError(f"{owner}: momentum must be a float in [0, 1], got None")
        self.momentum = check_momentum(momentum, "momentum", owner)
        factory = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.v1 = nn.Parameter(torch.ones(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        _check_channels_first(x, self.num_features, "EvoNormB0")
        spatial = tuple(range(2, x.ndim))
        if self.training:
            n = x.numel() // self.num_features
            if n <= 1:
                raise ValueError(f"EvoNormB0: expected more than 1 value per channel when training, got input "
                                 f"of shape {tuple(x.shape)}")
            batch_var = x.var(dim=(0, *spatial), unbiased=False)
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                unbiased = batch_var.detach() * (n / (n - 1.0))
                self.running_var.mul_(1.0 - self.momentum).add_(self.momentum * unbiased.to(self.running_var.dtype))
        else:
            batch_var = self.running_var.to(x.dtype)
        batch_std = (batch_var + self.eps).sqrt().reshape(1, -1, *([1] * len(spatial)))
        if spatial:
            inst_std = (x.var(dim=spatial, unbiased=False, keepdim=True) + self.eps).sqrt()
            gate = torch.addcmul(inst_std, _per_channel(self.v1, x), x)
        else:  # no spatial dims: the instance variance of one value is 0
            gate = _per_channel(self.v1, x) * x + math.sqrt(self.eps)
        den = torch.maximum(batch_std, gate)
        return torch.addcmul(_per_channel(self.bias, x), x / den, _per_channel(self.weight, x))


class EvoNormS0(nn.Module):
    r"""EvoNorm-S0: batch-independent normalization-activation, a swish numerator over a group std.

    With :math:`\sigma^2_g` the per-sample variance over the channels of a group and the spatial positions:

    .. math::
        y = \frac{x\,\operatorname{sigmoid}(v_1 x)}{\sqrt{\sigma^2_g + \epsilon}}\,\gamma + \beta

    Liu, Brock, Simonyan, Le, "Evolving Normalization-Activation Layers", NeurIPS 2020, Table 1 / Fig. 1
    (EvoNorm-S0). The group variance is biased (divides by the count). No running statistics: identical output
    in train and eval mode.

    Parameters
    ----------
    num_features : int
        Number of channels ``C``.
    groups : int, default 32
        Number of channel groups; capped at ``C`` (``min(groups, C)``), which must then divide ``C``.
    eps : float, default 1e-5
    dtype, device
        Of the parameters ``weight`` (ones), ``bias`` (zeros), ``v1`` (ones), all ``(C,)``.

    Shapes
    ------
    ``x``: ``(N, C)`` or ``(N, C, *spatial)`` (features in dim 1) -> same shape and dtype; ``domain`` is
    accepted and ignored. Each group must hold more than one value per sample (``C / groups * prod(spatial)
    > 1``), otherwise a ValueError is raised (the variance of one value is 0).
    """

    feature_dim = 1

    def __init__(self, num_features: int, *, groups: int = 32, eps: float = 1e-5,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        owner = "EvoNormS0"
        self.num_features = check_positive_int(num_features, "num_features", owner)
        check_positive_int(groups, "groups", owner)
        self.groups = min(groups, num_features)
        if num_features % self.groups != 0:
            raise ValueError(f"{owner}: groups = {self.groups} (min(groups={groups}, C)) must divide "
                             f"num_features = {num_features}")
        self.eps = _check_eps(eps, owner)
        factory = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.v1 = nn.Parameter(torch.ones(num_features, **factory))

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}"

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        _check_channels_first(x, self.num_features, "EvoNormS0")
        per_group = self.num_features // self.groups * math.prod(x.shape[2:])
        if per_group <= 1:
            raise ValueError(f"EvoNormS0: each of the {self.groups} groups holds {per_group} value per sample "
                             f"for input of shape {tuple(x.shape)}; use fewer groups or spatial inputs")
        xg = x.reshape(x.shape[0], self.groups, -1)
        inv_std = torch.rsqrt(xg.var(dim=-1, unbiased=False, keepdim=True) + self.eps)
        num = x * torch.sigmoid(_per_channel(self.v1, x) * x)
        y = (num.reshape(xg.shape) * inv_std).reshape(x.shape)  # the group std, broadcast without a copy
        return torch.addcmul(_per_channel(self.bias, x), y, _per_channel(self.weight, x))


class _PowerNormalize(torch.autograd.Function):
    """``x_hat = x / sqrt(psi2 + eps)`` with the approximate backward of PowerNorm (see :class:`PowerNorm`)."""

    @staticmethod
    def forward(ctx, x: Tensor, psi2: Tensor, nu: Tensor, alpha_bkw: float,  # type: ignore[override]
                eps: float) -> Tensor:
        inv = (psi2.to(x.dtype) + eps).rsqrt()
        x_hat = x * inv
        ctx.save_for_backward(x_hat, inv)
        ctx.nu = nu
        ctx.alpha_bkw = alpha_bkw
        return x_hat

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x_hat, inv = ctx.saved_tensors
        nu = ctx.nu
        g_tilde = grad - nu.to(grad.dtype) * x_hat
        grad_x = g_tilde * inv
        with torch.no_grad():
            gamma = (x_hat * g_tilde).reshape(-1, x_hat.shape[-1]).mean(0).to(nu.dtype)
            nu.add_((1.0 - ctx.alpha_bkw) * gamma)
        return grad_x, None, None, None, None


class PowerNorm(nn.Module):
    r"""Power normalization: divide by a running quadratic mean (no centering), with an approximate backward.

    Training step :math:`t` on a batch :math:`X` (all leading dims flattened to :math:`B` rows), per feature:

    .. math::
        \psi_B^2 = \tfrac1B \textstyle\sum_i x_i^2,\qquad
        \hat x = \frac{x}{\sqrt{\psi_{t-1}^2 + \epsilon}},\qquad y = \gamma \odot \hat x + \beta,\qquad
        \psi_t^2 = \alpha\,\psi_{t-1}^2 + (1-\alpha)\,\psi_B^2

    so the forward uses the running value from BEFORE this batch's update. The backward (``approx_backward``)
    replaces the exact gradient through :math:`\psi` by a running estimate :math:`\nu` (buffer
    ``running_grad``, zeros at start), with :math:`g = \gamma \odot \partial L/\partial y`:

    .. math::
        \tilde g = g - \nu_{t-1} \odot \hat x,\qquad \frac{\partial L}{\partial x} = \frac{\tilde g}
        {\sqrt{\psi_{t-1}^2 + \epsilon}},\qquad \tilde\Gamma = \tfrac1B \textstyle\sum_i \hat x_i \odot
        \tilde g_i, \qquad \nu_t = \nu_{t-1} + (1-\alpha_b)\,\tilde\Gamma

    equivalently :math:`\nu_t = \nu_{t-1}\big(1 - (1-\alpha_b)\Gamma\big) + (1-\alpha_b)\Lambda` with
    :math:`\Gamma = \tfrac1B\sum_i \hat x_i^2`, :math:`\Lambda = \tfrac1B\sum_i \hat x_i \odot g_i`: an
    exponential average of the projection :math:`\Lambda` that the exact batch backward would subtract.
    :math:`\nu` is updated in place during the backward. Gradients of :math:`\gamma, \beta` are exact. In eval
    mode (and with ``approx_backward=False``) :math:`\hat x = x / \sqrt{\psi^2 + \epsilon}` with :math:`\psi^2`
    a constant and the exact gradient is used.

    Shen, Yao, Gholami, Mahoney, Keutzer, "PowerNorm: Rethinking Batch Normalization in Transformers",
    ICML 2020, the Power Normalization algorithm (Algorithm 2; Algorithm 1 is batch normalization): forward
    lines :math:`\hat X = X/\psi_{t-1}`, :math:`\psi_t^2` update; backward lines :math:`\tilde g`,
    :math:`\tilde\Gamma`, :math:`\nu_t`. The authors' ``MaskPowerNorm`` (``mask_powernorm.py``) stores
    ``ema_gz`` :math:`= \nu / (1-\alpha_b)` and computes ``g - (1 - abkw) * ema_gz * z``,
    ``ema_gz += mean(approx_grad_g * z)``: the same recursion.

    Parameters
    ----------
    num_features : int
        Feature size ``C`` (last dim).
    alpha : float, default 0.9
        Running-average factor of :math:`\psi^2`, in ``[0, 1]`` (weight of the OLD value).
    alpha_bkw : float or None, default None
        :math:`\alpha_b` of the :math:`\nu` update, in ``[0, 1]``; ``None`` uses ``alpha`` (the paper's single
        :math:`\alpha`; the authors' code has separate ``alpha_fwd``/``alpha_bkw``, both 0.9 by default).
    eps : float, default 1e-5
    warmup_iters : int, default 0
        For the first ``warmup_iters`` training forwards, normalize by the batch quadratic mean
        :math:`\psi_B^2` instead (exact autograd through it); :math:`\psi^2` is still updated.
    approx_backward : bool, default True
        Use the approximate backward above; ``False`` gives the exact gradient with :math:`\psi_{t-1}` fixed.
    dtype, device
        Of ``weight`` (ones), ``bias`` (zeros) and the buffers ``running_phi`` (:math:`\psi^2`, ones),
        ``running_grad`` (:math:`\nu`, zeros), ``num_batches_tracked``.

    Shapes
    ------
    ``x``: ``(..., C)`` with at least 2 dims (features in the LAST dim; e.g. ``(N, L, C)`` tokens) -> same shape
    and dtype; ``domain`` is accepted and ignored.

    Deviations
    ----------
    Statistics are taken over all tokens of the batch (no padding mask). ``eps`` is added inside the square
    root. :math:`\nu` is read and updated when the backward runs, not when the forward runs. Differences
    from the authors' code: (i) after warmup the code divides the backward by the batch quadratic mean
    :math:`\sqrt{\psi_B^2 + \epsilon}` although its forward divides by :math:`\sqrt{\psi_{t-1}^2 + \epsilon}`;
    we divide by the forward's scale, as the chain rule of :math:`\hat x = x/\psi_{t-1}` requires. (ii) The
    code first rescales every token by its own root mean square over channel groups (``GroupScaling1D``), a step
    the paper does not describe; not done here. (iii) During warmup the code keeps the approximate backward
    (updating :math:`\nu`) and updates :math:`\psi^2` twice per step (a cumulative average, then the exponential
    one); here warmup uses the exact gradient through :math:`\psi_B`, leaves :math:`\nu` unchanged and applies
    only the exponential update.
    """

    feature_dim = -1

    def __init__(self, num_features: int, *, alpha: float = 0.9, alpha_bkw: float | None = None, eps: float = 1e-5,
                 warmup_iters: int = 0, approx_backward: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        owner = "PowerNorm"
        self.num_features = check_positive_int(num_features, "num_features", owner)
        self.alpha = check_momentum(alpha, "alpha", owner)
        self.alpha_bkw = self.alpha if alpha_bkw is None else check_momentum(alpha_bkw, "alpha_bkw", owner)
        self.eps = _check_eps(eps, owner)
        if isinstance(warmup_iters, bool) or not isinstance(warmup_iters, int) or warmup_iters < 0:
            raise ValueError(f"{owner}: warmup_iters must be a non-negative int, got {warmup_iters!r}")
        self.warmup_iters = warmup_iters
        self.approx_backward = bool(approx_backward)
        factory = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.register_buffer("running_phi", torch.ones(num_features, **factory))
        self.register_buffer("running_grad", torch.zeros(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, alpha={self.alpha}, alpha_bkw={self.alpha_bkw}, eps={self.eps}, "
                f"warmup_iters={self.warmup_iters}, approx_backward={self.approx_backward}")

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        _check_tensor(x, "PowerNorm")
        if x.ndim < 2 or x.shape[-1] != self.num_features:
            raise ValueError(f"PowerNorm: expected an input of shape (..., {self.num_features}) with at least 2 "
                             f"dims (features last), got shape {tuple(x.shape)}")
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if not self.training:
            return x * (self.running_phi.to(x.dtype) + self.eps).rsqrt() * w + b
        if x.numel() == 0:
            raise ValueError(f"PowerNorm: expected a non-empty batch when training, got shape {tuple(x.shape)}")
        psi2_batch = (x * x).reshape(-1, self.num_features).mean(0)
        psi2_prev = self.running_phi.detach().clone()
        warm = int(self.num_batches_tracked.item()) < self.warmup_iters
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_phi.mul_(self.alpha).add_((1.0 - self.alpha) * psi2_batch.detach().to(psi2_prev.dtype))
        if warm:
            x_hat = x * (psi2_batch + self.eps).rsqrt()
        elif self.approx_backward:
            x_hat = _PowerNormalize.apply(x, psi2_prev, self.running_grad, self.alpha_bkw, self.eps)
        else:
            x_hat = x * (psi2_prev.to(x.dtype) + self.eps).rsqrt()
        return x_hat * w + b


register_norm("evonorm_b0", "euclidean")(EvoNormB0)
register_norm("evonorm_s0", "euclidean")(EvoNormS0)
register_norm("powernorm", "euclidean")(PowerNorm)
