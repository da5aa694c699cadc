"""Shared plumbing of the SPD normalization layers: input layout, validation, parameters, dtypes."""

from __future__ import annotations

import contextlib
import warnings

import geoopt
import torch
from torch import Tensor, nn

from manifoldnorm import functional as mf
from manifoldnorm.functional._batch import Segments
from manifoldnorm.functional.validation import symmetry_rtol

from ._batch_stats import StatReducer, domain_range, domain_segments

__all__ = [
    "spd_identity_parameter",
    "to_channels",
    "from_channels",
    "check_momentum",
    "check_positive_int",
    "compute_dtype",
    "check_compute_dtype",
    "resolve_dtype",
    "autocast_off",
    "as_domain_ids",
    "DomainStatsMixin",
]


def check_positive_int(value: int, name: str, owner: str) -> int:
    """Return ``value`` if it is a positive ``int``; raise a TypeError/ValueError naming ``owner`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be >= 1, got {value}")
    return value


def check_momentum(value: float, name: str, owner: str) -> float:
    """Return ``float(value)`` if it lies in ``[0, 1]``; raise a ValueError naming ``owner`` otherwise."""
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}: {name} must lie in [0, 1], got {value}")
    return value


def spd_identity_parameter(channels: int, n: int, dtype: torch.dtype | None, device=None) -> nn.Parameter:
    """A ``(channels, n, n)`` stack of identities as a ``geoopt.ManifoldParameter`` on the SPD manifold."""
    eye = torch.eye(n, dtype=dtype or torch.float64, device=device).expand(channels, n, n).clone()
    return geoopt.ManifoldParameter(eye, manifold=geoopt.SymmetricPositiveDefinite())


def compute_dtype(x: Tensor, ref: Tensor) -> torch.dtype:
    """Promoted floating dtype of the input and the layer's parameters (float32 x float64 -> float64)."""
    return torch.promote_types(x.dtype, ref.dtype)


_COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_compute_dtype(value: torch.dtype | str | None, owner: str) -> torch.dtype | None:
    """Validate a layer's ``compute_dtype`` switch: ``None``, ``torch.float32``/``float64`` or their names."""
    if value is None:
        return None
    if isinstance(value, str):
        key = value.lower().removeprefix("torch.")
        if key not in _COMPUTE_DTYPES:
            raise ValueError(f"{owner}: compute_dtype must be None, 'float32' or 'float64', got {value!r}")
        return _COMPUTE_DTYPES[key]
    if value in (torch.float32, torch.float64):
        return value
    raise ValueError(f"{owner}: compute_dtype must be None, torch.float32 or torch.float64, got {value!r}")


_HALF = (torch.float16, torch.bfloat16)


def resolve_dtype(x: Tensor, ref: Tensor, compute: torch.dtype | None) -> tuple[torch.dtype, torch.dtype]:
    """``(compute dtype, output dtype)`` of a layer with parameter ``ref`` applied to ``x``.

    The computation runs in ``compute`` if given, else in the promoted dtype of input and parameters, and never
    below float32 (``torch.linalg.eigh`` and ``cholesky`` have no half-precision kernels). The output has the
    promoted dtype of input and parameters, except for float16/bfloat16 inputs, which get their own dtype back
    (computed in at least float32, rounded once at the end), so a half-precision network stays in half precision.
    """
    promoted = torch.promote_types(x.dtype, ref.dtype)
    out = x.dtype if x.dtype in _HALF else promoted
    if compute is not None:
        return compute, out
    return (torch.float32 if promoted in _HALF else promoted), out


