"""Lightning plugin synchronizing Euclidean and Riemannian batch norms across the processes of a DDP run."""

from __future__ import annotations

import logging

from lightning.pytorch.plugins import LayerSync
from torch import nn

from manifoldnorm.distributed.sync_norm import convert_sync_norm, revert_sync_norm, synchronizable_layers

__all__ = ["RiemannianSyncBatchNorm"]

log = logging.getLogger(__name__)


class RiemannianSyncBatchNorm(LayerSync):
    """``LayerSync`` plugin: batch statistics of every batch norm, Euclidean and Riemannian, over all processes.

    ``Trainer(strategy="ddp", plugins=[RiemannianSyncBatchNorm()])``. When fitting, the DDP strategies call
    :meth:`apply` before wrapping the model, which runs :func:`manifoldnorm.distributed.convert_sync_norm`:
    Euclidean batch norms become :class:`manifoldnorm.nn.SyncBatchNorm` and every SPD / Lie group norm
    (LieBN, SPDBN, SPDMBN, GBWBN, SO(3) LieBN and the domain-specific ones) computes its Fréchet mean and
    dispersion over the union of the batches of all processes. At teardown :meth:`revert` restores local
    statistics, so validation and test runs after fitting behave as without the plugin (evaluation never
    communicates anyway). Parameters, buffers and checkpoint keys are unchanged.

    Lightning's own ``Trainer(sync_batchnorm=True)`` converts only ``torch.nn.BatchNorm*`` layers (into
    ``torch.nn.SyncBatchNorm``, which needs a GPU) and leaves the Riemannian norms local; the two cannot be
    combined: use this plugin alone. On a single device it changes nothing numerically.

    Parameters
    ----------
    process_group : torch.distributed.ProcessGroup, optional
        Group to synchronize over; the default (world) group when ``None``. The group must exist when the
        trainer sets up the model (e.g. created in ``LightningModule.setup``); leave ``None`` otherwise.
    enabled : bool
        ``False`` makes the plugin a no-op that :func:`manifoldnorm.lit.run.build_trainer` leaves out, so a
        trainer config can declare it once and switch it (``conf/trainer/default.yaml``: ``enabled: ${sync_norm}``).
    """

    def __init__(self, process_group=None, enabled: bool = True) -> None:  # noqa: ANN001 - a ProcessGroup
        if not isinstance(enabled, bool):
            raise TypeError(f"RiemannianSyncBatchNorm: enabled must be true or false, got {enabled!r}")
        self.process_group = process_group
        self.enabled = enabled

    def apply(self, model: nn.Module) -> nn.Module:
        """Convert every batch norm of ``model`` to synchronized statistics (see ``convert_sync_norm``)."""
        if not self.enabled:
            return model
        model = convert_sync_norm(model, self.process_group)
        layers = synchronizable_layers(model)
        log.info("batch statistics synchronized across processes: %d norm layer(s) (%s)", len(layers),
                 ", ".join(sorted({type(m).__name__ for m in layers})) or "none")
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        """Back to local statistics and the original classes (see ``revert_sync_norm``)."""
        return revert_sync_norm(model) if self.enabled else model
