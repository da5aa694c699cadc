"""The LR monitor of the default callbacks records a schedule when there is one and is silent otherwise."""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from manifoldnorm.lit import ClassificationModule
from manifoldnorm.lit.callbacks import LearningRateMonitor


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x, domain=None):  # noqa: ANN001, ANN201
        return self.fc(x)


def _fit(tmp_path: Path, scheduler, logger) -> list[str]:  # noqa: ANN001
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.arange(16) % 2
    data = DataLoader(TensorDataset(x, y, torch.zeros(16, dtype=torch.long)), batch_size=8)
    module = ClassificationModule(_Linear(), 2, scheduler=scheduler)
    trainer = pl.Trainer(max_epochs=2, logger=logger, callbacks=[LearningRateMonitor(logging_interval="epoch")],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(module, data, data)
    if not logger:
        return []
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        return [k for k in next(csv.reader(fh)) if k.startswith("lr-")]


@pytest.mark.parametrize("with_logger", [False, True])
def test_quiet_without_scheduler_or_logger(tmp_path: Path, with_logger: bool) -> None:
    logger = CSVLogger(tmp_path, name="csv") if with_logger else False
    assert _fit(tmp_path, None, logger) == []  # Lightning's own monitor raises without a logger


def test_records_the_schedule(tmp_path: Path) -> None:
    sched = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    assert _fit(tmp_path, sched, CSVLogger(tmp_path, name="csv")) == ["lr-CompositeOptimizer"]
