"""Failed collectives explained in one line: which rank, which collective, called from where, and which rank is silent.

A stalled process (stopped, hung, or stuck in a long computation) makes every other process wait in its next
collective until the process group's timeout; a process that died makes them fail at once. Either way the error
``torch.distributed`` raises names neither the collective nor a rank: gloo says ``Timed out waiting 300000ms for
recv operation to complete`` or ``Connection closed by peer [10.0.0.2]:41234``. :func:`explain_collective_failure`
turns such an error into one line::

    rank 0 of 2: all_reduce (manifoldnorm/nn/euclidean/sync_bn.py:30 in forward) timed out after 300 s; rank 1
    did not answer (stopped, hung, or slower than the timeout?) [gloo: Timed out waiting 300000ms for recv
    operation to complete]; a slow step needs a longer timeout: trainer.strategy.timeout=<seconds>

The silent ranks are found through the process group's key-value store: every process that reports a failure
leaves a key there and waits a few seconds for the others' keys. This is the only communication, it is bounded
in time, and it is skipped when the store does not answer.
"""

from __future__ import annotations

import datetime
import os
import re
import threading
import time
import traceback
from dataclasses import dataclass

import torch.distributed as dist

from manifoldnorm._dist import process_group_ready

__all__ = ["CollectiveFailure", "diagnose_collective_failure", "explain_collective_failure", "silent_ranks"]

# what gloo, NCCL and the c10d stores say (message fragments, lower case)
_TIMEOUT = ("timed out", "timeout", "deadline exceeded")
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
              "end of file", "socket closed", "ncclremoteerror", "pair closure")
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h)\:\d+\]\s*")  # "[/__w/pytorch/.../pair.cc:534] "
_KEY = "manifoldnorm/collective_failure/{}"
_EXPLAINED = "rank "  # an explained message starts with "rank <r> of <w>: "


@dataclass(frozen=True)
class CollectiveFailure:
    """What :func:`diagnose_collective_failure` found out about a failed collective.

    Attributes
    ----------
    rank, world_size : int or None
        The reporting process and the size of its default group (``None`` without a process group).
    collective : str
        The ``torch.distributed`` function (``all_reduce``, ``barrier``, ...), or where it ran when the Python
        traceback does not show it (``DistributedDataParallel gradient all-reduce (backward)``).
    caller : str or None
        ``file:line in function`` of the code that called the collective.
    kind : str
        ``"timeout"`` (a process did not take part in time) or ``"peer lost"`` (a connection closed: a process
        died or closed its group).
    detail : str
        The first line of the backend's message, without its C++ source location.
    silent : list of int or None
        Ranks that did not report a failure within the wait (``None``: not asked, or the store did not answer).
    store_silent : bool
        The process group's store did not answer: its host (rank 0, or torchrun's agent on the first node)
        is the stalled or dead process.
    """

    rank: int | None
    world_size: int | None
    collective: str
    caller: str | None
    kind: str
    detail: str
    silent: list[int] | None = None
    store_silent: bool = False

    def message(self, timeout: datetime.timedelta | None = None, hint: str | None = None) -> str:
        """The one-line explanation (see the module docstring)."""
        who = "this process" if self.rank is None else f"rank {self.rank} of {self.world_size}"
        where = f" ({self.caller})" if self.caller else ""
        if self.kind == "timeout":
            after = f" after {timeout.total_seconds():g} s" if timeout is not None else ""
            what = f"timed out{after}"
        else:
            what = "failed: a connection to another rank closed"
        if self.silent:
            names = ", ".join(str(r) for r in self.silent)
            cause = "died" if self.kind == "peer lost" else "stopped, hung, or slower than the timeout"
            who_silent = f"; rank {names} did not answer ({cause}?)" if len(self.silent) == 1 else \
                f"; ranks {names} did not answer ({cause}?)"
        elif self.silent is not None:
            who_silent = "; every other rank failed too"
        elif self.store_silent:
            who_silent = ("; the group's store did not answer either: its host (rank 0, or torchrun's agent on the "
                          "first node) is the stalled or dead process")
        else:
            who_silent = ""
        line = f"{who}: {self.collective}{where} {what}{who_silent} [{self.detail}]"
        if hint and self.kind == "timeout":
            line += f"; {hint}"
        return line


def _is_collective_error(err: BaseException) -> str | None:
    """``"timeout"``, ``"peer lost"`` or ``None`` (not a failed collective) from the exception type and text."""
    if not isinstance(err, RuntimeError):  # DistBackendError, DistNetworkError, DistStoreError are RuntimeErrors
        return None
    text = str(err).lower()
    head = text.split(":", 1)[0]
    if head == "this process" or (head.startswith(_EXPLAINED) and " of " in head):
        return None  # explained already
    dist_error = isinstance(err, getattr(dist, "DistError", ())) or "gloo" in text or "nccl" in text \
        or _SOURCE_PREFIX.match(str(err)) is not None or "pair closure" in text \
        or (process_group_ready() and "timed out waiting" in text)
    if not dist_error:
        return None
    if any(p in text for p in _PEER_LOST):
        return "peer lost" if "timeout caused pair closure" not in text else "timeout"
    if any(p in text for p in _TIMEOUT):
        return "timeout"
    return None


def _short(filename: str) -> str:
    """A path from its package root: ``.../site-packages/lightning/x.py`` -> ``lightning/x.py``."""
    parts = filename.replace(os.sep, "/").split("/")
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1:])
    for root in ("manifoldnorm", "launch", "tests"):
        if root in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(root):])
    return filename


