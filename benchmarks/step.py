"""``step``: the flagship's Lightning training step against the bare step, and where the difference goes.

    python -m benchmarks step                     # 1 thread, 3 epochs of the flagship (~195 steps per arm)
    python -m benchmarks step --quick             # smoke run: a small simulation, 2 short epochs
    python -m benchmarks step --threads 2 --epochs 5 --override logger=none

One process, ``--threads`` torch threads. The flagship (``+experiment=spd_eeg``) is built from its Hydra config
with everything it trains with: data module, model, optimizer, callbacks (checkpoints, non-finite guard, RNG
states, progress bar, LR monitor) and logger (W&B offline), in a temporary run directory. Two arms, interleaved
step by step on the same batches (so a slow phase of the shared machine hits both alike):

* ``lightning``: one iteration of ``trainer.fit``, from the end of the previous iteration to the end of this one:
  data fetching and collation, device transfer, hooks, ``training_step`` (forward, loss, metrics), backward,
  the optimizer step with Lightning's closure, zero_grad, progress bar, logging;
* ``bare``: ``model(x, domain)``, cross-entropy, ``backward()``, ``optimizer.step()``, ``zero_grad()`` on a copy of
  the model with its own optimizer (the same factory), on the batch Lightning just trained on, run from a
  callback at the end of each Lightning iteration (its time is left out of the Lightning arm).

The first iteration of every epoch (epoch start hooks) and the first ``warmup`` of the run are left out. Then a
profiled epoch attributes each Lightning iteration: an exclusive-time profiler (each hook's own time, its nested
hooks subtracted) receives Lightning's hook and loop actions, forward hooks on the model, the optimizer's step
hooks and the metric updates, so the table shows the model's work (forward, backward, optimizer step) and every
other item that makes up the rest. The profiler adds a little overhead of its own; the ratio comes from the
unprofiled epochs.

Prints Markdown tables; writes ``outputs/bench_step.json`` (``suite``, ``torch``, ``threads``, ``epochs``,
``quick``, ``overrides``, ``steps_per_arm``, ``ratio_wall``, ``ratio_cpu``, ``breakdown``, ``rows``: one per arm with
median wall and process-CPU ms).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.profilers import Profiler
from torch.nn import functional as F

from benchmarks._harness import ROOT, child_env, env_info, md_table, torch_threads, write_report

QUICK = ("data.source_kwargs.n_subjects=3", "data.source_kwargs.trials_per_class=24")
PROFILER_TARGET = "benchmarks.step.ExclusiveProfiler"


# ------------------------------------------------------------------------------------------ the two arms
class BareStep:
    """The model's training step without Lightning: forward, cross-entropy, backward, optimizer step, zero_grad."""

    def __init__(self, module: Any) -> None:
        self.model = copy.deepcopy(module.model).train()
        factory = getattr(module, "optimizer_factory", None)
        if factory is None:
            from manifoldnorm.optim import create_optimizer as factory
        self.optimizer = factory(self.model)

    def __call__(self, batch: Sequence[torch.Tensor]) -> None:
        x, y, domain = batch
        with torch.enable_grad():
            loss = F.cross_entropy(self.model(x, domain=domain), y)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


class Interleave(Callback):
    """Times each Lightning iteration (end to end, both clocks) and runs the bare step on its batch right after it
    (that time goes to the bare arm only). The first iteration of every epoch, and the first ``warmup`` iterations
    of the run, are left out of both arms."""

    def __init__(self, bare: BareStep, warmup: int) -> None:
        self.bare_step, self.warmup = bare, warmup
        self.lightning: list[tuple[float, float]] = []
        self.bare: list[tuple[float, float]] = []
        self.seen = 0
        self._prev: tuple[float, float] | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._prev = None  # the first iteration of an epoch carries the epoch's start-up

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        now = (time.perf_counter(), time.process_time())
        self.seen += 1
        keep = self._prev is not None and self.seen > self.warmup
        if keep:
            self.lightning.append((now[0] - self._prev[0], now[1] - self._prev[1]))
        t0 = (time.perf_counter(), time.process_time())
        self.bare_step(batch)
        if keep:
            self.bare.append((time.perf_counter() - t0[0], time.process_time() - t0[1]))
        self._prev = (time.perf_counter(), time.process_time())


