"""The W&B logger of the runs: one run per SLURM job, and offline meaning no network at all."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

__all__ = ["WandbLogger", "slurm_run_id"]


def slurm_run_id() -> str | None:
    """``<cluster>-<job id>`` inside a SLURM job, else ``None``: one id per job, kept when the job is requeued.

    Each task of an array job has its own ``SLURM_JOB_ID``, hence its own id.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    return f"{os.environ.get('SLURM_CLUSTER_NAME') or 'slurm'}-{job}"


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` (every argument the same) with two defaults a cluster run needs.

    * Without an ``id``, inside a SLURM job the run id is :func:`slurm_run_id`, so that all processes and every
      requeued restart of the job write to one W&B run (with ``resume="allow"``, as in
      ``conf/logger/wandb.yaml``); outside SLURM W&B picks a fresh id. Only the process of global rank 0
      creates the run.
    * ``mode="offline"`` (or ``"dryrun"``) also sets ``WANDB_MODE=offline`` in the process environment: W&B
      builds its analytics exporter from the environment before ``wandb.init`` sees ``mode``, and would
      otherwise look up and contact its server (with the ``settings`` of ``conf/logger/wandb.yaml``, no request
      at all; ``tests/reliability/test_offline.py`` traces it).
    """

    def __init__(self, *args: Any, id: str | None = None, **kwargs: Any) -> None:  # noqa: A002 - W&B's name
        if id is None:
            id = slurm_run_id()  # noqa: A001
        if kwargs.get("mode") in ("offline", "dryrun"):
            os.environ["WANDB_MODE"] = "offline"
        super().__init__(*args, id=id, **kwargs)
