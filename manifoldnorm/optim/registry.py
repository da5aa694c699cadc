"""Registry of the optimizers a composite can be built from: name -> class, kind, keyword arguments.

Each optimizer of ours registers itself at the bottom of its module (``register_optimizer("muon", Muon,
"euclidean")``); the torch and geoopt optimizers are registered here. The mechanism is
:class:`manifoldnorm.registry.Registry`, shared with the norm layers.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import geoopt
import torch
from torch import Tensor

from manifoldnorm.optim._validate import check_no_manifold_params, check_options
from manifoldnorm.registry import Registry

__all__ = ["OPTIMIZERS", "OptimizerInfo", "register_optimizer", "get_optimizer", "list_optimizers", "build_optimizer"]

KINDS = ("euclidean", "riemannian")


@dataclass(frozen=True)
class OptimizerInfo:
    """One registered optimizer.

    Parameters
    ----------
    name : str
        Lower-case registry key.
    cls : type
        A ``torch.optim.Optimizer`` subclass, called as ``cls(params, **kwargs)``.
    kind : {"euclidean", "riemannian"}
        ``"riemannian"`` optimizers update ``geoopt.ManifoldParameter`` on their manifold (and plain tensors as
        Euclidean); ``"euclidean"`` ones must never receive a manifold parameter.
    keywords : tuple of str, optional
        The keyword arguments the optimizer honours; by default those of the constructor's signature.
    """

    name: str
    cls: type
    kind: str
    keywords: tuple[str, ...] | None = None

    @property
    def factory(self) -> type:
        """The class (the registry's name for what builds an entry)."""
        return self.cls

    def keyword_names(self) -> list[str]:
        """Keyword arguments accepted by the constructor besides ``params``."""
        if self.keywords is not None:
            return sorted(self.keywords)
        names: list[str] = []
        for klass in self.cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass in (object, torch.optim.Optimizer):
                continue
            for p in inspect.signature(init).parameters.values():
                if p.name not in ("self", "params") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                    if p.name not in names:
                        names.append(p.name)
        return sorted(names)


OPTIMIZERS: Registry[OptimizerInfo] = Registry("optimizer", KINDS, plural="optimizers")


def register_optimizer(
    name: str, cls: type, kind: str, keywords: tuple[str, ...] | None = None
) -> OptimizerInfo:
    """Register ``cls`` under the lower-case key ``name``; returns the stored :class:`OptimizerInfo`.

    Called once, at the bottom of the module that defines ``cls``. ``kind="riemannian"`` optimizers update
    ``geoopt.ManifoldParameter`` s on their manifold; ``"euclidean"`` ones refuse them.
    """
    return OPTIMIZERS.add(OptimizerInfo(name=name, cls=cls, kind=kind, keywords=keywords))


def list_optimizers(kind: str | None = None) -> list[str]:
    """Sorted registry keys, optionally only those of one ``kind`` (``"euclidean"`` or ``"riemannian"``)."""
    return OPTIMIZERS.names(kind)


def get_optimizer(name: str) -> OptimizerInfo:
    """Look up a registered optimizer; an unknown name raises a ValueError listing the valid ones."""
    return OPTIMIZERS.get(name)


def build_optimizer(name: str, params: Iterable[Tensor] | Iterable[dict], **kwargs: Any) -> torch.optim.Optimizer:
    """Instantiate the registered optimizer ``name`` on ``params``.

    Unknown keyword arguments raise a ValueError listing the accepted ones (instead of the constructor's
    ``TypeError``), so a typo in a config names the valid keys. The values of the keyword arguments and of the
    options of parameter groups given as dicts are checked by :func:`~manifoldnorm.optim._validate.check_options`
    (TypeError for a wrong type, ValueError for a value out of range), also for the torch and geoopt optimizers,
    some of which would only fail at their first step.
    """
    info = get_optimizer(name)
    valid = info.keyword_names()
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"optimizer {name!r} got unknown argument(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
        )
    check_options(kwargs, owner=f"optimizer {name!r}")
    params = list(params)
    if info.kind == "euclidean":  # torch's classes cannot refuse a manifold parameter themselves
        check_no_manifold_params(params, name)
    for i, group in enumerate(params):
        if isinstance(group, Mapping):
            options = {k: v for k, v in group.items() if k != "params"}
            check_options(options, f"param_groups[{i}]", f"optimizer {name!r}")
    return info.cls(params, **_plain(kwargs))


def _plain(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Lists from a config (e.g. ``betas``) become tuples, as the torch optimizers expect."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


register_optimizer("adamw", torch.optim.AdamW, "euclidean")
register_optimizer("adam", torch.optim.Adam, "euclidean")
register_optimizer("sgd", torch.optim.SGD, "euclidean")
register_optimizer("riemannian_sgd", geoopt.optim.RiemannianSGD, "riemannian")
