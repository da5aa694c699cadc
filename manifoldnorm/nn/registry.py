"""Norm-layer registry: names -> factories with metadata, one construction path for every model slot.

A norm slot accepts a registered name (``"liebn_aim"``), a class, a ``functools.partial`` (e.g. a Hydra
``_partial_: true`` node), or ``None`` for no normalization (the ``"none"`` entry, :class:`IdentityNorm`).
Every factory is called as ``factory(num_features, **kwargs)`` and the resulting module has
``forward(x, domain=None)``. Each norm registers itself with :func:`register_norm` in the module that
defines it (the mechanism is :class:`manifoldnorm.registry.Registry`, shared with the optimizers);
``import manifoldnorm.nn`` imports every such module.

>>> layer = create_norm_layer("liebn_lem", 8, momentum=0.05)
>>> sorted(list_norms(kind="lie"))
['liebn_aim', 'liebn_crim', 'liebn_lcm', 'liebn_lem', 'liebn_so3']
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from manifoldnorm.registry import Registry, unwrap_factory

__all__ = [
    "KINDS",
    "NormInfo",
    "register_norm",
    "get_norm_layer",
    "get_norm_info",
    "create_norm_layer",
    "list_norms",
    "IdentityNorm",
]

KINDS: tuple[str, ...] = ("spd", "lie", "euclidean")
NormSpec = str | type | Callable[..., nn.Module] | None


@dataclass(frozen=True)
class NormInfo:
    """Metadata of a registered norm layer.

    Attributes
    ----------
    name : str
        Registry key (lower case).
    factory : callable
        ``factory(num_features, **kwargs) -> nn.Module``.
    kind : str
        Family: ``"spd"`` (Riemannian BN on SPD matrices), ``"lie"`` (Lie group BN), ``"euclidean"``.
    inputs : tuple of str
        Spaces the layer accepts: ``"spd"`` for ``(N, [C,] n, n)`` SPD stacks, ``"so3"`` for ``(N, ..., 3, 3)``
        rotation matrices, ``"euclidean"`` for vectors, ``"weight"`` for a module whose weight it reparametrizes.
    domain_aware : bool
        Whether ``forward(x, domain)`` uses the domain ids.
    """

    name: str
    factory: Callable[..., nn.Module]
    kind: str
    inputs: tuple[str, ...]
    domain_aware: bool


NORMS: Registry[NormInfo] = Registry("norm", KINDS, what="norm layer")


def register_norm(name: str, kind: str, *, inputs: tuple[str, ...] | None = None,
                  domain_aware: bool | None = None) -> Callable[[Any], Any]:
    """Decorator registering a norm class or factory under ``name``, used where the class is defined.

    Parameters
    ----------
    name : str
        Lower-case key; re-registering an existing key raises a ValueError.
    kind : {'spd', 'lie', 'euclidean'}
    inputs : tuple of str, optional
        Accepted input spaces; default ``("spd",)`` for ``spd``/``lie`` kinds, ``("euclidean",)`` otherwise.
    domain_aware : bool, optional
        Default: the factory class's ``domain_aware`` attribute (False if absent).

    Examples
    --------
    >>> @register_norm("my_rmsnorm", "euclidean")            # doctest: +SKIP
    ... class MyRMSNorm(nn.Module): ...
    >>> register_norm("liebn_aim", "lie")(functools.partial(LieBatchNorm, metric="aim"))  # doctest: +SKIP
    """
    NORMS.check_name(name)
    NORMS.check_kind(kind)

    def decorator(factory: Any) -> Any:
        aware = bool(getattr(unwrap_factory(factory), "domain_aware", False)) if domain_aware is None \
            else domain_aware
        ins = inputs if inputs is not None else (("euclidean",) if kind == "euclidean" else ("spd",))
        NORMS.add(NormInfo(name, factory, kind, tuple(ins), aware))
        return factory

    return decorator


def list_norms(kind: str | None = None) -> list[str]:
    """Registered norm names (sorted), optionally only those of one ``kind``."""
    return NORMS.names(kind)


def get_norm_layer(spec: NormSpec) -> Callable[..., nn.Module]:
    """Resolve a name, class or partial to a factory ``factory(num_features, **kwargs)``; ``None`` means
    the ``"none"`` entry (no normalization)."""
    if spec is None:
        spec = "none"
    if isinstance(spec, str):
        return NORMS.get(spec.lower()).factory
    if callable(spec):
        return spec
    raise TypeError(f"a norm layer is given by a registered name, a class or a functools.partial; "
                    f"got {type(spec).__name__}")


def get_norm_info(spec: NormSpec) -> NormInfo | None:
    """Metadata for a name (ValueError if unknown) or for a registered class/partial (``None`` if unregistered);
    ``spec=None`` is the ``"none"`` entry."""
    if spec is None:
        spec = "none"
    if isinstance(spec, str):
        return NORMS.get(spec.lower())
    return NORMS.find(spec)


def _describe(spec: NormSpec, factory: Any) -> str:
    base = unwrap_factory(factory)
    cls_name = getattr(base, "__name__", repr(base))
    return f"norm layer {spec!r} ({cls_name})" if isinstance(spec, str) else f"norm layer {cls_name}"


def _check_kwargs(spec: NormSpec, factory: Any, kwargs: dict[str, Any]) -> None:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    params = list(sig.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    first = positional[0].name if positional else None
    fixed = set(factory.keywords) if isinstance(spec, str) and isinstance(factory, functools.partial) else set()
    accepted = [p.name for p in params
                if p.name != first and p.name not in fixed and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    clash = sorted(fixed & set(kwargs))
    if clash:
        raise TypeError(f"{_describe(spec, factory)} fixes {', '.join(clash)}; pick another registered name or "
                        f"pass the class itself")
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"{_describe(spec, factory)} got unexpected argument(s) {', '.join(unknown)}; "
                        f"accepted arguments: {', '.join(accepted) or '(none)'}")


def create_norm_layer(spec: NormSpec, num_features: int, *, expect: str | None = None,
                      **kwargs: Any) -> nn.Module:
    """Build a norm layer for ``num_features``: the matrix size ``n`` for SPD norms, the width for Euclidean ones,
    and for ``liebn_so3`` the number of rotations per sample (a feature dimension; the matrices are always 3x3, and
    ``None`` means input ``(N, 3, 3)``).

    Parameters
    ----------
    spec : str, class, functools.partial or None
        Registered name (see :func:`list_norms`), or a factory called as ``spec(num_features, **kwargs)``;
        ``None`` builds the ``"none"`` entry (an :class:`IdentityNorm`, no normalization), as ``norm_layer=None``
        does in timm.
    num_features : int
    expect : {'spd', 'euclidean'}, optional
        The slot's input space; a registered layer that does not accept it raises a ValueError.
    **kwargs
        Layer arguments; unknown names raise a TypeError listing the accepted ones.
    """
    factory = get_norm_layer(spec)
    if expect is not None:
        info = get_norm_info(spec)
        if info is not None and expect not in info.inputs:
            raise ValueError(f"{_describe(spec, factory)} takes {'/'.join(info.inputs)} inputs and cannot fill "
                             f"a {expect} slot; suitable names: "
                             f"{', '.join(k for k in list_norms() if expect in NORMS.get(k).inputs)}")
    _check_kwargs(spec, factory, kwargs)
    return factory(num_features, **kwargs)


class IdentityNorm(nn.Module):
    """No normalization: returns its input; accepts (and ignores) ``num_features`` and ``domain``."""

    feature_dim = None  # any layout

    def __init__(self, num_features: int | None = None) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        return x


register_norm("none", "euclidean", inputs=("spd", "euclidean"))(IdentityNorm)
