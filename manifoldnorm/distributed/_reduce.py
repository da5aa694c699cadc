"""The statistics reducer of synchronized Riemannian norms: sums over the processes of a ``torch.distributed`` group."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from manifoldnorm._dist import is_multiprocess
from manifoldnorm.nn.euclidean.sync_bn import all_reduce_sum

__all__ = ["ProcessGroupReducer"]


class ProcessGroupReducer:
    r"""Sum and maximum over the processes of a group, as a :class:`~manifoldnorm.nn._batch_stats.StatReducer`.

    ``sum`` is the differentiable all-reduce of :func:`manifoldnorm.nn.euclidean.sync_bn.all_reduce_sum`: the
    forward returns :math:`\sum_r t_r` on every process and the backward sums the incoming gradients over the
    group, so with the total loss :math:`\sum_r L_r` every process receives the exact gradient of its inputs.
    ``max`` is a plain all-reduce (no gradient). ``active`` is false while no process group is initialized or
    the group has a single process; layers then run their local code path and communicate nothing.

    Parameters
    ----------
    process_group : torch.distributed.ProcessGroup, optional
        Group to reduce over; the default group when ``None``.

    Notes
    -----
    One instance is shared by all layers converted together. Copies of a model (``copy.deepcopy``) share it
    as well: a process group cannot be copied.
    """

    def __init__(self, process_group=None) -> None:  # noqa: ANN001 - torch.distributed.ProcessGroup
        self.process_group = process_group

    @property
    def active(self) -> bool:
        """Whether there are other processes to reduce over."""
        return is_multiprocess(self.process_group)

    def sum(self, t: Tensor) -> Tensor:
        """Differentiable sum of ``t`` over the group (every process must call it, in the same order)."""
        return all_reduce_sum(t, self.process_group)

    def max(self, t: Tensor) -> Tensor:
        """Element-wise maximum of ``t`` over the group (no gradient)."""
        out = t.detach().clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.process_group)
        return out

    def __deepcopy__(self, memo: dict) -> ProcessGroupReducer:
        return self

    def __repr__(self) -> str:
        group = "default group" if self.process_group is None else repr(self.process_group)
        return f"{type(self).__name__}({group})"
