"""Helpers for reductions over a batch dimension of ``(..., n, n)`` stacks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def batch_dim(X: Tensor, dim: int) -> int:
    """Normalise ``dim`` to a non-negative index of a batch (non-matrix) dimension of ``X``."""
    nb = X.dim() - 2
    if nb < 1:
        raise ValueError(f"a mean needs a batch of matrices (..., N, ..., n, n); got shape {tuple(X.shape)}")
    d = dim + nb if dim < 0 else dim
    if not 0 <= d < nb:
        raise ValueError(f"dim={dim} is not a batch dimension of a tensor of shape {tuple(X.shape)}")
    return d


def normalized_weights(X: Tensor, dim: int, weights: Tensor | None) -> Tensor:
    """Weights of shape broadcastable to ``X.shape[:-2]``, non-negative and summing to one along ``dim``.

    Returned with two trailing singleton dims so they multiply ``(..., n, n)`` stacks directly.
    """
    size = X.shape[dim]
    if size == 0:
        raise ValueError(f"a mean needs at least one sample; dimension {dim} of the input of shape "
                         f"{tuple(X.shape)} is empty")
    if weights is None:
        w = torch.full((size,), 1.0 / size, dtype=X.dtype, device=X.device)
    else:
        w = torch.as_tensor(weights, dtype=X.dtype, device=X.device)
        if w.dim() == 1:
            if w.shape[0] != size:
                raise ValueError(f"weights has {w.shape[0]} entries but dimension {dim} has size {size}")
        if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise ValueError("weights must be finite and non-negative")
        total = w.sum(dim=0 if w.dim() == 1 else dim, keepdim=True)
        if bool((total <= 0).any()):
            raise ValueError("weights must not all be zero")
        w = w / total
    if w.dim() == 1:
        shape = [1] * (X.dim() - 2)
        shape[dim] = size
        w = w.reshape(shape)
    return w.unsqueeze(-1).unsqueeze(-1)


def weighted_sum(T: Tensor, dim: int, w: Tensor) -> Tensor:
    """``sum_i w_i T_i`` along ``dim`` (weights from :func:`normalized_weights`)."""
    return (w * T).sum(dim=dim)


def default_tol(dtype: torch.dtype) -> float:
    """Default Karcher-flow tolerance on the Frobenius norm of the mean tangent vector."""
    return max(1e-10, 50.0 * float(torch.finfo(dtype).eps))


#: ``reduce(t)`` returns the sum of ``t`` over every part of a batch split into parts (e.g. across processes);
#: it must be called by every part in the same order and keep autograd (the gradient of a sum is a sum).
BatchSum = Callable[[Tensor], Tensor]


def raw_weights(X: Tensor, dim: int, weights: Tensor | None) -> Tensor:
    """Unnormalised weights aligned with the batch dims ``X.shape[:-2]`` (one per sample if ``None``).

    For a part of a split batch: the weights may all be zero (or the part empty); see :class:`SplitBatchMean`.
    """
    size = X.shape[dim]
    if weights is None:
        w = torch.ones(size, dtype=X.dtype, device=X.device)
    else:
        w = torch.as_tensor(weights, dtype=X.dtype, device=X.device)
        if w.dim() == 1 and w.shape[0] != size:
            raise ValueError(f"weights has {w.shape[0]} entries but dimension {dim} has size {size}")
        if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise ValueError("weights must be finite and non-negative")
    if w.dim() == 1:
        shape = [1] * (X.dim() - 2)
        shape[dim] = size
        w = w.reshape(shape)
    return w


def _align(t: Tensor, ndim: int) -> Tensor:
    """Append singleton dims to ``t`` (aligned from the left) until it has ``ndim`` dims."""
    return t.reshape(tuple(t.shape) + (1,) * (ndim - t.dim()))  # a tuple: also for a 0-dim t and ndim 0


class SplitBatchMean:
    r"""Weighted means along ``dim`` of a batch split into parts, this part holding the samples given.

    Calling it on a stack ``T`` (batch dims first, then any event dims) returns
    :math:`\sum_i w_i T_i / \sum_i w_i` over the union of the parts: the local weighted sum goes through
    ``reduce`` (a :data:`BatchSum`). The total weight travels packed with the first sum (one ``reduce`` call per
    mean) and is reused by later calls, so every part is weighted by its own count; a part may be empty. The
    total is checked once (a host synchronisation): zero total weight raises a ValueError on every part alike.

    Parameters
    ----------
    w : Tensor
        Non-negative weights aligned with the leading (batch) dims of the stacks to average.
    dim : int
        The batch dimension that is reduced.
    reduce : callable
        Sum over the parts (identity for an unsplit batch).
    """

    def __init__(self, w: Tensor, dim: int, reduce: BatchSum) -> None:
        self.w, self.dim, self.reduce = w, dim, reduce
        self.total: Tensor | None = None

    def __call__(self, T: Tensor) -> Tensor:
        s = (_align(self.w, T.dim()) * T).sum(dim=self.dim)
        if self.total is None:
            tot = self.w.sum(dim=self.dim)
            packed = self.reduce(torch.cat([s.reshape(-1), tot.reshape(-1).to(s.dtype)]))
            s, tot = packed[:s.numel()].view_as(s), packed[s.numel():].view_as(tot)
            if not bool((tot > 0).all()):
                raise ValueError("the batch is empty (or its weights are all zero) on every part it is split "
                                 "into; a mean needs at least one sample")
            self.total = tot if self.w.requires_grad else tot.detach()
        else:
            s = self.reduce(s)
        return s / _align(self.total, s.dim())

    @property
    def count(self) -> Tensor:
        """Total weight over all parts (after the first call): the global sample count for unit weights."""
        if self.total is None:
            raise RuntimeError("SplitBatchMean.count is known after the first mean")
        return self.total


class Segments:
    r"""The samples of a batch grouped into segments (e.g. by domain id), for per-segment reductions.

    Every per-segment statistic is a segment sum: one ``index_add`` of the ``N`` samples into ``S`` slots (and,
    for a batch split into parts, one ``reduce`` of the packed ``(S, ...)`` sums), so the number of batched
    operations does not depend on the number of segments. Differentiable: the gradient of a segment sum is
    gathered back to the samples.

    Parameters
    ----------
    index : LongTensor ``(N,)``
        Segment of each sample of this part, in ``0..S-1``.
    counts : Tensor ``(S,)``
        Number of samples (total weight) of each segment over every part; all positive.
    labels : LongTensor ``(S,)``, optional
        What each segment stands for (e.g. its domain id), for the caller.
    reduce : callable, optional
        Sum over the parts of a split batch (a :data:`BatchSum`); ``None``: this is the whole batch.
    """

    def __init__(self, index: Tensor, counts: Tensor, labels: Tensor | None = None,
                 reduce: BatchSum | None = None) -> None:
        self.index, self.counts, self.labels, self.reduce = index, counts, labels, reduce
        self.num = int(counts.shape[0])

    @classmethod
    def from_ids(cls, ids: Tensor, size: int | None = None, reduce: BatchSum | None = None) -> Segments:
        """One segment per distinct id present (over every part with ``reduce``), in ascending order of id.

        ``ids`` are non-negative and below ``size`` (default: the largest local id plus one; a split batch
        must give the same ``size`` on every part). One ``bincount``, with ``reduce`` one sum of the counts
        over the parts; ``labels`` are the ids.
        """
        if size is None:
            if reduce is not None:
                raise ValueError("Segments.from_ids: a batch split into parts needs the same size on every part")
            size = int(ids.max()) + 1 if ids.numel() else 0
        with torch.no_grad():
            counts = torch.bincount(ids, minlength=size)
            if reduce is not None:
                counts = reduce(counts)
            labels = torch.nonzero(counts > 0, as_tuple=False).squeeze(1)
            slot = torch.full((counts.shape[0],), -1, dtype=torch.long, device=ids.device)
            slot[labels] = torch.arange(labels.shape[0], device=ids.device)
        return cls(slot[ids], counts[labels], labels, reduce)

    def sum(self, T: Tensor) -> Tensor:
        """Per-segment sums ``(S, *T.shape[1:])`` of a stack ``T`` ``(N, ...)`` (over every part)."""
        s = T.new_zeros((self.num, *T.shape[1:])).index_add(0, self.index, T)
        return s if self.reduce is None else self.reduce(s)

    def mean(self, T: Tensor) -> Tensor:
        """Per-segment means ``(S, *T.shape[1:])`` of a stack ``T`` ``(N, ...)`` (over every part)."""
        s = self.sum(T)
        return s / _align(self.counts.to(s.dtype), s.dim())

    def gather(self, V: Tensor) -> Tensor:
        """Per-sample copy ``(N, ...)`` of per-segment values ``V`` ``(S, ...)``: ``V[index]``."""
        return V.index_select(0, self.index)


#: two matrices of a batch count as equal when every entry differs by at most this many units of the compute
#: dtype's precision (``torch.finfo(dtype).eps``) relative to the largest entry of the feature (see
#: :func:`equal_to_precision` and :func:`manifoldnorm.nn._batch_stats.degenerate_batch`)
EQUAL_ULPS = 8.0


def equal_to_precision(hi: Tensor, neg_lo: Tensor) -> Tensor:
    r"""Per feature ``(*F)`` from the entry-wise batch maximum ``hi`` and negated minimum ``neg_lo`` ``(*F, n, n)``:
    are all samples equal to working precision, :math:`\max_{a,b}(\max_i T_{i,ab} - \min_i T_{i,ab}) \le`
    ``EQUAL_ULPS`` :math:`\cdot\,\epsilon \cdot \max_{a,b} \max_i |T_{i,ab}|`?"""
    spread = (hi + neg_lo).amax(dim=(-1, -2))
    scale = torch.maximum(hi.abs(), neg_lo.abs()).amax(dim=(-1, -2))
    return spread <= EQUAL_ULPS * torch.finfo(hi.dtype).eps * scale
