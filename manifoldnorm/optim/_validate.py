"""Type and range checks of hyper-parameters, shared by the optimizers, the schedules and the Lightning modules.

Each check raises at construction (not at the first step) with one line that names the option, the value
given and what is valid. A value of the wrong kind (text for a number, a number for a flag, ``None`` where a
value is needed) raises ``TypeError``; a number outside its range, or a non-whole number where a count is
needed, raises ``ValueError``. Booleans are never accepted as numbers, nor numbers (or the text ``"maybe"``,
which a Hydra override passes through as a string) as booleans. Real numbers must be finite.

:data:`OPTIMIZER_OPTIONS` maps every numeric or flag hyper-parameter that an optimizer of the registry takes
to its check; :func:`check_options` applies it to a constructor's keyword arguments or a parameter group.

:func:`check_no_manifold_params` is the one refusal of a ``geoopt.ManifoldParameter`` handed to a Euclidean
optimizer, whichever way it gets there (:func:`~manifoldnorm.optim.create_optimizer`, a hand-built
:class:`~manifoldnorm.optim.CompositeOptimizer`, :func:`~manifoldnorm.optim.build_optimizer`, or the constructor
and ``add_param_group`` of the library's own optimizers).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import geoopt
import torch
from torch import Tensor

from manifoldnorm.optim._newton_schulz import check_adjust_mode, resolve_dtype

__all__ = ["OPTIMIZER_OPTIONS", "check_bool", "check_fractions", "check_int", "check_no_manifold_params",
           "check_options", "check_real", "is_manifold_tensor"]


def _got(value: Any) -> str:
    return f"got {value!r} ({type(value).__name__})"


def _label(name: str, owner: str) -> str:
    return f"{owner}: {name}" if owner else name


def _range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return "finite"


def check_real(
    value: Any, name: str, owner: str = "", low: float | None = None, high: float | None = None,
    low_open: bool = False, high_open: bool = False,
) -> float:
    """``value`` as a finite real number within the given bounds (a one-element real tensor is accepted).

    Returns the value as given (a tensor stays a tensor, so a tensor learning rate keeps working).

    Raises
    ------
    TypeError
        Not a real number (text, bool, None, a sequence, a complex or bool tensor).
    ValueError
        NaN, infinite, or outside ``[low, high]`` (open ends with ``low_open`` / ``high_open``).
    """
    valid = _range(low, high, low_open, high_open)
    if isinstance(value, torch.Tensor):
        ok = value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool
        x = float(value) if ok else None
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        x = float(value)
    else:
        x = None
    if x is None:
        raise TypeError(f"{_label(name, owner)} must be a real number {valid}, {_got(value)}")
    bad = not math.isfinite(x)
    bad |= low is not None and (x <= low if low_open else x < low)
    bad |= high is not None and (x >= high if high_open else x > high)
    if bad:
        raise ValueError(f"{_label(name, owner)} must be a finite real number {valid}, got {value!r}")
    return value


def check_int(value: Any, name: str, owner: str = "", low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` in ``[low, high]``.

    A whole float (``5.0``) is refused too: counts are written as integers, and a float there usually means a
    mistyped option. Raises ``TypeError`` for non-numbers (text, bool, None) and ``ValueError`` for a
    non-whole or out-of-range number.
    """
    valid = _range(low, high, False, False)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        x = int(value)
        if (low is None or x >= low) and (high is None or x <= high):
            return x
        raise ValueError(f"{_label(name, owner)} must be an int {valid}, got {value!r}")
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        raise ValueError(f"{_label(name, owner)} must be an int {valid}, got the non-int number {value!r}")
    raise TypeError(f"{_label(name, owner)} must be an int {valid}, {_got(value)}")


def check_bool(value: Any, name: str, owner: str = "", allow_none: bool = False) -> bool | None:
    """``value`` as a real ``bool`` (``None`` too if ``allow_none``); text (``"maybe"``) or 0/1 raise TypeError."""
    if isinstance(value, bool) or (allow_none and value is None):
        return value
    valid = "true, false or null" if allow_none else "true or false"
    raise TypeError(f"{_label(name, owner)} must be {valid}, {_got(value)}")


def check_fractions(owner: str, val_fraction: Any, test_fraction: Any) -> tuple[float, float]:
    """Validation and test fractions of a data module: real numbers in [0, 1), validation > 0 (it selects the
    checkpoint). Returns them as floats."""
    check_real(val_fraction, "val_fraction", owner, 0.0, 1.0, high_open=True)
    check_real(test_fraction, "test_fraction", owner, 0.0, 1.0, high_open=True)
    if not val_fraction > 0:
        raise ValueError(f"{owner}: val_fraction must be > 0 (validation selects the checkpoint), got {val_fraction}")
    return float(val_fraction), float(test_fraction)


