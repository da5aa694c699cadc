"""Checkpoint and requeue a SLURM job on a signal, at a step all processes agree on."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

__all__ = ["SLURMRequeue", "slurm_job_id"]

log = logging.getLogger(__name__)


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for array tasks, else ``SLURM_JOB_ID``."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID") or None


class SLURMRequeue(Callback):
    """On ``signum`` (SIGUSR1 by default), save ``<default_root_dir>/hpc_ckpt_<n>.ckpt``, requeue, exit.

    SLURM delivers the signal (``#SBATCH --signal=USR1@<seconds>`` before the time limit, or
    ``scancel --signal=USR1 <job>``) to every process at a slightly different moment. The handler only records
    it; after each training batch the processes agree (one all-reduce of a flag) on whether any of them has
    received it, and then all of them save the checkpoint at that same step. Rank 0 finishes the W&B run (the
    restarted job resumes it: same id, see ``build_loggers``) and runs ``scontrol requeue``;
    when that succeeded every process exits (status 0) and SLURM starts the job again under the same job id.
    Lightning restores the newest ``hpc_ckpt_*.ckpt`` of ``default_root_dir`` by itself when a fit inside a
    SLURM job starts without ``ckpt_path``, so the run directory must be keyed on the job id (see
    ``conf/hydra/default.yaml``).

    Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) saves the checkpoint inside the signal
    handler, whose collective barrier can meet another process's gradient all-reduce and hang a multi-process
    job; it is not installed while this callback holds the signal. Outside SLURM the callback does nothing.

    Parameters
    ----------
    signum : int
        The requeue signal; must match the one SLURM sends (``--signal``).
    """

    def __init__(self, signum: int = signal.SIGUSR1) -> None:
        self.signum = signal.Signals(signum)
        self.received = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._installed or not isinstance(trainer._accelerator_connector.cluster_environment,
                                                               SLURMEnvironment):
            return
        self._previous = signal.signal(self.signum, self._handler)
        self._installed = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._installed:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._installed:
            return
        if not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        # the next free hpc_ckpt_<n>, as rank 0 sees it: a process that looked after rank 0 had written the file
        # would name the next number
        path = trainer.strategy.broadcast(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir),
                                          src=0)
        log.info("requeue signal %s: saving %s at step %d", self.signum.name, path, trainer.global_step)
        for logger in trainer.loggers:
            logger.save()
        trainer.save_checkpoint(path)  # every process: the strategy gathers and rank 0 writes
        # The requeue sends SIGTERM to every process of the job; Lightning's SIGTERM handler would start a
        # collective while the processes exit. Ignore it from here on: the processes leave by themselves.
        sigterm = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        requeued = False
        if trainer.is_global_zero:
            self._close_wandb(trainer)
            requeued = self._requeue()
        if trainer.strategy.broadcast(requeued, src=0):
            log.info("job requeued; exiting")
            raise SystemExit(0)
        signal.signal(signal.SIGTERM, sigterm)
        self.received = False  # requeue failed: keep training, the checkpoint stays for a manual restart

    @staticmethod
    def _close_wandb(trainer: pl.Trainer) -> None:
        """Finish the W&B run and stop W&B's service process before SLURM stops the job."""
        runs = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger) and lg._experiment is not None]
        if not runs:
            return
        import wandb

        for logger in runs:
            logger.experiment.finish()
        wandb.teardown()

    @staticmethod
    def _requeue() -> bool:
        job = slurm_job_id()
        if job is None:
            log.warning("no SLURM job id in the environment; not requeued")
            return False
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            log.warning("scontrol requeue %s failed: %s", job, err)
            return False
        if result.returncode != 0:
            log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
            return False
        log.info("requeued SLURM job %s", job)
        return True