# -------------------------------------------------------------------------------------------- the profiler
class ExclusiveProfiler(Profiler):
    """A Lightning profiler that adds up each action's exclusive time (its nested actions subtracted).

    ``start``/``stop`` nest (Lightning opens an action per hook and loop stage); ``totals[name]`` holds the seconds
    spent in ``name`` itself and ``counts[name]`` its calls. :meth:`enable` switches recording on (off at first, so
    that only the profiled epoch counts).
    """

    def __init__(self) -> None:
        super().__init__()
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._stack: list[list[Any]] = []
        self.enabled = False

    def enable(self, on: bool = True) -> None:
        self.enabled, self._stack = on, []

    def start(self, action_name: str) -> None:
        if self.enabled:
            self._stack.append([action_name, time.perf_counter(), 0.0])

    def stop(self, action_name: str) -> None:
        if not self.enabled or all(entry[0] != action_name for entry in self._stack):
            return  # started before recording began
        while self._stack[-1][0] != action_name:  # an action left open: dropped
            self._stack.pop()
        name, t0, nested = self._stack.pop()
        total = time.perf_counter() - t0
        self.totals[name] += total - nested
        self.counts[name] += 1
        if self._stack:
            self._stack[-1][2] += total

    def summary(self) -> str:
        return ""


