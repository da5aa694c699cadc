"""A resumed run reports the same best score and tests the same best weights as the uninterrupted run, also when
the best epoch came before the interruption.

``launch/train.py`` in fresh processes (tiny ``spd_eeg``, 4 epochs of 6 steps, deterministic; the validation
balanced accuracy is 0.3125, 0.3125, 0.375, 0.3125, so the best epoch is the third): an uninterrupted run; the same
run killed with SIGKILL in the first step of the fourth epoch (its ``last.ckpt`` is from the end of the third);
the killed run resumed with ``ckpt_path=<run>/checkpoints/last.ckpt``. Before the fix the resume opened a new run
directory, Lightning's ``ModelCheckpoint`` dropped its best score, and the run reported and tested the last epoch.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from manifoldnorm.lit.checkpoint import AtomicCheckpointIO, CarryBestCheckpoint

ROOT = Path(__file__).resolve().parents[2]
CALLBACKS = ROOT / "tests" / "lit"  # _resume_callbacks.KillAt, importable by the runs
KILL = 19  # 48 training trials / batch 8 = 6 steps an epoch: the first step of epoch 3 (0-based)
OVERRIDES = [
    "+experiment=spd_eeg", "data.source_kwargs.n_subjects=2", "data.source_kwargs.trials_per_class=8",
    "data.batch_size=8", "model.dims=[6]", "optimizer.manifold.lr=0.3", "optimizer.rest.lr=0.3",
    "trainer.max_epochs=4", "trainer.deterministic=true", "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null", "trainer.enable_model_summary=false", "logger=none",
]


def launch(cache: Path, *overrides: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "WANDB_", "SLURM_", "TORCHELASTIC"))}
    env.update(MANIFOLDNORM_CACHE=str(cache), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(CALLBACKS), env.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "launch/train.py", *OVERRIDES, *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def result(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out = proc.communicate(timeout=600)[0]
    finally:
        proc.kill()
    return proc.returncode, out


def metrics(output: str) -> dict[str, float]:
    """The table ``launch/train.py`` prints (``run.format_metrics``)."""
    return {m[1]: float(m[2]) for m in re.finditer(r"^([a-z_]+/[\w/]+)\s+(-?[\d.]+|nan|inf)$", output, re.M)}


def run_dir(output: str) -> Path:
    return Path(re.search(r"^run directory: (.+)$", output, re.M)[1])


def loaded_checkpoint(output: str) -> str:
    return Path(re.search(r"Loaded model weights from the checkpoint at (\S+)", output)[1]).name


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("resume_best")
    full = launch(tmp / "cache", f"paths.log_dir={tmp / 'full'}")
    killed = launch(tmp / "cache", f"paths.log_dir={tmp / 'killed'}",
                    "+callbacks.kill._target_=_resume_callbacks.KillAt", f"+callbacks.kill.step={KILL}")
    code, full_out = result(full)
    assert code == 0, full_out[-3000:]
    code, killed_out = result(killed)
    assert code == -9, killed_out[-3000:]
    (killed_dir,) = (tmp / "killed" / "spd_eeg").iterdir()
    shutil.copytree(killed_dir, tmp / "pristine")  # the run as the kill left it (the tests resume it)
    return {"tmp": tmp, "full": full_out, "killed": killed_dir}


def test_best_epoch_precedes_the_interruption(runs: dict) -> None:
    """The precondition that makes the other tests bite: the best epoch is before the kill, and the epochs after
    it are worse (a run that forgot the best would report another score)."""
    assert loaded_checkpoint(runs["full"]) == "best-epoch002.ckpt"
    assert sorted(p.name for p in (runs["killed"] / "checkpoints").iterdir()) == ["best-epoch002.ckpt", "last.ckpt"]


def test_resume_in_the_original_run_dir_keeps_best(runs: dict) -> None:
    killed = runs["killed"]
    code, out = result(launch(runs["tmp"] / "cache", f"paths.log_dir={runs['tmp'] / 'killed'}",
                              f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}"))
    assert code == 0, out[-3000:]
    assert run_dir(out) == killed  # continued in the directory of the checkpoint, no new one
    assert [p.name for p in (runs["tmp"] / "killed" / "spd_eeg").iterdir()] == [killed.name]
    assert "dirpath has changed" not in out
    reference, resumed = metrics(runs["full"]), metrics(out)
    assert "best/val/bacc" in reference and "test/bacc" in reference
    for key in ("best/val/bacc", "test/acc", "test/bacc", "test/loss"):
        assert resumed[key] == reference[key], (key, resumed[key], reference[key])
    assert loaded_checkpoint(out) == "best-epoch002.ckpt"


@pytest.mark.slow
def test_resume_of_a_moved_run_dir_keeps_best(runs: dict) -> None:
    """The killed run directory moved elsewhere (copied to another machine, renamed) and resumed from there: it
    continues in its new place, the best score is carried over and its best paths follow the move."""
    killed = runs["killed"]
    moved = runs["tmp"] / "moved" / killed.name
    shutil.copytree(runs["tmp"] / "pristine", moved)
    shutil.rmtree(killed)  # the checkpoint's own paths point here
    code, out = result(launch(runs["tmp"] / "cache", f"paths.log_dir={runs['tmp'] / 'elsewhere'}",
                              f"ckpt_path={moved / 'checkpoints' / 'last.ckpt'}"))
    assert code == 0, out[-3000:]
    assert run_dir(out) == moved and "is carried over" in out
    reference, resumed = metrics(runs["full"]), metrics(out)
    for key in ("best/val/bacc", "test/acc", "test/bacc", "test/loss"):
        assert resumed[key] == reference[key], (key, resumed[key], reference[key])
    assert re.search(rf"Loaded model weights from the checkpoint at {re.escape(str(moved))}\S*best-epoch002", out)


class Tiny(pl.LightningModule):
    """Validation loss 3, 1, 2, 4, 5 in epochs 0-4: the best epoch is the second."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", [3.0, 1.0, 2.0, 4.0, 5.0][self.current_epoch])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=4)

    val_dataloader = train_dataloader


