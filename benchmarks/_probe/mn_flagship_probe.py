"""A callback that records when a training run reaches its milestones, for ``benchmarks/flagship.py``.

Standalone on purpose (it imports nothing from ``manifoldnorm`` or ``benchmarks``): the flagship suite puts this
folder on the ``PYTHONPATH`` of runs of *any* checkout, older ones included, and injects the callback with Hydra
overrides::

    +callbacks.first_step._target_=mn_flagship_probe.FirstStepTimer +callbacks.first_step.out=<file.json>

It writes, at the end of fitting and again at the end of testing, the wall-clock time (``time.time()``) of the
milestones and the seconds since the process started (from ``/proc/self/stat`` on Linux, else since this module
was imported): ``fit_start``, ``first_step_start``, ``first_step_end``, ``train_end``, ``test_start``,
``test_end``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

_IMPORTED = time.time()


def process_start_time() -> float:
    """``time.time()`` at which this process started (Linux: ``/proc``; elsewhere: when this module was imported)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat(5): start time in clock ticks after boot
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED


class FirstStepTimer(Callback):
    """Record the milestones of a run (see the module docstring) into the JSON file ``out``."""

    def __init__(self, out: str) -> None:
        self.out = str(out)
        self.start = process_start_time()
        self.events: dict[str, float] = {}

    def _mark(self, name: str) -> None:
        self.events.setdefault(name, time.time())

    def _write(self) -> None:
        report = {"process_start": self.start, "pid": os.getpid(), "events": self.events,
                  "since_process_start": {k: v - self.start for k, v in self.events.items()}}
        path = Path(self.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, path)

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._mark("fit_start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._mark("first_step_start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self._mark("first_step_end")

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._mark("train_end")
        self._write()

    def on_test_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._mark("test_start")

    def on_test_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._mark("test_end")
        self._write()
