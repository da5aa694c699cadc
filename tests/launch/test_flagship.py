"""The README's flagship command, run exactly as written (marker ``slow``: CI runs it in its own step)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_spd_eeg_flagship_beats_chance_and_writes_a_complete_run(tmp_path: Path) -> None:
    env = {**os.environ, "MANIFOLDNORM_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "+experiment=spd_eeg", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = dict(re.findall(r"^(\S+/\S+)\s+([0-9.]+)$", proc.stdout, flags=re.M))
    assert float(metrics["test/bacc"]) > 0.5, metrics  # chance is 0.25 (four balanced classes)
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert list((run_dir / "checkpoints").glob("best*.ckpt"))
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert list((run_dir / "wandb").glob("offline-run-*"))

    out = tmp_path / "baseline.json"
    subprocess.run(
        [sys.executable, "launch/baseline.py", "--experiment", "spd_eeg", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=True,
    )
    baseline = json.loads(out.read_text())["results"]
    assert baseline["cross_session"]["n_test"] > 0