def tiny_fit(root: Path, epochs: int, ckpt_path: Path | None = None, carry: bool = True) -> ModelCheckpoint:
    best = ModelCheckpoint(dirpath=root / "checkpoints", filename="best-{epoch}", monitor="val/loss", mode="min")
    last = ModelCheckpoint(dirpath=root / "checkpoints", filename="last", enable_version_counter=False)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=root, callbacks=[best, last, *([CarryBestCheckpoint()] if carry else [])],
                         plugins=[AtomicCheckpointIO()])
    trainer.fit(Tiny(), ckpt_path=ckpt_path)
    return best


@pytest.mark.parametrize("carry", [True, False])
def test_resume_in_another_dir_carries_best(carry: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Resumed in another directory (``hydra.run.dir=...`` or a library user's trainer): with
    ``CarryBestCheckpoint`` (every ``build_trainer`` trainer has it) the best score and path of the original run
    are kept, the original best file is neither copied nor deleted; without it Lightning drops them."""
    tiny_fit(tmp_path / "a", epochs=3)
    original_best = tmp_path / "a" / "checkpoints" / "best-epoch=1.ckpt"
    assert original_best.is_file()
    with caplog.at_level(logging.WARNING, logger="manifoldnorm.lit.checkpoint"):
        best = tiny_fit(tmp_path / "b", epochs=5, ckpt_path=tmp_path / "a" / "checkpoints" / "last.ckpt", carry=carry)
    if not carry:  # Lightning alone: the best of the epochs after the resume
        assert float(best.best_model_score) == 4.0
        return
    assert float(best.best_model_score) == 1.0 and best.best_model_path == str(original_best)
    assert original_best.is_file() and not list((tmp_path / "b" / "checkpoints").glob("best-*"))
    assert any("is carried over" in r.getMessage() and "val/loss=1.0000" in r.getMessage() for r in caplog.records)


def test_a_resume_keeps_the_config_of_the_earlier_launch(tmp_path: Path) -> None:
    """The resumed launch writes its config into the original run directory; a different earlier config is kept as
    ``config_resolved.prev1.yaml`` (before: overwritten, so the options of the first epochs were lost)."""
    from omegaconf import OmegaConf

    from manifoldnorm.lit import run as run_helpers

    first = OmegaConf.create({"seed": 0, "optimizer": {"lr": 0.01}, "ckpt_path": None})
    run_helpers.save_config(first, [], tmp_path)
    run_helpers.save_config(first, [], tmp_path)  # a requeued job: the same config, nothing to keep
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config_resolved.yaml"]
    resumed = OmegaConf.create({"seed": 0, "optimizer": {"lr": 0.001}, "ckpt_path": "x/last.ckpt"})
    run_helpers.save_config(resumed, [], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config_resolved.prev1.yaml", "config_resolved.yaml"]
    assert OmegaConf.load(tmp_path / "config_resolved.prev1.yaml").optimizer.lr == 0.01
    assert OmegaConf.load(tmp_path / "config_resolved.yaml").optimizer.lr == 0.001
    run_helpers.save_config(first, [], tmp_path)
    assert OmegaConf.load(tmp_path / "config_resolved.prev2.yaml").optimizer.lr == 0.001
