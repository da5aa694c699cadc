"""Cluster configuration without a cluster: trainer geometry from SLURM, run directories, W&B ids, sbatch."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig

from manifoldnorm.lit import run
from manifoldnorm.lit.requeue import SLURMRequeue, slurm_job_id

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_NTASKS", "SLURM_CLUSTER_NAME",
              "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "TORCHELASTIC_RUN_ID")


@pytest.fixture
def cfg_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for var in SLURM_VARS:
        monkeypatch.delenv(var, raising=False)

    def make(*overrides: str, hydra: bool = False) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides],
                           return_hydra_config=hydra)

    return make


def test_ddp_trainers_take_their_geometry_from_slurm(cfg_of, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu = cfg_of("trainer=ddp_cpu").trainer, cfg_of("trainer=ddp").trainer
    assert (cpu.devices, cpu.num_nodes, cpu.accelerator) == (2, 1, "cpu")
    assert cpu.strategy.process_group_backend == "gloo"
    assert (gpu.devices, gpu.num_nodes, gpu.accelerator) == ("auto", 1, "gpu")
    assert gpu.strategy.process_group_backend == "nccl"
    single = cfg_of("trainer=gpu").trainer
    assert (single.devices, single.accelerator) == (1, "gpu") and "strategy" not in single
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "3")
    monkeypatch.setenv("SLURM_NNODES", "4")
    for name in ("ddp_cpu", "ddp"):
        trainer = cfg_of(f"trainer={name}").trainer
        assert (trainer.devices, trainer.num_nodes) == (3, 4)  # ints, as Lightning's validation compares them
    assert cfg_of("trainer=ddp_cpu", "trainer.devices=1").trainer.devices == 1


def test_ddp_cpu_trainer_builds(cfg_of) -> None:
    trainer = run.build_trainer(cfg_of("trainer=ddp_cpu"), [], [])
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2
    assert trainer.strategy._process_group_backend == "gloo" and trainer.max_epochs == 30
    assert isinstance(trainer.strategy.cluster_environment, LightningEnvironment)
    assert not any(isinstance(cb, SLURMRequeue) for cb in trainer.callbacks)  # outside SLURM


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_trainers_build(cfg_of) -> None:
    assert run.build_trainer(cfg_of("trainer=gpu"), [], []).num_devices == 1
    assert isinstance(run.build_trainer(cfg_of("trainer=ddp"), [], []).strategy, DDPStrategy)


def test_run_dirs_agree_between_processes(cfg_of, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfg_of("+experiment=spd_eeg", hydra=True)
    assert re.fullmatch(r"outputs/spd_eeg/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", cfg.hydra.run.dir)
    assert re.fullmatch(r"outputs/spd_eeg/multirun/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", cfg.hydra.sweep.dir)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "exp7")
    assert cfg_of("+experiment=spd_eeg", hydra=True).hydra.run.dir == "outputs/spd_eeg/exp7"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = cfg_of("+experiment=spd_eeg", "paths.log_dir=/runs", hydra=True)
    assert cfg.hydra.run.dir == "/runs/spd_eeg/4242"
    # sweeps: the start time of the sweep command, which Hydra hands to every job (submitit jobs included)
    assert "4242" not in cfg.hydra.sweep.dir


def test_wandb_run_id_from_the_slurm_job(cfg_of, monkeypatch: pytest.MonkeyPatch) -> None:
    (fresh,) = run.build_loggers(cfg_of("logger=wandb"))
    assert isinstance(fresh, WandbLogger) and fresh._wandb_init.get("id") is None
    assert fresh._wandb_init["resume"] == "allow"
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "local")
    assert run.slurm_run_id() == "local-77"
    (job,) = run.build_loggers(cfg_of("logger=wandb"))
    assert job._wandb_init["id"] == "local-77" and job.version == "local-77"
    (chosen,) = run.build_loggers(cfg_of("logger=wandb", "logger.wandb.id=mine"))
    assert chosen._wandb_init["id"] == "mine"


def test_requeue_job_id_of_array_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in SLURM_VARS:
        monkeypatch.delenv(var, raising=False)
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "120")
    assert slurm_job_id() == "120"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "118")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert slurm_job_id() == "118_2"  # what scontrol requeue takes; SLURM_JOB_ID (120) keys the run dir


def test_scripts_parse() -> None:
    for script in ("train.sbatch", "local_cluster.sh"):
        path = ROOT / "launch" / "slurm" / script
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    header = (ROOT / "launch" / "slurm" / "train.sbatch").read_text()
    for directive in ("--ntasks-per-node=", "--requeue", "--signal=USR1@", "--open-mode=append"):
        assert f"#SBATCH {directive}" in header
    launcher = (CONF / "hydra" / "launcher" / "submitit_slurm.yaml").read_text()
    assert "signal: USR1@" in launcher
