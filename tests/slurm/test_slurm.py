"""SLURM for real: launch/slurm/train.sbatch on two nodes, a requeue that resumes the run, a submitit sweep.

Needs Debian's slurm-client (sbatch) and a cluster with a two-node partition (``multi``, or
MANIFOLDNORM_SLURM_PARTITION); when none answers, ``launch/slurm/local_cluster.sh start`` starts the local one
(as root). On a cluster of several machines set MANIFOLDNORM_SLURM_DIR to a directory that every node sees (the
default is pytest's temporary directory). Skipped only when sbatch is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
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
def cluster() -> str:
    """The cluster's name (``ClusterName``), after making sure two nodes of the partition are up."""
    if idle_nodes() < 2:
        start = subprocess.run([str(ROOT / "launch" / "slurm" / "local_cluster.sh"), "start"], capture_output=True,
                               text=True, timeout=180)
        assert start.returncode == 0, f"no SLURM cluster and the local one did not start:\n{start.stderr}"
        assert idle_nodes() >= 2, subprocess.run(["sinfo"], capture_output=True, text=True).stdout
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    return re.search(r"^ClusterName\s*=\s*(\S+)", config, re.M).group(1)


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """A fresh directory that the nodes see: under MANIFOLDNORM_SLURM_DIR if set, else pytest's tmp_path."""
    base = os.environ.get("MANIFOLDNORM_SLURM_DIR")
    return Path(tempfile.mkdtemp(prefix="slurm-test-", dir=base)) if base else tmp_path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The submitting environment (sbatch exports it to the job): this interpreter, no inherited launch state."""
    drop = ("HYDRA_", "WANDB_", "SLURM_", "SBATCH_", "SRUN_", "MASTER_", "TORCHELASTIC_", "RANK", "LOCAL_RANK",
            "WORLD_SIZE", "GROUP_RANK", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    base = os.environ.get("MANIFOLDNORM_SLURM_DIR")
    cache = tempfile.mkdtemp(prefix="slurm-cache-", dir=base) if base else tmp_path_factory.mktemp("cache")
    env.update(MANIFOLDNORM_CACHE=str(cache), WANDB_SILENT="true", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    return env


def submit(out_dir: Path, env: dict[str, str], *overrides: str) -> str:
    cmd = ["sbatch", "--parsable", f"--partition={PARTITION}", "--nodes=2", "--ntasks-per-node=1", "--time=5",
           f"--output={out_dir}/slurm-%j.out", "launch/slurm/train.sbatch", *TINY, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env={**env, "LOG_DIR": str(out_dir)}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def wait(job: str, timeout: float = 150) -> dict[str, str]:
    """Wait until the job has left the queue; its final ``scontrol show job`` fields."""
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job])
            pytest.fail(f"job {job} still queued after {timeout} s")
        time.sleep(1)
    show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", show))


def until(predicate, timeout: float = 90) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def test_two_node_training_job(cluster: str, env: dict[str, str], shared: Path) -> None:
    job = submit(shared, env, "trainer.max_epochs=2")
    info = wait(job)
    out = (shared / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-4000:]
    assert f"job {job} (restart 0): 2 node(s) x 1 task(s)" in out and f"; {sys.executable}\n" in out  # this python
    assert {(int(r), int(w)) for r, w in MEMBER.findall(out)} == {(0, 2), (1, 2)}  # two nodes, one world
    run_dir = shared / "spd_eeg" / job  # keyed on the job id, the same for both processes
    assert out.count(f"run directory: {run_dir}") == 2 and len(re.findall(r"test/bacc(?!/)", out)) == 2
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")  # one W&B run, from rank 0
    assert wandb_run.name.endswith(f"-{cluster}-{job}")  # id <cluster>-<job id>


def read_steps(path: Path) -> dict[int, dict]:
    """The per-step records of ``tests/lit/_resume_callbacks.LossLog`` (loaded by path: no sys.path change)."""
    spec = importlib.util.spec_from_file_location("_resume_callbacks", ROOT / "tests" / "lit" / "_resume_callbacks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.read_steps(path)


def test_requeue_resumes_from_the_saved_step(cluster: str, env: dict[str, str], shared: Path) -> None:
    """SIGUSR1 -> checkpoint at an agreed step -> requeue -> resume; every step after the resume equals an
    uninterrupted job run beside it (loss, lrs, batch, epoch, random state of each process, bit for bit)."""
    epochs = 30
    env = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "lit"), env.get("PYTHONPATH", "")])}
    exact = ["trainer.deterministic=true", "+callbacks.loss_log._target_=_resume_callbacks.LossLog",
             "+callbacks.loss_log.path=${paths.output_dir}/steps.jsonl", f"trainer.max_epochs={epochs}"]
    (shared / "reference").mkdir()
    reference_job = submit(shared / "reference", env, *exact)
    job = submit(shared, env, *exact)
    run_dir = shared / "spd_eeg" / job
    until(lambda: (run_dir / "checkpoints" / "last.ckpt").is_file())  # the first epoch is done
    assert subprocess.run(["scancel", "--signal=USR1", job]).returncode == 0
    info, reference_info = wait(job), wait(reference_job)
    assert reference_info["JobState"] == "COMPLETED" and reference_info["Restarts"] == "0"
    out = (shared / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-4000:]
    assert info["Restarts"] == "1" and f"job {job} (restart 1)" in out, out[-4000:]
    first, second = out.split(f"job {job} (restart 1)")
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    saved = torch.load(hpc, weights_only=False)["global_step"]
    assert 0 < saved < epochs * STEPS_PER_EPOCH  # saved mid-training, at a step both processes agreed on
    assert len(re.findall(rf"saving {re.escape(str(hpc))} at step {saved}\n", first)) == 2, first[-4000:]
    assert first.count("job requeued; exiting") == 2 and "test/bacc" not in first
    assert f"Restored all states from the checkpoint at {hpc}" in second
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == epochs - 1 and last["global_step"] == epochs * STEPS_PER_EPOCH
    assert len(re.findall(r"test/bacc(?!/)", second)) == 2  # tested once, after the restart
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))  # one offline segment per start, one run id
    assert len(segments) == 2 and all(s.name.endswith(f"-{cluster}-{job}") for s in segments)
    reference_dir = shared / "reference" / "spd_eeg" / reference_job
    for rank in (0, 1):
        resumed = read_steps(run_dir / f"steps.jsonl.{rank}")
        uninterrupted = read_steps(reference_dir / f"steps.jsonl.{rank}")
        assert sorted(resumed) == sorted(uninterrupted) == list(range(1, epochs * STEPS_PER_EPOCH + 1))
        for s in range(saved + 1, epochs * STEPS_PER_EPOCH + 1):
            assert resumed[s] == uninterrupted[s], (rank, s)


def test_submitit_sweep(cluster: str, env: dict[str, str], shared: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs hydra-submitit-launcher")
    norms = ("dsliebn_aim", "dsliebn_lem")
    cmd = [sys.executable, "launch/train.py", "-m", "hydra/launcher=submitit_slurm",
           f"hydra.launcher.partition={PARTITION}", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=5", f"paths.log_dir={shared}", *TINY,
           "trainer=ddp_cpu", "trainer.max_epochs=2", f"norm={','.join(norms)}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (sweep,) = (shared / "spd_eeg" / "multirun").iterdir()
    (script,) = (sweep / ".submitit").glob("*/*_submission.sh")  # one array job of two tasks
    header = script.read_text()
    assert "#SBATCH --array=0-1" in header and "#SBATCH --nodes=2" in header and "#SBATCH --ntasks-per-node=1" in header
    assert "#SBATCH --requeue" in header and "#SBATCH --signal=USR1@120" in header  # our requeue, not submitit's
    assert "srun --unbuffered" in header and f" {sys.executable} -u -m submitit" in header  # this python
    run_ids = set()
    for num, norm in enumerate(norms):
        job_dir = sweep / str(num)
        (task,) = (sweep / ".submitit").glob(f"*_{num}")  # <array job>_<task>: this point's logs and results
        logs = "".join(p.read_text() for p in sorted(task.glob("*_log.*")))
        assert {(int(r), int(w)) for r, w in MEMBER.findall(logs)} == {(0, 2), (1, 2)}, logs[-4000:]
        assert logs.count(f"run directory: {job_dir}") == 2
        results = [pickle.loads(p.read_bytes()) for p in sorted(task.glob("*_result.pkl"))]
        assert len(results) == 2 and all(status == "success" for status, _ in results)  # one per process
        assert all(f"norm={norm}" in ret.overrides and 0 <= ret.return_value <= 1 for _, ret in results)
        assert torch.load(job_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1
        (wandb_run,) = (job_dir / "wandb").glob("offline-run-*")  # from rank 0, id <cluster>-<job id of the task>
        run_id = re.search(rf"-{re.escape(cluster)}-(\d+)$", wandb_run.name)
        assert run_id is not None, wandb_run.name
        run_ids.add(run_id.group(1))
    assert len(run_ids) == 2  # each array task is its own SLURM job (own job id, own W&B run)
