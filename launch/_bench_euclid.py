"""The ``sweep`` and ``layers`` suites of ``launch/bench.py``: Euclidean norms in training and in isolation.

``sweep`` trains every (experiment, norm, seed) of a grid through ``launch/train.py`` in fresh processes (CSV
logger, no progress bar), ``jobs`` at a time with ``threads`` torch threads each, reads each run's
``metrics.csv`` and reports per experiment and norm the mean ± std over seeds of the final validation metric, the
best one, the test metric and the wall time of a run, plus a PNG of the validation curves (mean over seeds,
band = min..max) against the optimizer step.

``layers`` times one training forward+backward of every registered Euclidean activation norm on a
``(tokens, width)`` batch, beside ``torch.nn.LayerNorm`` and ``torch.nn.RMSNorm`` timed in the same process,
and reports the ratios to both (median process-CPU time over adaptive repeats; the machine is noisy, the ratios
are the result).
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from manifoldnorm.nn import create_norm_layer, get_norm_info, list_norms

ROOT = Path(__file__).resolve().parents[1]

# experiment -> (validation metric to plot and report, its direction, test metric)
EXPERIMENTS = {
    "lm_char": ("val/bpc", "min", "test/bpc"),
    "cnn_digits": ("val/acc", "max", "test/acc"),
}
SWEEP_NORMS = {
    "lm_char": ("layernorm", "rmsnorm", "dyt", "derf"),
    "cnn_digits": ("batchnorm", "groupnorm", "evonorm_s0", "bcn", "none"),
}
# overrides that make a run take seconds (smoke test of the pipeline, not a result)
QUICK = {
    "lm_char": ("trainer.max_epochs=2", "data.steps_per_epoch=4", "data.val_batches=2", "data.batch_size=4",
                "model.n_layer=1", "model.d_model=16", "model.n_head=2", "data.block_size=16"),
    "cnn_digits": ("trainer.max_epochs=2", "model.widths=[4,8]", "data.batch_size=64"),
}
LAYER_WIDTHS = (256, 768, 1024)
LAYER_TOKENS = 2048
BUDGET_S = 0.5


def layer_norms() -> list[str]:
    """Registered Euclidean activation norms (weight reparametrizations and the identity left out)."""
    return [k for k in list_norms(kind="euclidean")
            if "euclidean" in get_norm_info(k).inputs and k not in ("none", "ngpt_norm")]


# --------------------------------------------------------------------------------------------------- sweep
def run_job(job: dict, out: Path, threads: int) -> dict:
    """One ``launch/train.py`` run of ``job`` = {experiment, label, seed, overrides, meta} in a fresh process."""
    experiment, label, seed = job["experiment"], job["label"], job["seed"]
    run_dir = out / experiment / label / f"seed{seed}"
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), f"+experiment={experiment}", f"seed={seed}",
           "logger=csv", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
           "trainer.enable_model_summary=false", f"hydra.run.dir={run_dir}", *job["overrides"]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"run {experiment}/{label}/seed{seed} failed (exit {proc.returncode}):\n"
                           f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return {"experiment": experiment, "seed": seed, "wall_s": wall, **job.get("meta", {}), **read_metrics(run_dir)}


def run_sweep_jobs(job_list: Sequence[dict], out: Path, jobs: int, threads: int) -> list[dict]:
    """Run every job of ``job_list`` (see :func:`run_job`), ``jobs`` at a time; results in the same order."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda job: run_job(job, out, threads), job_list))


def read_metrics(run_dir: Path) -> dict:
    """Validation curves ``{metric: [(step, value), ...]}`` and last-logged values of a run's CSV log."""
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    if not files:
        raise FileNotFoundError(f"no csv/version_*/metrics.csv under {run_dir}")
    curves: dict[str, list[tuple[int, float]]] = {}
    last: dict[str, float] = {}
    with files[-1].open() as fh:
        for row in csv.DictReader(fh):
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                v = float(value)
                last[key] = v
                if key.startswith("val/"):
                    curves.setdefault(key, []).append((int(float(row["step"])), v))
    return {"curves": curves, "last": last}


def run_sweep(experiments: Sequence[str], norms: dict[str, Sequence[str]], seeds: Sequence[int], out: Path,
              jobs: int, threads: int, quick: bool, extra: Sequence[str] = ()) -> list[dict]:
    grid = [{"experiment": e, "label": n, "seed": s, "meta": {"norm": n},
             "overrides": (f"norm={n}", *(QUICK[e] if quick else ()), *extra)}
            for e in experiments for n in norms[e] for s in seeds]
    return run_sweep_jobs(grid, out, jobs, threads)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: Sequence[dict]) -> list[dict]:
    """One row per (experiment, norm): final/best validation metric, test metric, run time (mean, std)."""
    rows = []
    for experiment, (val_key, mode, test_key) in EXPERIMENTS.items():
        for norm in dict.fromkeys(r["norm"] for r in runs if r["experiment"] == experiment):
            group = [r for r in runs if r["experiment"] == experiment and r["norm"] == norm]
            final = [r["curves"][val_key][-1][1] for r in group]
            pick = min if mode == "min" else max
            best = [pick(v for _, v in r["curves"][val_key]) for r in group]
            test = [r["last"][test_key] for r in group if test_key in r["last"]]
            row = {"experiment": experiment, "norm": norm, "seeds": len(group), "metric": val_key,
                   "final": _mean_std(final), "best": _mean_std(best),
                   "test_metric": test_key, "test": _mean_std(test) if test else None,
                   "wall_s": _mean_std([r["wall_s"] for r in group]),
                   "steps": group[0]["curves"][val_key][-1][0]}
            rows.append(row)
    return rows


