"""Thin norm-slot wrappers of torch's BatchNorm and GroupNorm (features in dim 1, any number of spatial dims)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from .._common import check_positive_int
from ..registry import register_norm

__all__ = ["BatchNorm", "GroupNorm"]


class BatchNorm(nn.BatchNorm1d):
    """Batch normalization over every dim but the features (dim 1); ``forward(x, domain=None)``.

    .. math:: y = \\gamma \\frac{x - \\mu_B}{\\sqrt{\\sigma^2_B + \\epsilon}} + \\beta

    with :math:`\\mu_B, \\sigma^2_B` the per-feature mean and biased variance over the batch and spatial dims in
    training, the running estimates (unbiased variance) in evaluation. Ioffe & Szegedy, "Batch Normalization:
    Accelerating Deep Network Training by Reducing Internal Covariate Shift", ICML 2015, Alg. 1 and 2. A subclass
    of ``torch.nn.BatchNorm1d`` (same parameters, buffers and state-dict keys) that accepts ``(N, C)`` and
    ``(N, C, *spatial)`` inputs of any number of spatial dims.
    """

    feature_dim = 1

    def _check_input_dim(self, x: Tensor) -> None:
        if x.ndim < 2:
            raise ValueError(f"BatchNorm: expected an input (N, {self.num_features}, ...) with at least 2 dims, "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm: expected {self.num_features} features in dim 1, got shape "
                             f"{tuple(x.shape)}")

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:  # type: ignore[override]
        return super().forward(x)


class GroupNorm(nn.GroupNorm):
    """Group normalization (features in dim 1); ``num_groups`` is capped to the largest divisor of C below it.

    .. math:: y = \\gamma \\frac{x - \\mu_g}{\\sqrt{\\sigma^2_g + \\epsilon}} + \\beta

    with :math:`\\mu_g, \\sigma^2_g` the mean and biased variance of each sample over the channels of its group
    and the spatial dims. Wu & He, "Group Normalization", ECCV 2018, Eqs. (1)-(3), (7). A subclass of
    ``torch.nn.GroupNorm`` taking ``num_features`` first so it fills a norm slot.

    Deviations: the paper fixes G = 32; a layer with fewer or indivisible channels uses the largest divisor of C
    that is at most ``num_groups`` (e.g. C = 4 gives 4 groups, i.e. InstanceNorm).
    """

    feature_dim = 1

    def __init__(self, num_features: int, *, num_groups: int = 32, eps: float = 1e-5, affine: bool = True,
                 dtype=None, device=None) -> None:
        c = check_positive_int(num_features, "num_features", "GroupNorm")
        g = check_positive_int(num_groups, "num_groups", "GroupNorm")
        g = max(d for d in range(1, min(g, c) + 1) if c % d == 0)
        if not (math.isfinite(float(eps)) and eps > 0):
            raise ValueError(f"GroupNorm: eps must be a finite positive number, got {eps}")
        super().__init__(g, c, eps=eps, affine=affine, device=device, dtype=dtype)
        self.num_features = c

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm: expected an input (N, {self.num_channels}, ...), got shape "
                             f"{tuple(x.shape)}")
        return super().forward(x)


register_norm("batchnorm", "euclidean")(BatchNorm)
register_norm("groupnorm", "euclidean")(GroupNorm)
