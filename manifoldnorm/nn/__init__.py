"""Stateful building blocks: SPDNet layers, Riemannian and Euclidean norm layers, the norm registry.

No Lightning or Hydra imports here: every layer works in a plain PyTorch loop.
"""

from .adapt import refit_domain_norms, refit_mode, refittable_norms
from .base import RefittableNorm
from .diagnostics import NormRecorder
from .domain_liebn import DomainLieBatchNorm
from .euclidean import (
    BatchChannelNorm,
    BatchNorm,
    CRMSNorm,
    Derf,
    DyT,
    EigenLR,
    EvoNormB0,
    EvoNormS0,
    GroupNorm,
    HypersphereNorm,
    LayerNorm,
    OnlineNorm,
    PowerNorm,
    QKNorm,
    RMSNorm,
    SyncBatchNorm,
    UnifiedNorm,
    WeightStandardization,
    WSConv2d,
    WSLinear,
    adapt_layout,
    normalize_weights_,
    spectral_norm,
    weight_norm,
    weight_std,
)
from .gbwbn import GBWBatchNorm
from .liebn import LieBatchNorm
from .momentum_bn import DomainSPDBatchNorm, SPDMomentumBatchNorm
from .registry import (
    KINDS,
    IdentityNorm,
    NormInfo,
    create_norm_layer,
    get_norm_info,
    get_norm_layer,
    list_norms,
    register_norm,
)
from .schedule import kobler_momentum, set_norm_momentum
from .so3bn import SO3BatchNorm
from .spd_layers import BiMap, CovPool, LogEig, ReEig, stiefel_init_, vech
from .spdbn import SPDBatchNorm

__all__ = [
    "BiMap", "ReEig", "LogEig", "CovPool", "vech", "stiefel_init_",
    "LieBatchNorm", "DomainLieBatchNorm", "GBWBatchNorm",
    "SPDBatchNorm", "SPDMomentumBatchNorm", "DomainSPDBatchNorm", "RefittableNorm", "SO3BatchNorm",
    "kobler_momentum", "set_norm_momentum",
    "IdentityNorm", "BatchNorm", "GroupNorm", "SyncBatchNorm", "LayerNorm", "RMSNorm", "QKNorm", "CRMSNorm",
    "DyT", "Derf",
    "HypersphereNorm", "EigenLR", "normalize_weights_", "EvoNormB0", "EvoNormS0", "PowerNorm", "adapt_layout",
    "BatchChannelNorm", "OnlineNorm", "UnifiedNorm",
    "weight_norm", "weight_std", "spectral_norm", "WeightStandardization", "WSConv2d", "WSLinear",
    "KINDS", "NormInfo", "register_norm", "get_norm_layer", "get_norm_info", "create_norm_layer", "list_norms",
    "refit_domain_norms", "refit_mode", "refittable_norms", "NormRecorder",
]


def _import_every_module() -> None:
    """Import every module of the package: each registers its norms where they are defined, so a new module is in
    the registry (and so in the contract tests, the benchmarks and ``list_*``) without an import line here."""
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(__path__, f"{__name__}."):
        importlib.import_module(module.name)


_import_every_module()
