"""Callbacks the exact-resume tests inject into ``launch/train.py`` runs (importable from a subprocess)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


def read_steps(path: str | Path) -> dict[int, dict]:
    """The records a :class:`LossLog` wrote, by step; each step must appear exactly once."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    by_step = {r.pop("step"): r for r in records}
    assert len(by_step) == len(records), f"a step was logged twice in {path}"
    return by_step


class LossLog(Callback):
    """Append step, epoch, batch index, loss and lrs (float.hex) and a digest of the global torch random state of
    every training step to a JSON-lines file (``<path>.<rank>`` for each process of a multi-process run)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        lrs = [g["lr"] for opt in trainer.optimizers for g in opt.param_groups]
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch, "batch": batch_idx,
                  "loss": float(loss.detach()).hex(), "lr": [float(lr).hex() for lr in lrs],
                  "rng": hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()}
        path = self.path if trainer.world_size == 1 else f"{self.path}.{trainer.global_rank}"
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


class KillAt(Callback):
    """SIGKILL this process after training step ``step`` (no cleanup, no checkpoint: a crash)."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
