"""Collectives of synchronized Riemannian norms: counted (:class:`CountingReducer`) and predicted (a model).

:func:`sync_stats_traffic` is the model of the ``scale`` suite: the all-reduces and bytes per training step of
one layer converted by :func:`manifoldnorm.distributed.convert_sync_norm`, written from the table in that
function's docstring and checked against the calls :class:`CountingReducer` counts on the real layers (the
suite's rows and ``tests/benchmarks``). The norm names come from the registry (:func:`synchronized_norms`); the
model assigns each a reduction pattern (:data:`REDUCTIONS`).
"""

from __future__ import annotations

import torch

from manifoldnorm.distributed import synchronizable_layers
from manifoldnorm.nn import create_norm_layer, get_norm_info, list_norms

# How a synchronized layer averages its batch statistics (convert_sync_norm's table) -> the norms doing so.
REDUCTIONS: dict[str, tuple[str, ...]] = {
    "karcher": ("liebn_aim", "liebn_crim"),  # arithmetic start, one per Karcher step, dispersion; max test
    "closed_form": ("liebn_lem", "liebn_lcm"),  # codomain mean, dispersion; max test
    "karcher_no_dispersion": ("spdbn",),  # arithmetic start, one per Karcher step
}


def synchronized_norms() -> list[str]:
    """Registered SPD-input norms (``kind`` spd or lie, not domain-aware) that ``convert_sync_norm`` synchronizes."""
    names = []
    for name in list_norms(kind="spd") + list_norms(kind="lie"):
        info = get_norm_info(name)
        if info.domain_aware or "spd" not in info.inputs:
            continue
        if synchronizable_layers(create_norm_layer(name, 2)):
            names.append(name)
    return sorted(names)


def modelled_norms() -> list[str]:
    """The norms :func:`sync_stats_traffic` knows, in the order of :data:`REDUCTIONS`."""
    return [name for names in REDUCTIONS.values() for name in names]


def representative_norms() -> tuple[str, ...]:
    """One norm per reduction pattern, the first of each in :data:`REDUCTIONS` (``liebn_aim``, ``liebn_lem``,
    ``spdbn``): the norms of one pattern issue the same collectives, so they pay the same synchronization."""
    return tuple(names[0] for names in REDUCTIONS.values())


def _pattern(norm: str) -> str:
    for pattern, names in REDUCTIONS.items():
        if norm in names:
            return pattern
    raise ValueError(f"no traffic model for norm {norm!r}; valid: {', '.join(modelled_norms())}")


class CountingReducer:
    """A :class:`~manifoldnorm.nn._batch_stats.StatReducer` that counts the collectives of another one.

    ``counts`` holds the number of calls and bytes of ``sum`` in the forward (``fwd``), of the all-reduces that
    the backward of ``sum`` runs (``bwd``: one per ``sum`` result that receives a gradient, counted by a tensor
    hook) and of ``max`` (``max``).
    """

    def __init__(self, inner) -> None:  # noqa: ANN001 - a StatReducer
        self.inner = inner
        self.counts = {k: [0, 0] for k in ("fwd", "bwd", "max")}

    @property
    def active(self) -> bool:
        return self.inner.active

    def _add(self, key: str, t: torch.Tensor) -> None:
        self.counts[key][0] += 1
        self.counts[key][1] += t.numel() * t.element_size()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        self._add("fwd", t)
        out = self.inner.sum(t)
        if out.requires_grad:
            out.register_hook(lambda g: self._add("bwd", g))
        return out

    def max(self, t: torch.Tensor) -> torch.Tensor:
        self._add("max", t)
        return self.inner.max(t)

    def reset(self) -> None:
        self.counts = {k: [0, 0] for k in self.counts}

    def totals(self) -> tuple[int, int]:
        """All calls and bytes counted so far."""
        return sum(c for c, _ in self.counts.values()), sum(b for _, b in self.counts.values())

    def __deepcopy__(self, memo: dict) -> CountingReducer:
        return self


def count_sync_traffic(module: torch.nn.Module) -> CountingReducer | None:
    """Wrap the (shared) reducer of every synchronized Riemannian norm of ``module``; ``None`` if there is none."""
    layers = [m for m in module.modules() if getattr(m, "stats_reducer", None) is not None]
    if not layers:
        return None
    counter = CountingReducer(layers[0].stats_reducer)
    for m in layers:
        m.stats_reducer = counter
    return counter


def sync_stats_traffic(norm: str, n: int, channels: int = 1, karcher_steps: int = 1,
                       dtype_bytes: int = 8) -> dict[str, int]:
    """All-reduces and bytes per training step (forward + backward) of one synchronized layer, computed.

    From the reductions listed in :func:`manifoldnorm.distributed.convert_sync_norm`, for ``C`` channels of
    ``n x n`` matrices: a mean's first reduction (the arithmetic start of a Karcher flow, or the codomain mean of
    LEM/LCM) carries ``C n^2`` sums and the sample count, each further Karcher step ``C n^2`` (the count is
    reused), the dispersion ``C`` sums and its count, and (LieBN) the degenerate-batch test one entry-wise
    maximum of ``2 C n^2`` numbers (:func:`manifoldnorm.nn._batch_stats.degenerate_batch`). With the default
    ``detach_mean=True`` only the dispersion is reduced again in the backward (its gradient, ``C + 1`` numbers).
    SPDBN has neither dispersion nor degenerate-batch test. Known norms: :func:`modelled_norms`.
    """
    pattern = _pattern(norm)
    stats, disp = channels * n * n, channels + 1
    if pattern == "closed_form":
        fwd = [stats + 1, disp]
    elif pattern == "karcher":
        fwd = [stats + 1] + [stats] * karcher_steps + [disp]
    else:
        fwd = [stats + 1] + [stats] * karcher_steps
    dispersion = pattern != "karcher_no_dispersion"
    bwd = [disp] if dispersion else []
    mx = [2 * stats] if dispersion else []  # the degenerate-batch test: entry-wise max and -min
    return {"calls": len(fwd) + len(bwd) + len(mx), "bytes": dtype_bytes * (sum(fwd) + sum(bwd) + sum(mx)),
            "fwd_calls": len(fwd), "bwd_calls": len(bwd), "max_calls": len(mx), "max_bytes": dtype_bytes * sum(mx)}


def ring_allreduce_bytes(nbytes: float, processes: int) -> float:
    """Bytes each process sends (and receives) in a ring all-reduce of ``nbytes``: ``2 (p - 1) / p * nbytes``."""
    return 2.0 * (processes - 1) / processes * nbytes
