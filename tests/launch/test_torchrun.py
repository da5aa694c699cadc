"""Multi-process training for real on CPU (gloo): Lightning-launched DDP, and torchrun with two "nodes".

Each run trains a tiny ``spd_eeg`` in fresh processes and checks that the processes formed one world of size 2,
wrote into one run directory and created a single W&B run (from global rank 0).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "+experiment=spd_eeg", "logger=wandb", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null", "trainer.enable_model_summary=false", "data.source_kwargs.n_subjects=2",
    "data.source_kwargs.trials_per_class=8", "data.batch_size=8",
]
MEMBER = re.compile(r"GLOBAL_RANK: (\d), MEMBER: \d/(\d)")


def clean_env(cache: Path) -> dict[str, str]:
    prefixes = ("HYDRA_", "WANDB_", "SLURM_", "TORCHELASTIC_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                "GROUP_RANK", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(MANIFOLDNORM_CACHE=str(cache), WANDB_SILENT="true", OMP_NUM_THREADS="1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def check_one_run(run_dir: Path, output: str) -> None:
    ranks = {(int(r), int(w)) for r, w in MEMBER.findall(output)}
    assert ranks == {(0, 2), (1, 2)}, output[-3000:]  # both processes, world size 2
    assert output.count(f"run directory: {run_dir}") == 2
    assert len(re.findall(r"test/bacc(?!/)", output)) == 2  # not the per-domain metrics
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1  # W&B from rank 0 only


def test_ddp_cpu_lightning_launches_the_second_process(cache: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "launch/train.py", *TINY, "trainer=ddp_cpu", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, env=clean_env(cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_one_run(tmp_path, proc.stdout + proc.stderr)
    assert (tmp_path / "train_ddp_process_1.log").is_file()  # the child was handed the same run directory


def test_torchrun_two_nodes_on_one_machine(cache: Path, tmp_path: Path) -> None:
    port, run_id = free_port(), f"torchrun-test-{os.getpid()}"
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               f"--rdzv-id={run_id}", "launch/train.py", *TINY, "trainer=ddp_cpu", "trainer.devices=1",
               "trainer.num_nodes=2", f"paths.log_dir={tmp_path}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=clean_env(cache), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    # each "node" ran one process; the rendezvous id keys the run directory of both
    for out in outputs:
        assert len(MEMBER.findall(out)) == 1
    check_one_run(tmp_path / "spd_eeg" / run_id, "".join(outputs))