def sweep_markdown(rows: Sequence[dict]) -> str:
    lines = ["| experiment | norm | seeds | final val | best val | test | s / run |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        def fmt(ms: tuple[float, float] | None) -> str:
            return "n/a" if ms is None else f"{ms[0]:.3f} ± {ms[1]:.3f}"
        lines.append(f"| {r['experiment']} | {r['norm']} | {r['seeds']} | {r['metric']} {fmt(r['final'])} "
                     f"| {fmt(r['best'])} | {r['test_metric']} {fmt(r['test'])} | {r['wall_s'][0]:.0f} |")
    return "\n".join(lines)


def plot_sweep(runs: Sequence[dict], path: Path) -> Path:
    """Validation metric vs step per norm (mean over seeds, band = min..max), one panel per experiment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experiments = [e for e in EXPERIMENTS if any(r["experiment"] == e for r in runs)]
    fig, axes = plt.subplots(1, len(experiments), figsize=(6 * len(experiments), 4), squeeze=False)
    for ax, experiment in zip(axes[0], experiments, strict=True):
        val_key = EXPERIMENTS[experiment][0]
        for norm in dict.fromkeys(r["norm"] for r in runs if r["experiment"] == experiment):
            curves = [r["curves"][val_key] for r in runs if r["experiment"] == experiment and r["norm"] == norm]
            length = min(len(c) for c in curves)
            steps = [s for s, _ in curves[0][:length]]
            vals = torch.tensor([[v for _, v in c[:length]] for c in curves])
            ax.plot(steps, vals.mean(0).tolist(), label=norm, marker=".")
            ax.fill_between(steps, vals.min(0).values.tolist(), vals.max(0).values.tolist(), alpha=0.2)
        ax.set(title=f"{experiment} ({len(curves)} seeds)", xlabel="optimizer step", ylabel=val_key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------- layers
def _step(fn, x: torch.Tensor, g: torch.Tensor) -> float:
    xr = x.clone().requires_grad_()
    t0 = time.process_time()
    (fn(xr) * g).sum().backward()
    return time.process_time() - t0


def _time_interleaved(fns: dict, x: torch.Tensor, g: torch.Tensor, repeats: int | None) -> dict[str, float]:
    """Median ms per function; the repeats run round-robin so that slow phases of the machine hit all alike."""
    first = {k: max(_step(f, x, g), _step(f, x, g), 1e-6) for k, f in fns.items()}
    rounds = repeats or int(min(max(BUDGET_S * len(fns) / sum(first.values()), 7), 60))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            times[k].append(_step(f, x, g))
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def bench_layers(norms: Sequence[str], widths: Sequence[int], tokens: int, dtype: torch.dtype,
                 repeats: int | None) -> list[dict]:
    """Forward+backward ms of each norm on ``(tokens, width)`` and its ratio to torch LayerNorm and RMSNorm."""
    rows = []
    for width in widths:
        gen = torch.Generator().manual_seed(width)
        x = torch.randn(tokens, width, generator=gen, dtype=dtype)
        g = torch.randn(tokens, width, generator=gen, dtype=dtype)
        fns = {"torch_layer_norm": torch.nn.LayerNorm(width, eps=1e-5, dtype=dtype),
               "torch_rms_norm": torch.nn.RMSNorm(width, eps=1e-6, dtype=dtype)}
        fns.update({name: create_norm_layer(name, width).to(dtype).train() for name in norms})
        ms = _time_interleaved(fns, x, g, repeats)
        for name in fns:
            rows.append({"norm": name, "width": width, "tokens": tokens, "dtype": str(dtype).replace("torch.", ""),
                         "ms": ms[name], "x_layernorm": ms[name] / ms["torch_layer_norm"],
                         "x_rmsnorm": ms[name] / ms["torch_rms_norm"]})
    return rows


def layers_markdown(rows: Sequence[dict]) -> str:
    widths = sorted({r["width"] for r in rows})
    names = list(dict.fromkeys(r["norm"] for r in rows))
    head = "| norm | " + " | ".join(f"C={w}: ms (× LN, × RMS)" for w in widths) + " |"
    lines = [head, "|---|" + "---|" * len(widths)]
    for name in names:
        cells = []
        for w in widths:
            r = next((r for r in rows if r["norm"] == name and r["width"] == w), None)
            cells.append("n/a" if r is None or math.isnan(r["ms"]) else
                         f"{r['ms']:.2f} ({r['x_layernorm']:.2f}, {r['x_rmsnorm']:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
