"""The GPU trainer configs, exercised on CPU: ``trainer=gpu`` and ``trainer=ddp`` with only the accelerator (and
the collective backend, NCCL -> gloo) swapped, so everything else they set (strategy, geometry from the
environment, precision defaults) runs for real without CUDA."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from manifoldnorm.lit import run

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("_torchrun_tests", Path(__file__).resolve().parent / "test_torchrun.py")
_torchrun = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_torchrun)
TINY, check_one_run, clean_env = _torchrun.TINY, _torchrun.check_one_run, _torchrun.clean_env

ON_CPU = {"gpu": ["trainer.accelerator=cpu"],
          "ddp": ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy.process_group_backend=gloo"]}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("name", ["gpu", "ddp"])
def test_gpu_configs_build_with_the_accelerator_swapped(name: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra import compose, initialize_config_dir

    for var in ("SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_JOB_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"trainer={name}", f"paths.output_dir={tmp_path}", *ON_CPU[name]])
    trainer = run.build_trainer(cfg, [], [])
    expected = SingleDeviceStrategy if name == "gpu" else DDPStrategy
    assert isinstance(trainer.strategy, expected)
    assert trainer.num_devices == (1 if name == "gpu" else 2)


def test_ddp_config_trains_two_processes_on_cpu(cache: Path, tmp_path: Path) -> None:
    """``trainer=ddp`` as on a GPU node, with gloo on CPU: Lightning starts the second process, one world of 2."""
    proc = subprocess.run([sys.executable, "launch/train.py", *TINY, "trainer=ddp", *ON_CPU["ddp"],
                           "sync_norm=true", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, env=clean_env(cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_one_run(tmp_path, proc.stdout + proc.stderr)
    synced = "batch statistics synchronized across processes: 1 norm layer(s) (DomainLieBatchNorm)"
    # sync_norm=true converted the model in both processes (the second one logs to its own file)
    assert synced in proc.stdout + proc.stderr and synced in (tmp_path / "train_ddp_process_1.log").read_text()
