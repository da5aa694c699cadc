"""Lightning's DDP strategy with a short collective timeout and failed collectives explained in one line."""

from __future__ import annotations

import datetime
import logging
import signal
import time
from typing import Any

import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy as _LightningDDPStrategy
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

from manifoldnorm._dist import process_group_ready
from manifoldnorm.distributed.faults import explain_collective_failure

__all__ = ["DDPStrategy", "DEFAULT_JOIN_TIMEOUT_S", "DEFAULT_TIMEOUT_S"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_JOIN_TIMEOUT_S = 1800.0
_HINT = "if a step is legitimately slower, raise the timeout (trainer.strategy.timeout=<seconds>)"
_JOIN_HINT = "if the processes start further apart, raise trainer.strategy.join_timeout=<seconds>"


def _as_timedelta(timeout: float | datetime.timedelta | None) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        seconds = None if timeout is None else timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"DDPStrategy: timeout must be a number of seconds or a datetime.timedelta, got "
                        f"{type(timeout).__name__} {timeout!r}")
    if seconds is not None and not seconds > 0:  # also NaN
        raise ValueError(f"DDPStrategy: timeout must be positive (seconds), got {seconds!r}")
    return None if seconds is None else datetime.timedelta(seconds=seconds)


class DDPStrategy(_LightningDDPStrategy):
    """Lightning's ``DDPStrategy`` whose collectives give up after ``timeout`` and say which rank and collective.

    A process that stops taking part (stopped with SIGSTOP, hung, stuck in a long computation) makes the
    others wait in their next collective; torch's default timeout is 30 minutes. Here it is ``timeout``
    seconds (default 300, ``trainer.strategy.timeout`` in ``conf/trainer/ddp*.yaml``), after which every
    waiting process raises. A process that dies makes the others fail at once (its connections close).
    Either way the exception's message is replaced by one line from
    :func:`manifoldnorm.distributed.faults.explain_collective_failure`: the reporting rank, the collective
    and its caller, the ranks that did not answer, the backend's own text and, for a timeout, the key to
    raise. When started by Lightning itself (no torchrun or srun), the first process then ends the other
    processes it started (SIGKILL, which also ends a stopped process), after giving them the same few
    seconds to report; under torchrun or srun the launcher ends them (``srun --kill-on-bad-exit=1``).

    Parameters
    ----------
    timeout : float or datetime.timedelta or None
        Collective timeout, in seconds when a number; ``None``: torch's default (30 minutes).
    join_timeout : float or datetime.timedelta or None
        How long the processes wait for each other to start and form the process group (the rendezvous),
        default 1800 s: processes of a job may start minutes apart (nodes, containers, imports), which is not a
        stall. ``None``: ``timeout``. The collective ``timeout`` applies from the group's creation on.
    *args, **kwargs
        Passed to :class:`lightning.pytorch.strategies.DDPStrategy` (``process_group_backend``, ...).

    Notes
    -----
    The timeout also bounds waits that are not stalls: every process must reach each collective within
    ``timeout`` of the first, so a rank-0-only step that takes longer (saving a very large checkpoint on a
    slow file system) needs a longer timeout. NCCL enforces it through its watchdog, which ends the process.
    """

    def __init__(self, *args: Any, timeout: float | datetime.timedelta | None = DEFAULT_TIMEOUT_S,
                 join_timeout: float | datetime.timedelta | None = DEFAULT_JOIN_TIMEOUT_S, **kwargs: Any) -> None:
        super().__init__(*args, timeout=_as_timedelta(timeout), **kwargs)
        self._join_timeout = _as_timedelta(join_timeout) if join_timeout is not None else self._timeout

    def setup_distributed(self) -> None:
        """Form the process group waiting up to ``join_timeout``, then set its collective timeout."""
        existed = process_group_ready()  # a group created by the user keeps its timeout
        timeout, self._timeout = self._timeout, self._join_timeout
        try:
            super().setup_distributed()
        finally:
            self._timeout = timeout
        if existed or timeout is None or not (process_group_ready()):
            return
        set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
        if set_timeout is None or self._join_timeout == timeout:  # torch without it: the group keeps join_timeout
            if self._join_timeout != timeout:
                log.warning("this torch cannot change a process group's timeout: collectives time out after %g s",
                            self._join_timeout.total_seconds())
                self._timeout = self._join_timeout
            return
        set_timeout(timeout)
        log.info("collective timeout: %g s", timeout.total_seconds())

    @property
    def report_wait_s(self) -> float:
        """How long a failing process waits for the others' reports (2-10 s, a thirtieth of the timeout)."""
        timeout = self._timeout.total_seconds() if self._timeout is not None else 1800.0
        return min(10.0, max(2.0, timeout / 30))

    def on_exception(self, exception: BaseException) -> None:
        """Explain a failed collective in one line, then end the processes this one started."""
        super().on_exception(exception)
        formed = process_group_ready()
        try:
            explain_collective_failure(exception, self._timeout if formed else self._join_timeout,
                                       hint=_HINT if formed else _JOIN_HINT, wait_s=self.report_wait_s,
                                       rank=self.global_rank, world_size=self.world_size)
        finally:
            self._end_started_processes()

    def _end_started_processes(self) -> None:
        launcher = self.launcher
        if not isinstance(launcher, _SubprocessScriptLauncher) or not launcher.procs:
            return
        deadline = time.monotonic() + self.report_wait_s
        while any(p.poll() is None for p in launcher.procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = [p.pid for p in launcher.procs if p.poll() is None]
        if alive:
            log.error("ending the processes of the other ranks: pid %s", ", ".join(map(str, alive)))
            launcher.kill(signal.SIGKILL)
