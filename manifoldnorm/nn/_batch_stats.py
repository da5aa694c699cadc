r"""Where the Riemannian norm layers reduce over the batch: locally, or over a batch split across processes.

Every batch statistic of the SPD and Lie group norms is a (weighted) average over the batch dimension: the
codomain mean of LEM/LCM, each Karcher or fixed-point step of the AIM, SO(3) and Bures–Wasserstein means, and
the dispersion (mean squared distance). A layer's ``stats_reducer`` attribute decides how these averages are
formed. ``None`` (the default) averages the local batch exactly as a plain forward does. A
:class:`StatReducer` instance whose ``active`` is true (see
:func:`manifoldnorm.distributed.convert_sync_norm`) turns every average into
:math:`\sum_r \sum_{i \in r} T_i / \sum_r n_r` over the parts :math:`r` of the batch: one call of
``reducer.sum`` per average, the counts packed into the first call of each mean, so every part obtains the
statistics of the union and uneven parts are weighted by their sizes. This module holds no communication code.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from manifoldnorm.functional._batch import BatchSum, SplitBatchMean

__all__ = ["StatReducer", "active_reducer", "reduce_fn", "batch_mean", "batch_mean_count", "domain_groups"]


class StatReducer(Protocol):
    """How a synchronized norm layer sums over the parts of a split batch.

    ``sum`` must keep autograd (the gradient of a sum over parts is the sum of the parts' gradients) and be
    called by every part in the same order; ``max`` is an element-wise maximum without gradient. ``active`` is
    false when there is nothing to reduce over (a single part): the layer then runs its local code path.
    """

    @property
    def active(self) -> bool: ...

    def sum(self, t: Tensor) -> Tensor: ...

    def max(self, t: Tensor) -> Tensor: ...


def active_reducer(layer: object) -> StatReducer | None:
    """The layer's reducer if it is set and active, else ``None`` (local statistics)."""
    red = getattr(layer, "stats_reducer", None)
    return red if red is not None and red.active else None


def reduce_fn(red: StatReducer | None) -> BatchSum | None:
    """``red.sum`` or ``None``: the ``reduce`` argument of the functional means."""
    return None if red is None else red.sum


def _ones(T: Tensor) -> Tensor:
    return torch.ones(T.shape[0], dtype=T.dtype, device=T.device)


def batch_mean(T: Tensor, red: StatReducer | None) -> Tensor:
    """Mean over dim 0 of the (union of the) batch; ``T.mean(dim=0)`` without a reducer."""
    if red is None:
        return T.mean(dim=0)
    return SplitBatchMean(_ones(T), 0, red.sum)(T)


def batch_mean_count(T: Tensor, red: StatReducer | None) -> tuple[Tensor, int]:
    """:func:`batch_mean` and the number of samples it averaged (over every part)."""
    if red is None:
        return T.mean(dim=0), T.shape[0]
    mean = SplitBatchMean(_ones(T), 0, red.sum)
    out = mean(T)
    return out, int(round(float(mean.count.detach().reshape(-1)[0])))


def domain_groups(d: Tensor, red: StatReducer) -> tuple[int, list[tuple[int, Tensor]]]:
    """Domains present on any part, ascending, with this part's sample indices (possibly empty).

    Returns ``(number of domain slots needed, groups)``. Two small collectives: the largest id, then the
    per-domain counts; every part gets the same list, so all parts run the same reductions in the same order.
    """
    local_max = int(d.max()) if d.numel() else -1
    top = int(red.max(torch.tensor([local_max], dtype=torch.long, device=d.device))[0])
    if top < 0:
        return 0, []
    with torch.no_grad():
        counts = red.sum(torch.bincount(d, minlength=top + 1))
    present = torch.nonzero(counts > 0, as_tuple=False).squeeze(1).tolist()
    return top + 1, [(dom, torch.nonzero(d == dom, as_tuple=False).squeeze(1)) for dom in present]
