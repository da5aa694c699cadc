"""Lightning module for (domain-aware) classification: cross-entropy, accuracy and balanced accuracy."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from manifoldnorm.lit.confusion import DomainConfusion, EpochAccuracy, accuracy, balanced_accuracy
from manifoldnorm.lit.guard import numerical_errors
from manifoldnorm.nn import refit_domain_norms, refittable_norms
from manifoldnorm.optim import create_optimizer
from manifoldnorm.optim._validate import check_bool, check_int

__all__ = ["ClassificationModule", "EpochMean", "OptimizerSetup", "RunLengthUnknown", "optimizers_for"]

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
_INTERVALS = ("epoch", "step")


def _metrics(num_classes: int, prefix: str) -> EpochAccuracy:
    """``<prefix>acc`` and ``<prefix>bacc`` (torchmetrics' micro and macro ``MulticlassAccuracy``) from one
    confusion matrix per epoch: one ``bincount`` per step."""
    return EpochAccuracy(num_classes, prefix=prefix)


def optimizers_for(model: nn.Module, optimizer: OptimizerFactory | None, scheduler: SchedulerFactory | None,
                   interval: str, monitor: str, trainer: pl.Trainer | None = None,
                   built: torch.optim.Optimizer | None = None) -> Any:
    """What ``configure_optimizers`` returns: the optimizer (default :func:`create_optimizer`), with its scheduler.

    ``built``: an optimizer already built by ``optimizer(model)``, used instead of building another.

    A scheduler factory that leaves ``total_steps`` unset (``functools.partial`` / Hydra ``_partial_`` with
    ``total_steps: null``, e.g. :class:`~manifoldnorm.optim.WarmupCosine`) gets the run's length in scheduler
    steps from ``trainer``: ``estimated_stepping_batches`` for ``interval="step"``, ``max_epochs`` for ``"epoch"``.
    """
    opt = built if built is not None else (optimizer or create_optimizer)(model)
    if scheduler is None:
        return opt
    kwargs = {}
    if _wants_total_steps(scheduler):
        if trainer is None:
            raise RunLengthUnknown("the scheduler needs total_steps, but it is not set and no trainer is attached to "
                             "derive it from; set total_steps in its config")
        total = trainer.estimated_stepping_batches if interval == "step" else trainer.max_epochs
        if total is None or total < 1 or total == float("inf"):
            raise ValueError(f"cannot derive the scheduler's total_steps from the trainer (got {total}); set "
                             f"trainer.max_epochs/max_steps or the scheduler's total_steps")
        kwargs["total_steps"] = int(total)
    sched = scheduler(opt, **kwargs)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": interval, "monitor": monitor}}


class RunLengthUnknown(ValueError):
    """A scheduler's ``total_steps`` must come from a trainer, and none is attached yet."""


class OptimizerSetup:
    """``configure_optimizers`` of the Lightning modules, with the optimizer built once.

    :meth:`build_optimizer` builds the optimizer from ``self.optimizer_factory`` on ``self.model`` right away, so
    that an unknown optimizer name or a bad option fails when the run is assembled, not at the start of ``fit``;
    the next :meth:`configure_optimizers` (called by the trainer in ``fit``, after moving the model) hands that
    same optimizer to Lightning, with the scheduler, which may need the trainer for its length. The built
    optimizer is used only when the model still holds the same parameter objects on the same devices and dtypes
    (a strategy that replaced or moved them gets a fresh one, built as before), and only once: a second ``fit``
    builds anew.
    """

    model: nn.Module
    optimizer_factory: OptimizerFactory | None
    scheduler_factory: SchedulerFactory | None
    _built_optimizer: tuple[torch.optim.Optimizer, tuple[tuple[Tensor, torch.device, torch.dtype], ...]] | None = None

    def _parameter_keys(self) -> tuple[tuple[Tensor, torch.device, torch.dtype], ...]:
        return tuple((p, p.device, p.dtype) for p in self.model.parameters())

    def build_optimizer(self) -> torch.optim.Optimizer:
        """Build the optimizer now and keep it for the next :meth:`configure_optimizers`."""
        opt = (self.optimizer_factory or create_optimizer)(self.model)
        self._built_optimizer = (opt, self._parameter_keys())
        return opt

    def _take_built_optimizer(self) -> torch.optim.Optimizer | None:
        built, self._built_optimizer = self._built_optimizer, None
        if built is None:
            return None
        opt, keys = built
        now = self._parameter_keys()
        same = len(keys) == len(now) and all(a[0] is b[0] and a[1:] == b[1:] for a, b in zip(keys, now, strict=True))
        return opt if same else None

    def configure_optimizers(self) -> Any:
        hp = self.hparams  # type: ignore[attr-defined]
        return optimizers_for(self.model, self.optimizer_factory, self.scheduler_factory, hp.scheduler_interval,
                              hp.scheduler_monitor, self._trainer,  # type: ignore[attr-defined]
                              built=self._take_built_optimizer())


def check_module_options(owner: str, optimizer: Any, scheduler: Any, interval: Any, monitor: Any) -> None:
    """Types of the options the Lightning modules share; raises at construction with the option's name."""
    for name, factory in (("optimizer", optimizer), ("scheduler", scheduler)):
        if factory is not None and not callable(factory):
            raise TypeError(f"{owner}: {name} must be a factory (callable, e.g. a Hydra node with _partial_: true) "
                            f"or null, got {factory!r} ({type(factory).__name__})")
    if not isinstance(interval, str) or interval not in _INTERVALS:
        raise ValueError(f"unknown scheduler_interval {interval!r}; valid: {', '.join(_INTERVALS)}")
    if not isinstance(monitor, str) or not monitor:
        raise TypeError(f"{owner}: scheduler_monitor must be a metric name (str), got {monitor!r}")


def _wants_total_steps(factory: SchedulerFactory) -> bool:
    if not isinstance(factory, functools.partial) or factory.keywords.get("total_steps", 0) is not None:
        return False
    return "total_steps" in inspect.signature(factory.func).parameters


class EpochMean:
    """Batch-size-weighted mean of a scalar per stage over an epoch, accumulated without a host synchronization.

    The arithmetic of Lightning's ``self.log(..., on_epoch=True, batch_size=n)`` (float32 sum of ``value * n``,
    integer count, one division at the end), so the epoch value is the one Lightning would have logged, at a
    fraction of the cost of a ``self.log`` call per step.
    """

    def __init__(self) -> None:
        self._sums: dict[str, tuple[Tensor, Tensor]] = {}

    def add(self, stage: str, value: Tensor, n: int) -> None:
        value = value.detach()
        if value.dtype not in (torch.float32, torch.float64):
            value = value.to(torch.get_default_dtype())
        total, count = self._sums.get(stage) or (
            torch.zeros((), dtype=torch.get_default_dtype(), device=value.device),
            torch.zeros((), dtype=torch.int64, device=value.device))
        self._sums[stage] = (total + value * n, count + n)

    def pop(self, stage: str) -> Tensor | None:
        """The mean since the last ``pop`` (``None`` if nothing was added), and start again."""
        entry = self._sums.pop(stage, None)
        return None if entry is None else entry[0] / entry[1]


class ClassificationModule(OptimizerSetup, pl.LightningModule):
    """Train/evaluate ``model(x, domain=domain) -> logits`` on ``(x, y, domain)`` batches.

    Logs per epoch ``{train,val,test}/loss``, ``/acc`` (micro accuracy) and ``/bacc`` (balanced accuracy: the
    mean per-class recall, torchmetrics ``average="macro"``). The steps only accumulate (the loss in an
    :class:`EpochMean`, the predictions in one confusion matrix per stage,
    :class:`~manifoldnorm.lit.confusion.EpochAccuracy`); the values are computed and logged once, at the end of
    each epoch (``on_{train,validation,test}_epoch_end``), equal to what per-step ``self.log`` calls
    with ``on_epoch=True`` gave, without their cost on every step.

    Testing also counts the confusion matrix of each domain (:class:`~manifoldnorm.lit.confusion.DomainConfusion`),
    kept after the test epoch as ``last_test_confusion`` (``(D, K, K)`` counts: domain, true class, predicted
    class; the :class:`~manifoldnorm.lit.confusion.ConfusionReport` callback writes and logs it). With
    ``num_domains`` > 1 it logs, for every domain ``d`` with test samples, ``test/acc/domain=<d>`` and
    ``test/bacc/domain=<d>`` (accuracy, and balanced accuracy over the classes present in that domain).

    Parameters
    ----------
    model : nn.Module
        Called as ``model(x, domain=domain)``; returns logits ``(N, num_classes)``.
    num_classes : int
    optimizer : callable, optional
        ``optimizer(model) -> torch.optim.Optimizer`` (e.g. a ``functools.partial`` of
        :func:`manifoldnorm.optim.create_optimizer`); default: ``create_optimizer`` with its defaults.
    scheduler : callable, optional
        ``scheduler(optimizer) -> LRScheduler`` (e.g. a partial of ``torch.optim.lr_scheduler.CosineAnnealingLR``).
    scheduler_interval : {"epoch", "step"}
        When the scheduler steps.
    scheduler_monitor : str
        Metric handed to schedulers that need one (``ReduceLROnPlateau``).
    num_domains : int, optional
        Number of domains of the data (the config passes ``data_info.num_domains``); domain ids must lie in
        ``0..num_domains-1``. ``None`` (default): the domains are not told apart in the test metrics.
    refit_on_test : bool or None
        Test-time adaptation before testing (Kobler et al., NeurIPS 2022, Sec. 3.3): re-estimate norm statistics
        on the unlabeled test data with :func:`manifoldnorm.nn.refit_domain_norms`. ``None`` (default): refit the
        domain-aware norms, one target domain at a time, if the model has any; ``True``: refit every refittable
        norm on all test data at once (error if there is none); ``False``: never. Anything else (e.g. the text
        ``"maybe"`` from a config override) raises a TypeError at construction.

    Raises
    ------
    TypeError, ValueError
        At construction, for an option of the wrong type or out of range; the message names the option.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val/loss",
        refit_on_test: bool | None = None,
        num_domains: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        num_classes = check_int(num_classes, "num_classes", "ClassificationModule", low=2)
        check_module_options("ClassificationModule", optimizer, scheduler, scheduler_interval, scheduler_monitor)
        check_bool(refit_on_test, "refit_on_test", "ClassificationModule", allow_none=True)
        if num_domains is not None:
            num_domains = check_int(num_domains, "num_domains", "ClassificationModule", low=1)
        if refit_on_test is True and not refittable_norms(model):
            raise ValueError("refit_on_test=True but the model has no refittable norm layer "
                             "(e.g. norm=spddsmbn, liebn_aim); use refit_on_test=null to refit only when possible")
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.train_metrics = _metrics(num_classes, "train/")
        self.val_metrics = _metrics(num_classes, "val/")
        self.test_metrics = _metrics(num_classes, "test/")
        self.test_confusion = DomainConfusion(num_classes, num_domains or 1)
        #: the test confusion counts ``(D, K, K)`` of the last test epoch (CPU), ``None`` before any
        self.last_test_confusion: Tensor | None = None
        self._epoch_loss = EpochMean()

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        return self.model(x, domain=domain)

    def _step(self, batch: tuple[Tensor, Tensor, Tensor], stage: str, metrics: EpochAccuracy) -> Tensor:
        x, y, domain = batch
        logits = self.model(x, domain=domain)
        loss = F.cross_entropy(logits, y)
        if not self.__dict__.get("_nonfinite_rerun"):  # the guard's diagnostic re-run counts nothing
            metrics.update(logits.detach(), y)
            self._epoch_loss.add(stage, loss, int(y.shape[0]))
            if stage == "test":
                self.test_confusion.update(logits.detach().argmax(-1), y,
                                           domain if self.hparams.num_domains is not None else None)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        with numerical_errors(self, batch, batch_idx):  # a diverged layer: one NonFiniteError line
            return self._step(batch, "train", self.train_metrics)

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val", self.val_metrics)

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "test", self.test_metrics)

    # ----------------------------------------------------------------- per-epoch logging
    def _log_epoch(self, stage: str, metrics: EpochAccuracy) -> None:
        """Log ``<stage>/loss`` and the stage's metrics once, from what the steps accumulated; then reset both."""
        loss = self._epoch_loss.pop(stage)
        if loss is None:  # no batch in this epoch (e.g. limit_val_batches=0)
            metrics.reset()
            return
        log = functools.partial(self.log_dict, on_step=False, on_epoch=True, batch_size=1)
        log({f"{stage}/loss": loss}, prog_bar=stage != "test")
        # torchmetrics' compute() already reduces over the processes: the values are equal on every rank, so
        # sync_dist (a mean of equal values, exact) changes nothing but tells Lightning they are global
        log(metrics.compute(), prog_bar=stage == "val", sync_dist=True)
        metrics.reset()

    def _start_epoch(self, stage: str, metrics: EpochAccuracy) -> None:
        self._epoch_loss.pop(stage)  # whatever an interrupted epoch left
        metrics.reset()

    def on_train_epoch_start(self) -> None:
        self._start_epoch("train", self.train_metrics)

    def on_validation_epoch_start(self) -> None:
        self._start_epoch("val", self.val_metrics)

    def on_test_epoch_start(self) -> None:
        self._start_epoch("test", self.test_metrics)
        self.test_confusion.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train", self.train_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_metrics)
        self._log_test_domains()

    def _log_test_domains(self) -> None:
        """Keep the test confusion counts; log the accuracy and balanced accuracy of every domain tested."""
        counts = self.test_confusion.compute().detach()  # summed over the processes
        self.test_confusion.reset()
        self.last_test_confusion = counts.cpu()
        if (self.hparams.num_domains or 1) < 2:
            return
        tested = [d for d in range(counts.shape[0]) if int(counts[d].sum()) > 0]
        if not tested:
            return
        acc, bacc = accuracy(counts[tested]).tolist(), balanced_accuracy(counts[tested]).tolist()
        values = {f"test/acc/domain={d}": a for d, a in zip(tested, acc, strict=True)}
        values.update({f"test/bacc/domain={d}": b for d, b in zip(tested, bacc, strict=True)})
        self.log_dict(values, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)

    def predict_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, domain = batch[0], batch[-1]
        return self.model(x, domain=domain).argmax(-1)

    # ----------------------------------------------------------------- test-time adaptation
    def on_test_start(self) -> None:
        mode = self.hparams.refit_on_test
        if mode is False:
            return
        domain_only = mode is None
        if not refittable_norms(self.model, domain_aware_only=domain_only):
            return
        loaders = self.trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        xs, ds = [], []
        for loader in loaders:
            for x, _, domain in loader:  # labels are not used
                xs.append(x)
                ds.append(domain)
        x_all = torch.cat(xs).to(self.device)
        d_all = torch.cat(ds).to(self.device)
        if domain_only:
            for dom in torch.unique(d_all).tolist():
                mask = d_all == dom
                refit_domain_norms(self.model, x_all[mask], d_all[mask], domain_aware_only=True)
        else:
            refit_domain_norms(self.model, x_all, d_all)
