"""A stalled or killed rank ends a distributed job, with one line naming the ranks and the collective.

Real gloo process groups of 2 processes on this machine. The fast tests run the library's own collective (the
all-reduce of the synchronized norms, :class:`~manifoldnorm.distributed.ProcessGroupReducer`) in a loop and stop
(SIGSTOP) or kill (SIGKILL) one process; the slow ones do the same to a Lightning-launched ``trainer=ddp_cpu``
run of ``launch/train.py``.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from manifoldnorm.distributed.faults import CollectiveFailure, explain_collective_failure
from manifoldnorm.lit.ddp import DEFAULT_TIMEOUT_S, DDPStrategy

ROOT = Path(__file__).resolve().parents[2]

WORKER = """
import datetime, sys, time
from pathlib import Path
import torch, torch.distributed as dist
from manifoldnorm.distributed import ProcessGroupReducer
from manifoldnorm.distributed.faults import explain_collective_failure

rank, port, timeout, ready = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
timeout = datetime.timedelta(seconds=timeout)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timeout)
reducer = ProcessGroupReducer()
try:
    for step in range(10**9):
        reducer.sum(torch.ones(4))
        if step == 20:
            (ready / str(rank)).touch()
except RuntimeError as err:
    explain_collective_failure(err, timeout, hint="raise the timeout", wait_s=2.0)
    print(f"ERROR {err}", file=sys.stderr, flush=True)
    sys.exit(3)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    prefixes = ("HYDRA_", "WANDB_", "SLURM_", "TORCHELASTIC_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                "GROUP_RANK", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true", PYTHONPATH=str(ROOT), **extra)
    return env


def wait_for(predicate, timeout: float, what: str, procs=()) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            if p.poll() is not None:
                out = p.stdout.read() if p.stdout else ""
                raise AssertionError(f"a process ended before {what}: rc {p.returncode}\n{out[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.05)


def start_pair(tmp_path: Path, timeout_s: float) -> list[subprocess.Popen]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(port), str(timeout_s), str(tmp_path)],
                              env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    wait_for(lambda: (tmp_path / "0").exists() and (tmp_path / "1").exists(), 120, "collectives", procs)
    return procs


def end_after(proc: subprocess.Popen, limit: float) -> tuple[float, str]:
    """Seconds until ``proc`` ends (at most ``limit``), and its output."""
    t0 = time.monotonic()
    try:
        out = proc.communicate(timeout=limit)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0]
        raise AssertionError(f"still running {limit} s after the fault:\n{out[-3000:]}") from None
    return time.monotonic() - t0, out


def error_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("ERROR ")]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


@pytest.mark.parametrize("victim", [1, pytest.param(0, marks=pytest.mark.slow)])  # rank 0 hosts the store
def test_stalled_rank_ends_the_other_within_the_timeout(tmp_path: Path, victim: int) -> None:
    timeout = 3.0
    procs = start_pair(tmp_path, timeout)
    try:
        os.kill(procs[victim].pid, signal.SIGSTOP)
        took, out = end_after(procs[1 - victim], timeout + 15)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    print(f"rank {victim} stopped: rank {1 - victim} ended {took:.1f} s later (timeout {timeout:g} s)")
    assert procs[1 - victim].returncode == 3
    assert timeout - 0.5 < took < timeout + 10  # waited for the timeout (+ 2 s for the other's report), not more
    line = error_line(out)
    assert f"rank {1 - victim} of 2: all_reduce (manifoldnorm/nn/euclidean/sync_bn.py:" in line
    assert "timed out after 3 s" in line and "raise the timeout" in line
    if victim == 1:
        assert "rank 1 did not answer (stopped, hung, or slower than the timeout?)" in line
    else:  # the stopped process holds the store: nobody can be asked
        assert "store did not answer" in line


def test_killed_rank_ends_the_other_within_seconds(tmp_path: Path) -> None:
    timeout = 120.0  # far beyond the test's limit: the end must come from the closed connection
    procs = start_pair(tmp_path, timeout)
    try:
        os.kill(procs[1].pid, signal.SIGKILL)
        took, out = end_after(procs[0], 20)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    print(f"rank 1 killed: rank 0 ended {took:.1f} s later")
    assert took < 10
    line = error_line(out)
    assert "rank 0 of 2: all_reduce (manifoldnorm/nn/euclidean/sync_bn.py:" in line
    assert "failed: a connection to another rank closed; rank 1 did not answer (died?)" in line
    assert "raise the timeout" not in line  # no advice about the timeout for a dead process


def test_other_errors_are_left_alone() -> None:
    err = ValueError("bad shape")
    assert explain_collective_failure(err, wait_s=0) is None and err.args == ("bad shape",)
    err = RuntimeError("CUDA out of memory")
    assert explain_collective_failure(err, wait_s=0) is None and err.args == ("CUDA out of memory",)


def test_message_of_a_failure_without_process_group() -> None:
    failure = CollectiveFailure(None, None, "barrier", "x.py:3 in f", "timeout", "gloo: Timed out", None)
    assert failure.message(datetime.timedelta(seconds=7), "try y") == \
        "this process: barrier (x.py:3 in f) timed out after 7 s [gloo: Timed out]; try y"


# ------------------------------------------------------------------------------------- the Lightning strategy


