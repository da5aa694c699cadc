"""SPD stages shared by the SPD models: BiMap, a norm slot and ReEig, in either order."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from manifoldnorm.nn import BiMap, ReEig, create_norm_layer
from manifoldnorm.nn.registry import NormSpec

__all__ = ["SPDStage", "no_autocast", "check_dims"]


def check_dims(dims: Any, owner: str) -> tuple[int, ...]:
    """Validate a sequence of positive ints (matrix sizes of the SPD stages)."""
    if isinstance(dims, int):
        dims = (dims,)
    try:
        out = tuple(dims)
    except TypeError as err:
        raise TypeError(f"{owner}: dims must be a sequence of ints, got {type(dims).__name__}") from err
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in out):
        raise ValueError(f"{owner}: dims must be positive ints, got {out}")
    return out


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast for the SPD part (eigendecompositions need float32/float64, never half precision)."""
    if device.type in ("cpu", "cuda", "xpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class SPDStage(nn.Module):
    """``BiMap -> norm -> ReEig`` (``norm_first=True``, SPDNetBN/LieBN order) or ``BiMap -> ReEig -> norm`` (TSMNet).

    ``forward(x, domain=None)``: ``(N, in_dim, in_dim)`` -> ``(N, out_dim, out_dim)``.
    """

    def __init__(self, in_dim: int, out_dim: int, norm_layer: NormSpec, norm_kwargs: dict[str, Any] | None,
                 reeig_threshold: float, norm_first: bool = True) -> None:
        super().__init__()
        self.bimap = BiMap(in_dim, out_dim)
        self.norm = create_norm_layer(norm_layer, out_dim, expect="spd", **dict(norm_kwargs or {}))
        self.reeig = ReEig(reeig_threshold)
        self.norm_first = bool(norm_first)

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        x = self.bimap(x)
        if self.norm_first:
            return self.reeig(self.norm(x, domain=domain))
        return self.norm(self.reeig(x), domain=domain)
