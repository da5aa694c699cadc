"""One norm layer, local vs synchronized, on 2 gloo processes (part 3 of the ``scale`` suite).

Kept apart from :mod:`benchmarks.scale` so that the spawned workers import torch and the layers only, not
Lightning.
"""

from __future__ import annotations

import copy
import datetime
import json
import statistics
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks._harness import fwd_bwd_seconds, median_ms, round_robin, timed
from benchmarks._traffic import count_sync_traffic, sync_stats_traffic


def _spd_batch(batch: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    X = A @ A.mT / n + 0.1 * torch.eye(n, dtype=torch.float64)
    return X, torch.randn(batch, n, n, generator=g, dtype=torch.float64)


def _layer_worker(rank: int, rdv: str, out: str, norms: Sequence[str], n: int, batch: int, repeats: int) -> None:
    from manifoldnorm.distributed import convert_sync_norm
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
            steps = {name: partial(fwd_bwd_seconds, layer, X, G, time.perf_counter)
                     for name, layer in (("local", local), ("sync", synced))}
            round_robin(steps, 3)  # warm-up; both processes run the same alternating sequence
            counter.reset()
            times = round_robin(steps, repeats)
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
            buf = torch.zeros(numel, dtype=torch.float64)
            step = timed(partial(dist.all_reduce, buf), time.perf_counter)
            latency[str(8 * numel)] = 1e3 * median_ms(step, 10 * repeats, warmup=10)
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
