"""Building blocks of the training entry point: instantiate from a composed config, fit, test, report.

The entry point (``launch/train.py``) composes the Hydra config and calls these helpers; nothing here reads
a config file. Errors a user can cause through the config (unknown names, invalid values) are raised as
:class:`ConfigError` with the original message, without Hydra's instantiation wrapper.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from manifoldnorm.lit.checkpoint import AtomicCheckpointIO, CarryBestCheckpoint, CheckpointError, verify_checkpoint
from manifoldnorm.lit.loggers import slurm_run_id
from manifoldnorm.lit.requeue import SLURMRequeue

__all__ = [
    "ConfigError",
    "config_errors",
    "set_threads",
    "build_datamodule",
    "build_module",
    "build_callbacks",
    "build_loggers",
    "slurm_run_id",
    "build_trainer",
    "save_config",
    "fit_and_test",
    "check_resume_checkpoint",
    "CheckpointError",
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


def set_threads(threads: Any) -> None:
    """Set this process's intra-op CPU threads (``torch.set_num_threads``) from the config key ``threads``.

    ``None`` keeps torch's default (the ``OMP_NUM_THREADS`` of the environment, else the number of cores). A tiny
    model (an SPDNet on 22x22 covariances, batches of 32) runs hundreds of small kernels per step; waking a second
    thread for each costs more than it gives (``docs/benchmarks.md``, flagship), hence ``threads: 1`` in its
    experiment. Results can differ in the last bits from another thread count (reductions are split differently).
    """
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"invalid configuration in 'threads': expected a positive int or null, got {threads!r}")
    import torch

    torch.set_num_threads(threads)
    log.info("torch intra-op threads: %d", threads)


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
    """Instantiate ``cfg.model`` and wrap it in ``cfg.module``; build its optimizer, so that unknown optimizer
    names or arguments fail here, not at the start of ``fit`` (the trainer then uses that optimizer)."""
    with config_errors("model/norm"):
        model = instantiate(cfg.model)
    with config_errors("module/optimizer/scheduler"):
        module = instantiate(cfg.module, model=model)
        if callable(getattr(module, "build_optimizer", None)):
            module.build_optimizer()
    return module


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """Instantiate every non-null entry of ``cfg.callbacks``."""
    callbacks: list[Callback] = []
    with config_errors("callbacks"):
        for key, node in (cfg.get("callbacks") or {}).items():
            if node is None:
                continue
            cb = instantiate(node)
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks.{key} built a {type(cb).__name__}, not a Lightning Callback")
            callbacks.append(cb)
    return callbacks


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """Instantiate every non-null entry of ``cfg.logger``.

    Each logger config carries what its object needs: ``conf/logger/wandb.yaml`` builds
    :class:`manifoldnorm.lit.loggers.WandbLogger`, which takes its run id from the SLURM job and keeps an
    offline run off the network.
    """
    loggers: list[Logger] = []
    with config_errors("logger"):
        for key, node in (cfg.get("logger") or {}).items():
            if node is None:
                continue
            lg = instantiate(node)
            if not isinstance(lg, Logger):
                raise TypeError(f"logger.{key} built a {type(lg).__name__}, not a Lightning Logger")
            loggers.append(lg)
    return loggers


def build_trainer(cfg: DictConfig, callbacks: list[Callback], loggers: list[Logger]) -> pl.Trainer:
    """Instantiate ``cfg.trainer`` with the callbacks and loggers.

    ``cfg.trainer.plugins`` names the trainer's plugins like ``cfg.callbacks`` names callbacks (a mapping of
    name -> node; a null entry is dropped; a list, or a single node with ``_target_``, is accepted too). The
    trainer configs declare :class:`~manifoldnorm.lit.checkpoint.AtomicCheckpointIO` (atomic writes, verified
    loads) and the :class:`~manifoldnorm.lit.sync.RiemannianSyncBatchNorm` plugin, switched by the top-level
    ``sync_norm`` (a plugin whose ``enabled`` is false is left out). A trainer config without a ``CheckpointIO``
    still gets ``AtomicCheckpointIO``. Inside a SLURM job a :class:`~manifoldnorm.lit.requeue.SLURMRequeue`
    callback is added unless one is configured: SIGUSR1 checkpoints the run at a step all processes agree on
    and requeues the job. A :class:`~manifoldnorm.lit.checkpoint.CarryBestCheckpoint` keeps the best
    checkpoint of a run resumed in another directory.
    """
    if SLURMEnvironment.detect() and not any(isinstance(cb, SLURMRequeue) for cb in callbacks):
        callbacks = [*callbacks, SLURMRequeue()]
    if not any(isinstance(cb, CarryBestCheckpoint) for cb in callbacks):
        callbacks = [*callbacks, CarryBestCheckpoint()]
    configured = cfg.trainer.get("plugins") or []
    if isinstance(configured, Mapping):
        configured = [configured] if "_target_" in configured else list(configured.values())
    with config_errors("trainer.plugins"):
        plugins = [instantiate(p) for p in configured if p is not None]
    plugins = [p for p in plugins if getattr(p, "enabled", True) is not False]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    with config_errors("trainer"):
        node = OmegaConf.to_container(cfg.trainer, resolve=True)
        assert isinstance(node, dict)
        node.pop("plugins", None)  # built above
        return instantiate(node, callbacks=callbacks, logger=loggers or False, plugins=plugins)


def save_config(cfg: DictConfig, loggers: list[Logger], output_dir: str | Path) -> dict[str, Any]:
    """Write the fully resolved config to ``<output_dir>/config_resolved.yaml`` and log it as hyperparameters.

    Written by the process of global rank 0 only, atomically. A resume continues in the run directory of its
    checkpoint: when that directory holds a different ``config_resolved.yaml`` (the resume changed an option, or
    added ``ckpt_path``), the earlier one is kept as ``config_resolved.prev<k>.yaml`` (k = 1, 2, ...), so the config
    the first epochs ran with is never lost.
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        path, text = out / "config_resolved.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved))
        if path.is_file() and path.read_text() != text:
            keep = next(out / f"config_resolved.prev{k}.yaml" for k in itertools.count(1)
                        if not (out / f"config_resolved.prev{k}.yaml").exists())
            path.rename(keep)
            log.info("%s held the config of an earlier launch of this run: kept as %s", path, keep.name)
        tmp = out / f".config_resolved.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, path)
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
    metrics, as floats. A damaged ``ckpt_path`` is refused before fitting (:class:`CheckpointError`); resuming
    in the directory the checkpoint was written in restores the best score and best checkpoint in full, and
    elsewhere the trainer's ``CarryBestCheckpoint`` carries them over (see ``docs/resume.md``).
    """
    if ckpt_path is not None and not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
        check_resume_checkpoint(ckpt_path)  # AtomicCheckpointIO checks it on loading
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


def check_resume_checkpoint(ckpt_path: str | os.PathLike) -> None:
    """Refuse a missing or damaged resume checkpoint with one line (:class:`CheckpointError`).

    Lightning's keywords (``"last"``, ``"best"``, ``"hpc"``, ``"registry"``) pass; a file is verified by
    :func:`~manifoldnorm.lit.checkpoint.verify_checkpoint` (the zip CRC-32 of every record).
    """
    if str(ckpt_path) in ("last", "best", "hpc", "registry"):
        return
    if not Path(ckpt_path).exists():
        raise CheckpointError(f"ckpt_path={ckpt_path}: no such file (working directory {os.getcwd()})")
    verify_checkpoint(ckpt_path)


def format_metrics(metrics: Mapping[str, float]) -> str:
    """A two-column text table of the metrics, sorted by name."""
    if not metrics:
        return "(no metrics)"
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in sorted(metrics.items())]
    return "\n".join(lines)
