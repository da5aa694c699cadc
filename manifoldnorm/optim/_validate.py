"""Type and range checks of hyper-parameters, shared by the optimizers, the schedules and the Lightning modules.

Each check raises at construction (not at the first step) with one line that names the option, the value
given and what is valid. A value of the wrong kind (text for a number, a number for a flag, ``None`` where a
value is needed) raises ``TypeError``; a number outside its range, or a non-whole number where a count is
needed, raises ``ValueError``. Booleans are never accepted as numbers, nor numbers (or the text ``"maybe"``,
which a Hydra override passes through as a string) as booleans. Real numbers must be finite.

:data:`OPTIMIZER_OPTIONS` maps every numeric or flag hyper-parameter that an optimizer of the registry takes
to its check; :func:`check_options` applies it to a constructor's keyword arguments or a parameter group.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from manifoldnorm.optim._newton_schulz import check_adjust_mode, resolve_dtype

__all__ = ["OPTIMIZER_OPTIONS", "check_bool", "check_fractions", "check_int", "check_options", "check_real"]


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
>= 1; ``stabilize`` an int >= 1 or None; flags real booleans (``foreach``/``fused`` may be None)."""


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
