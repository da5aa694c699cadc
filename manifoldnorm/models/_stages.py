"""SPD stages shared by the SPD models: BiMap, a norm slot and ReEig, in either order."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from manifoldnorm import functional as mf
from manifoldnorm.nn import BiMap, LogEig, ReEig, create_norm_layer
from manifoldnorm.nn.registry import NormSpec
from manifoldnorm.nn.spd_layers import vech

__all__ = ["SPDStage", "SPDTrunk", "no_autocast", "check_dims"]


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


class SPDTrunk(nn.Module):
    """Base of the SPD classifiers: SPD stages on ``sizes`` (``sizes[0] -> sizes[1] -> ...``), LogEig, Linear.

    Subclasses call :meth:`_build_trunk` in ``__init__``; :meth:`_spd_features` maps SPD matrices to the float64
    tangent vectors ``(N, d(d+1)/2)`` and :meth:`classify` gives the logits in the classifier's dtype.
    """

    def _build_trunk(self, sizes: tuple[int, ...], num_classes: int, norm_layer: NormSpec,
                     norm_kwargs: dict[str, Any] | None, reeig_threshold: float, norm_first: bool) -> None:
        self.stages = nn.ModuleList(
            SPDStage(a, b, norm_layer, norm_kwargs, reeig_threshold, norm_first=norm_first)
            for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.logeig = LogEig()
        d = sizes[-1]
        self.classifier = nn.Linear(d * (d + 1) // 2, num_classes)

    #: the last stage's ReEig and LogEig from one eigendecomposition
    #: (:func:`manifoldnorm.functional.sym_reeig_logm`) when the stage ends with ReEig: the same values and
    #: gradients; the forward hooks of that ``reeig`` and of ``logeig`` are then not called. ``False``: the
    #: modules one by one.
    fuse_reeig_logeig: bool = True

    def _spd_features(self, h: Tensor, domain: Tensor | None = None) -> Tensor:
        *head, last = self.stages
        for stage in head:
            h = stage(h, domain=domain)
        if self.fuse_reeig_logeig and last.norm_first:
            h = last.norm(last.bimap(h), domain=domain)
            return vech(mf.sym_reeig_logm(h, last.reeig.threshold))
        return self.logeig(last(h, domain=domain))

    def classify(self, f: Tensor) -> Tensor:
        """Logits from tangent features, in the classifier's dtype."""
        return self.classifier(f.to(self.classifier.weight.dtype))
