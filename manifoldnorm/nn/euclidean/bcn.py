"""Batch-Channel Normalization: a batch normalization (optionally on estimated statistics) then a group norm.

Acts on ``(N, C)`` or ``(N, C, *spatial)`` inputs (features in dim 1). Parameters are cast to the input dtype, so
the output keeps the input's shape and dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._common import check_momentum, check_positive_int
from ..registry import register_norm

__all__ = ["BatchChannelNorm"]


def _per_channel(p: Tensor, x: Tensor) -> Tensor:
    """``(C,)`` tensor reshaped to broadcast against ``(N, C, *spatial)`` in the dtype of ``x``."""
    return p.to(x.dtype).reshape(1, -1, *([1] * (x.ndim - 2)))


class BatchChannelNorm(nn.Module):
    r"""Batch-Channel Normalization (BCN): per-channel batch normalization followed by a group (channel) norm.

    With :math:`\mu, \sigma^2` per-channel statistics (see below) and :math:`\mu_{n,g}, \sigma^2_{n,g}` the mean and
    biased variance of sample :math:`n` over the channels of group :math:`g` and the spatial positions:

    .. math::
        \dot x = \gamma_b \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta_b,\qquad
        y = \gamma_c \frac{\dot x - \mu_{n,g}(\dot x)}{\sqrt{\sigma^2_{n,g}(\dot x) + \epsilon}} + \beta_c

    with per-channel affine parameters :math:`\gamma_b, \beta_b` (batch part) and :math:`\gamma_c, \beta_c`
    (channel part). Let :math:`\mu_B, \sigma^2_B` be the per-channel mean and biased variance of the current batch
    (over ``N`` and the spatial positions) and :math:`r` = ``momentum``.

    * ``estimated_stats=True`` (micro-batch BCN, Algorithm 1): in training, the estimates are first updated,
      :math:`\hat\mu \leftarrow (1-r)\hat\mu + r\mu_B` and :math:`\hat\sigma^2 \leftarrow (1-r)\hat\sigma^2 +
      r\sigma^2_B` (buffers ``running_mean``, ``running_var``), and the batch part then normalizes with these
      UPDATED estimates, :math:`\mu = \hat\mu, \sigma^2 = \hat\sigma^2`, treated as constants (no gradient flows
      through them). In eval mode the batch part uses the current estimates, without updating them. The only
      difference between the modes is that update: ``layer.eval()(x)`` right after ``layer.train()(x)`` returns
      the same tensor.
    * ``estimated_stats=False`` (large-batch BCN): in training :math:`\mu = \mu_B, \sigma^2 = \sigma^2_B`, with the
      gradient through them, and the running estimates are updated as in :class:`torch.nn.BatchNorm1d`
      (``running_var`` with the unbiased batch variance); eval mode uses the running estimates.

    The channel part has no running statistics: it standardizes each sample by its own group statistics in both
    modes.

    Qiao, Wang, Liu, Shen, Yuille, "Micro-Batch Training with Batch-Channel Normalization and Weight
    Standardization", arXiv:1903.10520 (2019), section "Batch-Channel Normalization", Algorithm 1 (micro-batch
    BCN). The paper pairs BCN with weight-standardized convolutions (class attribute
    ``pairs_with_weight_standardization``).

    Parameters
    ----------
    num_features : int
        Number of channels ``C``.
    num_groups : int, default 32
        Groups of the channel part; capped to the largest divisor of ``C`` that is at most ``num_groups`` (``C = 4``
        gives 4 groups).
    momentum : float, default 0.1
        Update rate :math:`r` of the estimates, in ``[0, 1]`` (weight of the new batch, PyTorch convention).
    eps : float, default 1e-5
        Added to the variances of both parts.
    estimated_stats : bool, default True
        Normalize the batch part with the running estimates in training (micro-batch BCN) instead of the batch
        statistics (large-batch BCN).
    dtype, device
        Of the parameters ``batch_weight`` (ones), ``batch_bias`` (zeros), ``weight`` (ones), ``bias`` (zeros), all
        ``(C,)``, and of the buffers ``running_mean`` (zeros), ``running_var`` (ones), ``num_batches_tracked``.

    Shapes
    ------
    ``x``: ``(N, C)`` or ``(N, C, *spatial)`` (features in dim 1) -> same shape and dtype; ``domain`` is accepted
    and ignored. Each group must hold more than one value per sample (``C / num_groups * prod(spatial) > 1``).

    Deviations
    ----------
    The variance estimate is moved with the biased variance of the current batch about the batch's own mean; the
    authors' released code measures the spread about the previous mean estimate instead, and fixes the update
    rate through a separate buffer that starts at 0. The channel part has one scale and shift per channel (as in
    Group Normalization); the released code uses one per group. ``eps`` is shared by both parts. Statistics are
    those of the local batch (no reduction across processes). At initialization the estimates are (0, 1), so in
    micro-batch mode the batch part starts near the identity and approaches batch normalization as the estimates
    converge.
    """

    feature_dim = 1
    pairs_with_weight_standardization = True

    def __init__(self, num_features: int, *, num_groups: int = 32, momentum: float = 0.1, eps: float = 1e-5,
                 estimated_stats: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        owner = "BatchChannelNorm"
        self.num_features = check_positive_int(num_features, "num_features", owner)
        groups = check_positive_int(num_groups, "num_groups", owner)
        self.num_groups = max(d for d in range(1, min(groups, num_features) + 1) if num_features % d == 0)
        if momentum is None or isinstance(momentum, bool):
            raise TypeError(f"{owner}: momentum must be a float in [0, 1], got {momentum!r}")
        self.momentum = check_momentum(momentum, "momentum", owner)
        eps = float(eps)
        if not (math.isfinite(eps) and eps > 0.0):
            raise ValueError(f"{owner}: eps must be a finite positive number, got {eps}")
        self.eps = eps
        if not isinstance(estimated_stats, bool):
            raise TypeError(f"{owner}: estimated_stats must be a bool, got {type(estimated_stats).__name__}")
        self.estimated_stats = estimated_stats
        factory = {"dtype": dtype, "device": device}
        self.batch_weight = nn.Parameter(torch.ones(num_features, **factory))
        self.batch_bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_groups={self.num_groups}, momentum={self.momentum}, eps={self.eps}, "
                f"estimated_stats={self.estimated_stats}")

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"BatchChannelNorm: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"BatchChannelNorm: expected a real floating-point tensor, got dtype {x.dtype}")
        if x.ndim < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchChannelNorm: expected an input (N, {self.num_features}) or "
                             f"(N, {self.num_features}, *spatial), got shape {tuple(x.shape)}")
        per_group = self.num_features // self.num_groups * math.prod(x.shape[2:])
        if per_group <= 1:
            raise ValueError(f"BatchChannelNorm: each of the {self.num_groups} groups holds {per_group} value per "
                             f"sample for input of shape {tuple(x.shape)}; use fewer groups or spatial inputs")
        if x.shape[0] == 0:
            raise ValueError(f"BatchChannelNorm: expected a non-empty batch, got shape {tuple(x.shape)}")

    def _batch_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, var)`` for the batch part; updates the running estimates in training mode."""
        if not self.training:
            return self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
        dims = (0, *range(2, x.ndim))
        n = x.numel() // self.num_features
        if not self.estimated_stats and n <= 1:
            raise ValueError(f"BatchChannelNorm: expected more than 1 value per channel when training with batch "
                             f"statistics, got input of shape {tuple(x.shape)}")
        if self.estimated_stats:  # the estimates carry no gradient: one fused pass without a graph
            with torch.no_grad():
                var_b, mean_b = torch.var_mean(x, dim=dims, unbiased=False)
        else:
            var_b, mean_b = torch.var_mean(x, dim=dims, unbiased=False)
        r = self.momentum
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            new_var = var_b.detach() if self.estimated_stats else var_b.detach() * (n / (n - 1.0))
            self.running_mean.mul_(1.0 - r).add_(r * mean_b.detach().to(self.running_mean.dtype))
            self.running_var.mul_(1.0 - r).add_(r * new_var.to(self.running_var.dtype))
        if self.estimated_stats:
            return self.running_mean.to(x.dtype).clone(), self.running_var.to(x.dtype).clone()
        return mean_b, var_b

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        self._check_input(x)
        mean, var = self._batch_stats(x)
        # batch part as one per-channel affine map (scale, shift are C-vectors), then a fused group norm
        scale = self.batch_weight.to(x.dtype) * torch.rsqrt(var + self.eps)
        shift = self.batch_bias.to(x.dtype) - mean * scale
        xb = torch.addcmul(_per_channel(shift, x), x, _per_channel(scale, x))
        return F.group_norm(xb, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


register_norm("bcn", "euclidean")(BatchChannelNorm)
