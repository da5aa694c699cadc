"""SLURM for real: launch/slurm/train.sbatch on a two-node cluster, and a requeue that resumes the run.

Needs Debian's slurm-client (sbatch) and a cluster with a two-node partition (``multi``, or
MANIFOLDNORM_SLURM_PARTITION); when none answers, ``launch/slurm/local_cluster.sh start`` starts the local one
(as root). Skipped only when sbatch is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(shutil.which("sbatch") is None,
                       reason="sbatch not installed (apt-get install slurmctld slurmd slurm-client munge)"),
]

ROOT = Path(__file__).resolve().parents[2]
PARTITION = os.environ.get("MANIFOLDNORM_SLURM_PARTITION", "multi")
TINY = [
    "+experiment=spd_eeg", "logger=wandb", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
    "trainer.enable_model_summary=false", "data.source_kwargs.n_subjects=2", "data.source_kwargs.trials_per_class=8",
    "data.batch_size=8",
]
STEPS_PER_EPOCH = 3  # 48 training trials / (2 processes x batch 8), drop_last
MEMBER = re.compile(r"GLOBAL_RANK: (\d), MEMBER: \d/(\d)")


def idle_nodes() -> int:
    out = subprocess.run(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %T"], capture_output=True, text=True)
    states = set(out.stdout.split("\n")) if out.returncode == 0 else set()
    return sum(1 for s in states if s.split(" ")[-1] in ("idle", "mixed"))


@pytest.fixture(scope="module")
def cluster() -> None:
    if idle_nodes() >= 2:
        return
    start = subprocess.run([str(ROOT / "launch" / "slurm" / "local_cluster.sh"), "start"], capture_output=True,
                           text=True, timeout=180)
    assert start.returncode == 0, f"no SLURM cluster and the local one did not start:\n{start.stderr}"
    assert idle_nodes() >= 2, subprocess.run(["sinfo"], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "WANDB_", "SLURM_", "SBATCH_"))}
    env.update(MANIFOLDNORM_CACHE=str(tmp_path_factory.mktemp("cache")), WANDB_SILENT="true",
               PYTHON=sys.executable)
    return env


def submit(tmp_path: Path, env: dict[str, str], *overrides: str) -> str:
    cmd = ["sbatch", "--parsable", f"--partition={PARTITION}", "--nodes=2", "--ntasks-per-node=1", "--time=5",
           f"--output={tmp_path}/slurm-%j.out", "launch/slurm/train.sbatch", *TINY, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env={**env, "LOG_DIR": str(tmp_path)}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def wait(job: str, timeout: float = 240) -> dict[str, str]:
    """Wait until the job has left the queue; its final ``scontrol show job`` fields."""
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job])
            pytest.fail(f"job {job} still queued after {timeout} s")
        time.sleep(1)
    show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", show))


def until(predicate, timeout: float = 120) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def test_two_node_training_job(cluster, env: dict[str, str], tmp_path: Path) -> None:
    job = submit(tmp_path, env, "trainer.max_epochs=2")
    info = wait(job)
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-4000:]
    assert {(int(r), int(w)) for r, w in MEMBER.findall(out)} == {(0, 2), (1, 2)}  # two nodes, one world
    run_dir = tmp_path / "spd_eeg" / job  # keyed on the job id, the same for both processes
    assert out.count(f"run directory: {run_dir}") == 2 and out.count("test/bacc") == 2
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")  # one W&B run, from rank 0
    assert wandb_run.name.endswith(f"-{job}")  # id <cluster>-<job id>


def test_requeue_resumes_from_the_saved_step(cluster, env: dict[str, str], tmp_path: Path) -> None:
    epochs = 25
    job = submit(tmp_path, env, f"trainer.max_epochs={epochs}")
    run_dir = tmp_path / "spd_eeg" / job
    until(lambda: (run_dir / "checkpoints" / "last.ckpt").is_file())  # the first epoch is done
    assert subprocess.run(["scancel", "--signal=USR1", job]).returncode == 0
    info = wait(job)
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-4000:]
    assert info["Restarts"] == "1" and f"job {job} (restart 1)" in out, out[-4000:]
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    saved = torch.load(hpc, weights_only=False)["global_step"]
    assert 0 < saved < epochs * STEPS_PER_EPOCH  # saved mid-training, at a step both processes agreed on
    assert len(re.findall(rf"saving {re.escape(str(hpc))} at step {saved}\b", out)) == 2
    assert f"Restored all states from the checkpoint at {hpc}" in out.split(f"job {job} (restart 1)")[1]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == epochs - 1 and last["global_step"] == epochs * STEPS_PER_EPOCH
    assert out.count("test/bacc") == 2  # tested once, after the restart
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(s.name.endswith(f"-{job}") for s in segments)  # one W&B run id
