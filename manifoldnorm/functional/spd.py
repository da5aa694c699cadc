"""Metric dispatch for SPD geometry: ``distance(A, B, metric)``, ``mean(X, metric)``, ``geodesic(...)``.

Tables map the metric names of the papers (``aim | lem | lcm``) to the ``<op>_<metric>`` functions; an unknown
name raises a ValueError that lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from .spd_aim import distance_aim, expmap_aim, geodesic_aim, logmap_aim, mean_aim
from .spd_pullback import distance_lcm, distance_lem, geodesic_lcm, geodesic_lem, mean_lcm, mean_lem

__all__ = ["METRICS", "distance", "mean", "geodesic", "logmap", "expmap", "check_metric"]

from .spd_bw import distance_bw, expmap_bw, geodesic_bw, logmap_bw, mean_bw

METRICS: tuple[str, ...] = ("aim", "lem", "lcm", "bw")

_DISTANCE: dict[str, Callable[..., Tensor]] = {
    "aim": distance_aim, "lem": distance_lem, "lcm": distance_lcm, "bw": distance_bw,
}
_MEAN: dict[str, Callable[..., Tensor]] = {"aim": mean_aim, "lem": mean_lem, "lcm": mean_lcm, "bw": mean_bw}
_GEODESIC: dict[str, Callable[..., Tensor]] = {
    "aim": geodesic_aim, "lem": geodesic_lem, "lcm": geodesic_lcm, "bw": geodesic_bw,
}
_LOGMAP: dict[str, Callable[..., Tensor]] = {"aim": logmap_aim, "bw": logmap_bw}
_EXPMAP: dict[str, Callable[..., Tensor]] = {"aim": expmap_aim, "bw": expmap_bw}


def check_metric(metric: str, valid: tuple[str, ...] | list[str] = METRICS, what: str = "metric") -> str:
    """Return the lower-cased metric name or raise a ValueError listing the valid names."""
    if not isinstance(metric, str) or metric.lower() not in valid:
        raise ValueError(f"unknown {what} {metric!r}; valid names: {', '.join(valid)}")
    return metric.lower()


def _lookup(table: dict[str, Callable[..., Tensor]], metric: str, op: str) -> Callable[..., Tensor]:
    return table[check_metric(metric, tuple(table), what=f"metric for {op}")]


def distance(A: Tensor, B: Tensor, metric: str = "aim") -> Tensor:
    """Geodesic distance under ``metric``; see ``distance_<metric>``."""
    return _lookup(_DISTANCE, metric, "distance")(A, B)


def mean(X: Tensor, metric: str = "aim", dim: int = 0, **kwargs: Any) -> Tensor:
    """Fréchet mean under ``metric`` over batch dimension ``dim``; see ``mean_<metric>`` for ``kwargs``."""
    return _lookup(_MEAN, metric, "mean")(X, dim=dim, **kwargs)


def geodesic(A: Tensor, B: Tensor, t: Tensor | float, metric: str = "aim") -> Tensor:
    """Point at time ``t`` on the geodesic from ``A`` to ``B`` under ``metric``."""
    return _lookup(_GEODESIC, metric, "geodesic")(A, B, t)


def logmap(P: Tensor, X: Tensor, metric: str = "aim") -> Tensor:
    """Riemannian logarithm at ``P`` under ``metric``."""
    return _lookup(_LOGMAP, metric, "logmap")(P, X)


def expmap(P: Tensor, V: Tensor, metric: str = "aim") -> Tensor:
    """Riemannian exponential at ``P`` under ``metric``."""
    return _lookup(_EXPMAP, metric, "expmap")(P, V)