def test_ddp_configs_time_out_in_minutes_not_half_an_hour() -> None:
    """``trainer=ddp_cpu`` / ``trainer=ddp`` build a strategy with the short timeout (torch: 30 minutes)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    for trainer in ("ddp_cpu", "ddp"):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"trainer={trainer}", "trainer.devices=2", "trainer.num_nodes=1"])
        strategy = instantiate(cfg.trainer.strategy)
        assert isinstance(strategy, DDPStrategy)
        assert strategy._timeout == datetime.timedelta(seconds=DEFAULT_TIMEOUT_S) <= datetime.timedelta(minutes=5)


def test_strategy_timeout_accepts_seconds_and_timedelta_and_refuses_nonsense() -> None:
    assert DDPStrategy(timeout=7)._timeout == datetime.timedelta(seconds=7)
    assert DDPStrategy(timeout=datetime.timedelta(minutes=2))._timeout == datetime.timedelta(seconds=120)
    assert DDPStrategy(timeout=None)._timeout is None  # torch's default
    with pytest.raises(ValueError, match="timeout must be positive"):
        DDPStrategy(timeout=0)
    with pytest.raises(ValueError, match="timeout must be positive"):
        DDPStrategy(timeout=float("nan"))
    with pytest.raises(TypeError, match="timeout must be a number of seconds"):
        DDPStrategy(timeout="5 minutes")


TINY = [
    "+experiment=spd_eeg", "logger=csv", "trainer=ddp_cpu", "trainer.max_epochs=1000",
    "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "trainer.enable_model_summary=false",
    "data.source_kwargs.n_subjects=2", "data.source_kwargs.trials_per_class=8", "data.batch_size=8",
]


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def fault_after_first_checkpoint(cmd: list[str], cache: Path, ckpts: Path, victim_of: Callable[[list[int]], int],
                                 sig: int, limit: float) -> tuple[float, str, int | None, list[int]]:
    """Start ``cmd``, wait for its first checkpoint (training is under way), send ``sig`` to the child process that
    ``victim_of(children)`` picks, and wait up to ``limit`` seconds for the launcher to end. Returns the seconds
    it took, its output, its return code and its child processes; the launcher and its children are killed after."""
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(MANIFOLDNORM_CACHE=str(cache)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kids: list[int] = []
    try:
        wait_for(lambda: ckpts.is_dir() and any(ckpts.iterdir()), 240, "first checkpoint", [launcher])
        kids = children(launcher.pid)
        os.kill(victim_of(kids), sig)
        took, out = end_after(launcher, limit)
    finally:
        launcher.kill()
        for pid in kids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    return took, out, launcher.returncode, kids


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["stop", "kill"])
def test_lightning_ddp_run_ends_when_a_rank_stalls_or_dies(tmp_path: Path, fault: str) -> None:
    """``launch/train.py trainer=ddp_cpu``: the second process (rank 1) is stopped or killed mid-training."""
    timeout = 5
    cmd = [sys.executable, "launch/train.py", *TINY, f"trainer.strategy.timeout={timeout}",
           f"hydra.run.dir={tmp_path / 'run'}"]

    def only_child(kids: list[int]) -> int:
        assert len(kids) == 1, kids  # Lightning started rank 1
        return kids[0]

    took, out, returncode, kids = fault_after_first_checkpoint(
        cmd, tmp_path / "cache", tmp_path / "run" / "checkpoints", only_child,
        signal.SIGSTOP if fault == "stop" else signal.SIGKILL, timeout + 40)
    print(f"rank 1 {fault}: the run ended {took:.1f} s later (timeout {timeout} s)")
    assert returncode != 0
    assert not any(alive(pid) for pid in kids)  # the stopped process was ended too
    # the error line (warnings of other processes may be interleaved after it, so search rather than index)
    ours = [ln for ln in out.splitlines() if ln.startswith("RuntimeError: rank 0 of 2: ")]
    if fault == "stop":
        assert ours, out[-3000:]
        assert timeout - 0.5 < took < timeout + 30, took
        assert f"timed out after {timeout} s; rank 1 did not answer" in ours[-1]
        assert "trainer.strategy.timeout=<seconds>" in ours[-1]
    else:
        assert took < 25, took
        # whichever notices first: rank 0's collective (our line), or Lightning's launcher, which watches the
        # processes it started and ends the job when one dies (its line names the rank and the signal)
        lightning = [ln for ln in out.splitlines()
                     if "[rank: 1] Child process" in ln and "terminated with code -9" in ln]
        assert lightning or any("failed: a connection to another rank closed; rank 1 did not answer (died?)" in ln
                                for ln in ours), out[-3000:]


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.slow
def test_torchrun_job_ends_when_a_rank_stalls(tmp_path: Path) -> None:
    """torchrun, one node x 2 processes: rank 1 stopped; rank 0 times out and torchrun ends the job (its
    SIGTERM waits 30 s on the stopped process, then SIGKILL)."""
    timeout, run_id = 5, f"stall-{os.getpid()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={run_id}", "launch/train.py", *TINY,
           "trainer.devices=2", "trainer.num_nodes=1", f"trainer.strategy.timeout={timeout}",
           f"paths.log_dir={tmp_path}"]

    def rank_1(workers: list[int]) -> int:
        victim = [pid for pid in workers if rank_of(pid) == 1]
        assert len(victim) == 1, (workers, [rank_of(p) for p in workers])
        return victim[0]

    took, out, returncode, workers = fault_after_first_checkpoint(
        cmd, tmp_path / "cache", tmp_path / "spd_eeg" / run_id / "checkpoints", rank_1, signal.SIGSTOP, timeout + 60)
    print(f"rank 1 stopped: torchrun ended {took:.1f} s later (timeout {timeout} s)")
    assert returncode != 0
    assert not any(alive(pid) for pid in workers)
    assert timeout - 0.5 < took < timeout + 50, took
    assert "rank 0 of 2: " in out and f"timed out after {timeout} s; rank 1 did not answer" in out, out[-3000:]
