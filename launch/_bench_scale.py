"""The ``scale`` suite of ``launch/bench.py``: 1 vs 2 processes (DDP on gloo) and synchronized Riemannian norms.

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
   (``+callbacks.scale_timer._target_=_bench_scale.ThroughputTimer`` with ``launch/`` on ``PYTHONPATH``), times
   the steady state only: start-up, data generation, the first ``warmup_steps`` steps and epoch boundaries are
   left out; validation, testing, checkpoints, logger and progress bar are off. Samples per second = samples
   of all processes / the time of global rank 0 (DDP processes advance in lock step); also the global batch /
   the median step time, which a few steps stalled by other programs on a shared machine do not move (the
   ratios between configurations use it).
2. Synchronized norms in training: ``spd_eeg`` on ``trainer=ddp_cpu`` with ``sync_norm=true`` (the
   :class:`manifoldnorm.lit.RiemannianSyncBatchNorm` plugin) vs ``sync_norm=false``, for ``norm=liebn_aim``,
   ``liebn_lem`` and ``spdbn``; the callback also counts the all-reduces and bytes of the norm statistics per
   step (:class:`CountingReducer` wrapped around every layer's reducer).
3. One norm layer in isolation: forward+backward of a synchronized layer on 2 gloo processes
   (``torch.multiprocessing.spawn``) vs the same local layer, median wall time, with the all-reduce calls and
   bytes per step counted, next to the count and bytes predicted by :func:`sync_stats_traffic`; and the latency
   of a lone all-reduce of the sizes involved.

Communication volume per step is also computed (not measured): the DDP gradient all-reduce moves the bytes of
the trainable parameters (counted in the run by the callback); a ring all-reduce over ``p`` processes sends
and receives ``2 (p - 1) / p`` times that per process (Patarasuk & Yuan, "Bandwidth optimal all-reduce
algorithms for clusters of workstations", J. Parallel Distrib. Comput. 69(2), 2009).
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]

EXPERIMENTS = ("spd_eeg", "lm_char")
# name -> (processes, threads per process, per-process batch divisor)
CONFIGS = {
    "1p x 1t": (1, 1, 1),
    "1p x 2t": (1, 2, 1),
    "2p x 1t": (2, 1, 1),
    "2p x 1t, B/2": (2, 1, 2),
}
SYNC_NORMS = ("liebn_aim", "liebn_lem", "spdbn")
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


# ------------------------------------------------------------------------------------ counting the traffic
class CountingReducer:
    """A :class:`~manifoldnorm.nn._batch_stats.StatReducer` that counts the collectives of another one.

    ``counts`` holds the number of calls and bytes of ``sum`` in the forward (``fwd``), of the all-reduces that
    the backward of ``sum`` runs (``bwd``: one per ``sum`` result that receives a gradient, counted by a tensor
    hook) and of ``max`` (``max``).
    """

    def __init__(self, inner) -> None:  # noqa: ANN001 - a StatReducer
        self.inner = inner
        self.counts = {k: [0, 0] for k in ("fwd", "bwd", "max")}

    @property
    def active(self) -> bool:
        return self.inner.active

    def _add(self, key: str, t: torch.Tensor) -> None:
        self.counts[key][0] += 1
        self.counts[key][1] += t.numel() * t.element_size()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        self._add("fwd", t)
        out = self.inner.sum(t)
        if out.requires_grad:
            out.register_hook(lambda g: self._add("bwd", g))
        return out

    def max(self, t: torch.Tensor) -> torch.Tensor:
        self._add("max", t)
        return self.inner.max(t)

    def reset(self) -> None:
        self.counts = {k: [0, 0] for k in self.counts}

    def totals(self) -> tuple[int, int]:
        """All calls and bytes counted so far."""
        return sum(c for c, _ in self.counts.values()), sum(b for _, b in self.counts.values())

    def __deepcopy__(self, memo: dict) -> CountingReducer:
        return self


def count_sync_traffic(module: torch.nn.Module) -> CountingReducer | None:
    """Wrap the (shared) reducer of every synchronized Riemannian norm of ``module``; ``None`` if there is none."""
    layers = [m for m in module.modules() if getattr(m, "stats_reducer", None) is not None]
    if not layers:
        return None
    counter = CountingReducer(layers[0].stats_reducer)
    for m in layers:
        m.stats_reducer = counter
    return counter


def sync_stats_traffic(norm: str, n: int, channels: int = 1, karcher_steps: int = 1,
                       dtype_bytes: int = 8) -> dict[str, int]:
    """All-reduces and bytes per training step (forward + backward) of one synchronized layer, computed.

    From the reductions listed in :func:`manifoldnorm.distributed.convert_sync_norm`, for ``C`` channels of
    ``n x n`` matrices: a mean's first reduction (the arithmetic start of a Karcher flow, or the codomain mean of
    LEM/LCM) carries ``C n^2`` sums and the sample count, each further Karcher step ``C n^2`` (the count is
    reused), the dispersion ``C`` sums and its count, and (LieBN) the degenerate-batch test one entry-wise
    maximum of ``2 C n^2`` numbers (:func:`manifoldnorm.nn._batch_stats.degenerate_batch`). With the default
    ``detach_mean=True`` only the dispersion is reduced again in the backward (its gradient, ``C + 1`` numbers).
    SPDBN has neither dispersion nor degenerate-batch test. Known norms:
    ``liebn_lem``/``liebn_lcm``, ``liebn_aim``/``liebn_crim`` and ``spdbn``.
    """
    stats, disp = channels * n * n, channels + 1
    if norm in ("liebn_lem", "liebn_lcm"):
        fwd = [stats + 1, disp]
    elif norm in ("liebn_aim", "liebn_crim"):
        fwd = [stats + 1] + [stats] * karcher_steps + [disp]
    elif norm == "spdbn":
        fwd = [stats + 1] + [stats] * karcher_steps
    else:
        raise ValueError(f"no traffic model for norm {norm!r}")
    bwd = [] if norm == "spdbn" else [disp]
    mx = [] if norm == "spdbn" else [2 * stats]  # the degenerate-batch test: entry-wise max and -min
    return {"calls": len(fwd) + len(bwd) + len(mx), "bytes": dtype_bytes * (sum(fwd) + sum(bwd) + sum(mx)),
            "fwd_calls": len(fwd), "bwd_calls": len(bwd), "max_calls": len(mx), "max_bytes": dtype_bytes * sum(mx)}


def ring_allreduce_bytes(nbytes: float, processes: int) -> float:
    """Bytes each process sends (and receives) in a ring all-reduce of ``nbytes``: ``2 (p - 1) / p * nbytes``."""
    return 2.0 * (processes - 1) / processes * nbytes


# -------------------------------------------------------------------------------------------- the callback
def _batch_size(batch) -> int:  # noqa: ANN001
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)):
        return _batch_size(batch[0])
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values())))
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


def _timer_class() -> type:
    """Build :class:`ThroughputTimer` (Lightning is imported on first use, not by the layer benchmark's workers)."""
    from lightning.pytorch.callbacks import Callback

    class ThroughputTimer(Callback):
        """Steady-state training throughput of a (possibly distributed) run, written as JSON by global rank 0.

        For every training batch after the first ``warmup_steps`` of the run, the wall time from the end of the
        previous batch (data loading included) to the end of this one is added up; the first batch of an epoch
        counts from its own start, so epoch boundaries (sampler set-up, validation, checkpoints) stay out. At the
        end of fitting the times, samples and steps of every process are gathered; besides samples / time, the
        global batch over the median step time of rank 0 is reported (robust to stalls caused by other programs
        on a shared machine). If the model has synchronized
        Riemannian norms, their all-reduces are counted (:class:`CountingReducer`).

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
                         "param_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in params}),
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
            Path(self.out).write_text(json.dumps(report, indent=2))

    return ThroughputTimer


def __getattr__(name: str):  # noqa: ANN202 - PEP 562: ``_bench_scale.ThroughputTimer`` for Hydra's _target_
    if name == "ThroughputTimer":
        cls = globals()[name] = _timer_class()
        cls.__module__ = __name__
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------ training runs
def _clean_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_DROP)}
    path = [str(ROOT / "launch"), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(path),
               PYTHONUNBUFFERED="1")
    return env


def train_run(experiment: str, processes: int, threads: int, batch: int, steps: int, warmup: int,
              overrides: Sequence[str], run_dir: Path) -> dict:
    """One ``launch/train.py`` run (``trainer=cpu`` or ``trainer=ddp_cpu``) with :class:`ThroughputTimer`."""
    report = run_dir / "throughput.json"
    trainer = ["trainer=cpu"] if processes == 1 else ["trainer=ddp_cpu", f"trainer.devices={processes}"]
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), f"+experiment={experiment}", *trainer, *COMMON,
           f"+trainer.max_steps={steps}", f"data.batch_size={batch}", *overrides,
           "+callbacks.scale_timer._target_=_bench_scale.ThroughputTimer", f"+callbacks.scale_timer.out={report}",
           f"+callbacks.scale_timer.warmup_steps={warmup}", f"hydra.run.dir={run_dir}"]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(threads), cwd=ROOT)
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


# ------------------------------------------------------------------------------------ one layer, 2 processes
def _spd_batch(batch: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    X = A @ A.mT / n + 0.1 * torch.eye(n, dtype=torch.float64)
    return X, torch.randn(batch, n, n, generator=g, dtype=torch.float64)


def _fwd_bwd(layer: torch.nn.Module, X: torch.Tensor, G: torch.Tensor) -> float:
    Xr = X.clone().requires_grad_()
    t0 = time.perf_counter()
    (layer(Xr) * G).sum().backward()
    return time.perf_counter() - t0


def _layer_worker(rank: int, rdv: str, out: str, norms: Sequence[str], n: int, batch: int, repeats: int) -> None:
    import copy

    from manifoldnorm.distributed.sync_norm import convert_sync_norm
    from manifoldnorm.nn import create_norm_layer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdv, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        X, G = _spd_batch(batch, n, seed=rank)
        rows = []
        for norm in norms:
            local = create_norm_layer(norm, n).to(torch.float64).train()
            synced = convert_sync_norm(copy.deepcopy(local))
            counter = count_sync_traffic(synced)
            assert counter is not None and counter.active
            times: dict[str, list[float]] = {"local": [], "sync": []}
            for i in range(3 + repeats):  # 3 warm-up rounds, then local and sync alternate
                if i == 3:
                    counter.reset()
                for name, layer in (("local", local), ("sync", synced)):
                    dt = _fwd_bwd(layer, X, G)
                    if i >= 3:
                        times[name].append(dt)
            local_ms, sync_ms = (1e3 * statistics.median(times[k]) for k in ("local", "sync"))
            calls, nbytes = counter.totals()
            rows.append({"norm": norm, "n": n, "channels": 1, "batch_per_process": batch, "processes": 2,
                         "dtype": "float64", "repeats": repeats, "local_ms": local_ms, "sync_ms": sync_ms,
                         "overhead_ms": sync_ms - local_ms, "sync_over_local": sync_ms / local_ms,
                         "calls_per_step": calls / repeats, "bytes_per_step": nbytes / repeats,
                         "counts_per_step": {k: [c / repeats, b / repeats] for k, (c, b) in counter.counts.items()},
                         "predicted": sync_stats_traffic(norm, n)})
        latency = {}  # one blocking all-reduce of a float64 buffer alone (the dispersion's, a mean's), microseconds
        for numel in (2, n * n + 1):
            buf, ts = torch.zeros(numel, dtype=torch.float64), []
            for i in range(10 + 10 * repeats):
                t0 = time.perf_counter()
                dist.all_reduce(buf)
                if i >= 10:
                    ts.append(time.perf_counter() - t0)
            latency[str(8 * numel)] = 1e6 * statistics.median(ts)
        if rank == 0:
            Path(out).write_text(json.dumps({"rows": rows, "allreduce_us": latency}, indent=2))
    finally:
        dist.destroy_process_group()


def bench_sync_layer(norms: Sequence[str], n: int, batch: int, repeats: int,
                     workdir: Path) -> tuple[list[dict], dict[str, float]]:
    """Forward+backward of each norm layer, local vs synchronized, on 2 gloo processes of one thread each.

    Both processes run the same alternating sequence (local step, synchronized step); the median wall time of
    rank 0 is reported with the all-reduce calls and bytes per step counted on it. Also returns the median
    latency in microseconds of a lone all-reduce of ``2`` and ``n^2 + 1`` float64 numbers, keyed by bytes.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "layer.json"
    mp.spawn(_layer_worker, args=(f"file://{workdir / 'rdv'}", str(out), list(norms), n, batch, repeats),
             nprocs=2, join=True)
    report = json.loads(out.read_text())
    return report["rows"], report["allreduce_us"]


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


def scale_markdown(throughput: Sequence[dict], sync_rows: Sequence[dict], layer_rows: Sequence[dict],
                   volume: Sequence[dict], allreduce_us: dict[str, float] | None = None) -> str:
    def x(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    out = []
    if throughput:
        out += ["Training throughput, steady state, samples/s of all processes (median of the repeats): over the "
                "whole window, and global batch / median step time (robust to stalls; the ratios use it):", "",
                "| experiment | processes x threads | batch / process | global batch | samples/s | samples/s at the "
                "median step | steps/s | × 1p x 1t | × 1p x 2t |", "|---" * 9 + "|"]
    for r in throughput:
        out.append(f"| {r['experiment']} | {r['config']} | {r['batch_per_process']} | {r['global_batch']} "
                   f"| {r['samples_per_s']:.0f} | {r[MEDIAN_KEY]:.0f} | {r['steps_per_s']:.2f} | {x(r['x_1p1t'])} "
                   f"| {x(r['x_1p2t'])} |")
    if sync_rows:
        out += ["", "Synchronized Riemannian norm in training (spd_eeg, trainer=ddp_cpu, 2 processes x 1 thread):",
                "", "| norm | batch / process | sync_norm=false samples/s (median step) | sync_norm=true samples/s "
                "(median step) | true / false (median step) | median step ms, false → true "
                "| all-reduces / step (predicted) | bytes / step (predicted) |", "|---" * 8 + "|"]
        for r in sync_rows:
            p = r["predicted"]
            out.append(f"| {r['norm']} | {r['batch_per_process']} | {r['local_samples_per_s']:.0f} "
                       f"({r['local_samples_per_s_median_step']:.0f}) | {r['sync_samples_per_s']:.0f} "
                       f"({r['sync_samples_per_s_median_step']:.0f}) | {r['sync_over_local']:.2f} "
                       f"({r['sync_over_local_median_step']:.2f}) | {r['local_ms_median_step']:.1f} → "
                       f"{r['sync_ms_median_step']:.1f} | {r['sync_calls_per_step']:.0f} ({p['calls']}) "
                       f"| {r['sync_bytes_per_step']:.0f} ({p['bytes']}) |")
    if layer_rows:
        out += ["", "One norm layer, forward+backward, 2 gloo processes x 1 thread (median wall ms):", "",
                "| norm | n | batch / process | local ms | synchronized ms | overhead ms | × local "
                "| all-reduces / step (predicted) | bytes / step (predicted) |", "|---" * 9 + "|"]
        for r in layer_rows:
            p = r["predicted"]
            out.append(f"| {r['norm']} | {r['n']} | {r['batch_per_process']} | {r['local_ms']:.3f} "
                       f"| {r['sync_ms']:.3f} | {r['overhead_ms']:.3f} | {r['sync_over_local']:.2f} "
                       f"| {r['calls_per_step']:.0f} ({p['calls']}) | {r['bytes_per_step']:.0f} ({p['bytes']}) |")
    if allreduce_us:
        out += ["", "A lone gloo all-reduce between the 2 processes (median): "
                + ", ".join(f"{b} bytes: {us:.0f} µs" for b, us in allreduce_us.items())]
    if volume:
        ps = list(volume[0]["ring_bytes_per_process"])
        out += ["", "Communication per optimizer step (computed): DDP gradient all-reduce, ring, per process:", "",
                "| experiment | trainable params | dtypes | gradient bytes | "
                + " | ".join(f"sent per process, p={p}" for p in ps) + " | synchronized norm statistics |",
                "|---|---|---|---|" + "---|" * len(ps) + "---|"]
        for r in volume:
            sync = ", ".join(f"{k}: {v['calls']} x, {_fmt_bytes(v['bytes'])}"
                             for k, v in r.get("sync_norm", {}).items())
            out.append(f"| {r['experiment']} | {r['params']:,} | {'/'.join(r['param_dtypes'])} "
                       f"| {_fmt_bytes(r['grad_bytes'])} | "
                       + " | ".join(_fmt_bytes(v) for v in r["ring_bytes_per_process"].values())
                       + f" | {sync or '–'} |")
    return "\n".join(out).strip("\n")