def _betas(value: Any, name: str, owner: str) -> Any:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{_label(name, owner)} must be two real numbers in [0, 1), {_got(value)}")
    for i, b in enumerate(value):
        check_real(b, f"{name}[{i}]", owner, 0.0, 1.0, high_open=True)
    return value


def _coefficients(value: Any, name: str, owner: str) -> Any:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise ValueError(f"{_label(name, owner)} must be three numbers (a, b, c), {_got(value)}")
    for i, c in enumerate(value):
        check_real(c, f"{name}[{i}]", owner)
    return value


def _adjust(value: Any, name: str, owner: str) -> Any:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{_label(name, owner)} must be a name or null, {_got(value)}")
    try:
        return check_adjust_mode(value)
    except ValueError as err:
        raise ValueError(f"{_label(name, owner)}: {err}") from None


def _dtype(value: Any, name: str, owner: str) -> Any:
    try:
        return resolve_dtype(value)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{_label(name, owner)}: {err}") from None


def _momentum_variant(value: Any, name: str, owner: str) -> Any:
    from manifoldnorm.optim.adamp import check_momentum_variant  # adamp imports this module

    try:
        return check_momentum_variant(value)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{_label(name, owner)}: {err}") from None


def _real(low: float | None = None, high: float | None = None, low_open: bool = False,
          high_open: bool = False) -> Callable[[Any, str, str], Any]:
    return lambda v, n, o: check_real(v, n, o, low, high, low_open, high_open)


def _int(low: int) -> Callable[[Any, str, str], Any]:
    return lambda v, n, o: check_int(v, n, o, low)


def _flag(allow_none: bool = False) -> Callable[[Any, str, str], Any]:
    return lambda v, n, o: check_bool(v, n, o, allow_none)


def _optional_int(low: int) -> Callable[[Any, str, str], Any]:
    return lambda v, n, o: None if v is None else check_int(v, n, o, low)


OPTIMIZER_OPTIONS: Mapping[str, Callable[[Any, str, str], Any]] = {
    "lr": _real(0.0),
    "weight_decay": _real(0.0),
    "eps": _real(0.0, low_open=True),
    "ns_eps": _real(0.0, low_open=True),
    "momentum": _real(0.0, 1.0, high_open=True),
    "dampening": _real(0.0, 1.0),
    "beta2": _real(0.0, 1.0, high_open=True),
    "betas": _betas,
    "delta": _real(0.0),
    "wd_ratio": _real(0.0, 1.0),
    "scale": _real(0.0, low_open=True),
    "ns_steps": _int(1),
    "iters": _int(1),
    "update_proj_gap": _int(1),
    "stabilize": _optional_int(1),
    "ns_coefficients": _coefficients,
    "adjust_lr_fn": _adjust,
    "ns_dtype": _dtype,
    "momentum_variant": _momentum_variant,
    "amsgrad": _flag(),
    "nesterov": _flag(),
    "maximize": _flag(),
    "capturable": _flag(),
    "differentiable": _flag(),
    "decoupled_weight_decay": _flag(),
    "distributed": _flag(),
    "foreach": _flag(allow_none=True),
    "fused": _flag(allow_none=True),
}
"""Check of every numeric or flag hyper-parameter of the registered optimizers, by keyword name.

``lr``, ``weight_decay``, ``delta`` >= 0; ``eps``, ``ns_eps``, ``scale`` > 0; ``momentum``, ``beta2`` and each of
``betas`` in [0, 1); ``dampening``, ``wd_ratio`` in [0, 1]; ``ns_steps``, ``iters``, ``update_proj_gap`` ints
>= 1; ``stabilize`` an int >= 1 or None; ``momentum_variant`` ``"paper"`` or ``"code"`` (SGDP); flags real booleans
(``foreach``/``fused`` may be None)."""


def check_options(options: Mapping[str, Any], where: str = "", owner: str = "") -> None:
    """Check each known hyper-parameter in ``options`` (unknown keys and ``params`` are left alone).

    Parameters
    ----------
    options : mapping
        Constructor keyword arguments or a parameter group.
    where : str
        Prefix of the option's name in messages, e.g. ``"rest"`` gives ``"rest.lr must be ..."`` (the config key
        ``optimizer.rest.lr``).
    owner : str
        Who rejects it, e.g. the optimizer's class name (``"AdamW: lr must be ..."``).
    """
    for key, value in options.items():
        check = OPTIMIZER_OPTIONS.get(key)
        if check is not None:
            check(value, f"{where}.{key}" if where else key, owner)