def autocast_off(x: Tensor) -> contextlib.AbstractContextManager:
    """Context disabling ``torch.autocast`` on ``x``'s device: spectral layers compute in float32 or float64."""
    if x.device.type in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(x.device.type):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def to_channels(x: Tensor, n: int, channels: int, owner: str, validate: bool, allow_empty: bool = False) -> Tensor:
    """Check ``x`` and view it as ``(N, C, n, n)``.

    Shape, dtype and finiteness are always checked (cheap); with ``validate=True`` symmetry and positive
    definiteness are checked as well (:func:`manifoldnorm.functional.check_spd`: one Cholesky per matrix; a
    float16/bfloat16 input is checked in float32, with the symmetry tolerance of its own dtype).
    ``N = 0`` is an error unless ``allow_empty`` (a part of a batch split across processes).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() not in (3, 4) or x.shape[-1] != n or x.shape[-2] != n:
        raise ValueError(
            f"{owner}: expected input of shape (N, {n}, {n}) or (N, C, {n}, {n}), got {tuple(x.shape)}"
        )
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{owner}: got an empty batch")
    x4 = x.unsqueeze(1) if x.dim() == 3 else x
    if x4.shape[1] != channels:
        raise ValueError(
            f"{owner}: the layer was built for channels={channels} but the input has {x4.shape[1]} channel(s) "
            f"(shape {tuple(x.shape)}); inputs of shape (N, n, n) count as one channel"
        )
    with torch.no_grad():
        if validate and x4.dtype in _HALF:  # no half-precision Cholesky kernels
            mf.check_spd(x4.detach().float(), name=f"{owner} input", rtol=symmetry_rtol(x4.dtype))
        elif validate:
            mf.check_spd(x4.detach(), name=f"{owner} input")
        else:
            mf.check_finite(x4.detach(), name=f"{owner} input")
    return x4


def from_channels(y4: Tensor, like: Tensor) -> Tensor:
    """Undo :func:`to_channels`: drop the channel dimension again if the input had none."""
    return y4.squeeze(1) if like.dim() == 3 else y4


def as_domain_ids(domain: Tensor | int | None, batch: int, device: torch.device, owner: str) -> Tensor:
    """Validate domain ids: ``None`` -> all zeros; an int -> constant; a tensor -> int64 of shape ``(N,)``.

    Type and shape only; the range (non-negative, below the declared number of domains) is checked by
    :meth:`DomainStatsMixin._prepare_domains`, over every process of a synchronized layer.
    """
    if domain is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if isinstance(domain, int) and not isinstance(domain, bool):
        d = torch.full((batch,), domain, dtype=torch.long, device=device)
    elif isinstance(domain, Tensor):
        if domain.is_floating_point() or domain.is_complex() or domain.dtype == torch.bool:
            raise TypeError(f"{owner}: domain ids must be an integer tensor, got dtype {domain.dtype}")
        d = domain.to(device=device, dtype=torch.long)
        if d.dim() == 0:
            d = d.expand(batch)
        if d.shape != (batch,):
            raise ValueError(f"{owner}: domain must have shape ({batch},) to match the batch, got {tuple(d.shape)}")
    else:
        raise TypeError(f"{owner}: domain must be None, an int or a LongTensor, got {type(domain).__name__}")
    return d


class DomainStatsMixin:
    """Per-domain running statistics in buffers stacked along a leading domain dimension.

    For ``nn.Module`` hosts that list the mixin before their module base. A host defines ``_stat_names`` (its
    statistics buffers, each of shape ``(D, ...)``) and ``_fresh_stats(lead, dtype, device)`` (initial values
    with leading shape ``lead``, in the order of ``_stat_names``), and sets ``_domains_declared`` (whether the
    user gave ``num_domains``) before building its buffers.

    Declared: domain ids must lie in ``[0, D)``; any other id raises a ValueError naming the valid range and the
    ids seen (a typo such as id ``10**6`` would otherwise allocate a million statistic slots and normalize with
    fresh, untrained statistics). Undeclared (``num_domains=None``): the buffers start with one slot and a
    domain id ``>= D`` grows every buffer (new slots start at the initial values), with a warning. In both
    cases negative ids are refused and ``load_state_dict`` adopts the stored number of domains.
    """

    _stat_names: tuple[str, ...] = ()
    _domains_declared: bool = False

    @property
    def num_domains(self) -> int:
        """Current number of domain slots."""
        return int(getattr(self, self._stat_names[0]).shape[0])

    def _grow(self, size: int) -> None:
        current = self.num_domains
        if size <= current:
            return
        ref = getattr(self, self._stat_names[0])
        extra = self._fresh_stats((size - current,), ref.dtype, ref.device)
        for name, value in zip(self._stat_names, extra, strict=True):
            setattr(self, name, torch.cat([getattr(self, name), value], dim=0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        key = prefix + self._stat_names[0]
        if key in state_dict:
            stored = int(state_dict[key].shape[0])
            if stored != self.num_domains:
                ref = getattr(self, self._stat_names[0])
                fresh = self._fresh_stats((stored,), ref.dtype, ref.device)
                for name, value in zip(self._stat_names, fresh, strict=True):
                    setattr(self, name, value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]

    def _check_domain_range(self, low: int, top: int, owner: str) -> None:
        """Refuse negative ids, and ids ``>= num_domains`` when the number of domains is declared."""
        D = self.num_domains
        if self._domains_declared and (low < 0 or top >= D):
            raise ValueError(
                f"{owner}: domain ids must be non-negative and below num_domains={D} (valid range 0..{D - 1}); "
                f"got ids from {low} to {top} (max id seen: {top}). Pass the number of domains of the data as "
                "num_domains (the configs use data_info.num_domains)"
            )
        if low < 0:
            raise ValueError(f"{owner}: domain ids must be non-negative; got min id {low} (max id seen: {top})")
        if top >= D:
            warnings.warn(
                f"{owner}: domain id {top} grows the statistics from {D} to {top + 1} domain slots because "
                "num_domains was not given; pass num_domains to fix the number of domains (ids beyond it are "
                "then refused)",
                stacklevel=6,  # the caller of the module (through nn.Module.__call__)
            )

    def _prepare_domains(self, d: Tensor, red: StatReducer | None, owner: str,
                         segments: bool = True) -> Segments | None:
        """Check the ids ``d`` and grow undeclared buffers; with ``segments`` return the domains of the batch.

        With ``red`` the range is checked over all processes (one ``red.max``), all processes grow to the same
        number of slots and get the same segments: the domains present anywhere, ascending, with this
        process's samples (possibly none; :func:`~manifoldnorm.nn._batch_stats.domain_segments`).
        """
        span = domain_range(d, red)
        if span is None:
            if red is None:
                return None
            raise ValueError(f"{owner}: got an empty batch on every process")
        self._check_domain_range(*span, owner)
        self._grow(span[1] + 1)
        return domain_segments(d, red, span[1]) if segments else None

    def _segment_stats(self, seg: Segments, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """The statistics of the domains ``seg.labels``, ``(S, ...)`` each, in the order of ``_stat_names``."""
        return tuple(getattr(self, k).index_select(0, seg.labels).to(dtype) for k in self._stat_names)

    @torch.no_grad()
    def _set_segment_stats(self, seg: Segments, values: tuple[Tensor, ...]) -> None:
        """Write ``(S, ...)`` statistics (order of ``_stat_names``) into the slots of the domains ``seg.labels``."""
        for k, v in zip(self._stat_names, values, strict=True):
            buf = getattr(self, k)
            buf.index_copy_(0, seg.labels, v.to(buf.dtype))
