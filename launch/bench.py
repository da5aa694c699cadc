"""Benchmarks: ``python launch/bench.py {spectral,norms,sweep,layers,optim,scale} [--quick] [--out <json>]``.

``scale`` (see ``launch/_bench_scale.py`` and ``docs/scale.md``) measures training throughput of ``spd_eeg`` and
``lm_char`` on 1 process (1 and 2 threads) vs 2 DDP processes on gloo (1 thread each; same per-process batch
and same global batch), the cost of synchronized Riemannian norms (``sync_norm=true`` vs ``false`` in training,
and one layer's forward+backward with its all-reduce calls and bytes counted), and the communication volume per
step::

    python launch/bench.py scale --out docs/bench/bench_scale.json   # 6-12 min on 2 cores
    python launch/bench.py scale --quick                              # smoke run: tiny spd_eeg only
    python launch/bench.py scale --experiments lm_char --configs "1p x 2t" "2p x 1t" --repeats 3

``optim`` (see ``launch/_bench_optim.py``) trains ``lm_char`` with AdamW, Muon, NorMuon, Conda and SinkGD: a
3-point lr search on seed 0, the best lr on seeds 1 and 2; final val loss, steps to reach AdamW's final val loss,
``optimizer.step()`` time relative to AdamW and optimizer state bytes per parameter, plus a PNG of the curves::

    python launch/bench.py optim                      # 25 runs of 3000 steps, 2 at a time (about 40 min on 2 cores)
    python launch/bench.py optim --optimizers adamw normuon --seeds 0 1

``sweep`` and ``layers`` (see ``launch/_bench_euclid.py``) cover the Euclidean norms: a norm sweep of the
``lm_char`` and ``cnn_digits`` experiments over 3 seeds (table + PNG of validation curves), and forward+backward
time of every Euclidean norm layer relative to torch's LayerNorm and RMSNorm::

    python launch/bench.py sweep                      # 4 LM norms + 5 CNN norms x 3 seeds, 2 runs at a time
    python launch/bench.py sweep --experiments lm_char --norms layernorm dyt --seeds 0 1
    python launch/bench.py layers                     # widths 256, 768, 1024 on 2048 tokens, float32

``norms`` (see ``launch/_bench_norms.py``) times forward+backward of every registered SPD/Lie norm layer over a
grid of sizes, dtypes and thread counts, beside the published reference times, with the relative error of output
and input gradient against each layer's ``forward_ref``::

    python launch/bench.py norms                                  # full grid, a few minutes on 2 cores
    python launch/bench.py norms --quick                          # n=20, N=32, few repeats
    python launch/bench.py norms --norms liebn_aim spdbn --sizes 20x32 93x128 --threads 1 --dtypes float64

``spectral`` times forward+backward of the matrix logarithm of a batch of SPD matrices, three ways, side by side
in one process (these machines are noisy; compare ratios, not absolute numbers):

* ``ours``: :func:`manifoldnorm.functional.sym_logm` (one batched ``eigh``, Daleckii–Krein backward);
* ``eigh_autograd``: the same forward differentiated by ``torch.linalg.eigh``'s own backward;
* ``svd_loop``: one ``torch.linalg.svd`` per matrix in a Python loop, the layout of the published SPDNet code.

It also reports the relative gradient error of each against ``ours`` at a random input, and whether each
gives a finite gradient at ``X = 2I`` (repeated eigenvalues). Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import _bench_scale as sc
import torch
from _bench_euclid import (
    EXPERIMENTS,
    LAYER_TOKENS,
    LAYER_WIDTHS,
    SWEEP_NORMS,
    bench_layers,
    layer_norms,
    layers_markdown,
    plot_sweep,
    run_sweep,
    summarize,
    sweep_markdown,
)
from _bench_norms import QUICK_SIZES, SIZES, bench_norms, default_norms, floor_rows, markdown, parse_size
from _bench_optim import OPTIMIZERS, optim_markdown, plot_optim, step_cost, summarize_optim, train_runs

from manifoldnorm import functional as mf
from manifoldnorm.nn import list_norms


def _svd_loop_logm(X: torch.Tensor) -> torch.Tensor:
    flat = X.reshape(-1, *X.shape[-2:])
    outs = []
    for A in flat:
        U, S, _ = torch.linalg.svd(A)
        outs.append((U * torch.log(S)) @ U.T)
    return torch.stack(outs).reshape(X.shape)


IMPLS = {"ours": mf.sym_logm, "eigh_autograd": mf.sym_logm_ref, "svd_loop": _svd_loop_logm}


def _time(fn, X: torch.Tensor, G: torch.Tensor, repeats: int, warmup: int = 3) -> float:
    times = []
    for i in range(warmup + repeats):
        Xr = X.clone().requires_grad_()
        t0 = time.process_time()
        (fn(Xr) * G).sum().backward()
        dt = time.process_time() - t0
        if i >= warmup:
            times.append(dt * 1e3)
    return statistics.median(times)


def _grad(fn, X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    Xr = X.clone().requires_grad_()
    (fn(Xr) * G).sum().backward()
    return mf.sym(Xr.grad)


def bench_spectral(quick: bool) -> list[dict]:
    sizes = [(20, 32)] if quick else [(20, 32), (20, 128), (93, 32), (93, 128)]
    dtypes = [torch.float64] if quick else [torch.float64, torch.float32]
    repeats = 3 if quick else 15
    rows = []
    for n, N in sizes:
        for dtype in dtypes:
            g = torch.Generator().manual_seed(0)
            A = torch.randn(N, n, n, generator=g, dtype=torch.float64)
            X = (A @ A.mT / n + 0.1 * torch.eye(n, dtype=torch.float64)).to(dtype)
            G = torch.randn(N, n, n, generator=g, dtype=torch.float64).to(dtype)
            ref_grad = _grad(mf.sym_logm, X.double(), G.double())
            tie = (2.0 * torch.eye(n, dtype=dtype)).expand(2, n, n).contiguous()
            for name, fn in IMPLS.items():
                grad = _grad(fn, X, G).double()
                rel = float(torch.linalg.norm(grad - ref_grad) / torch.linalg.norm(ref_grad))
                finite_at_tie = bool(torch.isfinite(_grad(fn, tie, G[:2])).all())
                rows.append({
                    "op": "logm", "impl": name, "n": n, "N": N, "dtype": str(dtype).replace("torch.", ""),
                    "threads": torch.get_num_threads(), "ms": round(_time(fn, X, G, repeats), 3),
                    "grad_rel_err_vs_ours_f64": rel, "finite_grad_at_2I": finite_at_tie,
                })
    return rows


def _markdown(rows: list[dict]) -> str:
    lines = ["| n | N | dtype | impl | fwd+bwd ms (median CPU) | × ours | grad rel. err | finite at 2I |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(x["ms"] for x in rows
                    if x["impl"] == "ours" and (x["n"], x["N"], x["dtype"]) == (r["n"], r["N"], r["dtype"]))
        lines.append(f"| {r['n']} | {r['N']} | {r['dtype']} | {r['impl']} | {r['ms']:.2f} | {r['ms'] / base:.2f} "
                     f"| {r['grad_rel_err_vs_ours_f64']:.1e} | {'yes' if r['finite_grad_at_2I'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=["spectral", "norms", "sweep", "layers", "optim", "scale"])
    parser.add_argument("--quick", action="store_true", help="one size, few repeats (smoke run)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch thread counts (spectral: the first; norms: default 1 2, --quick: 1)")
    parser.add_argument("--norms", nargs="+", default=None,
                        help="norm names (norms: every SPD/Lie norm; layers: every Euclidean norm; sweep: per "
                             "experiment, see SWEEP_NORMS; scale: the synchronized norms, default "
                             f"{' '.join(sc.SYNC_NORMS)})")
    parser.add_argument("--sizes", nargs="+", default=None, help="norms: nxN sizes, e.g. 20x32 93x128")
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats (default: adaptive; scale: rounds of training runs, default 1)")
    parser.add_argument("--experiments", nargs="+", default=None, choices=[*EXPERIMENTS, "spd_eeg"],
                        help="sweep: lm_char cnn_digits (default both); scale: spd_eeg lm_char (default both)")
    parser.add_argument("--configs", nargs="+", default=None, choices=list(sc.CONFIGS),
                        help="scale: processes x threads configurations (default all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="sweep: runs at a time")
    parser.add_argument("--override", nargs="*", default=[], help="sweep: extra Hydra overrides for every run")
    parser.add_argument("--widths", type=int, nargs="+", default=list(LAYER_WIDTHS), help="layers: feature widths")
    parser.add_argument("--tokens", type=int, default=LAYER_TOKENS, help="layers: rows of the input")
    parser.add_argument("--plot", type=Path, default=None, help="sweep: PNG path (default: next to --out)")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS),
                        help="optim: optimizer configs to compare (adamw is the reference)")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="optim: re-summarize the runs saved in this JSON instead of training")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or Path("outputs") / f"bench_{args.suite}.json"
    meta = {"suite": args.suite, "torch": torch.__version__}
    if args.suite == "sweep":
        rows = _sweep(parser, args, out, meta)
    elif args.suite == "scale":
        rows = _scale(parser, args, out, meta)
    elif args.suite == "optim":
        rows = _optim(args, out, meta)
    elif args.suite == "layers":
        known = layer_norms()
        norms = args.norms or known
        unknown = sorted(set(norms) - set(known))
        if unknown:
            parser.error(f"unknown norm(s) {', '.join(unknown)}; valid: {', '.join(known)}")
        torch.set_num_threads((args.threads or [1])[0])
        widths = [64] if args.quick else args.widths
        tokens = 256 if args.quick else args.tokens
        rows = bench_layers(norms, widths, tokens, getattr(torch, args.dtypes[-1] if args.dtypes else "float32"),
                            3 if args.quick else args.repeats)
        meta.update(timer="time.process_time", threads=torch.get_num_threads())
        print(layers_markdown(rows))
    elif args.suite == "spectral":
        torch.set_num_threads((args.threads or [1])[0])
        rows = bench_spectral(args.quick)
        print(_markdown(rows))
    else:
        known = default_norms()
        norms = args.norms or known
        unknown = sorted(set(norms) - set(known))
        if unknown:
            parser.error(f"unknown norm(s) {', '.join(unknown)}; valid: {', '.join(known)}")
        try:
            sizes = [parse_size(t) for t in args.sizes] if args.sizes else list(QUICK_SIZES if args.quick else SIZES)
        except ValueError as err:
            parser.error(str(err))
        threads = args.threads or ([1] if args.quick else [1, 2])
        repeats = args.repeats or (5 if args.quick else None)
        dtypes = [getattr(torch, d) for d in args.dtypes]
        rows, overhead = bench_norms(norms, sizes, dtypes, threads, repeats)
        floors = floor_rows(sizes, repeats) if torch.float64 in dtypes else []
        print(markdown(rows, overhead, floors))
        meta.update(timer="time.process_time (process CPU, all threads)", validate=False, overhead=overhead,
                    floors=floors)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


def _sweep(parser: argparse.ArgumentParser, args: argparse.Namespace, out: Path, meta: dict) -> list[dict]:
    args.experiments = args.experiments or list(EXPERIMENTS)
    if "spd_eeg" in args.experiments:
        parser.error("sweep: --experiments takes lm_char and cnn_digits")
    known = set(list_norms(kind="euclidean"))
    norms = {e: tuple(args.norms) if args.norms else SWEEP_NORMS[e] for e in args.experiments}
    unknown = sorted({n for ns in norms.values() for n in ns} - known)
    if unknown:
        parser.error(f"unknown norm(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    seeds = [0] if args.quick else args.seeds
    threads = (args.threads or [1])[0]
    t0 = time.perf_counter()
    runs = run_sweep(args.experiments, norms, seeds, out.parent / f"{out.stem}_runs", args.jobs, threads,
                     args.quick, args.override)
    summary = summarize(runs)
    png = plot_sweep(runs, args.plot or out.with_suffix(".png"))
    print(sweep_markdown(summary))
    print(f"wrote {png}")
    meta.update(seeds=seeds, jobs=args.jobs, threads_per_run=threads, quick=args.quick, overrides=args.override,
                total_wall_s=time.perf_counter() - t0, plot=str(png), runs=runs)
    return summary


def _optim(args: argparse.Namespace, out: Path, meta: dict) -> list[dict]:
    if args.from_json:  # summarize saved runs again (no training)
        saved = json.loads(args.from_json.read_text())
        best = {r["optimizer"]: r["lr"] for r in saved["rows"]}
        keys = ("step_ms", "step_ratio", "state_bytes_per_param", "matrix_state_bytes_per_param", "params",
                "matrix_params")
        cost = {r["optimizer"]: {k: r[k] for k in keys} for r in saved["rows"]}
        rows = summarize_optim(saved["runs"], best, cost)
        print(optim_markdown(rows))
        meta.update({k: v for k, v in saved.items() if k not in ("rows", "suite", "torch")})
        return rows
    seeds = [0] if args.quick else args.seeds
    threads = (args.threads or [1])[0]
    t0 = time.perf_counter()
    runs, best = train_runs(args.optimizers, seeds, out.parent / f"{out.stem}_runs", args.jobs, threads,
                            args.quick, args.override)
    torch.set_num_threads(1)
    cost = step_cost(args.optimizers, args.quick, args.repeats)
    rows = summarize_optim(runs, best, cost)
    png = plot_optim(runs, best, args.plot or out.with_suffix(".png"))
    print(optim_markdown(rows))
    print(f"wrote {png}")
    meta.update(seeds=seeds, jobs=args.jobs, threads_per_run=threads, quick=args.quick, overrides=args.override,
                timer="time.process_time, 1 thread", total_wall_s=time.perf_counter() - t0, plot=str(png), runs=runs)
    return rows


def _scale(parser: argparse.ArgumentParser, args: argparse.Namespace, out: Path, meta: dict) -> list[dict]:
    import tempfile

    experiments = args.experiments or (["spd_eeg"] if args.quick else list(sc.EXPERIMENTS))
    unknown = sorted(set(experiments) - set(sc.EXPERIMENTS))
    if unknown:
        parser.error(f"scale: unknown experiment(s) {', '.join(unknown)}; valid: {', '.join(sc.EXPERIMENTS)}")
    configs = args.configs or (["1p x 1t", "2p x 1t"] if args.quick else list(sc.CONFIGS))
    configs = [c for c in sc.CONFIGS if c in configs]  # the baselines first
    norms = args.norms or (["liebn_lem"] if args.quick else list(sc.SYNC_NORMS))
    unknown = sorted(set(norms) - set(sc.SYNC_NORMS))
    if unknown:
        parser.error(f"scale: no traffic model for norm(s) {', '.join(unknown)}; valid: {', '.join(sc.SYNC_NORMS)}")
    repeats = args.repeats or 1
    n, batch = (sc.QUICK_LAYER_N, sc.QUICK_LAYER_BATCH) if args.quick else (sc.LAYER_N, sc.LAYER_BATCH)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        work = Path(tmp)
        print("training throughput:", flush=True)
        rows, runs = sc.bench_throughput(experiments, configs, args.quick, repeats, work / "throughput")
        print("synchronized norms in training:", flush=True)
        sync_rows, sync_runs = sc.bench_sync_training(norms, args.quick, repeats, work / "sync")
        print("one norm layer, local vs synchronized:", flush=True)
        layer_rows, latency = sc.bench_sync_layer(list(sc.SYNC_NORMS), n, batch, 5 if args.quick else 60,
                                                  work / "layer")
    volume = sc.comm_volume(rows, sync_rows)
    print(sc.scale_markdown(rows, sync_rows, layer_rows, volume, latency))
    keep = ("experiment", "config", "norm", "sync", "repeat", "samples_per_s", "seconds", "samples", "steps",
            "total_steps", "seconds_per_rank", "samples_per_rank", "torch_threads", "world_size", "wall_s",
            "sync_calls_per_step", "sync_bytes_per_step", "median_step_s", "samples_per_s_median_step", "load_1min")
    meta.update(quick=args.quick, repeats=repeats, cpus=os.cpu_count(), configs={c: sc.CONFIGS[c] for c in configs},
                sizes={e: dict(zip(("batch_per_process", "steps", "warmup_steps", "overrides"),
                                   (sc.QUICK if args.quick else sc.FULL)[e], strict=True))
                       for e in dict.fromkeys([*experiments, "spd_eeg"])},
                common_overrides=sc.COMMON,
                timer="wall time of global rank 0 over the training batches after warm-up (ThroughputTimer)",
                layer_timer="median wall time of rank 0 (time.perf_counter), one thread per process",
                total_wall_s=time.perf_counter() - t0, sync_training=sync_rows, sync_layer=layer_rows,
                allreduce_latency_us=latency,
                comm_volume=volume, runs=[{k: r[k] for k in keep if k in r} for r in runs + sync_runs])
    return rows


if __name__ == "__main__":
    main()
