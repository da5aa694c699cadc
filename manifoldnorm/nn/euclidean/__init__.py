"""Euclidean normalization layers (registry kind ``euclidean``): batch, layer, RMS and normalization-free norms."""

from .batch_free import EvoNormB0, EvoNormS0, PowerNorm
from .pointwise import CRMSNorm, Derf, DyT, EigenLR, HypersphereNorm, LayerNorm, QKNorm, RMSNorm, normalize_weights_
from .sync_bn import SyncBatchNorm, all_reduce_sum

__all__ = [
    "LayerNorm", "RMSNorm", "QKNorm", "CRMSNorm", "DyT", "Derf", "HypersphereNorm", "EigenLR", "normalize_weights_",
    "SyncBatchNorm", "all_reduce_sum", "EvoNormB0", "EvoNormS0", "PowerNorm",
]