def is_manifold_tensor(param: Any) -> bool:
    """True for a ``geoopt`` manifold tensor whose manifold is not Euclidean (Stiefel, SPD, sphere, ...)."""
    return isinstance(param, geoopt.ManifoldTensor) and not isinstance(param.manifold, geoopt.Euclidean)


def check_no_manifold_params(
    params: Tensor | Iterable[Tensor] | Iterable[Mapping[str, Any]],
    optimizer_name: str,
    *,
    names: Mapping[int, str] | None = None,
    key: str | None = None,
) -> Any:
    """Refuse a ``geoopt.ManifoldParameter`` on a non-Euclidean manifold for the Euclidean ``optimizer_name``.

    A Euclidean step leaves the manifold (a Stiefel weight stops being orthonormal, an SPD bias can lose
    definiteness), silently. Every route to a Euclidean optimizer calls this one check, so the error reads the
    same everywhere: :func:`~manifoldnorm.optim.create_optimizer` and
    :class:`~manifoldnorm.optim.CompositeOptimizer` (also ``add_param_group``),
    :func:`~manifoldnorm.optim.build_optimizer` for the registry's Euclidean entries (torch's optimizers
    included), and the constructors and ``add_param_group`` of the library's own optimizers
    (:class:`~manifoldnorm.optim._base.StepOptimizer`). It only inspects: no value, order or step changes.

    Parameters
    ----------
    params : Tensor, iterable of Tensor or iterable of parameter-group dicts
        What an optimizer constructor takes. It is read once: a one-shot iterator (a generator) is read into a
        list, at the top level and as a group's ``"params"`` (written back into the group dict, as
        ``torch.optim.Optimizer.add_param_group`` does), so pass the returned value on, not the argument.
    optimizer_name : str
        The optimizer as the message names it: a registry key (``"adamw"``), a class name (``"Muon"``) or a
        composite's sub-optimizer.
    names : mapping of ``id(param)`` to str, optional
        Labels of the parameters in the message (``create_optimizer`` passes the quoted parameter names);
        default ``of shape (m, n)``.
    key : str, optional
        The composite's sub-optimizer that would hold the parameter, added to the message.

    Returns
    -------
    ``params``, with one-shot iterators replaced by lists.

    Raises
    ------
    ValueError
        ``parameter <label> is a geoopt.ManifoldParameter on <Manifold> but would be updated by the Euclidean
        optimizer '<name>' [(sub-optimizer '<key>')], which leaves the manifold; route manifold parameters to a
        Riemannian optimizer (<the registry's Riemannian entries>)``.
    """
    if isinstance(params, Iterator):
        params = list(params)
    if not isinstance(params, Iterable) or isinstance(params, Tensor):
        _check_tensors([params], optimizer_name, names, key)
        return params
    for entry in params:
        if not isinstance(entry, Mapping):
            _check_tensors([entry], optimizer_name, names, key)
            continue
        tensors = entry.get("params", ())
        if isinstance(tensors, Iterator):
            if not isinstance(entry, MutableMapping):
                continue  # reading it would lose it; torch refuses a group that is not a dict anyway
            entry["params"] = tensors = list(tensors)
        if not isinstance(tensors, Iterable) or isinstance(tensors, Tensor):
            tensors = [tensors]
        _check_tensors(tensors, optimizer_name, names, key)
    return params


def _check_tensors(tensors: Iterable[Any], optimizer_name: str, names: Mapping[int, str] | None,
                   key: str | None) -> None:
    for p in tensors:
        if is_manifold_tensor(p):
            raise ValueError(_manifold_message(p, optimizer_name, names, key))


def _manifold_message(p: Any, optimizer_name: str, names: Mapping[int, str] | None, key: str | None) -> str:
    from manifoldnorm.optim.registry import list_optimizers  # the registry imports this module

    label = (names or {}).get(id(p), f"of shape {tuple(p.shape)}")
    return (
        f"parameter {label} is a geoopt.ManifoldParameter on {type(p.manifold).__name__} but would be updated by "
        f"the Euclidean optimizer {optimizer_name!r}{'' if key is None else f' (sub-optimizer {key!r})'}, which "
        f"leaves the manifold; route manifold parameters to a Riemannian optimizer "
        f"({', '.join(list_optimizers('riemannian'))})"
    )
