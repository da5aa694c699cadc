"""``optim``: normalized optimizers against AdamW on the char-level language model (``+experiment=lm_char``).

    python -m benchmarks optim                      # 25 runs of 3000 steps, 2 at a time (about 40 min on 2 cores)
    python -m benchmarks optim --optimizers adamw normuon --seeds 0 1
    python -m benchmarks optim --from-json docs/bench/bench_optim.json    # summarize saved runs again
    python -m benchmarks optim --quick              # 1 lr, seed 0, seconds-long runs: a smoke test, not a result
    python -m benchmarks optim --step-only          # Newton–Schulz step cost only: ours vs torch.optim.Muon (~1 min)

The optimizers are :func:`compared_optimizers`: ``adamw`` (the reference) and every registered optimizer that a
``conf/optimizer/<name>.yaml`` uses for the hidden matrices (its ``matrix`` group). Two parts, the same model,
data, steps and schedule for every optimizer:

1. Training. For each optimizer (``optimizer=<name>``) a light learning-rate search on seed 0 (the grid in
   ``LR_GRID``; the lr of the matrix optimizer, or of AdamW for ``adamw``), then the best lr on the other seeds.
   Runs go through ``launch/train.py`` in fresh processes (the ``sweep`` runner). Reported per optimizer, over
   seeds: final validation loss (nats/char), the step at which the mean validation curve first reaches AdamW's
   mean final validation loss (linear interpolation between validation points), and a PNG of val loss vs step.
2. Optimizer step cost, in one process: the lm_char GPT with one set of gradients, ``optimizer.step()`` of every
   composite timed round-robin (median process-CPU ms, one thread) and reported relative to AdamW's, and the
   optimizer state in bytes per parameter (all parameters, and the hidden matrices alone).

``--step-only`` times only the Newton–Schulz optimizers' ``step()`` (:func:`newton_schulz_step_cost`):
``torch.optim.Muon``, our Muon and our NorMuon (both ``adjust_lr_fn`` modes), with Newton–Schulz in bfloat16 and in
float32, on the same matrices (12 x 256x256 + 4 x 256x1024, and the lm_char GPT's hidden matrices), round-robin in
one process with one thread (median process-CPU ms), and the ratios of that same run: ours / torch (bfloat16;
torch has no other precision) and NorMuon / Muon (same precision). JSON (``outputs/bench_optim_step.json``):
``{"suite", "torch", "timer", "rounds", "rows": [{"matrices", "shapes", "ns_dtype", "optimizer", "step_ms",
"vs_torch", "vs_muon"}, ...]}``.

JSON: ``{"suite", "torch", "seeds", "jobs", "threads_per_run", "quick", "overrides", "timer", "total_wall_s",
"plot", "runs": [...], "rows": [{"optimizer", "lr", "seeds", "final_val_loss", "final_val_loss_std",
"steps_to_adamw_final", "total_steps", "steps_to_loss", "lr_search_final_val_loss", "step_ms", "step_ratio",
"state_bytes_per_param", "matrix_state_bytes_per_param", "params", "matrix_params"}, ...]}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks._harness import (
    ROOT,
    default_out,
    env_info,
    md_table,
    pyplot,
    round_robin,
    save_figure,
    timed,
    torch_threads,
    write_report,
)
from benchmarks.sweep import run_sweep_jobs
from manifoldnorm.optim import list_optimizers

REFERENCE = "adamw"
# the lr searched per optimizer: AdamW's (whole model) or the matrix optimizer's (AdamW keeps lm_char's 3e-3); the
# rows come in this order
LR_GRID = {
    "adamw": ("optimizer.rest.lr", (1e-3, 3e-3, 1e-2)),
    "muon": ("optimizer.matrix.lr", (1e-3, 3e-3, 1e-2)),
    "normuon": ("optimizer.matrix.lr", (1e-3, 3e-3, 1e-2)),
    "conda": ("optimizer.matrix.lr", (3e-3, 1e-2, 3e-2)),
    "sinkgd": ("optimizer.matrix.lr", (3e-4, 1e-3, 3e-3)),
}
# validation every 50 steps (60 epochs of 50 steps = lm_char's 3000 steps) for a fine curve
BENCH_OVERRIDES = ("data.steps_per_epoch=50", "trainer.max_epochs=60")
QUICK_OVERRIDES = ("trainer.max_epochs=2", "data.steps_per_epoch=4", "data.val_batches=2", "data.batch_size=4",
                   "model.n_layer=1", "model.d_model=16", "model.n_head=2", "data.block_size=16")
VAL_KEY = "val/loss"
THRESHOLDS = (1.6, 1.5, 1.4)  # val losses at which the steps to reach them are reported


def matrix_optimizers() -> list[str]:
    """Registered optimizers that their own ``conf/optimizer/<name>.yaml`` puts on the hidden matrices, sorted."""
    from omegaconf import OmegaConf

    names = []
    for name in list_optimizers(kind="euclidean"):
        path = ROOT / "conf" / "optimizer" / f"{name}.yaml"
        if path.is_file() and OmegaConf.select(OmegaConf.load(path), "matrix.name") == name:
            names.append(name)
    return names


def compared_optimizers() -> list[str]:
    """``adamw`` and every :func:`matrix_optimizers` entry, in the order of ``LR_GRID`` (which must cover them)."""
    names = [REFERENCE, *matrix_optimizers()]
    missing = [n for n in names if n not in LR_GRID]
    if missing:
        raise ValueError(f"optim benchmark: no learning-rate grid for {', '.join(missing)}; add it to "
                         "benchmarks.optim.LR_GRID")
    return sorted(names, key=list(LR_GRID).index)


def _job(name: str, lr: float, seed: int, quick: bool, extra: Sequence[str]) -> dict:
    key, _ = LR_GRID[name]
    overrides = (f"optimizer={name}", f"{key}={lr:g}", *(QUICK_OVERRIDES if quick else BENCH_OVERRIDES), *extra)
    return {"experiment": "lm_char", "label": f"{name}/lr{lr:g}", "seed": seed, "overrides": overrides,
            "meta": {"optimizer": name, "lr": lr}}


def _final(run: dict) -> float:
    return run["curves"][VAL_KEY][-1][1]


def train_runs(optimizers: Sequence[str], seeds: Sequence[int], out: Path, jobs: int, threads: int, quick: bool,
               extra: Sequence[str] = ()) -> tuple[list[dict], dict[str, float]]:
    """lr search on ``seeds[0]`` (every lr of :data:`LR_GRID`), then the best lr on the other seeds."""
    grids = {n: (LR_GRID[n][1][1:2] if quick else LR_GRID[n][1]) for n in optimizers}
    search = run_sweep_jobs([_job(n, lr, seeds[0], quick, extra) for n in optimizers for lr in grids[n]],
                            out, jobs, threads)
    best = {n: min((r for r in search if r["optimizer"] == n), key=_final)["lr"] for n in optimizers}
    rest = run_sweep_jobs([_job(n, best[n], s, quick, extra) for n in optimizers for s in seeds[1:]],
                          out, jobs, threads)
    return search + rest, best


def _mean_curve(runs: Sequence[dict]) -> tuple[list[int], list[float]]:
    length = min(len(r["curves"][VAL_KEY]) for r in runs)
    steps = [s for s, _ in runs[0]["curves"][VAL_KEY][:length]]
    vals = [statistics.fmean(r["curves"][VAL_KEY][i][1] for r in runs) for i in range(length)]
    return steps, vals


def steps_to_reach(steps: Sequence[int], vals: Sequence[float], target: float) -> float | None:
    """First step at which the piecewise-linear curve ``(steps, vals)`` is <= ``target`` (None if never)."""
    prev = None
    for s, v in zip(steps, vals, strict=True):
        if v <= target:
            if prev is None or prev[1] == v:
                return float(s)
            (s0, v0) = prev
            return s0 + (s - s0) * (v0 - target) / (v0 - v)
        prev = (s, v)
    return None


def summarize_optim(runs: Sequence[dict], best: dict[str, float], cost: dict[str, dict]) -> list[dict]:
    chosen = {n: [r for r in runs if r["optimizer"] == n and r["lr"] == lr] for n, lr in best.items()}
    target = statistics.fmean(_final(r) for r in chosen[REFERENCE]) if REFERENCE in chosen else None
    rows = []
    for name, group in chosen.items():
        finals = [_final(r) for r in group]
        steps, vals = _mean_curve(group)
        reach = steps_to_reach(steps, vals, target) if target is not None else None
        search = {f"{r['lr']:g}": _final(r) for r in runs if r["optimizer"] == name and r["seed"] == group[0]["seed"]}
        rows.append({"optimizer": name, "lr": best[name], "seeds": len(group),
                     "final_val_loss": statistics.fmean(finals),
                     "final_val_loss_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                     "steps_to_adamw_final": reach, "total_steps": steps[-1],
                     "steps_to_loss": {f"{t:g}": steps_to_reach(steps, vals, t) for t in THRESHOLDS},
                     "lr_search_final_val_loss": search, **cost.get(name, {})})
    return rows


def markdown(rows: Sequence[dict]) -> str:
    nan = float("nan")

    def cells(r: dict) -> list[str]:
        reach = "not reached" if r["steps_to_adamw_final"] is None else f"{r['steps_to_adamw_final']:.0f}"
        search = ", ".join(f"{k}: {v:.3f}" for k, v in r["lr_search_final_val_loss"].items())
        return [r["optimizer"], f"{r['lr']:g} ({search})",
                f"{r['final_val_loss']:.3f} ± {r['final_val_loss_std']:.3f}", f"{reach} / {r['total_steps']}",
                *("–" if v is None else f"{v:.0f}" for v in r["steps_to_loss"].values()),
                f"{r.get('step_ratio', nan):.2f}× ({r.get('step_ms', nan):.2f} ms)",
                f"{r.get('state_bytes_per_param', nan):.1f} / {r.get('matrix_state_bytes_per_param', nan):.1f}"]

    return md_table(["optimizer", "lr (searched)", "final val loss", "steps to AdamW's final",
                     *(f"steps to {t:g}" for t in THRESHOLDS), "step time vs AdamW",
                     "state bytes/param (all / matrices)"], [cells(r) for r in rows])


# --------------------------------------------------------------------------------------------- step cost
def _compose(name: str, quick: bool):  # noqa: ANN202 - a DictConfig
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    overrides = ["+experiment=lm_char", f"optimizer={name}", *(QUICK_OVERRIDES if quick else ())]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.data_info = {"vocab_size": 103, "block_size": cfg.data.block_size}
    return cfg


def step_cost(optimizers: Sequence[str], quick: bool, repeats: int | None = None) -> dict[str, dict]:
    """Median ms of ``optimizer.step()`` (ratio to AdamW's) and state bytes per parameter, same model and grads."""
    from hydra.utils import instantiate

    from manifoldnorm.optim import hidden_matrices

    setups = {}
    for name in optimizers:
        cfg = _compose(name, quick)
        torch.manual_seed(0)
        model = instantiate(cfg.model)
        idx = torch.randint(0, 103, (cfg.data.batch_size, cfg.data.block_size + 1))
        logits = model(idx[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).backward()
        opt = instantiate(cfg.optimizer)(model)
        opt.step()  # creates the state; later steps reuse the same gradients
        setups[name] = (model, opt)
    times = round_robin({name: timed(opt.step) for name, (_, opt) in setups.items()},
                        repeats or (3 if quick else 30))
    ref = statistics.median(times[REFERENCE]) if REFERENCE in times else None
    cost = {}
    for name, (model, opt) in setups.items():
        params = [p for p in model.parameters() if p.requires_grad]
        hidden = hidden_matrices(model)
        nbytes = {id(p): sum(t.numel() * t.element_size() for t in opt.state.get(p, {}).values()
                             if isinstance(t, torch.Tensor)) for p in params}
        n_hidden = sum(p.numel() for p in params if id(p) in hidden)
        ms = 1e3 * statistics.median(times[name])
        cost[name] = {"step_ms": ms, "step_ratio": (ms / (1e3 * ref)) if ref else None,
                      "state_bytes_per_param": sum(nbytes.values()) / sum(p.numel() for p in params),
                      "matrix_state_bytes_per_param": sum(nbytes[id(p)] for p in params if id(p) in hidden)
                      / max(1, n_hidden), "params": sum(p.numel() for p in params), "matrix_params": n_hidden}
    return cost


# ------------------------------------------------------------------------- Newton–Schulz step cost (--step-only)
SYNTHETIC_SHAPES = ((256, 256),) * 12 + ((256, 1024),) * 4
NS_PRECISIONS = ("bfloat16", "float32")
TORCH_MUON = "torch.optim.Muon"
NS_OPTIMIZERS = (TORCH_MUON, "Muon", "NorMuon (original)", "NorMuon (match_rms_adamw)")


def lm_char_hidden_shapes(quick: bool) -> list[tuple[int, ...]]:
    """Shapes of the lm_char GPT's hidden matrices (those ``conf/optimizer/muon.yaml`` sends to Muon)."""
    from hydra.utils import instantiate

    from manifoldnorm.optim import hidden_matrices

    model = instantiate(_compose("muon", quick).model)
    hidden = hidden_matrices(model)
    return [tuple(p.shape) for p in model.parameters() if id(p) in hidden]


def _ns_optimizer(name: str, ns_dtype: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """torch's Muon (its only precision is bfloat16) or ours, all with lr 0.02 and torch's weight decay 0.1."""
    from manifoldnorm.optim import Muon, NorMuon

    kw = {"lr": 0.02, "weight_decay": 0.1}
    if name == TORCH_MUON:
        return torch.optim.Muon(params, **kw)
    if name == "Muon":
        return Muon(params, ns_dtype=ns_dtype, **kw)
    mode = name.removeprefix("NorMuon (").removesuffix(")")
    return NorMuon(params, ns_dtype=ns_dtype, adjust_lr_fn=mode, **kw)


def newton_schulz_step_cost(quick: bool, rounds: int | None = None) -> list[dict]:
    """Median process-CPU ms of ``step()`` per (matrix set, Newton–Schulz precision, optimizer), one thread.

    Every optimizer steps its own copy of the same float32 matrices with the same gradients (one untimed step
    creates the state); all entries of a matrix set are timed round-robin in one loop (rotated start), so the
    ratios compare steps measured side by side: ``vs_torch`` = ms / torch.optim.Muon's ms (bfloat16 rows; the
    float32 rows are compared with torch's bfloat16 step, the price of full precision), ``vs_muon`` = ms / our
    Muon's ms at the same precision.
    """
    rounds = rounds or (3 if quick else 25)
    sets = {"12 x 256x256 + 4 x 256x1024": list(SYNTHETIC_SHAPES),
            "lm_char GPT hidden": lm_char_hidden_shapes(quick)}
    rows = []
    for label, shapes in sets.items():
        gen = torch.Generator().manual_seed(0)
        values = [torch.randn(s, generator=gen) for s in shapes]
        grads = [torch.randn(s, generator=gen) for s in shapes]
        steps = {}
        for ns_dtype in NS_PRECISIONS:
            for name in NS_OPTIMIZERS:
                if name == TORCH_MUON and ns_dtype != "bfloat16":
                    continue
                params = [torch.nn.Parameter(v.clone()) for v in values]
                for p, g in zip(params, grads, strict=True):
                    p.grad = g.clone()
                opt = _ns_optimizer(name, ns_dtype, params)
                opt.step()  # creates the state
                steps[(ns_dtype, name)] = timed(opt.step)
        times = round_robin(steps, rounds, warmup=1, rotate=True)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        torch_ms = ms[("bfloat16", TORCH_MUON)]
        for (ns_dtype, name), value in ms.items():
            rows.append({"matrices": label, "shapes": [list(s) for s in shapes], "ns_dtype": ns_dtype,
                         "optimizer": name, "step_ms": value, "vs_torch": value / torch_ms,
                         "vs_muon": value / ms[(ns_dtype, "Muon")]})
    return rows


def step_markdown(rows: Sequence[dict]) -> str:
    return md_table(["matrices", "Newton–Schulz", "optimizer", "step() ms", f"vs {TORCH_MUON} (bf16)",
                     "vs our Muon (same precision)"],
                    [[r["matrices"], r["ns_dtype"], r["optimizer"], f"{r['step_ms']:.2f}", f"{r['vs_torch']:.3f}x",
                      f"{r['vs_muon']:.3f}x"] for r in rows])


# --------------------------------------------------------------------------------------------------- plot
def plot_optim(runs: Sequence[dict], best: dict[str, float], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, lr in best.items():
        group = [r for r in runs if r["optimizer"] == name and r["lr"] == lr]
        steps, vals = _mean_curve(group)
        length = len(steps)
        lo = [min(r["curves"][VAL_KEY][i][1] for r in group) for i in range(length)]
        hi = [max(r["curves"][VAL_KEY][i][1] for r in group) for i in range(length)]
        ax.plot(steps, vals, label=f"{name} (lr {lr:g})")
        ax.fill_between(steps, lo, hi, alpha=0.2)
    ax.set(title=f"lm_char: validation loss ({len(group)} seeds, band = min..max)", xlabel="optimizer step",
           ylabel="val loss (nats/char)")
    top = max(v for name, lr in best.items() for r in runs if r["optimizer"] == name and r["lr"] == lr
              for _, v in r["curves"][VAL_KEY][len(r["curves"][VAL_KEY]) // 10:])
    ax.set_ylim(top=top)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    optimizers = compared_optimizers()
    parser = argparse.ArgumentParser(prog="python -m benchmarks optim", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seed 0, one lr, seconds-long runs (smoke run)")
    parser.add_argument("--step-only", action="store_true",
                        help="only time step() of torch.optim.Muon, Muon and NorMuon (bf16 and float32 Newton-Schulz)")
    parser.add_argument("--optimizers", nargs="+", default=optimizers, choices=optimizers,
                        help="optimizer configs to compare (adamw is the reference)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="torch threads per run (the first; 1)")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed optimizer steps (default 30, --step-only 25, --quick 3)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --out)")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="re-summarize the runs saved in this JSON instead of training")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default outputs/bench_optim.json)")
    return parser


def _resummarize(path: Path, meta: dict) -> list[dict]:
    """Rows from the runs and step costs saved in an earlier report (no training)."""
    saved = json.loads(path.read_text())
    best = {r["optimizer"]: r["lr"] for r in saved["rows"]}
    keys = ("step_ms", "step_ratio", "state_bytes_per_param", "matrix_state_bytes_per_param", "params",
            "matrix_params")
    cost = {r["optimizer"]: {k: r[k] for k in keys} for r in saved["rows"]}
    rows = summarize_optim(saved["runs"], best, cost)
    print(markdown(rows))
    meta.update({k: v for k, v in saved.items() if k not in ("rows", "suite", "torch")})
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    meta = env_info("optim")
    if args.step_only:
        out = args.out or default_out("optim_step")
        with torch_threads(1):
            rows = newton_schulz_step_cost(args.quick, args.repeats)
        print(step_markdown(rows))
        meta.update(mode="step_only", quick=args.quick, timer="time.process_time, 1 thread, median, round-robin",
                    rounds=args.repeats or (3 if args.quick else 25))
        return write_report(out, meta, rows)
    out = args.out or default_out("optim")
    if args.from_json:
        return write_report(out, meta, _resummarize(args.from_json, meta))
    seeds = [0] if args.quick else args.seeds
    threads = (args.threads or [1])[0]
    t0 = time.perf_counter()
    runs, best = train_runs(args.optimizers, seeds, out.parent / f"{out.stem}_runs", args.jobs, threads,
                            args.quick, args.override)
    with torch_threads(1):
        cost = step_cost(args.optimizers, args.quick, args.repeats)
    rows = summarize_optim(runs, best, cost)
    png = plot_optim(runs, best, args.plot or out.with_suffix(".png"))
    print(markdown(rows))
    print(f"wrote {png}")
    meta.update(seeds=seeds, jobs=args.jobs, threads_per_run=threads, quick=args.quick, overrides=args.override,
                timer="time.process_time, 1 thread", total_wall_s=time.perf_counter() - t0, plot=str(png), runs=runs)
    return write_report(out, meta, rows)


if __name__ == "__main__":
    main()
