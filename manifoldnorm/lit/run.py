"""Building blocks of the training entry point: instantiate from a composed config, fit, test, report.

The entry point (``launch/train.py``) composes the Hydra config and calls these helpers; nothing here reads
a config file. Errors a user can cause through the config (unknown names, invalid values) are raised as
:class:`ConfigError` with the original message, without Hydra's instantiation wrapper.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict

from manifoldnorm.lit.module import RunLengthUnknown
from manifoldnorm.lit.requeue import SLURMRequeue
from manifoldnorm.lit.sync import RiemannianSyncBatchNorm

__all__ = [
    "ConfigError",
    "config_errors",
    "build_datamodule",
    "build_module",
    "build_callbacks",
    "slurm_run_id",
    "build_loggers",
    "build_trainer",
    "save_config",
    "fit_and_test",
    "format_metrics",
]

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """An invalid configuration value, with the message of the component that rejected it."""


def _root_cause(err: BaseException) -> BaseException:
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


@contextlib.contextmanager
def config_errors(section: str) -> Iterator[None]:
    """Re-raise ``ValueError``/``TypeError`` (also wrapped by Hydra's instantiate) as :class:`ConfigError`."""
    try:
        yield
    except ConfigError:
        raise
    except (InstantiationException, ValueError, TypeError, FileNotFoundError, ImportError) as err:
        cause = _root_cause(err)
        if isinstance(cause, InstantiationException):  # e.g. an unknown _target_
            msg = str(cause).splitlines()[0]
        else:
            msg = f"{type(cause).__name__}: {cause}"
        raise ConfigError(f"invalid configuration in '{section}': {msg}") from err


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """Instantiate ``cfg.data``, prepare and set it up, and fill ``cfg.data_info`` from its :meth:`info`."""
    with config_errors("data"):
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        info = datamodule.info()
    with open_dict(cfg):
        cfg.data_info = info
    return datamodule


def build_module(cfg: DictConfig) -> pl.LightningModule:
    """Instantiate ``cfg.model`` and wrap it in ``cfg.module``; build the optimizer once to validate it."""
    with config_errors("model/norm"):
        model = instantiate(cfg.model)
    with config_errors("module/optimizer/scheduler"):
        module = instantiate(cfg.module, model=model)
        try:  # unknown optimizer names or arguments fail here, not mid-fit
            module.configure_optimizers()
        except RunLengthUnknown:  # the optimizer is built; the scheduler's length comes from the trainer in fit
            pass
    return module


def build_callbacks(cfg: DictConfig, has_logger: bool) -> list[Callback]:
    """Instantiate every non-null entry of ``cfg.callbacks``.

    A ``LearningRateMonitor`` is kept only when an LR scheduler is configured and a logger is present.
    """
    callbacks: list[Callback] = []
    with config_errors("callbacks"):
        for key, node in (cfg.get("callbacks") or {}).items():
            if node is None:
                continue
            cb = instantiate(node)
            if isinstance(cb, LearningRateMonitor) and (cfg.module.get("scheduler") is None or not has_logger):
                continue
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks.{key} built a {type(cb).__name__}, not a Lightning Callback")
            callbacks.append(cb)
    return callbacks


def slurm_run_id() -> str | None:
    """``<cluster>-<job id>`` inside a SLURM job, else ``None``: one id per job, kept when the job is requeued.

    Each task of an array job has its own ``SLURM_JOB_ID``, hence its own id.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    return f"{os.environ.get('SLURM_CLUSTER_NAME') or 'slurm'}-{job}"


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """Instantiate every non-null entry of ``cfg.logger``.

    A ``WandbLogger`` without an ``id`` gets :func:`slurm_run_id` inside a SLURM job, so that all processes
    and every requeued restart of the job write to one W&B run (``resume: allow`` in ``conf/logger/wandb.yaml``);
    outside SLURM W&B picks a fresh id. Only the process of global rank 0 creates the run.
    """
    loggers: list[Logger] = []
    with config_errors("logger"):
        for key, node in (cfg.get("logger") or {}).items():
            if node is None:
                continue
            extra = {}
            if str(node.get("_target_", "")).endswith("WandbLogger") and node.get("id") is None:
                if (run_id := slurm_run_id()) is not None:
                    extra["id"] = run_id
            lg = instantiate(node, **extra)
            if not isinstance(lg, Logger):
                raise TypeError(f"logger.{key} built a {type(lg).__name__}, not a Lightning Logger")
            loggers.append(lg)
    return loggers


def build_trainer(cfg: DictConfig, callbacks: list[Callback], loggers: list[Logger]) -> pl.Trainer:
    """Instantiate ``cfg.trainer`` with the callbacks and loggers.

    Inside a SLURM job a :class:`~manifoldnorm.lit.requeue.SLURMRequeue` callback is added unless one is
    configured: SIGUSR1 checkpoints the run at a step all processes agree on and requeues the job.
    ``sync_norm: true`` adds the :class:`~manifoldnorm.lit.sync.RiemannianSyncBatchNorm` plugin (batch
    statistics of every batch norm over all processes; nothing changes on a single process).
    """
    if SLURMEnvironment.detect() and not any(isinstance(cb, SLURMRequeue) for cb in callbacks):
        callbacks = [*callbacks, SLURMRequeue()]
    extra: dict[str, Any] = {}
    if cfg.get("sync_norm"):
        plugins = list(cfg.trainer.get("plugins") or [])
        extra["plugins"] = [*(instantiate(p) for p in plugins), RiemannianSyncBatchNorm()]
    with config_errors("trainer"):
        return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **extra)


def save_config(cfg: DictConfig, loggers: list[Logger], output_dir: str | Path) -> dict[str, Any]:
    """Write the fully resolved config to ``<output_dir>/config_resolved.yaml`` and log it as hyperparameters."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(resolved), out / "config_resolved.yaml")
    for lg in loggers:
        lg.log_hyperparams(resolved)
    return resolved


def _checkpoint(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The first checkpoint callback that monitors a metric (the "best" one), else the first one."""
    ckpts = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    monitored = [cb for cb in ckpts if cb.monitor]
    return (monitored or ckpts or [None])[0]


def fit_and_test(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    ckpt_path: str | None = None,
    test: bool = True,
) -> dict[str, float]:
    """Fit (resuming from ``ckpt_path`` if given), then test the best checkpoint if there is one.

    Returns the validation metrics of the last epoch, ``best/<monitor>`` (best checkpoint score) and the test
    metrics, as floats.
    """
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    ckpt = _checkpoint(trainer)
    best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    if ckpt is not None and ckpt.best_model_score is not None and ckpt.monitor:
        metrics[f"best/{ckpt.monitor}"] = float(ckpt.best_model_score)
    if test:
        if best is None:
            log.info("no best checkpoint: testing the weights of the last epoch")
        for results in trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False):
            metrics.update({k: float(v) for k, v in results.items()})
    return metrics


def format_metrics(metrics: Mapping[str, float]) -> str:
    """A two-column text table of the metrics, sorted by name."""
    if not metrics:
        return "(no metrics)"
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in sorted(metrics.items())]
    return "\n".join(lines)
