"""Lightning callbacks: Kobler's batch-size-aware momentum schedule of the norm layers, and a learning-rate monitor
that stays quiet when there is nothing to monitor."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateMonitor as _LightningLRMonitor

from manifoldnorm.nn.schedule import (
    DEFAULT_BASE_BATCH_SIZE,
    DEFAULT_TAU0,
    kobler_momentum,
    set_norm_momentum,
)

__all__ = ["LearningRateMonitor", "MomentumSchedule"]

log = logging.getLogger(__name__)

EPOCHS_OFFSET = 10  # the paper ramps the momentum over all but the last 10 epochs


class MomentumSchedule(pl.Callback):
    """Set the training/test momentum of every norm layer at the start of each training epoch.

    Applies :func:`manifoldnorm.nn.schedule.kobler_momentum` (Kobler et al., NeurIPS 2022) for epoch
    ``trainer.current_epoch + 1`` through ``set_momentum(train=..., test=...)`` on every layer that has it
    (:func:`~manifoldnorm.nn.schedule.set_norm_momentum`), and logs ``norm/train_momentum`` and
    ``norm/test_momentum`` once per epoch.

    The callback keeps no state: the momenta are a function of ``trainer.current_epoch``, so a run resumed from
    a checkpoint continues the schedule where it stopped.

    Parameters
    ----------
    epochs : int, optional
        Ramp length :math:`K`; default ``max(trainer.max_epochs - 10, 1)`` (the paper: 50 epochs, K = 40).
    batch_size : float, optional
        Samples per batch seen by one set of statistics; default: the data module's ``batch_size``, else the
        training loader's. Pass the per-domain count for domain-specific layers fed by domain-mixed batches.
    base_batch_size : float
        Reference batch size :math:`b_0` of the schedule (must be at least ``batch_size``).
    tau0 : float
        :math:`\\tau_0` of the test momentum.

    Raises
    ------
    ValueError
        At the start of fitting, if the model has no layer with ``set_momentum``, or if ``epochs`` is not given
        and the trainer has no finite ``max_epochs``; argument errors of the schedule are raised on construction.
    """

    def __init__(self, epochs: int | None = None, batch_size: float | None = None,
                 base_batch_size: float = DEFAULT_BASE_BATCH_SIZE, tau0: float = DEFAULT_TAU0) -> None:
        super().__init__()
        # validate what is known now (the batch size may only be known once the loaders exist)
        kobler_momentum(1, 1 if epochs is None else epochs,
                        base_batch_size if batch_size is None else batch_size, base_batch_size, tau0)
        self.epochs, self.batch_size = epochs, batch_size
        self.base_batch_size, self.tau0 = base_batch_size, tau0

    def resolve_epochs(self, trainer: pl.Trainer) -> int:
        """The ramp length ``K`` used with this trainer."""
        if self.epochs is not None:
            return self.epochs
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            raise ValueError("MomentumSchedule: the trainer has no finite max_epochs; pass epochs=K explicitly")
        return max(max_epochs - EPOCHS_OFFSET, 1)

    def resolve_batch_size(self, trainer: pl.Trainer) -> float:
        """The batch size of the schedule: given, else the data module's, else the training loader's."""
        if self.batch_size is not None:
            return self.batch_size
        for source in (getattr(trainer, "datamodule", None), trainer.train_dataloader):
            size = getattr(source, "batch_size", None)
            if size is not None:
                return size
        raise ValueError("MomentumSchedule: cannot read the batch size from the data module or the training "
                         "loader; pass batch_size explicitly")

    def momenta(self, trainer: pl.Trainer) -> tuple[float, float]:
        """(train, test) momentum of the epoch the trainer is in."""
        return kobler_momentum(trainer.current_epoch + 1, self.resolve_epochs(trainer),
                               self.resolve_batch_size(trainer), self.base_batch_size, self.tau0)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not set_norm_momentum(pl_module):
            raise ValueError(f"MomentumSchedule: {type(pl_module).__name__} has no norm layer with "
                             f"set_momentum(train=, test=) (e.g. norm=spdmbn, spddsmbn or liebn_*); remove the "
                             f"callback or use a Riemannian norm")
        self.resolve_epochs(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        train, test = self.momenta(trainer)
        set_norm_momentum(pl_module, train=train, test=test)
        pl_module.log("norm/train_momentum", train, on_step=False, on_epoch=True)
        pl_module.log("norm/test_momentum", test, on_step=False, on_epoch=True)

    def __repr__(self) -> str:
        return (f"MomentumSchedule(epochs={self.epochs}, batch_size={self.batch_size}, "
                f"base_batch_size={self.base_batch_size}, tau0={self.tau0})")


class LearningRateMonitor(_LightningLRMonitor):
    """Lightning's ``LearningRateMonitor`` (same arguments) that does nothing in a run without an LR scheduler or
    without a logger, instead of logging constant learning rates or raising for the missing logger.

    So one callbacks config (``conf/callbacks/default.yaml``) serves every scheduler and logger choice: the
    callback itself decides, at the start of training, whether there is a schedule to record.
    """

    _active: bool = True

    def on_train_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._active = bool(trainer.loggers) and bool(trainer.lr_scheduler_configs)
        if not self._active:
            log.debug("LearningRateMonitor: no %s, nothing to monitor",
                      "logger" if not trainer.loggers else "LR scheduler")
            return
        super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if self._active:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if self._active:
            super().on_train_epoch_start(trainer, *args, **kwargs)
