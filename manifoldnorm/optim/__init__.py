"""Optimizers for models with manifold-valued parameters.

:func:`create_optimizer` splits a model's parameters by ordered rules: ``geoopt.ManifoldParameter`` s
(Stiefel BiMap weights, SPD biases) go to a Riemannian optimizer, everything else to a Euclidean one, and
one :class:`CompositeOptimizer` drives both. Normalized optimizers for matrix parameters: :class:`Muon`,
:class:`NorMuon`, :class:`Conda`, :class:`SinkGD`; :class:`AdamP`/:class:`SGDP` for scale-invariant weights
(registry keys ``muon``, ``normuon``, ``conda``, ``sinkgd``, ``adamp``, ``sgdp``). A ``geoopt.ManifoldParameter``
handed to any Euclidean optimizer is refused with one error
(:func:`~manifoldnorm.optim._validate.check_no_manifold_params`).
"""

from manifoldnorm.optim.adamp import SGDP, AdamP, adamp_update, projection, sgdp_update
from manifoldnorm.optim.compose import (
    DEFAULT_MANIFOLD,
    DEFAULT_REST,
    CompositeOptimizer,
    Rule,
    create_optimizer,
    hidden_matrices,
    is_manifold_parameter,
)
from manifoldnorm.optim.conda import Conda, conda_basis, conda_update
from manifoldnorm.optim.finite import drop_grads, grad_norm, grads_finite
from manifoldnorm.optim.muon import Muon, NorMuon, adjust_lr, muon_update, newton_schulz, normuon_update
from manifoldnorm.optim.registry import (
    OptimizerInfo,
    build_optimizer,
    get_optimizer,
    list_optimizers,
    register_optimizer,
)
from manifoldnorm.optim.riemannian import RiemannianAdam
from manifoldnorm.optim.schedules import WarmupCosine, warmup_cosine_factor
from manifoldnorm.optim.sinkgd import SinkGD, sinkgd_update, sinkhorn_normalize

__all__ = [
    "AdamP",
    "SGDP",
    "Conda",
    "SinkGD",
    "adamp_update",
    "sgdp_update",
    "projection",
    "conda_basis",
    "conda_update",
    "sinkgd_update",
    "sinkhorn_normalize",
    "Muon",
    "NorMuon",
    "adjust_lr",
    "muon_update",
    "newton_schulz",
    "normuon_update",
    "DEFAULT_MANIFOLD",
    "DEFAULT_REST",
    "CompositeOptimizer",
    "OptimizerInfo",
    "Rule",
    "build_optimizer",
    "create_optimizer",
    "hidden_matrices",
    "get_optimizer",
    "is_manifold_parameter",
    "list_optimizers",
    "register_optimizer",
    "RiemannianAdam",
    "WarmupCosine",
    "drop_grads",
    "grad_norm",
    "grads_finite",
    "warmup_cosine_factor",
]


def _import_every_module() -> None:
    """Import every module of the package: each registers its optimizers where they are defined, so a new module is in
    the registry (and so in the contract tests, the benchmarks and ``list_*``) without an import line here."""
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(__path__, f"{__name__}."):
        importlib.import_module(module.name)


_import_every_module()