class _StepClock(Callback):
    """In the profiled fit: records from the end of the first training iteration until validation starts, and
    times each iteration in that window (end of one ``on_train_batch_end`` to the next)."""

    def __init__(self) -> None:
        self.iterations: list[float] = []
        self.handles: list[Any] = []
        self._prev: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.handles = _instrument(pl_module, trainer.optimizers[0], trainer.profiler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        now = time.perf_counter()
        if self._prev is not None:
            self.iterations.append(now - self._prev)
        else:
            trainer.profiler.enable(True)
        self._prev = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._stop(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._stop(trainer)

    def _stop(self, trainer) -> None:  # noqa: ANN001
        if trainer.profiler.enabled:
            trainer.profiler.enable(False)
            _remove(self.handles)


def _instrument(module: Any, optimizer: torch.optim.Optimizer, prof: ExclusiveProfiler) -> list[Any]:
    """Actions for the model's forward, the optimizer's step and the metric updates; returns the hook handles."""
    handles = [
        module.model.register_forward_pre_hook(lambda *_: prof.start("model forward")),
        module.model.register_forward_hook(lambda *_: prof.stop("model forward")),
        optimizer.register_step_pre_hook(lambda *_: prof.start("optimizer.step (the update itself)")),
        optimizer.register_step_post_hook(lambda *_: prof.stop("optimizer.step (the update itself)")),
    ]
    for name in ("train_metrics",):
        metrics = getattr(module, name, None)
        if metrics is not None and hasattr(metrics, "update"):
            update = metrics.update

            def timed_update(*args: Any, _update=update, **kwargs: Any) -> Any:  # noqa: ANN001
                prof.start("metrics update")
                try:
                    return _update(*args, **kwargs)
                finally:
                    prof.stop("metrics update")

            metrics.update = timed_update
            handles.append((metrics, "update"))
    return handles


def _remove(handles: list[Any]) -> None:
    for h in handles:
        if isinstance(h, tuple):
            obj, attr = h
            obj.__dict__.pop(attr, None)
        else:
            h.remove()


_MODEL_WORK = ("model forward", "[Strategy]SingleDeviceStrategy.backward", "optimizer.step (the update itself)",
               "[LightningModule]ClassificationModule.optimizer_zero_grad")  # what the bare step does too


def _label(name: str) -> str:
    """Shorter names for the table (ModelCheckpoint's long repr, Lightning's brackets)."""
    if "ModelCheckpoint{" in name:
        monitor = "best" if "'monitor': None" not in name else "last"
        return f"[Callback]ModelCheckpoint({monitor}).{name.rsplit('.', 1)[-1]}"
    return name


def _group(name: str) -> str:
    """Table rows: a callback's hooks summed (``[Callback]TQDMProgressBar``), other actions by name."""
    name = _label(name)
    if name.startswith("[Callback]"):
        return name.rsplit(".", 1)[0]
    return name


def _breakdown(prof: ExclusiveProfiler, steps: int, iteration_ms: float, floor_ms: float = 0.01) -> list[dict]:
    """Milliseconds per training step of every action (exclusive), the measurement's own callback left out;
    items under ``floor_ms`` summed into one row; the iteration time no action covers last."""
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, seconds in prof.totals.items():
        if _StepClock.__name__ in name:
            continue
        g = groups[_group(name)]
        g[0] += 1e3 * seconds / steps
        g[1] += prof.counts[name] / steps
    rows = [{"item": k, "model_work": k in _MODEL_WORK, "ms_per_step": ms, "calls_per_step": calls}
            for k, (ms, calls) in groups.items()]
    rows.sort(key=lambda r: (not r["model_work"], -r["ms_per_step"]))
    small = [r for r in rows if not r["model_work"] and r["ms_per_step"] < floor_ms]
    rows = [r for r in rows if r not in small]
    if small:
        rows.append({"item": f"{len(small)} other hooks and loop actions, each under {floor_ms} ms",
                     "model_work": False, "ms_per_step": sum(r["ms_per_step"] for r in small),
                     "calls_per_step": sum(r["calls_per_step"] for r in small)})
    attributed = sum(r["ms_per_step"] for r in rows)
    rows.append({"item": "loop code outside every profiled action", "model_work": False,
                 "ms_per_step": max(iteration_ms - attributed, 0.0), "calls_per_step": None})
    return rows


# -------------------------------------------------------------------------------------------------- run
def tree_root() -> Path:
    """The checkout whose ``manifoldnorm`` this process imported (its ``conf/`` is the config used)."""
    import manifoldnorm

    return Path(manifoldnorm.__file__).resolve().parents[1]


def _compose(overrides: Sequence[str], out_dir: Path):  # noqa: ANN202 - an omegaconf DictConfig
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(tree_root() / "conf"), version_base="1.3"):
        return compose("train", overrides=["+experiment=spd_eeg", f"paths.output_dir={out_dir}",
                                           f"hydra.run.dir={out_dir}", *overrides])


def _fit(cfg: Any, module: Any, datamodule: Any, epochs: int, extra_callbacks: list, limit: int | None,
         profiler: bool) -> Any:
    from omegaconf import open_dict

    from manifoldnorm.lit import run

    with open_dict(cfg):
        cfg.trainer.max_epochs = epochs
        if limit is not None:
            cfg.trainer.limit_train_batches = limit
        if profiler:
            cfg.trainer.profiler = {"_target_": PROFILER_TARGET}
        else:
            cfg.trainer.pop("profiler", None)
    loggers = run.build_loggers(cfg)
    wants = inspect.signature(run.build_callbacks).parameters  # older checkouts: build_callbacks(cfg, has_logger)
    callbacks = run.build_callbacks(cfg, bool(loggers)) if "has_logger" in wants else run.build_callbacks(cfg)
    trainer = run.build_trainer(cfg, callbacks + extra_callbacks, loggers)
    trainer.fit(module, datamodule=datamodule)
    return trainer


def bench(threads: int, epochs: int, quick: bool, overrides: Sequence[str], warmup: int) -> dict:
    import lightning.pytorch as pl

    from manifoldnorm.lit import run

    overrides = [*(QUICK if quick else ()), *overrides]
    limit = 12 if quick else None
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp, torch_threads(threads):
        cfg = _compose(overrides, Path(tmp))
        pl.seed_everything(cfg.seed, workers=True)
        datamodule = run.build_datamodule(cfg)
        module = run.build_module(cfg)
        bare = BareStep(module)
        timer = Interleave(bare, warmup)
        _fit(cfg, module, datamodule, epochs, [timer], limit, profiler=False)

        # the profiled epoch (the same module, trained on): Lightning only, the bare step would count in a hook
        clock = _StepClock()
        trainer = _fit(cfg, module, datamodule, 1, [clock], limit, profiler=True)
        prof = trainer.profiler
        steps = max(sum(c for k, c in prof.counts.items() if k.startswith("[Strategy]")
                        and k.endswith(".training_step")), 1)
        iteration_ms = 1e3 * sum(clock.iterations) / max(len(clock.iterations), 1)
    med = {arm: [1e3 * statistics.median(t[i] for t in times) for i in (0, 1)]
           for arm, times in (("bare", timer.bare), ("lightning", timer.lightning))}
    rows = [{"arm": arm, "wall_ms": med[arm][0], "cpu_ms": med[arm][1], "steps": len(times)}
            for arm, times in (("bare", timer.bare), ("lightning", timer.lightning))]
    return {
        "tree": str(tree_root()), "threads": threads, "epochs": epochs, "quick": quick,
        "overrides": list(overrides), "warmup": warmup,
        "steps_per_arm": len(timer.bare),
        "ratio_wall": med["lightning"][0] / med["bare"][0], "ratio_cpu": med["lightning"][1] / med["bare"][1],
        "profiled_steps": steps, "profiled_mean_ms": iteration_ms,
        "breakdown": _breakdown(prof, steps, iteration_ms), "rows": rows,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks step", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small simulation, 2 epochs of 12 steps (smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs (default 3, --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="iterations left out first (default 5, --quick 2)")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra Hydra overrides of the flagship config (e.g. logger=none)")
    parser.add_argument("--tree", type=Path, default=None,
                        help="measure the manifoldnorm and conf/ of another checkout (e.g. a worktree of an older "
                             "commit), in a child process; default: this one")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_step.json", help="JSON path")
    return parser


_BOOT = ("import sys; sys.path.insert(0, {tree!r}); import manifoldnorm; sys.path.insert(0, {root!r}); "
         "from benchmarks.step import main; main({argv!r})")


def _in_tree(tree: Path, argv: list[str]) -> dict:
    """Run this suite in a child that imports ``manifoldnorm`` from ``tree`` (and ``benchmarks`` from here)."""
    import json
    import subprocess
    import sys

    tree = tree.resolve()
    if not (tree / "manifoldnorm" / "__init__.py").is_file():
        raise SystemExit(f"--tree {tree}: no manifoldnorm package there")
    code = _BOOT.format(tree=str(tree), root=str(ROOT), argv=argv)
    env = child_env(int(argv[argv.index("--threads") + 1]) if "--threads" in argv else 1)
    env["PYTHONPATH"] = str(tree)
    subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, check=True)
    out = Path(argv[argv.index("--out") + 1])
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.tree is not None and args.tree.resolve() != tree_root():
        rest = [a for i, a in enumerate(argv) if a != "--tree" and (i == 0 or argv[i - 1] != "--tree")]
        rest = [a for a in rest if not a.startswith("--tree=")]
        rest = [a for i, a in enumerate(rest) if a != "--out" and (i == 0 or rest[i - 1] != "--out")]
        return _in_tree(args.tree, [*rest, "--out", str(args.out.resolve())])
    epochs = args.epochs or (2 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    result = bench(args.threads, epochs, args.quick, args.override, warmup)
    print(md_table(["arm", "median step, wall (ms)", "median step, process CPU (ms)", "steps"],
                   [[r["arm"], f"{r['wall_ms']:.2f}", f"{r['cpu_ms']:.2f}", r["steps"]] for r in result["rows"]]))
    print(f"\nLightning / bare: wall {result['ratio_wall']:.2f}x, CPU {result['ratio_cpu']:.2f}x "
          f"({args.threads} thread(s), steps interleaved; {result['tree']})\n")
    total = result["profiled_mean_ms"]
    print(md_table(["item (profiled epoch, exclusive time)", "ms / step", "% of the iteration", "calls / step"],
                   [[("**" + r["item"] + "**") if r["model_work"] else r["item"], f"{r['ms_per_step']:.3f}",
                     f"{100 * r['ms_per_step'] / total:.1f}",
                     "" if r["calls_per_step"] is None else f"{r['calls_per_step']:.2f}"]
                    for r in result["breakdown"] if r["ms_per_step"] >= 0.001]))
    work = sum(r["ms_per_step"] for r in result["breakdown"] if r["model_work"])
    print(f"\nprofiled iteration: {total:.2f} ms, of which the model's work (bold) {work:.2f} ms and the rest "
          f"{total - work:.2f} ms")
    return write_report(args.out, {**env_info("step"), **{k: v for k, v in result.items() if k != "rows"}},
                        result["rows"])


if __name__ == "__main__":
    main()
