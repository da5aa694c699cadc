"""Norm and optimizer diagnostics during training, every few steps: :class:`NormMonitor`.

Enabled from the command line with ``monitor=norms`` (``conf/monitor/norms.yaml``); every logged quantity, its
definition and the commands are listed in ``docs/monitoring.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn

from manifoldnorm.nn.diagnostics import NormRecorder
from manifoldnorm.optim.finite import grad_norm

__all__ = ["NormMonitor", "param_group_names"]

log = logging.getLogger(__name__)

HISTOGRAM_BINS = 64


def param_group_names(optimizer: torch.optim.Optimizer) -> list[str]:
    """A readable, unique name per parameter group of ``optimizer``, in ``param_groups`` order.

    A group's own ``"name"`` entry (a non-empty string) if it has one; for a
    :class:`~manifoldnorm.optim.CompositeOptimizer` the sub-optimizer's name (``manifold``, ``matrix``, ``rest``,
    ...), with ``.<j>`` when it holds several groups; otherwise ``group<i>``.
    """
    opt = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the optimizer
    groups = opt.param_groups
    names = [f"group{i}" for i in range(len(groups))]
    subs = getattr(opt, "optimizers", None)
    if isinstance(subs, Mapping):
        sub_names = [key if len(sub.param_groups) == 1 else f"{key}.{j}"
                     for key, sub in subs.items() for j in range(len(sub.param_groups))]
        if len(sub_names) == len(groups):
            names = sub_names
    names = [g["name"] if isinstance(g.get("name"), str) and g["name"] else n for g, n in zip(groups, names,
                                                                                              strict=True)]
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            names[i] = f"{n}.{i}"
        seen[n] = i
    return names


def _floats(values: Mapping[str, Tensor]) -> dict[str, float]:
    """0-d tensors to floats, one host transfer per device."""
    if not values:
        return {}
    keys = list(values)
    flat = torch.stack([values[k].detach().to(torch.float64).reshape(()).cpu() for k in keys]).tolist()
    return dict(zip(keys, flat, strict=True))


class NormMonitor(pl.Callback):
    r"""Log diagnostics of every norm layer and every optimizer parameter group, every ``every_n_steps`` steps.

    On a logging step (training step ``k`` with ``k % every_n_steps == 0``, counted like Lightning's own step
    metrics, so the first step is logged), a :class:`~manifoldnorm.nn.diagnostics.NormRecorder` hooks the norm
    layers for that one training forward only; the hooks are removed at the end of the batch, so the other steps
    run without them. Everything is computed under ``torch.no_grad`` in float64 from the tensors the layers see.
    Logged, ``<layer>`` being the module path in the model (e.g. ``stages.0.norm``):

    * per Riemannian norm (SPD and Lie group batch norms, domain-specific ones included):
      ``monitor/<layer>/<key>`` for the keys of :func:`~manifoldnorm.nn.diagnostics.riemannian_norm_stats`
      (``batch_var``, ``running_var``, ``dist_mean_bias``, ``dist_mean_identity``, ``bias_dist_identity``,
      ``shift_mean``/``min``/``max``, ``eig_min_in``, ``eig_max_in``, ``cond_in`` and ``*_out``), and with a W&B
      logger the histograms ``monitor/<layer>/log10_eig_in`` and ``log10_eig_out`` of the base-10 logarithms of
      the input and output eigenvalues;
    * per Euclidean norm (torch's batch/layer/group/RMS norms and the registered Euclidean norms):
      ``monitor/<layer>/rms_in`` and ``rms_out``;
    * per optimizer parameter group (:func:`param_group_names`): ``monitor/optim/<group>/grad_norm``, the
      2-norm of the group's gradients before clipping (at ``on_before_optimizer_step``); ``update_rms``,
      :math:`\sqrt{\sum\|\theta_{t+1}-\theta_t\|^2 / \#\theta}`, the root mean square of the change the optimizer
      step made to the group's parameters (weight decay, momentum and Riemannian retractions included; the
      difference of the stored tensors, i.e. the chordal change for manifold parameters); and ``update_rel``,
      :math:`\|\theta_{t+1}-\theta_t\| / \|\theta_t\|` over the group.

    Scalars go to every logger of the trainer (``log_metrics`` at the trainer's logging step, so CSV and W&B
    agree); histograms only to W&B loggers. In a multi-process run only global rank 0 records (its own part of
    the batch). Without a logger the monitor stays off.

    Parameters
    ----------
    every_n_steps : int
        Logging period in training steps (optimizer steps; >= 1).
    histograms : bool
        Log the eigenvalue histograms to W&B loggers.
    optimizer : bool
        Log the parameter-group diagnostics (one copy of the parameters is kept during a logging step).
    prefix : str
        First component of every metric name.

    Raises
    ------
    ValueError
        At construction, for an option out of range; the message names it.
    """

    def __init__(self, every_n_steps: int = 50, histograms: bool = True, optimizer: bool = True,
                 prefix: str = "monitor") -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"NormMonitor: every_n_steps must be an int >= 1, got {every_n_steps!r}; "
                             f"e.g. callbacks.norm_monitor.every_n_steps=50")
        for name, value in (("histograms", histograms), ("optimizer", optimizer)):
            if not isinstance(value, bool):
                raise ValueError(f"NormMonitor: {name} must be true or false, got {value!r}")
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ValueError(f"NormMonitor: prefix must be a non-empty name without a trailing '/', got {prefix!r}")
        self.every_n_steps, self.histograms, self.optimizer, self.prefix = every_n_steps, histograms, optimizer, prefix
        self.recorder: NormRecorder | None = None
        self._active = False
        self._last_step: int | None = None
        self._pending: int | None = None  # the step whose optimizer update is awaited
        self._optim: dict[str, Any] | None = None  # grad norms and parameter copies of that step

    # ----------------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _root(pl_module: pl.LightningModule) -> nn.Module:
        model = getattr(pl_module, "model", None)
        return model if isinstance(model, nn.Module) else pl_module

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = bool(trainer.loggers) and trainer.global_rank == 0
        if not trainer.loggers:
            log.warning("NormMonitor: the run has no logger, nothing will be recorded (set logger=csv or wandb)")
        want_eig = self.histograms and any(isinstance(lg, WandbLogger) for lg in trainer.loggers)
        self.recorder = NormRecorder(self._root(pl_module), eigenvalues=want_eig)
        if not self.recorder.layers:
            log.info("NormMonitor: %s has no norm layer; logging the optimizer diagnostics only",
                     type(self._root(pl_module)).__name__)

    @staticmethod
    def _step(trainer: pl.Trainer) -> int:
        """The trainer's logging step (what Lightning's step metrics and the LR monitor use)."""
        return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))

    # ----------------------------------------------------------------------------------------------- training
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = self._step(trainer)
        if self._pending is not None and step != self._pending:  # that step made no optimizer step (e.g. skipped)
            self._pending, self._optim = None, None
        if not self._active or self.recorder is None or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        self.recorder.start()
        if self.optimizer:
            self._pending, self._optim = step, None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._pending is None or self._optim is not None:
            return
        opt = getattr(optimizer, "_optimizer", optimizer)
        groups = [list(g["params"]) for g in opt.param_groups]
        with torch.no_grad():
            self._optim = {
                "names": param_group_names(opt),
                "params": groups,
                "before": [[p.detach().clone() for p in ps] for ps in groups],
                "grad_norm": [grad_norm(ps) for ps in groups],
            }

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        scalars: dict[str, Tensor] = {}
        hists: dict[str, Tensor] = {}
        step = self._last_step
        if self.recorder is not None and self.recorder.recording:
            for layer, stats in self.recorder.stop().items():
                scalars.update({f"{self.prefix}/{layer}/{k}": v for k, v in stats.items()})
            for layer, eig in self.recorder.eigenvalues.items():
                hists.update({f"{self.prefix}/{layer}/log10_eig_{side}": lam for side, lam in eig.items()})
            self.recorder.eigenvalues = {}
        if self._optim is not None:
            step = self._pending
            scalars.update(self._optimizer_stats(self._optim))
            self._pending, self._optim = None, None
        if (scalars or hists) and step is not None:
            self._log(trainer, _floats(scalars), hists, step)

    @torch.no_grad()
    def _optimizer_stats(self, snap: dict[str, Any]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, params, before, gnorm in zip(snap["names"], snap["params"], snap["before"], snap["grad_norm"],
                                               strict=True):
            if not params:
                continue
            dev = before[0].device
            d2 = torch.zeros((), dtype=torch.float64, device=dev)
            p2 = torch.zeros((), dtype=torch.float64, device=dev)
            count = 0
            for p, p0 in zip(params, before, strict=True):
                b = p0.to(torch.float64)
                d2 = d2 + (p.detach().to(torch.float64) - b).square().sum().to(dev)
                p2 = p2 + b.square().sum().to(dev)
                count += p0.numel()
            base = f"{self.prefix}/optim/{name}"
            out[f"{base}/grad_norm"] = gnorm.to(torch.float64)
            out[f"{base}/update_rms"] = (d2 / max(count, 1)).sqrt()
            out[f"{base}/update_rel"] = d2.sqrt() / p2.sqrt() if float(p2) > 0 else torch.tensor(math.nan)
        return out

    def _log(self, trainer: pl.Trainer, scalars: dict[str, float], hists: dict[str, Tensor], step: int) -> None:
        wandb_hists: dict[str, Any] = {}
        if hists and self.histograms and any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
            import wandb

            for key, lam in hists.items():
                lam = lam[lam > 0]
                if lam.numel():
                    wandb_hists[key] = wandb.Histogram(torch.log10(lam).numpy(), num_bins=HISTOGRAM_BINS)
        for logger in trainer.loggers:
            payload: dict[str, Any] = dict(scalars)
            if isinstance(logger, WandbLogger):
                payload.update(wandb_hists)
            if payload:
                logger.log_metrics(payload, step=step)

    # ----------------------------------------------------------------------------------------------- clean-up
    def _detach(self) -> None:
        if self.recorder is not None:
            self.recorder.stop()
        self._pending, self._optim = None, None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()

    def __repr__(self) -> str:
        return (f"NormMonitor(every_n_steps={self.every_n_steps}, histograms={self.histograms}, "
                f"optimizer={self.optimizer}, prefix={self.prefix!r})")
