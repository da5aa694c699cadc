"""``optim``: normalized optimizers against AdamW, tuned alike, on the char-level LM of ``+experiment=lm_corpus``.

    python -m benchmarks optim --dry-run            # the plan: runs, cached ones, estimated hours on this machine
    python -m benchmarks optim                      # the study (resumable: finished runs are read back, not rerun)
    python -m benchmarks optim --optimizers adamw muon --seeds 0 1
    python -m benchmarks optim --size small         # the same study with lm_char's 2 x 96 model (a check)
    python -m benchmarks optim --from-json outputs/bench_optim.json    # summarize saved runs again
    python -m benchmarks optim --quick              # seed 0, one lr, seconds-long runs: a smoke test, not a result
    python -m benchmarks optim --step-only          # Newton–Schulz step cost only: ours vs torch.optim.Muon (~1 min)

The rows are :data:`VARIANTS`: ``adamw`` (the reference), every optimizer that a ``conf/optimizer/<name>.yaml``
puts on the hidden matrices (Muon, NorMuon twice: ``adjust_lr_fn=original`` as in the authors' code and
``match_rms_adamw`` as in the paper, each with its own lr search; Conda; SinkGD) and AdamP (the whole model, like
AdamW). The setting is ``lm_corpus``: a 4 x 128 GPT, 600 steps of 16 x 128 characters of the ~2.9 M-character
offline corpus (half a pass over its training text: the validation loss measures learning, not memorizing).

Per variant, every run through ``launch/train.py`` in a fresh process (``--jobs`` at a time, one thread each):

1. lr search on seed 0 at weight decay :data:`WD_LR_SEARCH`: the three lrs of its initial grid (consecutive
   points of the ladder 1, 3, 10, 30, ... x 1e-k, factors of ~3), then the ladder extended at the edge until the
   best lr has a worse neighbour on both sides (*bracketed*), at most ``--max-extend`` points per side (then the
   row says "not bracketed"). A run that diverges (stopped by the non-finite guard, or a non-finite loss) counts
   as infinitely bad. The searched lr is the matrix optimizer's (AdamW 3e-3 keeps the rest); for ``adamw`` and
   ``adamp`` the whole model's.
2. weight-decay search at that lr, the same for everyone: :data:`WD_GRID` (the run at ``WD_LR_SEARCH`` reused).
   The weight decay is that of the searched group (the matrices; the whole model for adamw and adamp).
3. if the chosen weight decay is another one, the lr bracket is searched again at it (same rule, from the
   chosen lr and its two neighbours).
4. the chosen (lr, wd) on the other seeds.

Selection is by the final validation loss of seed 0. Reported per variant: the bracket (lr below, chosen, above
with their losses; bracketed or not), the weight decays tried, final train loss (mean over the last validation
interval's steps), final validation loss and test loss (best checkpoint) mean ± std over seeds, the tokens (and
steps) at which the mean validation curve first reaches each of :data:`THRESHOLDS` (linear interpolation), the
step at which it reaches AdamW's final mean validation loss and the speed-up over AdamW it implies (AdamW's own step
for that loss divided by it: the papers' "x times fewer steps than AdamW"), and,
measured in one process side by side for all variants (round-robin, median process-CPU ms, one thread, same
model and gradients): ``optimizer.step()`` time, its ratio to AdamW's and its share of a training step
(forward + backward + step), and the optimizer state in bytes per parameter. A PNG shows the mean train and
validation curves of the chosen setting per variant.

Runs are cached by run directory (``<out>_runs/<variant>/lr<lr>_wd<wd>/seed<s>/result.json``, holding the
overrides it ran with): an interrupted study started again skips what finished. A run that fails is an error
(the study stops, nothing is cached), except one stopped by the non-finite guard: it is recorded as diverged and
not retried.

JSON: ``{"suite", "torch", "experiment", "size", "seeds", "jobs", "threads_per_run", "quick", "overrides",
"tokens_per_step", "corpus", "thresholds", "timer", "total_wall_s", "plot", "runs": [...], "plans": {...},
"rows": [{"optimizer", "config", "lr", "weight_decay", "bracketed", "lr_bracket", "wd_search", "seeds",
"final_train_loss", "final_train_loss_std", "final_val_loss", "final_val_loss_std", "test_loss", "test_loss_std",
"total_steps", "to_threshold", "reference_final_val", "to_reference_final", "speedup", "step_ms", "step_ratio",
"step_share", "fwd_bwd_ms", "state_bytes_per_param", "matrix_state_bytes_per_param", "params", "matrix_params"},
...]}``.

``--step-only`` times only the Newton–Schulz optimizers' ``step()`` (:func:`newton_schulz_step_cost`):
``torch.optim.Muon``, our Muon and our NorMuon (both ``adjust_lr_fn`` modes), with Newton–Schulz in bfloat16 and in
float32, on the same matrices (12 x 256x256 + 4 x 256x1024, and the lm_char GPT's hidden matrices), round-robin in
one process with one thread (median process-CPU ms), and the ratios of that same run: ours / torch (bfloat16;
torch has no other precision) and NorMuon / Muon (same precision). JSON (``outputs/bench_optim_step.json``):
``{"suite", "torch", "timer", "rounds", "rows": [{"matrices", "shapes", "ns_dtype", "optimizer", "step_ms",
"vs_torch", "vs_muon"}, ...]}``.

"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks._harness import (
    ROOT,
    child_env,
    default_out,
    env_info,
    fmt,
    md_table,
    pyplot,
    round_robin,
    save_figure,
    timed,
    torch_threads,
    write_report,
)
from manifoldnorm.optim import list_optimizers

EXPERIMENT = "lm_corpus"
REFERENCE = "adamw"


@dataclass(frozen=True)
class Variant:
    """One row of the study: ``optimizer=<config>`` plus ``extra`` overrides; ``group`` (``matrix`` or ``rest``)
    is the sub-optimizer whose lr and weight decay are searched; ``lrs`` the initial lr grid (3 ladder points)."""

    name: str
    config: str
    group: str
    lrs: tuple[float, float, float]
    extra: tuple[str, ...] = ()

    @property
    def lr_key(self) -> str:
        return f"optimizer.{self.group}.lr"

    @property
    def wd_key(self) -> str:
        return f"optimizer.{self.group}.weight_decay"


# The rows, in this order. Initial grids centred on what earlier runs suggest; the search extends them anyway.
VARIANTS: tuple[Variant, ...] = (
    Variant("adamw", "adamw", "rest", (1e-3, 3e-3, 1e-2)),
    Variant("muon", "muon", "matrix", (3e-3, 1e-2, 3e-2), ("optimizer.matrix.adjust_lr_fn=match_rms_adamw",)),
    # the authors' code: lr scaled by sqrt(max(1, m/n)) (1 or 2 here) instead of 0.2 sqrt(max(m, n)) (2.3 or 4.5
    # for 128 x 128 and 512 x 128 matrices), hence a grid ~3x higher than match_rms_adamw's
    Variant("normuon_original", "normuon", "matrix", (1e-2, 3e-2, 1e-1), ("optimizer.matrix.adjust_lr_fn=original",)),
    Variant("normuon_match_rms", "normuon", "matrix", (3e-3, 1e-2, 3e-2),
            ("optimizer.matrix.adjust_lr_fn=match_rms_adamw",)),
    # update_proj_gap 2000 (the paper's long runs) would never refresh the basis in 600 steps
    Variant("conda", "conda", "matrix", (3e-3, 1e-2, 3e-2), ("optimizer.matrix.update_proj_gap=50",)),
    Variant("sinkgd", "sinkgd", "matrix", (1e-3, 3e-3, 1e-2)),
    Variant("adamp", "adamp", "rest", (1e-3, 3e-3, 1e-2)),
)
BY_NAME = {v.name: v for v in VARIANTS}

WD_GRID = (0.0, 0.01, 0.1)
WD_LR_SEARCH = 0.01  # the weight decay of the lr search (steps 1 and 3 share the ladder rule)
MAX_EXTEND = 3  # ladder points added per side at most before a row is reported "not bracketed"
LR_RANGE = (1e-5, 3.0)  # the ladder is not extended beyond these

# model sizes: base = the experiment's 4 x 128 (600 steps, half a pass); small = lm_char's 2 x 96 model and its
# batch (2048 characters per step too), 1200 steps = one pass over the training text, in about the same time
SIZES = {
    "base": (),
    "small": ("model.n_layer=2", "model.d_model=96", "data.block_size=64", "data.batch_size=32",
              "trainer.max_epochs=24"),
}
QUICK_OVERRIDES = ("data.source=pydoc", "trainer.max_epochs=2", "data.steps_per_epoch=4", "data.val_batches=2",
                   "data.batch_size=4", "model.n_layer=1", "model.d_model=16", "model.n_head=2", "data.block_size=16",
                   "test=false")
VAL_KEY, TRAIN_KEY = "val/loss", "train/loss_epoch"
# validation losses (nats/char) whose time to reach is reported: between the count models' levels on the validation
# text (bigram 2.68, smoothed trigram 2.11); AdamW 3e-3 is at 2.49 after 500 steps
THRESHOLDS = (2.6, 2.4, 2.2)
# seconds per run, one thread, extrapolated from short real runs on a 2-core machine (process CPU time; Muon-type
# steps 0.30 s, AdamW 0.24 s; + 12 validations and ~13 s of start-up and test): base 600 steps ~175-210 s; small
# 1200 steps at ~0.08 s + 24 validations ~115 s
RUN_SECONDS = {"base": 195.0, "small": 115.0}


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
    """The names of :data:`VARIANTS`; every :func:`matrix_optimizers` entry must be the config of one."""
    configs = {v.config for v in VARIANTS}
    missing = [n for n in [REFERENCE, *matrix_optimizers()] if n not in configs]
    if missing:
        raise ValueError(f"optim benchmark: no study row for {', '.join(missing)}; add it to "
                         "benchmarks.optim.VARIANTS")
    return [v.name for v in VARIANTS]


# ----------------------------------------------------------------------------------------------- the ladder
def ladder_index(lr: float) -> int:
    """Position of ``lr`` on the ladder ``..., 1e-3, 3e-3, 1e-2, 3e-2, ...`` (index ``2k`` is ``1e{k}``)."""
    k = math.floor(math.log10(lr) + 1e-9)
    return 2 * k + (1 if lr / 10.0**k > 2.0 else 0)


def ladder_value(i: int) -> float:
    return float(f"{(1, 3)[i % 2]}e{i // 2}")


@dataclass(frozen=True)
class Bracket:
    """State of an lr search: the lrs still to run (``needed``), the best so far and whether it is bracketed."""

    needed: tuple[float, ...]
    best: float | None
    bracketed: bool
    below: float | None
    above: float | None


def bracket(losses: dict[float, float], initial: Sequence[float], max_extend: int = MAX_EXTEND) -> Bracket:
    """Next step of the bracketing rule, given the final losses of the lrs run so far (``inf``: diverged).

    Run ``initial``; then, while the best lr lacks an evaluated neighbour on the ladder, run that neighbour,
    unless it lies more than ``max_extend`` points beyond ``initial`` or outside :data:`LR_RANGE` (then the
    search stops with ``bracketed=False``). ``bracketed``: both neighbours run and worse than the best (ties
    broken towards the smaller lr)."""
    by_index = {ladder_index(lr): loss for lr, loss in losses.items()}
    todo = tuple(lr for lr in initial if ladder_index(lr) not in by_index)
    if todo:
        return Bracket(todo, None, False, None, None)
    lo, hi = min(map(ladder_index, initial)), max(map(ladder_index, initial))
    best = min(by_index, key=lambda i: (_key(by_index[i]), i))
    needed = []
    for side in (best - 1, best + 1):
        if side not in by_index and lo - max_extend <= side <= hi + max_extend \
                and LR_RANGE[0] <= ladder_value(side) <= LR_RANGE[1]:
            needed.append(ladder_value(side))
    below, above = by_index.get(best - 1), by_index.get(best + 1)
    done = below is not None and above is not None
    bracketed = done and _key(below) > _key(by_index[best]) and _key(above) > _key(by_index[best])
    return Bracket(tuple(needed), ladder_value(best), bracketed,
                   ladder_value(best - 1) if below is not None else None,
                   ladder_value(best + 1) if above is not None else None)


def _key(loss: float | None) -> float:
    return loss if loss is not None and math.isfinite(loss) else math.inf


# --------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Key:
    """A run: variant, matrix (or whole-model) lr and weight decay, seed."""

    name: str
    lr: float
    wd: float
    seed: int


def plan(variant: Variant, results: dict[Key, dict], seeds: Sequence[int], quick: bool = False,
         max_extend: int = MAX_EXTEND) -> tuple[list[Key], dict | None]:
    """The runs that ``variant`` needs next given the finished ``results`` (``[]`` once done), and when done the
    choice ``{"lr", "weight_decay", "bracketed", "lr_bracket": {...}, "wd_search": {...}, "stages": {...}}``."""
    name, s0 = variant.name, seeds[0]
    initial = variant.lrs[1:2] if quick else variant.lrs
    extend = 0 if quick else max_extend
    wd_grid = (WD_LR_SEARCH,) if quick else WD_GRID

    def losses(wd: float) -> dict[float, float]:
        return {k.lr: final_val(r) for k, r in results.items() if (k.name, k.wd, k.seed) == (name, wd, s0)}

    first = bracket(losses(WD_LR_SEARCH), initial, extend)
    if first.needed:
        return [Key(name, lr, WD_LR_SEARCH, s0) for lr in first.needed], None
    lr1 = first.best
    wd_keys = [Key(name, lr1, wd, s0) for wd in wd_grid]
    missing = [k for k in wd_keys if k not in results]
    if missing:
        return missing, None
    wd_losses = {k.wd: final_val(results[k]) for k in wd_keys}
    wd = min(wd_grid, key=lambda w: (_key(wd_losses[w]), w != WD_LR_SEARCH))
    final = first
    if wd != WD_LR_SEARCH:  # the lr searched again at the chosen weight decay
        around = (ladder_value(ladder_index(lr1) - 1), lr1, ladder_value(ladder_index(lr1) + 1))
        final = bracket(losses(wd), around, extend)
        if final.needed:
            return [Key(name, lr, wd, s0) for lr in final.needed], None
    lr = final.best
    rest = [Key(name, lr, wd, s) for s in seeds[1:] if Key(name, lr, wd, s) not in results]
    if rest:
        return rest, None
    at = losses(wd)
    return [], {"lr": lr, "weight_decay": wd, "bracketed": final.bracketed,
                "lr_bracket": {"below": final.below, "below_loss": at.get(final.below),
                               "chosen": lr, "chosen_loss": at[lr],
                               "above": final.above, "above_loss": at.get(final.above)},
                "lr_search": {f"{k:g}": v for k, v in sorted(losses(WD_LR_SEARCH).items())},
                "lr_search_at_wd": {f"{k:g}": v for k, v in sorted(at.items())} if wd != WD_LR_SEARCH else None,
                "wd_search_lr": lr1, "wd_search": {f"{k:g}": v for k, v in wd_losses.items()}}


def final_val(run: dict) -> float:
    curve = run.get("curves", {}).get(VAL_KEY) or []
    return curve[-1][1] if curve and not run.get("diverged") and math.isfinite(curve[-1][1]) else math.inf


# ---------------------------------------------------------------------------------------------- the runs
def job_overrides(key: Key, quick: bool, size: str, extra: Sequence[str]) -> list[str]:
    v = BY_NAME[key.name]
    return [f"optimizer={v.config}", *v.extra, f"{v.lr_key}={key.lr:g}", f"{v.wd_key}={key.wd:g}",
            *SIZES[size], *(QUICK_OVERRIDES if quick else ()), *extra]


def run_dir(out: Path, key: Key) -> Path:
    return out / key.name / f"lr{key.lr:g}_wd{key.wd:g}" / f"seed{key.seed}"


def read_run(path: Path) -> dict:
    """Curves ``{metric: [(step, value), ...]}`` of the validation and epoch train losses, last values."""
    from manifoldnorm.lit.report import read_metrics

    return read_metrics(path, curve_keys=(VAL_KEY, TRAIN_KEY))


def run_one(key: Key, out: Path, overrides: Sequence[str], threads: int) -> dict:
    """One ``launch/train.py`` run, or its cached result when ``result.json`` holds the same overrides."""
    where = run_dir(out, key)
    cached = where / "result.json"
    if cached.is_file():
        saved = json.loads(cached.read_text())
        if saved.get("overrides") == list(overrides):
            return {**saved, "cached": True}
    if where.exists():
        shutil.rmtree(where)  # a run interrupted half-way, or one with other overrides: started again
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), f"+experiment={EXPERIMENT}", f"seed={key.seed}",
           "logger=csv", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
           "trainer.enable_model_summary=false", f"hydra.run.dir={where}", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads, WANDB_MODE="offline"),
                          cwd=ROOT)
    wall = time.perf_counter() - t0
    record = {"optimizer": key.name, "lr": key.lr, "weight_decay": key.wd, "seed": key.seed,
              "overrides": list(overrides), "wall_s": wall, "diverged": False}
    if proc.returncode != 0:
        said = (proc.stderr + proc.stdout).lower()
        if "nonfiniteerror" not in said and "training diverged" not in said:
            raise RuntimeError(f"run {key} failed (exit {proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr[-3000:]}")
        try:  # stopped by the non-finite guard: a result (infinitely bad), not an error
            metrics = read_run(where)
        except FileNotFoundError:
            metrics = {"curves": {}, "last": {}}
        record.update(metrics, diverged=True, error=proc.stderr[-1500:])
    else:
        record.update(read_run(where))
        if not math.isfinite(final_val(record)):
            record["diverged"] = True
    cached.write_text(json.dumps(record, indent=1))
    return {**record, "cached": False}


def run_study(names: Sequence[str], seeds: Sequence[int], out: Path, jobs: int, threads: int, quick: bool,
              size: str, extra: Sequence[str] = (), max_extend: int = MAX_EXTEND,
              log=print) -> tuple[dict[Key, dict], dict[str, dict]]:  # noqa: ANN001
    """Every variant's :func:`plan` to its end, ``jobs`` runs at a time (a variant's next runs are submitted as
    soon as the runs they depend on finish). Returns the runs and the choice of each variant."""
    results: dict[Key, dict] = {}
    choices: dict[str, dict] = {}
    pending: dict[Future, Key] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while True:
            for name in names:
                if name in choices:
                    continue
                needed, choice = plan(BY_NAME[name], results, seeds, quick, max_extend)
                if choice is not None:
                    choices[name] = choice
                    log(f"[optim] {name}: lr {choice['lr']:g}, wd {choice['weight_decay']:g}"
                        f"{'' if choice['bracketed'] or quick else ' (lr NOT bracketed)'}")
                for key in needed:
                    if key not in pending.values():
                        f = pool.submit(run_one, key, out, job_overrides(key, quick, size, extra), threads)
                        pending[f] = key
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                key = pending.pop(f)
                results[key] = f.result()
                r = results[key]
                how = "cached" if r["cached"] else f"{r['wall_s']:.0f} s"
                log(f"[optim] {key.name} lr {key.lr:g} wd {key.wd:g} seed {key.seed}: val {final_val(r):.4f} "
                    f"({how}){' DIVERGED' if r['diverged'] else ''}")
    return results, choices


# ------------------------------------------------------------------------------------------------ summary
def _mean_curve(runs: Sequence[dict], metric: str) -> tuple[list[int], list[float]]:
    curves = [r["curves"].get(metric, []) for r in runs]
    length = min(len(c) for c in curves)
    steps = [s for s, _ in curves[0][:length]]
    return steps, [statistics.fmean(c[i][1] for c in curves) for i in range(length)]


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


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def chosen_runs(runs: Sequence[dict], name: str, choice: dict) -> list[dict]:
    return sorted((r for r in runs if r["optimizer"] == name and r["lr"] == choice["lr"]
                   and r["weight_decay"] == choice["weight_decay"]), key=lambda r: r["seed"])


def summarize_optim(runs: Sequence[dict], choices: dict[str, dict], cost: dict[str, dict],
                    tokens_per_step: int) -> list[dict]:
    rows = []
    ref = _reference_target(runs, choices)
    for name, choice in choices.items():
        group = chosen_runs(runs, name, choice)
        train = [r["curves"][TRAIN_KEY][-1][1] for r in group if r["curves"].get(TRAIN_KEY)]
        val = [final_val(r) for r in group]
        test = [r["last"]["test/loss"] for r in group if "test/loss" in r.get("last", {})]
        steps, vals = _mean_curve(group, VAL_KEY)
        reach = {}
        for t in THRESHOLDS:
            s = steps_to_reach(steps, vals, t)
            reach[f"{t:g}"] = None if s is None else {"steps": s, "tokens": s * tokens_per_step}
        (tr, tr_sd), (va, va_sd) = _mean_std(train or [math.nan]), _mean_std(val)
        (te, te_sd) = _mean_std(test) if test else (None, None)
        rows.append({"optimizer": name, "config": BY_NAME[name].config if name in BY_NAME else name,
                     **{k: choice[k] for k in ("lr", "weight_decay", "bracketed", "lr_bracket", "lr_search",
                                               "lr_search_at_wd", "wd_search_lr", "wd_search")},
                     "seeds": len(group), "diverged_seeds": sum(bool(r.get("diverged")) for r in group),
                     "final_train_loss": tr, "final_train_loss_std": tr_sd,
                     "final_val_loss": va, "final_val_loss_std": va_sd, "test_loss": te, "test_loss_std": te_sd,
                     "total_steps": steps[-1] if steps else None, "tokens_per_step": tokens_per_step,
                     "to_threshold": reach, **cost.get(name, {})})
        if ref is not None:  # steps to AdamW's final loss; speed-up = AdamW's own step for it / this one (1.0 for
            at = steps_to_reach(steps, vals, ref[0])  # AdamW; None if never reached): the papers' "x times faster"
            rows[-1].update(reference_final_val=ref[0], to_reference_final=at,
                            speedup=None if at is None or ref[1] is None else ref[1] / at)
    return rows


def _reference_target(runs: Sequence[dict], choices: dict[str, dict]) -> tuple[float, float | None] | None:
    """The reference's (AdamW's) final mean validation loss and the step at which its own mean curve first reaches
    it; ``None`` without a reference row."""
    if REFERENCE not in choices:
        return None
    steps, vals = _mean_curve(chosen_runs(runs, REFERENCE, choices[REFERENCE]), VAL_KEY)
    return vals[-1], steps_to_reach(steps, vals, vals[-1])


def markdown(rows: Sequence[dict]) -> str:
    nan = float("nan")

    def loss(v: float | None) -> str:
        return "div." if v is None or not math.isfinite(v) else f"{v:.3f}"

    def pm(r: dict, key: str) -> str:  # mean ± std over seeds; one seed: its value (no spread to show)
        one = r.get("seeds") == 1  # the number of seeds averaged
        return f"{r[key]:.3f}" if one else f"{r[key]:.3f} ± {r[key + '_std']:.3f}"

    def cells(r: dict) -> list[str]:
        b = r["lr_bracket"]
        side = [f"{b[k]:g}: {loss(b[k + '_loss'])}" if b[k] is not None else "–" for k in ("below", "above")]
        lr = f"{side[0]} / **{b['chosen']:g}: {loss(b['chosen_loss'])}** / {side[1]}"
        lr += "" if r["bracketed"] else " (not bracketed)"
        wd = f"{r['weight_decay']:g} (" + ", ".join(f"{k}: {loss(v)}" for k, v in r["wd_search"].items()) + ")"
        reach = []
        for t in THRESHOLDS:
            x = r["to_threshold"][f"{t:g}"]
            reach.append("–" if x is None else f"{x['tokens'] / 1e6:.2f} M ({x['steps']:.0f})")
        test = "n/a" if r["test_loss"] is None else pm(r, "test_loss")
        at = r.get("to_reference_final")
        speed = "not reached" if at is None else f"{at:.0f} ({fmt(r.get('speedup'), '.2f')}×)"
        return [r["optimizer"], lr, wd, pm(r, "final_train_loss"), pm(r, "final_val_loss"), test, *reach, speed,
                f"{r.get('step_ms', nan):.2f} ms ({fmt(r.get('step_ratio'), '.2f')}×, "
                f"{fmt(None if r.get('step_share') is None else 100 * r['step_share'], '.0f')} %)",
                f"{r.get('state_bytes_per_param', nan):.1f} / {r.get('matrix_state_bytes_per_param', nan):.1f}"]

    return md_table(["optimizer", "lr: below / **chosen** / above (seed-0 val loss)", "wd (seed-0 val loss)",
                     "final train loss", "final val loss", "test loss",
                     *(f"tokens (steps) to val {t:g}" for t in THRESHOLDS),
                     "steps to AdamW's final val (speed-up)",
                     "optimizer.step() (vs AdamW, share of step)", "state bytes/param (all / matrices)"],
                    [cells(r) for r in rows])


# --------------------------------------------------------------------------------------------- step cost
def _compose(overrides: Sequence[str]):  # noqa: ANN202 - a DictConfig
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"+experiment={EXPERIMENT}", *overrides])


def _vocab_size(source: str) -> int:
    from manifoldnorm.data import load_text

    return len(set(load_text(source)))


def step_cost(names: Sequence[str], quick: bool, size: str, repeats: int | None = None,
              extra: Sequence[str] = (), ns_dtypes: Sequence[str] = ()) -> dict[str, dict]:
    """Median ms of ``optimizer.step()`` (ratio to AdamW's, share of forward + backward + step) and state bytes
    per parameter of every variant at its config's default lr, the same model, batch and gradients.

    ``ns_dtypes``: the Newton–Schulz rows (configs with ``matrix.ns_dtype``) are measured once per precision
    instead, as ``"<name> (ns <dtype>)"``, in the same round-robin."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from manifoldnorm.optim import hidden_matrices

    entries: list[tuple[str, str, tuple[str, ...]]] = []  # (label, row, overrides)
    for name in names:
        if ns_dtypes and _runs_newton_schulz(name):
            entries += [(f"{name} (ns {d})", name, (f"optimizer.matrix.ns_dtype={d}",)) for d in ns_dtypes]
        else:
            entries.append((name, name, ()))
    setups, vocab, batch, cfg = {}, None, None, None
    for name, row, own in entries:
        v = BY_NAME[row]
        cfg = _compose([f"optimizer={v.config}", *v.extra, *SIZES[size], *(QUICK_OVERRIDES if quick else ()),
                        *extra, *own])
        vocab = vocab or _vocab_size(cfg.data.source)
        with open_dict(cfg):
            cfg.data_info = {"vocab_size": vocab, "block_size": cfg.data.block_size}
        torch.manual_seed(0)
        model = instantiate(cfg.model)
        if batch is None:
            batch = torch.randint(0, vocab, (cfg.data.batch_size, cfg.data.block_size + 1))
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt = instantiate(cfg.optimizer)(model)
        opt.step()  # creates the state; later steps reuse the same gradients
        setups[name] = (model, opt)
    torch.manual_seed(0)
    probe = instantiate(cfg.model)  # forward + backward timed on a model of the same shape

    def fwd_bwd() -> None:
        probe.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(probe(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()

    steps = {name: timed(opt.step) for name, (_, opt) in setups.items()}
    steps["forward+backward"] = timed(fwd_bwd)
    times = round_robin(steps, repeats or (3 if quick else 30), warmup=1)
    fb = 1e3 * statistics.median(times.pop("forward+backward"))
    ref = 1e3 * statistics.median(times[REFERENCE]) if REFERENCE in times else None
    cost = {}
    for name, (model, opt) in setups.items():
        params = [p for p in model.parameters() if p.requires_grad]
        hidden = hidden_matrices(model)
        nbytes = {id(p): sum(t.numel() * t.element_size() for t in opt.state.get(p, {}).values()
                             if isinstance(t, torch.Tensor)) for p in params}
        n_hidden = sum(p.numel() for p in params if id(p) in hidden)
        ms = 1e3 * statistics.median(times[name])
        cost[name] = {"step_ms": ms, "step_ratio": (ms / ref) if ref else None, "fwd_bwd_ms": fb,
                      "step_share": ms / (fb + ms),
                      "state_bytes_per_param": sum(nbytes.values()) / sum(p.numel() for p in params),
                      "matrix_state_bytes_per_param": sum(nbytes[id(p)] for p in params if id(p) in hidden)
                      / max(1, n_hidden), "params": sum(p.numel() for p in params), "matrix_params": n_hidden}
    return cost


def cost_markdown(cost: dict[str, dict]) -> str:
    """The ``--cost-only`` table: step time, its ratio to AdamW's and share of the training step, state bytes."""
    return md_table(["optimizer", "optimizer.step() ms", "vs AdamW", "forward+backward ms", "share of step",
                     "state bytes/param (all / matrices)"],
                    [[k, f"{c['step_ms']:.2f}", fmt(c["step_ratio"], ".2f") + "×", f"{c['fwd_bwd_ms']:.1f}",
                      f"{100 * c['step_share']:.0f} %",
                      f"{c['state_bytes_per_param']:.1f} / {c['matrix_state_bytes_per_param']:.1f}"]
                     for k, c in cost.items()])


# ------------------------------------------------------------------------- Newton–Schulz step cost (--step-only)
NS_CONFIGS = ("muon", "normuon")  # optimizer configs with a Newton–Schulz precision (matrix.ns_dtype)


def _runs_newton_schulz(name: str) -> bool:
    """Does the study row ``name`` run Newton–Schulz (its config has ``matrix.ns_dtype``)?"""
    return BY_NAME[name].config in NS_CONFIGS


SYNTHETIC_SHAPES = ((256, 256),) * 12 + ((256, 1024),) * 4
NS_PRECISIONS = ("bfloat16", "float32")
TORCH_MUON = "torch.optim.Muon"
NS_OPTIMIZERS = (TORCH_MUON, "Muon", "NorMuon (original)", "NorMuon (match_rms_adamw)")


def lm_char_hidden_shapes(quick: bool) -> list[tuple[int, ...]]:
    """Shapes of the lm_char GPT's hidden matrices (those ``conf/optimizer/muon.yaml`` sends to Muon)."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from manifoldnorm.optim import hidden_matrices

    cfg = _compose(["optimizer=muon", *SIZES["small"], *(QUICK_OVERRIDES if quick else ())])  # lm_char's 2 x 96
    with open_dict(cfg):  # the vocabulary sizes only the embedding and the head, which are not hidden matrices
        cfg.data_info = {"vocab_size": 103, "block_size": cfg.data.block_size}
    model = instantiate(cfg.model)
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
def plot_optim(runs: Sequence[dict], choices: dict[str, dict], path: Path, tokens_per_step: int) -> Path:
    """Mean train (dashed) and validation (solid) loss of the chosen setting per variant vs training tokens."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    tops, bottoms, n = [], [], 0
    for i, (name, choice) in enumerate(choices.items()):
        group = chosen_runs(runs, name, choice)
        n = max(n, len(group))
        color = f"C{i}"
        for metric, style in ((VAL_KEY, "-"), (TRAIN_KEY, "--")):
            if not all(r["curves"].get(metric) for r in group):
                continue
            steps, vals = _mean_curve(group, metric)
            finite = [(s, v) for s, v in zip(steps, vals, strict=True) if math.isfinite(v)]
            if not finite:
                continue
            ax.plot([s * tokens_per_step / 1e6 for s, _ in finite], [v for _, v in finite], style, color=color,
                    marker=".", markersize=4,
                    label=f"{name} (lr {choice['lr']:g}, wd {choice['weight_decay']:g})" if metric == VAL_KEY
                    else None)
            tops.append(finite[len(finite) // 4][1])
            bottoms.append(min(v for _, v in finite))
    ax.set(title=f"{EXPERIMENT}: mean of {n} seed(s); solid: validation, dashed: train (epoch mean)",
           xlabel="training tokens (M characters)", ylabel="loss (nats/char)")
    if tops:
        ax.set_ylim(min(bottoms) - 0.05, max(tops) + 0.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    names = compared_optimizers()
    parser = argparse.ArgumentParser(prog="python -m benchmarks optim", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seed 0, one lr and wd, seconds-long runs (smoke run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (runs, cached runs, estimated duration) and exit")
    parser.add_argument("--optimizers", nargs="+", default=names, choices=names,
                        help="study rows (adamw is the reference)")
    parser.add_argument("--size", choices=list(SIZES), default="base",
                        help="base: lm_corpus's 4 x 128 GPT; small: lm_char's 2 x 96 (a check)")
    parser.add_argument("--step-only", action="store_true",
                        help="only time step() of torch.optim.Muon, Muon and NorMuon (bf16 and float32 Newton-Schulz)")
    parser.add_argument("--cost-only", action="store_true",
                        help="only measure the study's step costs (step time, share of the step, state bytes) of "
                             "--optimizers on the --size model, no training")
    parser.add_argument("--ns-dtypes", nargs="+", default=[], choices=list(NS_PRECISIONS),
                        help="with --cost-only: measure the Newton-Schulz rows once per precision (same run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--max-extend", type=int, default=MAX_EXTEND,
                        help="lr ladder points added per side at most before 'not bracketed'")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed optimizer steps (default 30, --step-only 25, --quick 3)")
    parser.add_argument("--run-seconds", type=float, default=None,
                        help="seconds per run for the --dry-run estimate (default: measured, see RUN_SECONDS)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --out)")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="re-summarize the runs saved in this JSON instead of training")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default outputs/bench_optim.json; runs cached in <out>_runs/)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="where runs are cached (default <out>_runs/); docs/bench/optim_runs keeps only each "
                             "run's result.json under git, so a study can be carried on from a fresh clone")
    return parser


def _tokens_per_step(quick: bool, size: str, extra: Sequence[str]) -> tuple[int, int]:
    cfg = _compose([*SIZES[size], *(QUICK_OVERRIDES if quick else ()), *extra])
    return (int(cfg.data.batch_size) * int(cfg.data.block_size),
            int(cfg.data.steps_per_epoch) * int(cfg.trainer.max_epochs))


def dry_run(args: argparse.Namespace, runs_dir: Path) -> dict:
    """The number of runs (at least, typically) and their duration on this machine at ``--jobs`` at a time."""
    seeds = [0] if args.quick else args.seeds
    tokens, steps = _tokens_per_step(args.quick, args.size, args.override)
    per = 0 if args.quick else (len(WD_GRID) - 1)
    least = {n: (1 if args.quick else 3) + per + len(seeds) - 1 for n in args.optimizers}
    # typical: one ladder extension in the first search, and the search again at another weight decay (2 runs)
    typical = {n: k + (0 if args.quick else 3) for n, k in least.items()}
    me = 0 if args.quick else args.max_extend
    most = {n: (1 if args.quick else 3 + 2 * me) + per + (0 if args.quick else 2 + 2 * me) + len(seeds) - 1
            for n in args.optimizers}
    cached = sum(1 for _ in runs_dir.glob("*/*/seed*/result.json")) if runs_dir.is_dir() else 0
    sec = args.run_seconds or RUN_SECONDS[args.size]
    hours = {k: sum(d.values()) * sec / args.jobs / 3600 for k, d in (("least", least), ("typical", typical))}
    lines = [f"optim study: {len(args.optimizers)} rows ({', '.join(args.optimizers)}), experiment {EXPERIMENT}, "
             f"size {args.size}, seeds {seeds}, {steps} steps x {tokens} characters = {steps * tokens / 1e6:.2f} M "
             "characters per run",
             f"runs: at least {sum(least.values())}, typically ~{sum(typical.values())}, at most "
             f"{sum(most.values())}; {cached} already finished in {runs_dir}",
             f"at ~{sec:.0f} s per run (extrapolated from short real runs, one thread each), {args.jobs} at a "
             f"time: at least {hours['least']:.1f} h, typically ~{hours['typical']:.1f} h, minus the finished runs"]
    for n in args.optimizers:
        v = BY_NAME[n]
        lines.append(f"  {n}: optimizer={v.config} {' '.join(v.extra)}; lr ({v.lr_key}) from "
                     f"{', '.join(f'{x:g}' for x in v.lrs)}; wd ({v.wd_key}) {', '.join(f'{w:g}' for w in WD_GRID)}")
    print("\n".join(lines))
    return {"runs_least": sum(least.values()), "runs_typical": sum(typical.values()), "cached": cached,
            "seconds_per_run": sec}


def _resummarize(path: Path, meta: dict) -> list[dict]:
    """Rows from the runs, choices and step costs saved in an earlier report (no training)."""
    saved = json.loads(path.read_text())
    if "plans" not in saved:
        raise SystemExit(f"{path} is not a report of this study (no 'plans'; the lm_char report of the earlier "
                         "study has another format)")
    keys = ("step_ms", "step_ratio", "step_share", "fwd_bwd_ms", "state_bytes_per_param",
            "matrix_state_bytes_per_param", "params", "matrix_params")
    cost = {r["optimizer"]: {k: r[k] for k in keys if k in r} for r in saved["rows"]}
    rows = summarize_optim(saved["runs"], saved["plans"], cost, saved["tokens_per_step"])
    print(markdown(rows))
    meta.pop("cpu", None)  # the step costs are the saved report's: so is its CPU (absent in older reports)
    meta.update({k: v for k, v in saved.items() if k not in ("rows", "suite", "torch")})
    return rows


def corpus_info(quick: bool, extra: Sequence[str]) -> dict | None:
    """Length and SHA-256 of the text the runs train on (``data.source=corpus``), to compare studies by."""
    cfg = _compose([*(QUICK_OVERRIDES if quick else ()), *extra])
    from manifoldnorm.data import load_text

    text = load_text(cfg.data.source)
    return {"source": cfg.data.source, "characters": len(text), "vocab": len(set(text)),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


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
    if args.cost_only:
        if args.ns_dtypes and not any(map(_runs_newton_schulz, args.optimizers)):
            raise SystemExit(f"--ns-dtypes: none of --optimizers {' '.join(args.optimizers)} runs Newton-Schulz "
                             f"(those that do: {', '.join(filter(_runs_newton_schulz, BY_NAME))})")
        out = args.out or default_out("optim_cost")
        with torch_threads(1):
            cost = step_cost(args.optimizers, args.quick, args.size, args.repeats, args.override, args.ns_dtypes)
        print(cost_markdown(cost))
        meta.update(mode="cost_only", size=args.size, quick=args.quick, overrides=args.override,
                    ns_dtypes=args.ns_dtypes, timer="time.process_time, 1 thread, median, round-robin",
                    rounds=args.repeats or (3 if args.quick else 30))
        return write_report(out, meta, [{"optimizer": k, **c} for k, c in cost.items()])
    elif args.ns_dtypes:
        raise SystemExit("--ns-dtypes applies to --cost-only only (the study runs each optimizer's config)")
    out = args.out or default_out("optim")
    runs_dir = args.runs_dir or out.parent / f"{out.stem}_runs"
    if args.from_json:
        return write_report(out, meta, _resummarize(args.from_json, meta))
    if args.dry_run:
        return dry_run(args, runs_dir)
    seeds = [0] if args.quick else args.seeds
    t0 = time.perf_counter()
    tokens, _ = _tokens_per_step(args.quick, args.size, args.override)
    results, choices = run_study(args.optimizers, seeds, runs_dir, args.jobs, args.threads, args.quick, args.size,
                                 args.override, args.max_extend)
    order = sorted(results, key=lambda k: (args.optimizers.index(k.name), k.seed, k.wd, k.lr))  # not finish order
    runs = [{k: v for k, v in results[key].items() if k != "cached"} for key in order]
    choices = {n: choices[n] for n in args.optimizers}
    with torch_threads(1):
        cost = step_cost(args.optimizers, args.quick, args.size, args.repeats, args.override)
    rows = summarize_optim(runs, choices, cost, tokens)
    png = plot_optim(runs, choices, args.plot or out.with_suffix(".png"), tokens)
    print(markdown(rows))
    print(f"wrote {png}")
    meta.update(experiment=EXPERIMENT, size=args.size, seeds=seeds, jobs=args.jobs, threads_per_run=args.threads,
                quick=args.quick, overrides=args.override, tokens_per_step=tokens,
                corpus=corpus_info(args.quick, args.override), thresholds=list(THRESHOLDS),
                timer="time.process_time, 1 thread", total_wall_s=time.perf_counter() - t0, plot=str(png),
                cached_runs=sum(bool(r["cached"]) for r in results.values()), runs=runs, plans=choices)
    return write_report(out, meta, rows)


if __name__ == "__main__":
    main()
