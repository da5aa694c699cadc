r"""Whole-matrix sharding of an optimizer's expensive per-matrix work across data-parallel ranks.

Under DDP every rank holds the full parameters and the same averaged gradients, so an optimizer that runs an
expensive transform per matrix (Newton–Schulz for Muon and NorMuon) would repeat it ``world_size`` times. Here
each matrix gets one owner rank (:func:`assign_owners`), only the owner computes the transform, and one
all-gather per result dtype (:func:`all_gather_owned`) gives every rank every result. Everything before and after
the transform (momentum, second moments, weight decay, the parameter update) runs on every rank, so all ranks
keep identical optimizer state and any rank's ``state_dict()`` is the full state.

See ``docs/distributed_optimizers.md`` for the scheme, its communication volume and its mapping to FSDP2.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from manifoldnorm import _dist
from manifoldnorm.optim._base import MatrixOptimizer

__all__ = ["assign_owners", "newton_schulz_cost", "sharding_world", "all_gather_owned", "check_same_work",
           "ShardedMatrixOptimizer"]


def newton_schulz_cost(shape: Sequence[int]) -> float:
    r"""Flop count (up to a constant) of Newton–Schulz on a weight of ``shape``: :math:`m\,n\,\min(m, n)`.

    ``shape`` is ``(out, in, ...)``; conv shapes count as the flattened matrix ``(out, in·kh·kw)``.
    """
    m, n = int(shape[0]), math.prod(int(s) for s in shape[1:])
    return float(m) * float(n) * float(min(m, n))


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Deterministic greedy balance of whole work items over ``world_size`` ranks (longest processing time first).

    Items are taken by cost, largest first (ties: lower index first), and each goes to the rank with the smallest
    load so far (ties: lowest rank). Every rank computes the same assignment from the same costs, so no
    communication is needed to agree on it.

    Parameters
    ----------
    costs : sequence of float, length N
        Non-negative cost of each item, in a fixed order shared by all ranks.
    world_size : int
        Number of ranks, >= 1.

    Returns
    -------
    list of int, length N
        ``owners[i]`` is the rank that handles item ``i``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    costs = [float(c) for c in costs]
    for i, c in enumerate(costs):
        if not (math.isfinite(c) and c >= 0.0):
            raise ValueError(f"costs must be finite and >= 0; item {i} has cost {c}")
    owners = [0] * len(costs)
    if world_size == 1:
        return owners
    loads = [(0.0, r) for r in range(world_size)]  # a heap: the least loaded rank first, then the lowest rank
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + costs[i], rank))
    return owners


def sharding_world(enabled: bool, group: Any = None) -> tuple[int, int] | None:
    """``(rank, world_size)`` in ``group`` when sharding applies, else ``None``.

    Sharding applies when ``enabled``, ``torch.distributed`` is available and initialised, and the group has more
    than one rank. Without a process group this returns ``None`` and touches no ``torch.distributed`` state.
    """
    if not enabled or not _dist.is_multiprocess(group):
        return None
    return dist.get_rank(group), _dist.world_size(group)


def check_same_work(shapes: Sequence[Sequence[int]], device: torch.device, group: Any = None) -> None:
    """Raise a RuntimeError on every rank unless all ranks step the same list of matrix shapes.

    The sharded exchange derives buffer sizes locally, so ranks that disagree on which parameters have a gradient
    would exchange mismatched buffers. One all-gather of three integers (count, total size, a position-weighted
    size sum) catches that before any state changes; all ranks see the same gathered values and raise together.
    """
    sizes = [math.prod(int(s) for s in shape) for shape in shapes]
    signature = [len(sizes), sum(sizes), sum((i + 1) * (s + 1) for i, s in enumerate(sizes))]
    mine = torch.tensor(signature, dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    rows = [tuple(int(x) for x in t.tolist()) for t in everyone]
    if any(row != rows[0] for row in rows):
        raise RuntimeError(
            "ranks step different parameters: (matrices with a gradient, total elements, checksum) per rank = "
            f"{rows}. The sharded Newton–Schulz needs every rank to call step() with gradients on the same "
            "parameters (as DDP gives); pass distributed=False otherwise."
        )


def all_gather_owned(
    owned: Mapping[int, Tensor],
    specs: Sequence[tuple[Sequence[int], torch.dtype, torch.device]],
    owners: Sequence[int],
    rank: int,
    world_size: int,
    group: Any = None,
) -> list[Tensor]:
    """Give every rank all N results when rank ``r`` has computed those with ``owners[i] == r``.

    Results are bucketed by ``(device, dtype)`` (first appearance order). Per bucket each rank flattens the
    results it owns, in index order, into one buffer, zero-padded to the largest per-rank length (known to all
    ranks from ``specs`` and ``owners``), and a single ``all_gather`` exchanges the buffers; the results are views
    into the gathered buffers, bit-identical to what their owners computed. Buffers stay on the results' device
    (gloo on CPU, nccl on GPU).

    Parameters
    ----------
    owned : mapping int -> Tensor
        This rank's results, keyed by item index; exactly the indices ``i`` with ``owners[i] == rank``.
    specs : sequence of (shape, dtype, device), length N
        Shape, dtype and device of every result, identical on all ranks.
    owners : sequence of int, length N
        Owner rank of every item, e.g. from :func:`assign_owners`.
    rank, world_size : int
        This rank and the number of ranks in ``group``.
    group : ProcessGroup, optional
        Process group of the collective (default group when ``None``).

    Returns
    -------
    list of Tensor, length N
        Contiguous tensors with the shapes, dtypes and devices of ``specs``.
    """
    if set(owned) != {i for i, r in enumerate(owners) if r == rank}:
        raise ValueError(f"rank {rank} must provide exactly the results it owns")
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, (_, dtype, device) in enumerate(specs):
        buckets.setdefault((torch.device(device), dtype), []).append(i)
    numels = [math.prod(int(s) for s in shape) for shape, _, _ in specs]
    out: list[Tensor | None] = [None] * len(specs)
    for (device, dtype), items in buckets.items():
        per_rank = [[i for i in items if owners[i] == r] for r in range(world_size)]
        length = max(sum(numels[i] for i in idx) for idx in per_rank)
        pieces = [owned[i].reshape(-1).to(device=device, dtype=dtype) for i in per_rank[rank]]
        pad = length - sum(numels[i] for i in per_rank[rank])
        buffer = torch.cat([*pieces, torch.zeros(pad, dtype=dtype, device=device)])
        gathered = [torch.empty_like(buffer) for _ in range(world_size)]
        if length > 0:
            dist.all_gather(gathered, buffer, group=group)
        for r, idx in enumerate(per_rank):
            offset = 0
            for i in idx:
                out[i] = gathered[r][offset:offset + numels[i]].view(*specs[i][0])
                offset += numels[i]
    return out  # type: ignore[return-value]


class ShardedMatrixOptimizer(MatrixOptimizer):
    r"""Matrix optimizer whose expensive per-matrix transform runs once per matrix across DDP ranks.

    A subclass splits its per-parameter update into three phases:

    1. :meth:`_prepare` (every rank, every parameter with a gradient): cheap state updates such as momentum;
    2. :meth:`_transform` (owner rank only): the expensive matrix transform, returning a tensor described by
       :meth:`_transform_spec`;
    3. :meth:`_finish` (every rank): the rest of the update, given the transform's result.

    Without sharding (``distributed=False``, no initialised process group, or a group of one rank) each parameter
    runs the three phases in turn, exactly as a plain single-process optimizer. With sharding, phase 1 runs for all
    parameters, phase 2 only for this rank's share (:func:`assign_owners` on :func:`newton_schulz_cost` in step
    order: groups, then parameters), one :func:`all_gather_owned` per result dtype gives every rank every result,
    and phase 3 runs for all parameters. Since the transform is deterministic and the exchange copies bits, the
    result is bit-identical to the single-process step.

    Notes
    -----
    *Assumption.* Every rank calls ``step()`` with gradients on the same parameters (as DDP gives) and with the
    same hyperparameters. An all-gather of three integers per step checks the first part and raises a RuntimeError
    on all ranks before any state changes.

    *Communication.* Per step one ``all_gather`` per result dtype (one in the usual case) of a buffer of
    :math:`L = \max_r S_r` elements, :math:`S_r` the number of result elements rank :math:`r` owns; each rank
    receives :math:`(W-1)L` elements. With :math:`S = \sum_r S_r` the total size of the matrices with a gradient
    and a balanced assignment (:math:`L \approx S/W`) that is :math:`S(W-1)/W`, the volume of all-gathering the
    updates (or the updated parameters) in a ZeRO-1-style sharded optimizer; the padding :math:`WL - S` is what
    balancing by flops rather than by size costs. Compute per rank drops from all Newton–Schulz iterations to
    about :math:`1/W` of them (within the largest single matrix).

    *FSDP2 (row shards; described, not implemented).* Under FSDP2 each rank holds a dim-0 shard
    (``DTensor`` ``Shard(0)``) of every matrix and of its momentum: whole rows of the flattened ``(out, -1)``
    matrix. Phase 1 is elementwise and runs on the local shards. In phase 2 the owner of a matrix needs the full
    :math:`U`: one ``all_to_all`` sends each rank's row shards of every matrix to that matrix's owner, the owner
    runs Newton–Schulz, and a second ``all_to_all`` returns the row shards of :math:`O`. NorMuon's row second
    moment and row normalization are row-local (no communication); only the Frobenius norms
    :math:`\lVert O\rVert_F`, :math:`\lVert\hat O\rVert_F` of the norm restore need the full matrix, i.e. one
    all-reduce of the squared shard norms (two scalars per matrix, batched). The volume is about twice the
    parameter size per step (gather plus scatter), against once for the replicated DDP scheme above.
    """

    def _init_sharding(self, distributed: bool, process_group: Any) -> None:
        if not isinstance(distributed, bool):
            raise TypeError(f"distributed must be a bool, got {type(distributed).__name__}")
        # attributes, not defaults: param groups and state_dict() stay free of process-group objects
        self._distributed = distributed
        self._process_group = process_group

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_distributed", True)
        self.__dict__.setdefault("_process_group", None)

    def _prepare(self, p: Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _transform(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def _transform_spec(self, p: Tensor, group: dict[str, Any]) -> tuple[Sequence[int], torch.dtype]:
        raise NotImplementedError

    def _finish(self, p: Tensor, group: dict[str, Any], result: Tensor) -> None:
        raise NotImplementedError

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        self._prepare(p, group)
        self._finish(p, group, self._transform(p, group))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the loss (gradients enabled)."""
        world = sharding_world(self._distributed, self._process_group)
        if world is None:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = list(self._with_grad())
        for p, _ in items:
            self._check(p)
        self._sharded_update(items, *world)
        return loss

    def _with_grad(self) -> Iterable[tuple[Tensor, dict[str, Any]]]:
        return ((p, g) for g in self.param_groups for p in g["params"] if p.grad is not None)

    def _sharded_update(self, items: list[tuple[Tensor, dict[str, Any]]], rank: int, world_size: int) -> None:
        group = self._process_group
        params = [p for g in self.param_groups for p in g["params"]]
        device = items[0][0].device if items else (params[0].device if params else torch.device("cpu"))
        check_same_work([p.shape for p, _ in items], device, group)
        if not items:
            return
        for p, g in items:
            self._prepare(p, g)
        owners = assign_owners([newton_schulz_cost(p.shape) for p, _ in items], world_size)
        owned = {i: self._transform(p, g) for i, ((p, g), r) in enumerate(zip(items, owners, strict=True))
                 if r == rank}
        specs = [(*self._transform_spec(p, g), p.device) for p, g in items]
        results = all_gather_owned(owned, specs, owners, rank, world_size, group)
        for (p, g), result in zip(items, results, strict=True):
            self._finish(p, g, result)
