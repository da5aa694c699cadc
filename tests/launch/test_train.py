"""launch/train.py end to end in subprocesses: sweep, checkpoints, saved config, resume, W&B offline, errors."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "trainer=cpu", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
    "trainer.enable_model_summary=false", "data.source_kwargs.n_subjects=2", "data.source_kwargs.trials_per_class=8",
    "data.batch_size=16", "model.dims=[6]",
]


def train(*overrides: str, cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "WANDB_", "SLURM_"))}
    env["MANIFOLDNORM_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "launch/train.py", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("sweep")
    proc = train("-m", "norm=liebn_aim,liebn_lem", "logger=csv", *TINY, f"hydra.sweep.dir={out}", cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


def test_sweep_prints_metrics_saves_checkpoints_and_config(sweep) -> None:
    proc, out = sweep
    assert len(re.findall(r"test/bacc(?!/)", proc.stdout)) == 2 and proc.stdout.count("best/val/bacc") == 2
    for job, metric in (("0", "aim"), ("1", "lem")):
        run_dir = out / job
        ckpts = run_dir / "checkpoints"
        assert (ckpts / "last.ckpt").is_file() and len(list(ckpts.glob("best-epoch*.ckpt"))) == 1
        assert torch.load(ckpts / "last.ckpt", weights_only=False)["epoch"] == 1  # end of the 2nd epoch
        assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / ".hydra" / "overrides.yaml").is_file()
        resolved = OmegaConf.load(run_dir / "config_resolved.yaml")
        assert resolved.norm.metric == metric and resolved.model.norm_layer.metric == metric
        assert resolved.data_info.n_channels == 22 and resolved.model.in_dim == 22
        metrics = (run_dir / "csv" / "version_0" / "metrics.csv").read_text()
        assert "test/bacc" in metrics.splitlines()[0] and "val/bacc" in metrics.splitlines()[0]
        hparams = OmegaConf.load(run_dir / "csv" / "version_0" / "hparams.yaml")
        assert hparams.data_info.num_classes == 4 and hparams.norm.metric == metric


def test_resume_from_last_checkpoint(sweep, cache: Path, tmp_path: Path) -> None:
    _, out = sweep
    last = out / "0" / "checkpoints" / "last.ckpt"
    proc = train("logger=csv", *TINY, "trainer.max_epochs=3", f"ckpt_path={last}", f"hydra.run.dir={tmp_path}",
                 cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {last}" in proc.stdout + proc.stderr
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 2
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    train_epochs = {r.split(",")[0] for r in rows[1:] if r.split(",")[header.index("train/loss")]}
    assert train_epochs == {"2"}  # only the third epoch was trained
    assert "test/bacc" in proc.stdout


def test_wandb_offline_run(cache: Path, tmp_path: Path) -> None:
    proc = train("logger=wandb", *TINY, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}", cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test/bacc" in proc.stdout
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (record,) = runs[0].glob("run-*.wandb")
    blob = record.read_bytes()
    assert b"data_info" in blob and b"test/bacc" in blob  # resolved config and test metrics were logged


def test_unknown_group_option_lists_valid_options(cache: Path, tmp_path: Path) -> None:
    proc = train("norm=nonexistent", f"hydra.run.dir={tmp_path}", cache=cache)
    assert proc.returncode != 0
    assert "Could not find 'norm/nonexistent'" in proc.stderr
    assert "Available options in 'norm'" in proc.stderr
    assert all(name in proc.stderr for name in ("liebn_aim", "liebn_lcm", "spddsmbn", "none"))
    assert "Traceback" not in proc.stderr


def test_invalid_value_reports_our_error(cache: Path, tmp_path: Path) -> None:
    proc = train("norm.metric=foo", "logger=none", f"hydra.run.dir={tmp_path}", *TINY, cache=cache)
    assert proc.returncode != 0
    assert "unknown metric 'foo'; valid names: aim, lem, lcm" in proc.stderr
    assert "Traceback" not in proc.stderr and "InstantiationException" not in proc.stderr


EEG_EXPERIMENTS = ("spd_eeg", "tsm_eeg")  # lm_char, lm_corpus, cnn_digits: tests/launch/test_euclidean_experiments.py


def test_every_experiment_is_tested() -> None:
    assert {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")} == {*EEG_EXPERIMENTS, "spd_ts", "lm_char",
                                                                               "lm_corpus", "cnn_digits"}


@pytest.mark.skipif(importlib.util.find_spec("aeon") is None, reason="needs the ts extra (aeon's bundled archives)")
def test_spd_ts_runs_on_the_bundled_archive(cache: Path, tmp_path: Path) -> None:
    """One epoch of +experiment=spd_ts on aeon's BasicMotions: the files' split, 6x6 covariances, 4 classes."""
    quiet = [o for o in TINY[:5] if not o.startswith("trainer.max_epochs")]
    proc = train("+experiment=spd_ts", "logger=none", "trainer.max_epochs=1", *quiet, f"hydra.run.dir={tmp_path}",
                 cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test/bacc" in proc.stdout and "best/val/loss" in proc.stdout
    resolved = OmegaConf.load(tmp_path / "config_resolved.yaml")
    assert dict(resolved.data_info) == {"n_channels": 6, "n_times": 100, "num_classes": 4, "num_domains": 1}
    assert resolved.data.source == "ts" and resolved.model.in_dim == 6
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("experiment", EEG_EXPERIMENTS)
def test_every_experiment_runs_on_tiny_data(experiment: str, cache: Path, tmp_path: Path) -> None:
    tiny = [o for o in TINY if not o.startswith("model.")]
    proc = train(f"+experiment={experiment}", "logger=none", *tiny, f"hydra.run.dir={tmp_path}", cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test/bacc" in proc.stdout


@pytest.mark.parametrize(("preset", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_idle_openmp_threads_sleep_unless_told_otherwise(preset: str | None, expected: str) -> None:
    """launch/train.py sets OMP_WAIT_POLICY=PASSIVE before anything imports torch (whose OpenMP runtime reads it
    once, at start); an explicit setting is kept."""
    source = (ROOT / "launch" / "train.py").read_text()
    assert source.index('os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")') < source.index("import hydra")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset is not None:
        env["OMP_WAIT_POLICY"] = preset
    code = ("import os, runpy; runpy.run_path('launch/train.py', run_name='imported'); "
            "print(os.environ['OMP_WAIT_POLICY'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == expected
