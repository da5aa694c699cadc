"""Offline means offline: a training run with the W&B logger offline makes no network or DNS request.

A short ``launch/train.py`` run (W&B offline, the default logger) runs under ``strace -f``, which records every
``connect``/``sendto``/``sendmsg`` of the run's processes and threads (Python, the W&B service ``wandb-core``,
its system monitor, any subprocess) and every ``execve``. The run may talk over Unix sockets (the W&B service)
and loopback; it must not open or send to any other IPv4/IPv6 address, send anything to port 53 (DNS, also a
local resolver on loopback), or run ``git`` on a remote.

Unix-socket connects to ``/var/run/nscd/socket`` are allowed: glibc asks the name-service cache there for user and
group lookups too (the ones seen here come from ``getpwuid``). A host-name lookup through a running nscd would
be invisible in this trace, so the test skips where nscd runs; without it every host lookup shows up as DNS
traffic. Needs ``strace`` (CI: ``apt-get install -y strace``) and permission to trace child processes.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STRACE = shutil.which("strace")
NSCD_SOCKET = Path("/var/run/nscd/socket")
TINY = [
    "+experiment=spd_eeg", "logger=wandb", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1", "test=false", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
    "trainer.enable_model_summary=false", "data.source_kwargs.n_subjects=2", "data.source_kwargs.trials_per_class=8",
    "data.batch_size=8",
]
# an IPv4 / IPv6 socket address in strace's notation
INET = re.compile(r'sa_family=AF_INET6?, sin6?_port=htons\((\d+)\),.*?'
                  r'(?:inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)")')
GIT = re.compile(r'execve\("[^"]*/git", \[([^\]]*)\]')


def _can_trace() -> bool:
    if STRACE is None:
        return False
    probe = subprocess.run([STRACE, "-f", "-o", os.devnull, "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


def network_requests(trace: str) -> list[str]:
    """The lines of an ``strace -f`` log that connect or send to a non-loopback address or to port 53."""
    bad = []
    for line in trace.splitlines():
        if not re.search(r"\b(connect|sendto|sendmsg)\(", line):
            continue
        for m in INET.finditer(line):
            port, addr = int(m.group(1)), m.group(2) or m.group(3)
            ip = ipaddress.ip_address(addr)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if port == 53 or not ip.is_loopback:
                bad.append(line.strip())
    return bad


def git_remote_calls(trace: str) -> list[str]:
    """The ``git`` commands of the trace that read or contact a remote."""
    return [m.group(0) for m in GIT.finditer(trace) if "remote" in m.group(1) or "fetch" in m.group(1)]


def test_the_parser_flags_dns_and_remote_addresses() -> None:
    """The checks below would see a lookup and a connection (lines as strace writes them)."""
    trace = "\n".join([
        '12 connect(9, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.255.255.53")}, 16) = 0',
        '12 connect(9, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("127.0.0.53")}, 16) = 0',
        '13 connect(5, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), '
        'inet_pton(AF_INET6, "2606:4700::6810:84e5", &sin6_addr), sin6_scope_id=0}, 28) = -1 EINPROGRESS',
        '14 connect(7, {sa_family=AF_INET, sin_port=htons(29500), sin_addr=inet_addr("127.0.0.1")}, 16) = 0',
        '15 connect(8, {sa_family=AF_UNIX, sun_path="/tmp/wandb-1-2-3/socket"}, 41) = 0',
        '16 execve("/usr/bin/git", ["git", "config", "--get", "remote.origin.url"], 0x7f /* 45 vars */) = 0',
        '17 execve("/usr/bin/git", ["git", "rev-parse", "--show-toplevel"], 0x7f /* 45 vars */) = 0',
    ])
    assert len(network_requests(trace)) == 3  # both DNS lines (also to a local resolver) and the HTTPS connect
    assert len(git_remote_calls(trace)) == 1


@pytest.mark.slow  # long: CI runs it in the bounded `-m slow` step
@pytest.mark.skipif(not _can_trace(), reason="needs strace and ptrace permission (CI: apt-get install -y strace)")
@pytest.mark.skipif(NSCD_SOCKET.exists(), reason="nscd runs here: host lookups through it are not visible to strace")
def test_offline_wandb_run_makes_no_network_request(tmp_path: Path) -> None:
    prefixes = ("HYDRA_", "WANDB_", "SLURM_", "TORCHELASTIC_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(MANIFOLDNORM_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", WANDB_SILENT="true")
    log = tmp_path / "strace.log"
    cmd = [STRACE, "-f", "-s", "200", "-e", "trace=connect,sendto,sendmsg,execve", "-o", str(log),
           sys.executable, "launch/train.py", *TINY, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1  # W&B did run, offline
    trace = log.read_text(errors="replace")
    assert "wandb-core" in trace  # the W&B service ran under the trace
    assert network_requests(trace) == []
    assert git_remote_calls(trace) == []
