"""The ``optim`` suite of ``launch/bench.py``: normalized optimizers on the char-level language model.

Two parts, both on ``+experiment=lm_char`` (same model, data, steps and schedule for every optimizer):

1. Training. For each optimizer (``optimizer=<name>``) a light learning-rate search on seed 0 (the grid in
   ``LR_GRID``; the lr of the matrix optimizer, or of AdamW for ``adamw``), then the best lr on the other seeds.
   Runs go through ``launch/train.py`` in fresh processes (the ``sweep`` runner). Reported per optimizer, over
   seeds: final validation loss (nats/char), the step at which the mean validation curve first reaches AdamW's
   mean final validation loss (linear interpolation between validation points), and a PNG of val loss vs step.
2. Optimizer step cost, in one process: the lm_char GPT with one set of gradients, ``optimizer.step()`` of every
   composite timed round-robin (median process-CPU ms, one thread) and reported relative to AdamW's, and the
   optimizer state in bytes per parameter (all parameters, and the hidden matrices alone).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from _bench_euclid import ROOT, read_metrics, run_sweep_jobs

OPTIMIZERS = ("adamw", "muon", "normuon", "conda", "sinkgd")
# the lr searched per optimizer: AdamW's (whole model) or the matrix optimizer's (AdamW keeps lm_char's 3e-3)
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
    target = statistics.fmean(_final(r) for r in chosen["adamw"]) if "adamw" in chosen else None
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


def optim_markdown(rows: Sequence[dict]) -> str:
    head = " | ".join(f"steps to {t:g}" for t in THRESHOLDS)
    lines = ["| optimizer | lr (searched) | final val loss | steps to AdamW's final | " + head
             + " | step time vs AdamW | state bytes/param (all / matrices) |",
             "|---|---|---|---|" + "---|" * len(THRESHOLDS) + "---|---|"]
    for r in rows:
        reach = "not reached" if r["steps_to_adamw_final"] is None else f"{r['steps_to_adamw_final']:.0f}"
        search = ", ".join(f"{k}: {v:.3f}" for k, v in r["lr_search_final_val_loss"].items())
        lines.append(f"| {r['optimizer']} | {r['lr']:g} ({search}) | {r['final_val_loss']:.3f} ± "
                     f"{r['final_val_loss_std']:.3f} | {reach} / {r['total_steps']} | "
                     + "".join("– | " if v is None else f"{v:.0f} | " for v in r["steps_to_loss"].values()) +
                     f"{r.get('step_ratio', float('nan')):.2f}× ({r.get('step_ms', float('nan')):.2f} ms) | "
                     f"{r.get('state_bytes_per_param', float('nan')):.1f} / "
                     f"{r.get('matrix_state_bytes_per_param', float('nan')):.1f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- step cost
def _compose(name: str, quick: bool):
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
    times: dict[str, list[float]] = {n: [] for n in optimizers}
    for _ in range(repeats or (3 if quick else 30)):
        for name, (_, opt) in setups.items():
            t0 = time.process_time()
            opt.step()
            times[name].append(time.process_time() - t0)
    ref = statistics.median(times["adamw"]) if "adamw" in times else None
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


# --------------------------------------------------------------------------------------------------- plot
def plot_optim(runs: Sequence[dict], best: dict[str, float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["OPTIMIZERS", "LR_GRID", "train_runs", "step_cost", "summarize_optim", "optim_markdown", "plot_optim",
           "steps_to_reach", "read_metrics"]
