"""TSMNet: temporal and spatial convolutions, covariance pooling, SPD stages with a (domain) batch norm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from manifoldnorm.nn import CovPool
from manifoldnorm.nn.registry import NormSpec

from ._stages import SPDTrunk, check_dims, no_autocast

__all__ = ["TSMNet"]


class TSMNet(SPDTrunk):
    r"""Tangent space mapping network for raw EEG ``(N, C, T)``.

    Kobler, Hirayama, Zhao & Kawanabe, "SPD domain-specific batch normalization to crack interpretable
    unsupervised domain adaptation in EEG", NeurIPS 2022:

    ``Conv2d(1 -> F_t, (1, K), 'same', reflect)`` -> ``Conv2d(F_t -> F_s, (C, 1))`` -> covariance ``(F_s, F_s)``
    -> ``[BiMap -> ReEig -> norm]`` per entry of ``spd_dims`` -> ``LogEig`` -> ``Linear``.

    Parameters
    ----------
    n_channels : int
        EEG channels ``C``.
    num_classes : int
    temporal_filters, spatial_filters : int
        :math:`F_t` and :math:`F_s` (4 and 40 in the paper).
    temporal_kernel : int
        Temporal kernel length ``K`` (25 samples in the paper).
    spd_dims : sequence of int
        BiMap output sizes (``(20,)`` in the paper).
    norm_layer : str, class, functools.partial or None
        Any SPD-capable registered norm (default ``'spddsmbn'``; ``None`` or ``'none'`` disables it).
    norm_kwargs : dict, optional
        Extra norm arguments, e.g. ``{'num_domains': 10}``.
    reeig_threshold : float
    cov_eps : float
        Relative ridge of the covariance pooling (:class:`~manifoldnorm.nn.CovPool`).

    Notes
    -----
    ``forward(x, domain=None)`` -> logits ``(N, num_classes)`` in the dtype of the classifier (float32). The
    convolutions run in their dtype (float32, autocast allowed); covariances and the SPD part run in float64
    with autocast disabled.

    Deviations
    ----------
    Covariances are centred and regularised by a relative ridge ``cov_eps`` (SPD for any signal scale); the
    reference code has neither and keeps the SPD part pinned to the CPU.
    """

    def __init__(self, n_channels: int, num_classes: int, temporal_filters: int = 4, spatial_filters: int = 40,
                 temporal_kernel: int = 25, spd_dims: Sequence[int] = (20,), norm_layer: NormSpec = "spddsmbn",
                 norm_kwargs: dict[str, Any] | None = None, reeig_threshold: float = 1e-4,
                 cov_eps: float = 1e-5) -> None:
        super().__init__()
        n_channels, num_classes, temporal_filters, spatial_filters, temporal_kernel = check_dims(
            (n_channels, num_classes, temporal_filters, spatial_filters, temporal_kernel), "TSMNet")
        spd_dims = check_dims(spd_dims, "TSMNet spd_dims")
        self.n_channels = n_channels
        self.temporal = nn.Conv2d(1, temporal_filters, (1, temporal_kernel), padding="same", padding_mode="reflect")
        self.spatial = nn.Conv2d(temporal_filters, spatial_filters, (n_channels, 1))
        self.cov = CovPool(center=True, eps=cov_eps, dtype=torch.float64)
        sizes = (spatial_filters, *spd_dims)
        self._build_trunk(sizes, num_classes, norm_layer, norm_kwargs, reeig_threshold, norm_first=False)

    def features(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        """Tangent-space features ``(N, d(d+1)/2)`` (float64)."""
        if x.dim() != 3 or x.shape[1] != self.n_channels:
            raise ValueError(f"TSMNet: expected raw signals of shape (N, {self.n_channels}, T), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"TSMNet: expected a floating-point tensor, got dtype {x.dtype}")
        h = self.spatial(self.temporal(x.to(self.temporal.weight.dtype).unsqueeze(1))).squeeze(2)
        with no_autocast(x.device):
            h = self.cov(h.to(torch.float64))
            return self._spd_features(h, domain)

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        return self.classify(self.features(x, domain))
