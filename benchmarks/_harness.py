"""What every suite shares: timers, thread control, Markdown tables, the JSON report, PNG figures.

The timers return seconds or milliseconds of one clock: ``time.process_time`` (process CPU, summed over all
threads; the default) or ``time.perf_counter`` (wall). The machines these run on are shared and noisy: suites
report medians and time their contenders round-robin, so that a slow phase of the machine hits all of them alike.
A ratio a suite prints is a quotient of two times measured in the same run; a time measured on another day or
machine is never its denominator (shown at all, it has its own column, labelled with its source).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
Clock = Callable[[], float]


# ------------------------------------------------------------------------------------------------ timing
def timed(fn: Callable[[], object], clock: Clock = time.process_time) -> Callable[[], float]:
    """A step that calls ``fn()`` and returns the seconds it took on ``clock``."""
    def step() -> float:
        t0 = clock()
        fn()
        return clock() - t0

    return step


def fwd_bwd_seconds(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, g: torch.Tensor,
                    clock: Clock = time.process_time) -> float:
    """Seconds of one training step ``(fn(x) * g).sum().backward()`` on a fresh leaf copy of ``x`` (not timed)."""
    xr = x.clone().requires_grad_()
    t0 = clock()
    (fn(xr) * g).sum().backward()
    return clock() - t0


def median_ms(step: Callable[[], float], repeats: int, warmup: int = 0) -> float:
    """Median in ms of ``repeats`` calls of ``step`` (which returns its own time in seconds) after ``warmup``."""
    for _ in range(warmup):
        step()
    return 1e3 * statistics.median(step() for _ in range(repeats))


def round_robin(steps: Mapping[str, Callable[[], float]], rounds: int, warmup: int = 0,
                rotate: bool = False) -> dict[str, list[float]]:
    """Seconds of every step, ``rounds`` times in turn after ``warmup`` untimed rounds: ``{name: [s, ...]}``.

    ``rotate``: round ``r`` starts with step ``r mod len(steps)``, so that no step always follows the same one
    (a step that runs after another process's step, for instance, starts with that process's cache contents).
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        shift = r % len(names) if rotate and names else 0
        for k in names[shift:] + names[:shift]:
            times[k].append(steps[k]())
    return times


def adaptive_repeats(first_s: float, budget_s: float, low: int, high: int) -> int:
    """Repeats that spend about ``budget_s`` when one costs ``first_s``, clipped to ``[low, high]``."""
    return int(min(max(budget_s / max(first_s, 1e-6), low), high))


# ------------------------------------------------------------------------------------------------ threads
@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``; the previous count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables that give a child process ``threads`` OpenMP/MKL (and so torch) threads."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def child_env(threads: int, drop: Sequence[str] = (), **extra: str) -> dict[str, str]:
    """This process's environment for a child run from the repository root: the variables starting with one of
    ``drop`` removed, ``threads`` threads, unbuffered output, the root first on ``PYTHONPATH`` (so that a Hydra
    ``_target_: benchmarks....`` resolves in ``launch/train.py``), then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not (drop and k.startswith(tuple(drop)))}
    path = [str(ROOT), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT))]
    env.update(thread_env(threads), PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1", **extra)
    return env


# ----------------------------------------------------------------------------------------- tables, JSON
def md_table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table: header, ``|---|`` separator, one line per row (cells already formatted)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, spec: str, missing: str = "n/a") -> str:
    """``format(value, spec)``, or ``missing`` for ``None``."""
    return missing if value is None else format(value, spec)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float64`` -> ``"float64"``."""
    return str(dtype).replace("torch.", "")


def cpu_info() -> dict[str, Any]:
    """The CPU a report was measured on: model name, logical cores, torch's kernel level and whether it has
    bfloat16 instructions (``avx512_bf16``/``amx_bf16``; without them a bfloat16 matrix product on CPU is emulated
    and several times slower than float32)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # not Linux
        pass
    return {"model": model, "logical_cores": os.cpu_count(), "capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_instructions": sorted(flags & {"avx512_bf16", "amx_bf16"})}


def env_info(suite: str) -> dict[str, Any]:
    """The head of every report: the suite, the torch version and the CPU (:func:`cpu_info`)."""
    return {"suite": suite, "torch": torch.__version__, "cpu": cpu_info()}


def default_out(suite: str) -> Path:
    """``outputs/bench_<suite>.json`` (relative to the working directory, the repository root)."""
    return Path("outputs") / f"bench_{suite}.json"


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON to ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path


def write_report(path: Path, meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Write ``{**meta, "rows": rows}`` (``meta`` starts with :func:`env_info`), print where, return it."""
    report = {**meta, "rows": list(rows)}
    print(f"wrote {write_json(path, report)}")
    return report


# ----------------------------------------------------------------------------------------------- figures
def pyplot():  # noqa: ANN201 - matplotlib.pyplot, imported on first use (the `bench` extra)
    """``matplotlib.pyplot`` on the non-interactive Agg backend, imported only when a suite draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> Path:  # noqa: ANN001 - a matplotlib Figure
    """Save ``fig`` as PNG to ``path`` (parents created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def chosen(parser: Any, given: Sequence[str] | None, known: Sequence[str], what: str = "norm") -> list[str]:
    """``given`` (default: all of ``known``), or a command-line error naming the unknown ones and the valid ones."""
    names = list(given or known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown {what}(s) {', '.join(unknown)}; valid: {', '.join(known)}")
    return names
