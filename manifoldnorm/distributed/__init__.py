"""Distributed training helpers: synchronized (Euclidean and Riemannian) batch normalization across ranks.

:func:`convert_sync_norm` switches every batch norm of a model to statistics over the union of all ranks'
batches (uneven batches weighted by their counts); :func:`revert_sync_norm` switches back. Without an
initialised process group (or with one rank) the converted layers compute exactly what the local ones do.
:func:`explain_collective_failure` turns the error of a timed-out or broken collective into one line naming the
ranks and the collective (:mod:`manifoldnorm.distributed.faults`).
"""

from manifoldnorm.distributed.faults import explain_collective_failure
from manifoldnorm.distributed.sync_norm import (
    ProcessGroupReducer,
    convert_sync_norm,
    is_synchronized,
    revert_sync_norm,
    synchronizable_layers,
)

__all__ = ["ProcessGroupReducer", "convert_sync_norm", "explain_collective_failure", "is_synchronized",
           "revert_sync_norm", "synchronizable_layers"]
