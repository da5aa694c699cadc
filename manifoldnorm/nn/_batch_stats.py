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

from manifoldnorm.functional._batch import EQUAL_ULPS, BatchSum, Segments, SplitBatchMean, equal_to_precision

__all__ = [
    "StatReducer",
    "active_reducer",
    "reduce_fn",
    "batch_mean",
    "batch_mean_count",
    "domain_segments",
    "domain_range",
    "degenerate_batch",
    "degenerate_segments",
    "EQUAL_ULPS",
]


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


def degenerate_batch(T: Tensor, count: int, red: StatReducer | None) -> Tensor:
    r"""Per feature: is the (union of the) batch degenerate, i.e. one sample or all samples equal to working precision?

    The norms fall back to their running variance only for such batches; every batch of two or more distinct
    samples is normalized by the paper's formula, however small its dispersion.

    Parameters
    ----------
    T : Tensor ``(N, *F, n, n)``
        The batch in the layer's compute dtype (inputs, or a deterministic function of them such as the
        deformed codomain elements): equal inputs give equal rows.
    count : int
        Number of samples in the union of the batch (:func:`batch_mean_count`).
    red : StatReducer or None
        With a reducer, the entry-wise maximum and minimum over the batch are reduced over all parts (one
        ``red.max``, no gradient; every part calls it iff ``count > 1``, so the calls stay in step).

    Returns
    -------
    Tensor ``(*F)`` of bool
        True where ``count == 1`` or :math:`\max_{i,j,a,b}|T_{i,ab} - T_{j,ab}| \le` ``EQUAL_ULPS`` :math:`\cdot
        \epsilon_{\mathrm{dtype}} \cdot \max_{i,a,b}|T_{i,ab}|` (exactly equal samples always qualify).
    """
    lead = T.shape[1:-2]
    if count <= 1:
        return torch.ones(lead, dtype=torch.bool, device=T.device)
    with torch.no_grad():
        T = T.detach()
        if not T.is_contiguous() and T.mT.is_contiguous():  # e.g. Cholesky factors: reduce in memory order
            T = T.mT  # (the test below is invariant to transposing every matrix)
        if T.shape[0]:
            hi, neg_lo = T.amax(dim=0), T.amin(dim=0).neg_()
        else:  # an empty part of a split batch
            hi = torch.full(T.shape[1:], -torch.inf, dtype=T.dtype, device=T.device)
            neg_lo = hi.clone()
        if red is not None:
            hi, neg_lo = red.max(torch.stack([hi, neg_lo]))
        return equal_to_precision(hi, neg_lo)


def degenerate_segments(T: Tensor, seg: Segments, red: StatReducer | None) -> Tensor:
    r""":func:`degenerate_batch` for every segment (domain) of the batch at once, ``(S, *F)`` of bool.

    A segment is degenerate where it holds one sample (over every part) or all its samples are equal to
    working precision, by the test of :func:`degenerate_batch` on per-segment entry-wise maxima and minima (two
    ``scatter_reduce`` calls; with a reducer one ``red.max`` over all segments, called by every part iff some
    segment holds two or more samples, so the calls stay in step).
    """
    S, feat = seg.num, T.shape[1:-2]
    single = (seg.counts <= 1).reshape((S,) + (1,) * len(feat)).expand((S, *feat))
    if bool(single.all()):
        return single.clone()
    with torch.no_grad():
        T = T.detach()
        init = torch.full((S, *T.shape[1:]), -torch.inf, dtype=T.dtype, device=T.device)
        idx = seg.index.reshape((-1,) + (1,) * (T.dim() - 1)).expand(T.shape)
        hi = init.scatter_reduce(0, idx, T, "amax")
        neg_lo = init.scatter_reduce(0, idx, -T, "amax")
        if red is not None:
            hi, neg_lo = red.max(torch.stack([hi, neg_lo]))
        return single | equal_to_precision(hi, neg_lo)


def domain_range(d: Tensor, red: StatReducer | None) -> tuple[int, int] | None:
    """Smallest and largest domain id over the (union of the) batch, ``None`` if it holds no sample.

    With a reducer one ``red.max`` packs both, so every part gets the same range (and raises the same error).
    """
    if red is None:
        if not d.numel():
            return None
        low, top = torch.stack(torch.aminmax(d)).tolist()  # one device sync
        return int(low), int(top)
    empty = (-1, -(2**62))
    local = (int(d.max()), -int(d.min())) if d.numel() else empty
    top, neg_low = (int(v) for v in red.max(torch.tensor(local, dtype=torch.long, device=d.device)).tolist())
    if (top, neg_low) == empty:
        return None
    return -neg_low, top


def domain_segments(d: Tensor, red: StatReducer | None, top: int) -> Segments:
    """The domains of the (union of the) batch as :class:`~manifoldnorm.functional._batch.Segments`.

    One segment per domain present on any part, in ascending order of id (``labels``), with this part's samples
    (possibly none); ``counts`` are the sizes over all parts. ``top`` is the largest id over all parts
    (:func:`domain_range`; ids already checked to be non-negative). With a reducer one collective (the
    per-domain counts), so every part gets the same segments and runs the same reductions in the same order;
    each per-domain average is then one ``red.sum`` of the packed ``(S, ...)`` segment sums.
    """
    return Segments.from_ids(d, top + 1, reduce_fn(red))
