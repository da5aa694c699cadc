"""``guard``: overhead of :class:`manifoldnorm.lit.NonFiniteGuard` on the flagship's step (``+experiment=spd_eeg``).

    python -m benchmarks guard                    # 1 thread, 6 rounds of one epoch per arm (a few minutes)
    python -m benchmarks guard --quick            # smoke run: 2 rounds of 20 steps
    python -m benchmarks guard --out outputs/bench_guard.json

One process, one thread. The flagship's data module and Lightning module are built once from the Hydra config;
each round trains a fresh copy of the module for one epoch with the guard off, then with it on (the order
alternates between rounds), without logger, checkpoints or validation; then, as many rounds again, one epoch
with the guard active on every other step only (both arms under the same machine load; this leaves out
Lightning's dispatch of the guard's hooks, a few microseconds). The step time is the wall time from
``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, guard, optimizer step). Also timed: the
guard's ``on_before_optimizer_step`` alone on the flagship's gradients. Prints a Markdown table, writes JSON
(one flat object, no ``rows``: ``experiment``, ``threads``, ``rounds``, ``steps_per_arm``, ``step_ms_off``/``_on``,
``overhead_pct``, the ``cpu_`` and ``toggled_`` variants, ``guard_check_us``, ``guard_check_pct_of_step``,
``torch``); ``outputs/bench_guard.json`` under the repository root by default.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir

from benchmarks._harness import ROOT, md_table, median_ms, timed, torch_threads, write_json
from manifoldnorm.lit import NonFiniteGuard, run


class _StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []
        self._t0 = (0.0, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append((time.perf_counter() - self._t0[0], time.process_time() - self._t0[1]))


class _Toggled(NonFiniteGuard):
    """The guard, active on even steps only: both arms timed in the same epoch, under the same load."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.active = batch_idx % 2 == 0
        if self.active:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.active:
            super().on_before_backward(trainer, pl_module, loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.active:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)


def _fit(module: pl.LightningModule, datamodule: pl.LightningDataModule, guard: bool | None,
         steps: int | None) -> list:
    """Step times of one epoch: guard off (False), on (True), or toggled every step (None: all steps returned)."""
    timer = _StepTimer()
    callbacks = [timer] if guard is False else [timer, NonFiniteGuard() if guard else _Toggled()]
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=steps or 1.0, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, accelerator="cpu", devices=1)
    trainer.fit(copy.deepcopy(module), datamodule=datamodule)
    return timer.times if guard is None else timer.times[2:]  # the first steps warm up


def _hook_cost(module: pl.LightningModule, datamodule: pl.LightningDataModule, repeats: int) -> float:
    """Median seconds of the guard's per-step check on the flagship's gradients (finite)."""
    module = copy.deepcopy(module)
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    x, y, d = next(iter(datamodule.train_dataloader()))
    torch.nn.functional.cross_entropy(module(x, domain=d), y).backward()
    step = timed(partial(NonFiniteGuard().on_before_optimizer_step, None, module, opt), time.perf_counter)
    return median_ms(step, repeats) / 1e3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks guard", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 20 steps (smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per arm (default 6, --quick 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_guard.json", help="JSON path")
    return parser


def _median_ms(times: list[tuple[float, float]]) -> list[float]:
    """Median wall and process-CPU ms of ``(wall s, cpu s)`` pairs."""
    return [1e3 * statistics.median(t[i] for t in times) for i in (0, 1)]


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with torch_threads(1):
        result, med, counts = _bench(args.quick, args.rounds)
    print(md_table(["guard", "median step, wall (ms)", "median step, process CPU (ms)", "steps"],
                   [[arm, f"{med[arm][0]:.3f}", f"{med[arm][1]:.3f}", counts[arm]] for arm in med]))
    print(f"\noverhead (on/off - 1), whole epochs alternated: wall {result['overhead_pct']:+.2f}%, CPU "
          f"{result['cpu_overhead_pct']:+.2f}%; steps alternated within an epoch: wall "
          f"{result['toggled_overhead_pct']:+.2f}%, CPU {result['toggled_cpu_overhead_pct']:+.2f}%; "
          f"the guard's per-step check alone: {result['guard_check_us']:.1f} us = "
          f"{result['guard_check_pct_of_step']:.3f}% of a step (process CPU)")
    write_json(args.out, result)
    return result


def _bench(quick: bool, rounds: int | None) -> tuple[dict, dict[str, list[float]], dict[str, int]]:
    rounds = rounds or (2 if quick else 6)
    steps = 20 if quick else None
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=spd_eeg", "paths.output_dir=outputs/bench_guard"])
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = run.build_datamodule(cfg)
    module = run.build_module(cfg)
    times: dict[str, list[tuple[float, float]]] = {"off": [], "on": [], "toggled off": [], "toggled on": []}
    for r in range(rounds):
        for arm in (("off", "on") if r % 2 == 0 else ("on", "off")):
            times[arm] += _fit(module, datamodule, arm == "on", steps)
    for _ in range(rounds):
        steps_times = _fit(module, datamodule, None, steps)[2:]
        times["toggled off"] += steps_times[1::2]  # odd batch_idx (offset 2 keeps the parity)
        times["toggled on"] += steps_times[0::2]
    med = {arm: _median_ms(times[arm]) for arm in times}
    hook = _hook_cost(module, datamodule, 200)
    result = {"experiment": "spd_eeg", "threads": 1, "rounds": rounds, "steps_per_arm": len(times["on"]),
              "step_ms_off": med["off"][0], "step_ms_on": med["on"][0],
              "overhead_pct": 100 * (med["on"][0] / med["off"][0] - 1),
              "cpu_step_ms_off": med["off"][1], "cpu_step_ms_on": med["on"][1],
              "cpu_overhead_pct": 100 * (med["on"][1] / med["off"][1] - 1),
              "toggled_step_ms_off": med["toggled off"][0], "toggled_step_ms_on": med["toggled on"][0],
              "toggled_overhead_pct": 100 * (med["toggled on"][0] / med["toggled off"][0] - 1),
              "toggled_cpu_overhead_pct": 100 * (med["toggled on"][1] / med["toggled off"][1] - 1),
              "guard_check_us": 1e6 * hook, "guard_check_pct_of_step": 1e5 * hook / med["off"][1],
              "torch": torch.__version__}
    return result, med, {arm: len(t) for arm, t in times.items()}


if __name__ == "__main__":
    main()
