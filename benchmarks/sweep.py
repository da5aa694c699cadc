"""``sweep``: Euclidean norms in training, a norm sweep of ``lm_char`` and ``cnn_digits`` over seeds.

    python -m benchmarks sweep                     # 4 LM norms + 5 CNN norms x 3 seeds, 2 runs at a time
    python -m benchmarks sweep --experiments lm_char --norms layernorm dyt --seeds 0 1
    python -m benchmarks sweep --quick --norms layernorm none     # seconds-long runs: a smoke test, not a result

Trains every (experiment, norm, seed) of the grid through ``launch/train.py`` in fresh processes (CSV logger, no
progress bar), ``--jobs`` at a time with ``--threads`` torch threads each, reads each run's ``metrics.csv`` and
reports per experiment and norm the mean ± std over seeds of the final validation metric, the best one, the test
metric and the wall time of a run, plus a PNG of the validation curves (mean over seeds, band = min..max)
against the optimizer step. The runner (:func:`run_job`, :func:`run_sweep_jobs`, :func:`read_metrics`) is
shared with the ``optim`` suite.

JSON: ``{"suite", "torch", "seeds", "jobs", "threads_per_run", "quick", "overrides", "total_wall_s", "plot",
"runs": [...], "rows": [{"experiment", "norm", "seeds", "metric", "final", "best", "test_metric", "test",
"wall_s", "steps"}, ...]}``; PNG next to the JSON (``--plot`` to move it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks._harness import (
    ROOT,
    child_env,
    default_out,
    env_info,
    md_table,
    pyplot,
    save_figure,
    write_report,
)
from manifoldnorm.lit.report import aggregate, mean_std, read_metrics
from manifoldnorm.nn import list_norms

__all__ = ["EXPERIMENTS", "SWEEP_NORMS", "main", "markdown", "plot_sweep", "read_metrics", "run_job", "run_sweep",
           "run_sweep_jobs", "summarize"]

# experiment -> (validation metric to plot and report, its direction, test metric)
EXPERIMENTS = {
    "lm_char": ("val/bpc", "min", "test/bpc"),
    "cnn_digits": ("val/acc", "max", "test/acc"),
}
# The study: the norms compared per experiment (each costs a training run per seed). A choice, not a copy of the
# registry: every name must be a registered Euclidean norm (checked by the CLI and the tests).
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


# --------------------------------------------------------------------------------------------- the runner
def run_job(job: dict, out: Path, threads: int) -> dict:
    """One ``launch/train.py`` run of ``job`` = {experiment, label, seed, overrides, meta} in a fresh process."""
    experiment, label, seed = job["experiment"], job["label"], job["seed"]
    run_dir = out / experiment / label / f"seed{seed}"
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), f"+experiment={experiment}", f"seed={seed}",
           "logger=csv", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
           "trainer.enable_model_summary=false", f"hydra.run.dir={run_dir}", *job["overrides"]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads, WANDB_MODE="offline"),
                          cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"run {experiment}/{label}/seed{seed} failed (exit {proc.returncode}):\n"
                           f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return {"experiment": experiment, "seed": seed, "wall_s": wall, **job.get("meta", {}), **read_metrics(run_dir)}


def run_sweep_jobs(job_list: Sequence[dict], out: Path, jobs: int, threads: int) -> list[dict]:
    """Run every job of ``job_list`` (see :func:`run_job`), ``jobs`` at a time; results in the same order."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda job: run_job(job, out, threads), job_list))


# ---------------------------------------------------------------------------------------------- the sweep
def run_sweep(experiments: Sequence[str], norms: dict[str, Sequence[str]], seeds: Sequence[int], out: Path,
              jobs: int, threads: int, quick: bool, extra: Sequence[str] = ()) -> list[dict]:
    grid = [{"experiment": e, "label": n, "seed": s, "meta": {"norm": n},
             "overrides": (f"norm={n}", *(QUICK[e] if quick else ()), *extra)}
            for e in experiments for n in norms[e] for s in seeds]
    return run_sweep_jobs(grid, out, jobs, threads)


_mean_std = mean_std  # the name this module used before the aggregation moved to manifoldnorm.lit.report


def summarize(runs: Sequence[dict]) -> list[dict]:
    """One row per (experiment, norm): final/best validation metric, test metric, run time (mean, std).

    The aggregation is :func:`manifoldnorm.lit.report.aggregate`, the one of ``launch/report.py``.
    """
    rows = []
    for experiment, (val_key, mode, test_key) in EXPERIMENTS.items():
        group = [r for r in runs if r["experiment"] == experiment]
        for row in aggregate(group, lambda r: r["norm"], val_key, mode, test_keys=(test_key,), scalars=("wall_s",)):
            rows.append({"experiment": experiment, "norm": row["group"], "seeds": row["seeds"], "metric": val_key,
                         "final": row["final"], "best": row["best"],
                         "test_metric": test_key, "test": row["test"].get(test_key),
                         "wall_s": row["wall_s"], "steps": row["steps"]})
    return rows


def markdown(rows: Sequence[dict]) -> str:
    def fmt(ms: tuple[float, float] | None) -> str:
        return "n/a" if ms is None else f"{ms[0]:.3f} ± {ms[1]:.3f}"

    return md_table(["experiment", "norm", "seeds", "final val", "best val", "test", "s / run"],
                    [[r["experiment"], r["norm"], r["seeds"], f"{r['metric']} {fmt(r['final'])}", fmt(r["best"]),
                      f"{r['test_metric']} {fmt(r['test'])}", f"{r['wall_s'][0]:.0f}"] for r in rows])


def plot_sweep(runs: Sequence[dict], path: Path) -> Path:
    """Validation metric vs step per norm (mean over seeds, band = min..max), one panel per experiment."""
    plt = pyplot()
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
    return save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seed 0, seconds-long runs (smoke run)")
    parser.add_argument("--experiments", nargs="+", default=None, choices=list(EXPERIMENTS),
                        help="default: lm_char cnn_digits")
    parser.add_argument("--norms", nargs="+", default=None,
                        help="norm names for every experiment (default: per experiment, see SWEEP_NORMS)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="torch threads per run (the first; 1)")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --out)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default outputs/bench_sweep.json)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = args.out or default_out("sweep")
    experiments = args.experiments or list(EXPERIMENTS)
    known = set(list_norms(kind="euclidean"))
    norms = {e: tuple(args.norms) if args.norms else SWEEP_NORMS[e] for e in experiments}
    unknown = sorted({n for ns in norms.values() for n in ns} - known)
    if unknown:
        parser.error(f"unknown norm(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    seeds = [0] if args.quick else args.seeds
    threads = (args.threads or [1])[0]
    t0 = time.perf_counter()
    runs = run_sweep(experiments, norms, seeds, out.parent / f"{out.stem}_runs", args.jobs, threads, args.quick,
                     args.override)
    summary = summarize(runs)
    png = plot_sweep(runs, args.plot or out.with_suffix(".png"))
    print(markdown(summary))
    print(f"wrote {png}")
    meta = {**env_info("sweep"), "seeds": seeds, "jobs": args.jobs, "threads_per_run": threads,
            "quick": args.quick, "overrides": args.override, "total_wall_s": time.perf_counter() - t0,
            "plot": str(png), "runs": runs}
    return write_report(out, meta, summary)


if __name__ == "__main__":
    main()
