"""Batch normalization whose batch statistics are summed over the processes of a ``torch.distributed`` group.

Works on every backend (``gloo`` on CPU included): each process reduces its local batch to per-channel
``(count, sum, sum of squares)``, one differentiable all-reduce adds them up, and every process normalizes with
the global mean and variance. Without an initialized process group (or with a group of size one) the layer is a
plain batch norm and issues no collective.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from manifoldnorm._dist import world_size

from .._common import check_momentum, check_positive_int
from ..registry import register_norm

__all__ = ["SyncBatchNorm", "all_reduce_sum"]


class _AllReduceSum(torch.autograd.Function):
    """Sum a tensor over a process group; the backward sums the incoming gradients the same way."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = t.detach().clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        g = grad.detach().clone().contiguous()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


def all_reduce_sum(t: Tensor, group=None) -> Tensor:
    r"""Differentiable sum of ``t`` over the processes of ``group`` (the default group if ``None``).

    Every process receives :math:`\sum_r t_r`. With the total loss :math:`L = \sum_r L_r`, the gradient with
    respect to :math:`t_s` is :math:`\sum_r \partial L_r / \partial (\sum_q t_q)`, so the backward is again a sum
    over the group. Every process of the group must call both the forward and the backward.
    """
    return _AllReduceSum.apply(t, group)


def _stats_dtype(x: Tensor) -> torch.dtype:
    """Dtype of the reduced statistics: float64 except on devices without it."""
    return torch.float32 if x.device.type == "mps" else torch.float64


class SyncBatchNorm(nn.Module):
    r"""Batch normalization over dim 1 with batch statistics synchronized across a process group.

    For channel :math:`c`, with the samples :math:`x_i` of all :math:`R` processes (process :math:`r` holding
    :math:`n_r` values per channel, batch and spatial positions together):

    .. math::
        n = \sum_r n_r,\qquad \mu = \frac1n \sum_r \sum_{i \in r} x_i,\qquad
        \sigma^2 = \frac1n \sum_r \sum_{i \in r} x_i^2 - \mu^2,\qquad
        y_i = \frac{x_i - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

    Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal Covariate
    Shift", ICML 2015, Algorithm 1 (normalize) and Algorithm 2 (unbiased variance for inference); the
    statistics are taken over the union of the per-process batches as in Peng et al., "MegDet: A Large
    Mini-Batch Object Detector", CVPR 2018, Sec. 3.3 (cross-GPU batch normalization).

    In training mode (or always, when ``track_running_stats=False``) the batch statistics above are used and the
    running statistics are updated as ``running = (1 - momentum) * running + momentum * batch`` with the
    unbiased variance :math:`\sigma^2 n / (n - 1)`; ``momentum=None`` gives the cumulative average. In eval
    mode the running statistics are used and nothing is communicated.

    Parameters
    ----------
    num_features : int
        Number of channels ``C``.
    eps : float, default 1e-5
        Added to the variance inside the square root.
    momentum : float or None, default 0.1
        Weight of the new batch in the running statistics (PyTorch convention), in ``[0, 1]``.
    affine : bool, default True
        Learnable per-channel ``weight`` (ones) and ``bias`` (zeros).
    track_running_stats : bool, default True
        Keep ``running_mean``/``running_var``/``num_batches_tracked`` buffers and use them in eval mode.
    process_group : torch.distributed.ProcessGroup, optional
        Group to synchronize over; the default group when ``None``.
    dtype, device
        Of the parameters and buffers.

    Shapes
    ------
    ``x``: ``(N, C)`` or ``(N, C, *spatial)`` -> same shape and dtype; ``domain`` is accepted and ignored.
    Processes may hold different ``N`` (even ``N = 0``), but every process of the group must run the forward
    (and the backward) in training mode together.

    Deviations
    ----------
    The variance is computed in one pass as ``E[x^2] - mean^2`` (the per-process sums are accumulated in at
    least float32 and reduced in float64), clamped at zero; this loses precision when ``|mean| >> std`` in low
    precision inputs. Parameters are cast to the computation dtype, so a float64 input through a float32 layer
    stays float64. Gradients follow the summed loss of all processes (the all-reduce's backward sums
    gradients); data-parallel wrappers that average gradients over processes scale them accordingly.
    """

    feature_dim = 1

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        owner = "SyncBatchNorm"
        self.num_features = check_positive_int(num_features, "num_features", owner)
        eps = float(eps)
        if not (math.isfinite(eps) and eps > 0.0):
            raise ValueError(f"{owner}: eps must be a finite positive number, got {eps}")
        self.eps = eps
        self.momentum = None if momentum is None else check_momentum(momentum, "momentum", owner)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.process_group = process_group
        factory = {"dtype": dtype, "device": device}
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, batch counter 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics and the affine parameters (weight 1, bias 0)."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"SyncBatchNorm: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"SyncBatchNorm: expected a real floating-point tensor, got dtype {x.dtype}")
        if x.ndim < 2:
            raise ValueError(f"SyncBatchNorm: expected an input of shape (N, C) or (N, C, *spatial) with "
                             f"C = {self.num_features}, got a {x.ndim}-d tensor of shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm: expected {self.num_features} channels in dim 1, got input of "
                             f"shape {tuple(x.shape)}")

    def _batch_stats(self, x: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor, float]:
        """Global per-channel mean and biased variance (dtype ``acc``) and the global count per channel."""
        dims = [0, *range(2, x.ndim)]
        xa = x.to(acc)
        local_n = x.numel() // self.num_features
        sdt = _stats_dtype(x)
        s = xa.sum(dims).to(sdt)
        ss = (xa * xa).sum(dims).to(sdt)
        world = world_size(self.process_group)
        if world > 1:
            cnt = torch.full_like(s.detach(), float(local_n))
            stats = all_reduce_sum(torch.stack([cnt, s, ss]), self.process_group)
            cnt, s, ss = stats.unbind(0)
            n = float(cnt[0].item())
        else:
            n = float(local_n)
        if n <= 1:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel when training, got "
                             f"{int(n)} value(s) per channel in total over {world} process(es) "
                             f"(input shape {tuple(x.shape)})")
        mean = s / n
        var = (ss / n - mean * mean).clamp_min(0.0)
        return mean.to(acc), var.to(acc), n

    def _update_running(self, mean: Tensor, var: Tensor, n: float) -> None:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = 1.0 / float(self.num_batches_tracked.item()) if self.momentum is None else self.momentum
            unbiased = var * (n / (n - 1.0))
            self.running_mean.mul_(1.0 - m).add_(m * mean.to(self.running_mean.dtype))
            self.running_var.mul_(1.0 - m).add_(m * unbiased.to(self.running_var.dtype))

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        self._check_input(x)
        acc = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        use_batch = self.training or not self.track_running_stats
        if use_batch:
            mean, var, n = self._batch_stats(x, acc)
            if self.training and self.track_running_stats:
                self._update_running(mean.detach(), var.detach(), n)
        else:
            mean, var = self.running_mean.to(acc), self.running_var.to(acc)
        shape = (1, self.num_features) + (1,) * (x.ndim - 2)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight.to(acc)
        y = (x.to(acc) - mean.reshape(shape)) * scale.reshape(shape)
        if self.affine:
            y = y + self.bias.to(acc).reshape(shape)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


register_norm("syncbatchnorm", "euclidean")(SyncBatchNorm)