def _locate(err: BaseException) -> tuple[str, str | None]:
    """The collective (outermost ``torch.distributed`` function of the traceback) and the frame that called it."""
    frames = traceback.extract_tb(err.__traceback__)

    def in_c10d(f: traceback.FrameSummary) -> bool:
        return f.filename.replace(os.sep, "/").endswith("torch/distributed/distributed_c10d.py")

    def in_torch_dist(f: traceback.FrameSummary) -> bool:
        return "/torch/distributed/" in f.filename.replace(os.sep, "/")

    for i, f in enumerate(frames):
        if in_c10d(f):
            callers = [f"{_short(g.filename)}:{g.lineno} in {g.name}" for g in frames[:i] if not in_torch_dist(g)]
            if len(callers) > 1 and callers[-1].startswith("lightning/pytorch/strategies/"):
                return f.name, f"{callers[-1]}, from {callers[-2]}"  # the strategy's wrapper, and who called it
            return f.name, callers[-1] if callers else None
    names = [f.filename.replace(os.sep, "/") for f in frames]
    ddp = [f for f, n in zip(frames, names, strict=True) if n.endswith("torch/nn/parallel/distributed.py")]
    if any(n.endswith(("torch/autograd/graph.py", "torch/autograd/__init__.py")) for n in names):
        return "the gradient all-reduce of the backward pass (DistributedDataParallel or a synchronized norm)", None
    if ddp:
        return f"DistributedDataParallel ({ddp[-1].name})", None
    return "a collective", None


def silent_ranks(wait_s: float = 5.0) -> list[int] | None:
    """Ranks of the default group that do not report a failed collective within ``wait_s`` seconds.

    Every process calling this leaves a key in the group's store, then waits for the keys of the others.
    Returns ``None`` without a process group or when the store does not answer within ``wait_s`` (its host
    may be the silent process). Meant for error paths only: it takes up to ``wait_s`` seconds (the store
    calls run in a daemon thread, as a stopped store host would block them beyond any store timeout).
    """
    if not (process_group_ready()):
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    result: list[list[int] | None] = [None]
    stop = threading.Event()

    def ask() -> None:
        try:
            store = dist.distributed_c10d._get_default_store()
            store.set(_KEY.format(rank), "1")
            pending = set(range(world)) - {rank}
            while pending and not stop.is_set():
                pending = {r for r in pending if not store.check([_KEY.format(r)])}
                if pending:
                    time.sleep(0.05)
            result[0] = sorted(pending)
        except Exception:  # noqa: BLE001 - the store is gone: no answer, not a second error
            result[0] = None

    thread = threading.Thread(target=ask, name="manifoldnorm-silent-ranks", daemon=True)
    thread.start()
    thread.join(wait_s)
    stop.set()
    thread.join(0.5)  # the last round of checks, if the store answers
    return None if thread.is_alive() else result[0]


def diagnose_collective_failure(
    err: BaseException,
    wait_s: float = 5.0,
    rank: int | None = None,
    world_size: int | None = None,
) -> CollectiveFailure | None:
    """Describe ``err`` if it is a failed ``torch.distributed`` collective (timeout or lost peer), else ``None``.

    Parameters
    ----------
    err : BaseException
        The exception, with its traceback (the collective and its caller are read from it).
    wait_s : float
        How long to wait for the other ranks' reports (:func:`silent_ranks`); ``0`` skips asking.
    rank, world_size : int, optional
        This process's rank and the world size, where the process group cannot tell (it failed to form);
        by default from the default process group, else from ``RANK``/``WORLD_SIZE``.
    """
    kind = _is_collective_error(err)
    if kind is None:
        return None
    collective, caller = _locate(err)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    detail = _SOURCE_PREFIX.sub("", first).split(". ")[0].rstrip(".")  # gloo appends advice after a full stop
    backend = None
    world = world_size
    if process_group_ready():
        rank, world = dist.get_rank(), dist.get_world_size()
        backend = str(dist.get_backend())
    elif rank is None and os.environ.get("RANK", "").isdigit():
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"]) if os.environ.get("WORLD_SIZE", "").isdigit() else None
    if backend and not detail.lower().startswith(backend):
        detail = f"{backend}: {detail}"
    silent = silent_ranks(wait_s) if wait_s > 0 else None
    store_silent = silent is None and wait_s > 0 and process_group_ready()
    return CollectiveFailure(rank, world, collective, caller, kind, detail, silent, store_silent)


def explain_collective_failure(
    err: BaseException,
    timeout: datetime.timedelta | None = None,
    hint: str | None = None,
    wait_s: float = 5.0,
    rank: int | None = None,
    world_size: int | None = None,
) -> str | None:
    """Replace the message of a failed collective's exception by one explaining line, and return that line.

    The exception keeps its type and traceback (``err.args`` is replaced, as Lightning's own DDP strategy does
    for its hints); the backend's text stays in the line. Anything else is left alone and ``None`` returned.

    Parameters
    ----------
    err : BaseException
        The exception raised by the collective (or by ``loss.backward()`` around DDP's gradient all-reduce).
    timeout : datetime.timedelta, optional
        The process group's timeout, quoted in the line.
    hint : str, optional
        What to try, appended to a timeout's line (e.g. the config key of the timeout).
    wait_s : float
        How long to wait for the other ranks' reports; ``0`` skips asking.
    rank, world_size : int, optional
        See :func:`diagnose_collective_failure`.
    """
    failure = diagnose_collective_failure(err, wait_s=wait_s, rank=rank, world_size=world_size)
    if failure is None:
        return None
    line = failure.message(timeout, hint)
    err.args = (line,)
    return line
