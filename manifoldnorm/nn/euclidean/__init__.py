"""Euclidean normalization layers (registry kind ``euclidean``): batch, group, layer, RMS and normalization-free
norms, and :func:`adapt_layout`, which lets a model hold a norm of either feature layout."""

from .batch_free import EvoNormB0, EvoNormS0, PowerNorm
from .bcn import BatchChannelNorm
from .layout import MovedFeatures, adapt_layout, feature_dim_of
from .online_norm import OnlineNorm
from .pointwise import CRMSNorm, Derf, DyT, EigenLR, HypersphereNorm, LayerNorm, QKNorm, RMSNorm, normalize_weights_
from .standard import BatchNorm, GroupNorm
from .sync_bn import SyncBatchNorm, all_reduce_sum
from .unified_norm import UnifiedNorm
from .weight_norms import WeightStandardization, WSConv2d, WSLinear, spectral_norm, weight_norm, weight_std

__all__ = [
    "BatchNorm", "GroupNorm", "LayerNorm", "RMSNorm", "QKNorm", "CRMSNorm", "DyT", "Derf", "HypersphereNorm", "EigenLR",
    "normalize_weights_", "SyncBatchNorm", "all_reduce_sum", "EvoNormB0", "EvoNormS0", "PowerNorm",
    "adapt_layout", "feature_dim_of", "MovedFeatures", "BatchChannelNorm", "OnlineNorm", "UnifiedNorm",
    "weight_norm", "weight_std", "spectral_norm", "WeightStandardization", "WSConv2d", "WSLinear",
]
