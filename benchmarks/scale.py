"""``scale``: 1 vs 2 processes (DDP on gloo) and synchronized Riemannian norms, in training and in one layer.

    python -m benchmarks scale --out docs/bench/bench_scale.json   # 6-12 min on 2 cores
    python -m benchmarks scale --quick                              # smoke run: tiny spd_eeg only, 1.5-2.5 min
    python -m benchmarks scale --experiments lm_char --configs "1p x 2t" "2p x 1t" --repeats 3

Three parts, run in one invocation so that the noisy machine hits all configurations alike (the configurations
of a part run round-robin, ``repeats`` times; medians are reported):

1. Throughput. ``launch/train.py +experiment=spd_eeg`` and ``+experiment=lm_char`` in fresh processes, as

   * ``1p x 1t``: ``trainer=cpu``, one torch thread;
   * ``1p x 2t``: ``trainer=cpu``, two threads (the whole machine; the fair baseline of the next two);
   * ``2p x 1t``: ``trainer=ddp_cpu`` (2 processes, gloo), one thread each, the same per-process batch (the
     global batch doubles);
   * ``2p x 1t, B/2``: as above with half the per-process batch (the same global batch as one process).

   Thread counts are set through ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` (Lightning leaves torch's thread count
   alone when ``OMP_NUM_THREADS`` is set). The :class:`ThroughputTimer` callback, injected by a Hydra override
   (``+callbacks.scale_timer._target_=benchmarks.scale.ThroughputTimer``, with the repository root on the child's
   ``PYTHONPATH``), times the steady state only: start-up, data generation, the first ``warmup_steps`` steps
   and epoch boundaries are left out; validation, testing, checkpoints, logger and progress bar are off.
   Samples per second = samples of all processes / the time of global rank 0 (DDP processes advance in lock
   step); also the global batch / the median step time, which a few steps stalled by other programs on a
   shared machine do not move (the ratios between configurations use it).
2. Synchronized norms in training: ``spd_eeg`` on ``trainer=ddp_cpu`` with ``sync_norm=true`` (the
   :class:`manifoldnorm.lit.RiemannianSyncBatchNorm` plugin) vs ``sync_norm=false``, for ``norm=liebn_aim``,
   ``liebn_lem`` and ``spdbn`` (one norm per reduction pattern of the traffic model, see
   :func:`benchmarks._traffic.representative_norms`); the callback also counts the all-reduces and bytes of the
   norm statistics per step (:class:`CountingReducer` wrapped around every layer's reducer).
3. One norm layer in isolation: forward+backward of a synchronized layer on 2 gloo processes
   (``torch.multiprocessing.spawn``) vs the same local layer, median wall time, with the all-reduce calls and
   bytes per step counted, next to the count and bytes predicted by :func:`sync_stats_traffic`; and the latency
   of a lone all-reduce of the sizes involved.

Communication volume per step is also computed (not measured): the DDP gradient all-reduce moves the bytes of
the trainable parameters (counted in the run by the callback); a ring all-reduce over ``p`` processes sends
and receives ``2 (p - 1) / p`` times that per process (Patarasuk & Yuan, "Bandwidth optimal all-reduce
algorithms for clusters of workstations", J. Parallel Distrib. Comput. 69(2), 2009).

JSON: ``{"suite", "torch", "quick", "repeats", "cpus", "configs", "sizes", "common_overrides", "timer",
"layer_timer", "total_wall_s", "sync_training", "sync_layer", "allreduce_latency_us", "comm_volume", "runs",
"rows"}`` (``rows``: the throughput table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from benchmarks._harness import ROOT, child_env, default_out, dtype_name, env_info, md_table, write_json, write_report
from benchmarks._sync_layer import bench_sync_layer
from benchmarks._traffic import (
    CountingReducer,
    count_sync_traffic,
    modelled_norms,
    representative_norms,
    ring_allreduce_bytes,
    sync_stats_traffic,
)

EXPERIMENTS = ("spd_eeg", "lm_char")
# name -> (processes, threads per process, per-process batch divisor)
CONFIGS = {
    "1p x 1t": (1, 1, 1),
    "1p x 2t": (1, 2, 1),
    "2p x 1t": (2, 1, 1),
    "2p x 1t, B/2": (2, 1, 2),
}
SYNC_NORMS = representative_norms()  # liebn_aim, liebn_lem, spdbn
MEDIAN_KEY = "samples_per_s_median_step"  # global batch / median step time: robust to stalls of the machine
COMMON = ("logger=none", "test=false", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
          "trainer.enable_model_summary=false", "callbacks.model_checkpoint=null", "callbacks.last_checkpoint=null",
          "callbacks.lr_monitor=null", "+trainer.limit_val_batches=0", "+trainer.num_sanity_val_steps=0",
          "trainer.max_epochs=-1")
# experiment -> (per-process batch, steps, warm-up steps, extra overrides)
FULL = {
    "spd_eeg": (32, 110, 10, ()),
    "lm_char": (32, 120, 20, ()),
}
QUICK = {
    "spd_eeg": (8, 20, 5, ("data.source_kwargs.n_subjects=2", "data.source_kwargs.trials_per_class=8")),
    "lm_char": (8, 20, 5, ("model.n_layer=1", "model.d_model=16", "model.n_head=2", "data.block_size=16",
                          "data.val_batches=1")),
}
SPD_EEG_N = 16  # spd_eeg's one norm layer acts on 16 x 16 matrices (model.dims=[16]; --quick keeps the model)
# layer micro-benchmark: matrix size and per-process batch of spd_eeg's norm (one BiMap 22 -> 16)
LAYER_N, LAYER_BATCH = 16, 32
QUICK_LAYER_N, QUICK_LAYER_BATCH = 8, 8
ENV_DROP = ("HYDRA_", "SLURM_", "TORCHELASTIC_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK",
            "NODE_RANK", "WANDB_")
TIMER_TARGET = "benchmarks.scale.ThroughputTimer"  # Hydra _target_ of the callback below


# -------------------------------------------------------------------------------------------- the callback
def _batch_size(batch) -> int:  # noqa: ANN001
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)):
        return _batch_size(batch[0])
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values())))
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


class ThroughputTimer(Callback):
    """Steady-state training throughput of a (possibly distributed) run, written as JSON by global rank 0.

    For every training batch after the first ``warmup_steps`` of the run, the wall time from the end of the
    previous batch (data loading included) to the end of this one is added up; the first batch of an epoch
    counts from its own start, so epoch boundaries (sampler set-up, validation, checkpoints) stay out. At the
    end of fitting the times, samples and steps of every process are gathered; besides samples / time, the
    global batch over the median step time of rank 0 is reported (robust to stalls caused by other programs
    on a shared machine). If the model has synchronized Riemannian norms, their all-reduces are counted
    (:class:`CountingReducer`). Inject it into any run of ``launch/train.py`` with the repository root on
    ``PYTHONPATH``: ``+callbacks.scale_timer._target_=benchmarks.scale.ThroughputTimer
    +callbacks.scale_timer.out=<json>``.

    Parameters
    ----------
    out : str
        JSON file to write (global rank 0 only).
    warmup_steps : int
        Training batches left out at the start.
    """

    def __init__(self, out: str, warmup_steps: int = 5) -> None:
        self.out, self.warmup_steps = out, int(warmup_steps)
        self.seen = self.steps = self.samples = 0
        self.seconds = 0.0
        self.step_seconds: list[float] = []
        self._start = self._prev_end = None
        self._prev_epoch = -1
        self.counter: CountingReducer | None = None
        self.info: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        params = [p for p in pl_module.parameters() if p.requires_grad]
        self.info = {"params": sum(p.numel() for p in params),
                     "param_bytes": sum(p.numel() * p.element_size() for p in params),
                     "param_dtypes": sorted({dtype_name(p.dtype) for p in params}),
                     "torch_threads": torch.get_num_threads(), "world_size": trainer.world_size}
        self.counter = count_sync_traffic(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        now = time.perf_counter()
        self.seen += 1
        if self.seen > self.warmup_steps:
            same_epoch = trainer.current_epoch == self._prev_epoch and self._prev_end is not None
            dt = now - (self._prev_end if same_epoch else self._start)
            self.seconds += dt
            self.step_seconds.append(dt)
            self.samples += _batch_size(batch)
            self.steps += 1
        self._prev_end, self._prev_epoch = now, trainer.current_epoch

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        calls, nbytes = self.counter.totals() if self.counter is not None else (0, 0)
        local = torch.tensor([self.seconds, self.samples, self.steps, self.seen, calls, nbytes],
                             dtype=torch.float64)
        rows = local[None]
        if trainer.world_size > 1:
            rows = trainer.strategy.all_gather(local).reshape(-1, local.numel())
        if trainer.global_rank != 0:
            return
        seconds, samples, seen = float(rows[0, 0]), int(rows[:, 1].sum()), max(1, int(rows[0, 3]))
        steps = int(rows[0, 2])
        median_step = statistics.median(self.step_seconds) if self.step_seconds else None
        report = {**self.info, "seconds": seconds, "samples": samples, "steps": steps,
                  "median_step_s": median_step,
                  "samples_per_s_median_step": samples / steps / median_step if median_step else None,
                  "warmup_steps": self.warmup_steps, "total_steps": int(rows[0, 3]),
                  "seconds_per_rank": rows[:, 0].tolist(), "samples_per_rank": rows[:, 1].tolist(),
                  "samples_per_s": samples / seconds if seconds > 0 else None,
                  "sync_calls_per_step": float(rows[0, 4]) / seen, "sync_bytes_per_step": float(rows[0, 5]) / seen,
                  "sync_counts": None if self.counter is None else
                  {k: [c / seen, b / seen] for k, (c, b) in self.counter.counts.items()}}
        Path(self.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(self.out), report)


# ------------------------------------------------------------------------------------------ training runs
def train_run(experiment: str, processes: int, threads: int, batch: int, steps: int, warmup: int,
              overrides: Sequence[str], run_dir: Path) -> dict:
    """One ``launch/train.py`` run (``trainer=cpu`` or ``trainer=ddp_cpu``) with :class:`ThroughputTimer`."""
    report = run_dir / "throughput.json"
    trainer = ["trainer=cpu"] if processes == 1 else ["trainer=ddp_cpu", f"trainer.devices={processes}"]
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), f"+experiment={experiment}", *trainer, *COMMON,
           f"+trainer.max_steps={steps}", f"data.batch_size={batch}", *overrides,
           f"+callbacks.scale_timer._target_={TIMER_TARGET}", f"+callbacks.scale_timer.out={report}",
           f"+callbacks.scale_timer.warmup_steps={warmup}", f"hydra.run.dir={run_dir}"]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads, ENV_DROP), cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not report.is_file():
        raise RuntimeError(f"run failed (exit {proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return {**json.loads(report.read_text()), "wall_s": wall, "load_1min": [load, os.getloadavg()[0]]}


def _log(label: str, run: dict) -> None:
    print(f"  {label:36s} {run['samples_per_s']:8.1f} samples/s, {run['samples_per_s_median_step']:8.1f} at the "
          f"median step ({run['wall_s']:.0f} s wall, load {run['load_1min'][0]:.1f})", flush=True)


def _median(runs: Sequence[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def bench_throughput(experiments: Sequence[str], configs: Sequence[str], quick: bool, repeats: int,
                     workdir: Path) -> tuple[list[dict], list[dict]]:
    """Samples/s of every (experiment, config); the runs go round-robin, ``repeats`` times. Returns rows, runs."""
    sizes = QUICK if quick else FULL
    runs = []
    for r in range(repeats):
        for experiment in experiments:
            batch, steps, warmup, extra = sizes[experiment]
            for config in configs:
                processes, threads, divisor = CONFIGS[config]
                run = train_run(experiment, processes, threads, batch // divisor, steps, warmup, extra,
                                workdir / f"{experiment}_{config.replace(' ', '').replace(',', '_')}_r{r}")
                runs.append({"experiment": experiment, "config": config, "repeat": r, **run})
                _log(f"{experiment} {config}", run)
    rows = []
    for experiment in experiments:
        batch = sizes[experiment][0]
        group = {c: [x for x in runs if x["experiment"] == experiment and x["config"] == c] for c in configs}
        base = {c: _median(group[c], MEDIAN_KEY) for c in ("1p x 1t", "1p x 2t") if c in group}
        for config in configs:
            processes, threads, divisor = CONFIGS[config]
            g = group[config]
            sps, robust = _median(g, "samples_per_s"), _median(g, MEDIAN_KEY)
            per_process = batch // divisor
            rows.append({
                "experiment": experiment, "config": config, "processes": processes, "threads": threads,
                "torch_threads": g[0]["torch_threads"], "batch_per_process": per_process,
                "global_batch": per_process * processes, "samples_per_s": sps, MEDIAN_KEY: robust,
                "samples_per_s_runs": [x["samples_per_s"] for x in g],
                "steps_per_s": sps / (per_process * processes), "measured_steps": g[0]["steps"],
                "x_1p1t": robust / base["1p x 1t"] if "1p x 1t" in base else None,
                "x_1p2t": robust / base["1p x 2t"] if "1p x 2t" in base else None,
                "params": g[0]["params"], "param_bytes": g[0]["param_bytes"], "param_dtypes": g[0]["param_dtypes"],
            })
    return rows, runs


def bench_sync_training(norms: Sequence[str], quick: bool, repeats: int, workdir: Path) -> tuple[list[dict], list]:
    """``spd_eeg`` on 2 gloo processes, ``sync_norm=false`` then ``true`` per norm, ``repeats`` rounds."""
    batch, steps, warmup, extra = (QUICK if quick else FULL)["spd_eeg"]
    runs = []
    for r in range(repeats):
        for norm in norms:
            for sync in (False, True):
                run = train_run("spd_eeg", 2, 1, batch, steps, warmup,
                                (*extra, f"norm={norm}", f"sync_norm={str(sync).lower()}"),
                                workdir / f"sync_{norm}_{'sync' if sync else 'local'}_r{r}")
                runs.append({"norm": norm, "sync": sync, "repeat": r, **run})
                _log(f"spd_eeg {norm} sync_norm={str(sync).lower()}", run)
    rows = []
    for norm in norms:
        local = [x for x in runs if x["norm"] == norm and not x["sync"]]
        synced = [x for x in runs if x["norm"] == norm and x["sync"]]
        a, b = _median(local, "samples_per_s"), _median(synced, "samples_per_s")
        ma, mb = _median(local, MEDIAN_KEY), _median(synced, MEDIAN_KEY)
        rows.append({"experiment": "spd_eeg", "norm": norm, "processes": 2, "batch_per_process": batch,
                     "local_samples_per_s": a, "sync_samples_per_s": b, "sync_over_local": b / a,
                     "local_samples_per_s_median_step": ma, "sync_samples_per_s_median_step": mb,
                     "sync_over_local_median_step": mb / ma,
                     "local_ms_median_step": 1e3 * 2 * batch / ma, "sync_ms_median_step": 1e3 * 2 * batch / mb,
                     "sync_calls_per_step": synced[0]["sync_calls_per_step"],
                     "sync_bytes_per_step": synced[0]["sync_bytes_per_step"],
                     "sync_counts_per_step": synced[0]["sync_counts"],
                     "local_calls_per_step": local[0]["sync_calls_per_step"],
                     "predicted": sync_stats_traffic(norm, SPD_EEG_N)})
    return rows, runs


# ------------------------------------------------------------------------------------ communication volume
def comm_volume(throughput: Sequence[dict], sync_rows: Sequence[dict], processes: Sequence[int] = (2, 4, 8, 16)
                ) -> list[dict]:
    """Bytes per optimizer step, computed: DDP gradients (ring all-reduce) and the norms' statistics.

    The DDP gradient all-reduce carries every trainable parameter once (in its dtype); with a ring each process
    sends and receives ``2 (p - 1) / p`` of that. The synchronized norms add, per layer, the statistics of
    :func:`sync_stats_traffic` (all-reduced in full by every process; latency-bound at these sizes).
    """
    rows = []
    for experiment in dict.fromkeys(r["experiment"] for r in throughput):
        r = next(x for x in throughput if x["experiment"] == experiment)
        row = {"experiment": experiment, "params": r["params"], "param_dtypes": r["param_dtypes"],
               "grad_bytes": r["param_bytes"],
               "ring_bytes_per_process": {str(p): ring_allreduce_bytes(r["param_bytes"], p) for p in processes}}
        if experiment == "spd_eeg":
            row["sync_norm"] = {s["norm"]: s["predicted"] for s in sync_rows}
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- markdown
def _fmt_bytes(b: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b:.0f} B"


def markdown(throughput: Sequence[dict], sync_rows: Sequence[dict], layer_rows: Sequence[dict],
             volume: Sequence[dict], allreduce_us: dict[str, float] | None = None) -> str:
    def x(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    parts = []
    if throughput:
        parts.append(
            "Training throughput, steady state, samples/s of all processes (median of the repeats): over the whole "
            "window, and global batch / median step time (robust to stalls; the ratios use it):\n\n" + md_table(
                ["experiment", "processes x threads", "batch / process", "global batch", "samples/s",
                 "samples/s at the median step", "steps/s", "× 1p x 1t", "× 1p x 2t"],
                [[r["experiment"], r["config"], r["batch_per_process"], r["global_batch"], f"{r['samples_per_s']:.0f}",
                  f"{r[MEDIAN_KEY]:.0f}", f"{r['steps_per_s']:.2f}", x(r["x_1p1t"]), x(r["x_1p2t"])]
                 for r in throughput]))
    if sync_rows:
        parts.append(
            "Synchronized Riemannian norm in training (spd_eeg, trainer=ddp_cpu, 2 processes x 1 thread):\n\n"
            + md_table(["norm", "batch / process", "sync_norm=false samples/s (median step)",
                        "sync_norm=true samples/s (median step)", "true / false (median step)",
                        "median step ms, false → true", "all-reduces / step (predicted)", "bytes / step (predicted)"],
                       [[r["norm"], r["batch_per_process"],
                         f"{r['local_samples_per_s']:.0f} ({r['local_samples_per_s_median_step']:.0f})",
                         f"{r['sync_samples_per_s']:.0f} ({r['sync_samples_per_s_median_step']:.0f})",
                         f"{r['sync_over_local']:.2f} ({r['sync_over_local_median_step']:.2f})",
                         f"{r['local_ms_median_step']:.1f} → {r['sync_ms_median_step']:.1f}",
                         f"{r['sync_calls_per_step']:.0f} ({r['predicted']['calls']})",
                         f"{r['sync_bytes_per_step']:.0f} ({r['predicted']['bytes']})"] for r in sync_rows]))
    if layer_rows:
        parts.append(
            "One norm layer, forward+backward, 2 gloo processes x 1 thread (median wall ms):\n\n"
            + md_table(["norm", "n", "batch / process", "local ms", "synchronized ms", "overhead ms", "× local",
                        "all-reduces / step (predicted)", "bytes / step (predicted)"],
                       [[r["norm"], r["n"], r["batch_per_process"], f"{r['local_ms']:.3f}", f"{r['sync_ms']:.3f}",
                         f"{r['overhead_ms']:.3f}", f"{r['sync_over_local']:.2f}",
                         f"{r['calls_per_step']:.0f} ({r['predicted']['calls']})",
                         f"{r['bytes_per_step']:.0f} ({r['predicted']['bytes']})"] for r in layer_rows]))
    if allreduce_us:
        parts.append("A lone gloo all-reduce between the 2 processes (median): "
                     + ", ".join(f"{b} bytes: {us:.0f} µs" for b, us in allreduce_us.items()))
    if volume:
        ps = list(volume[0]["ring_bytes_per_process"])
        parts.append(
            "Communication per optimizer step (computed): DDP gradient all-reduce, ring, per process:\n\n"
            + md_table(["experiment", "trainable params", "dtypes", "gradient bytes",
                        *(f"sent per process, p={p}" for p in ps), "synchronized norm statistics"],
                       [[r["experiment"], f"{r['params']:,}", "/".join(r["param_dtypes"]), _fmt_bytes(r["grad_bytes"]),
                         *(_fmt_bytes(v) for v in r["ring_bytes_per_process"].values()),
                         ", ".join(f"{k}: {v['calls']} x, {_fmt_bytes(v['bytes'])}"
                                   for k, v in r.get("sync_norm", {}).items()) or "–"] for r in volume]))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks scale", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny spd_eeg, 1p x 1t and 2p x 1t, liebn_lem, 8 x 8 layer (smoke run)")
    parser.add_argument("--experiments", nargs="+", default=None, choices=list(EXPERIMENTS),
                        help="default: spd_eeg lm_char (--quick: spd_eeg)")
    parser.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                        help="processes x threads configurations (default all)")
    parser.add_argument("--norms", nargs="+", default=None,
                        help=f"synchronized norms in training (default {' '.join(SYNC_NORMS)}; --quick: liebn_lem)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of training runs (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default outputs/bench_scale.json)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    experiments = args.experiments or (["spd_eeg"] if args.quick else list(EXPERIMENTS))
    configs = args.configs or (["1p x 1t", "2p x 1t"] if args.quick else list(CONFIGS))
    configs = [c for c in CONFIGS if c in configs]  # the baselines first
    norms = args.norms or (["liebn_lem"] if args.quick else list(SYNC_NORMS))
    unknown = sorted(set(norms) - set(modelled_norms()))
    if unknown:
        parser.error(f"scale: no traffic model for norm(s) {', '.join(unknown)}; valid: {', '.join(modelled_norms())}")
    repeats = args.repeats or 1
    n, batch = (QUICK_LAYER_N, QUICK_LAYER_BATCH) if args.quick else (LAYER_N, LAYER_BATCH)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        work = Path(tmp)
        print("training throughput:", flush=True)
        rows, runs = bench_throughput(experiments, configs, args.quick, repeats, work / "throughput")
        print("synchronized norms in training:", flush=True)
        sync_rows, sync_runs = bench_sync_training(norms, args.quick, repeats, work / "sync")
        print("one norm layer, local vs synchronized:", flush=True)
        layer_rows, latency = bench_sync_layer(list(SYNC_NORMS), n, batch, 5 if args.quick else 60, work / "layer")
    volume = comm_volume(rows, sync_rows)
    print(markdown(rows, sync_rows, layer_rows, volume, latency))
    keep = ("experiment", "config", "norm", "sync", "repeat", "samples_per_s", "seconds", "samples", "steps",
            "total_steps", "seconds_per_rank", "samples_per_rank", "torch_threads", "world_size", "wall_s",
            "sync_calls_per_step", "sync_bytes_per_step", "median_step_s", "samples_per_s_median_step", "load_1min")
    meta = {**env_info("scale"), "quick": args.quick, "repeats": repeats, "cpus": os.cpu_count(),
            "configs": {c: CONFIGS[c] for c in configs},
            "sizes": {e: dict(zip(("batch_per_process", "steps", "warmup_steps", "overrides"),
                                  (QUICK if args.quick else FULL)[e], strict=True))
                      for e in dict.fromkeys([*experiments, "spd_eeg"])},
            "common_overrides": COMMON,
            "timer": "wall time of global rank 0 over the training batches after warm-up (ThroughputTimer)",
            "layer_timer": "median wall time of rank 0 (time.perf_counter), one thread per process",
            "total_wall_s": time.perf_counter() - t0, "sync_training": sync_rows, "sync_layer": layer_rows,
            "allreduce_latency_us": latency, "comm_volume": volume,
            "runs": [{k: r[k] for k in keep if k in r} for r in runs + sync_runs]}
    return write_report(args.out or default_out("scale"), meta, rows)


__all__ = ["ThroughputTimer", "CountingReducer", "count_sync_traffic", "sync_stats_traffic", "ring_allreduce_bytes",
           "main"]


if __name__ == "__main__":
    main()
