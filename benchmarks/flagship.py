"""``flagship``: the flagship run (``launch/train.py +experiment=spd_eeg``) of this checkout against an older commit.

    python -m benchmarks flagship                          # against 9d07fe6, 3 runs per tree (~10-15 min, 2 cores)
    python -m benchmarks flagship --against HEAD~5 --runs 5
    python -m benchmarks flagship --against /path/to/other/checkout
    python -m benchmarks flagship --quick                  # trainer.max_epochs=2, 1 run per tree

The older tree is a git worktree of ``--against`` (a commit; ``git worktree add --detach`` into
``<tmp>/manifoldnorm-bench-worktrees/<sha>``, reused by later invocations; remove it with ``git worktree remove``)
or any checkout given as a path. Both trees read one data cache (``--cache-dir``, default ``$MANIFOLDNORM_CACHE`` or
``~/.cache/manifoldnorm``), which each tree first fills for itself (a data-module setup in a child process, timed
and reported, not part of the runs). Then the flagship runs as a user starts it, as a subprocess with
``PYTHONPATH`` set to its tree, alternating between the trees (old, new; then new, old; ...) so that the load of a
shared machine hits both alike, with the same environment (``--env KEY=VALUE`` adds to both) and the same extra
overrides (``--override``). Measured per run:

* wall time, from spawning the process to reaping it;
* process CPU (user + system) and peak resident memory, from ``os.wait4`` (the process and the children it
  waited for; peak memory is the largest of them, not a sum);
* start-up: seconds from spawning to the first training step, recorded by
  :class:`FirstStepTimer` (``benchmarks/_probe/mn_flagship_probe.py``), injected through Hydra overrides
  (``+callbacks.first_step._target_=mn_flagship_probe.FirstStepTimer``) with ``benchmarks/_probe`` on the
  ``PYTHONPATH`` after the tree under test (the probe imports nothing from either tree);
* the start-up floor: just before each run, the wall time of a process that only imports the required stack
  (``import torch, lightning.pytorch, hydra, geoopt, wandb``), with the same environment; no run can reach its
  first step sooner;
* the test balanced accuracy printed by the run, and whether ``last.ckpt`` holds bitwise the same weights as the
  other tree's run of the same round.

Prints a Markdown table (medians per tree, new/old ratios, the targets) and writes ``outputs/bench_flagship.json``
(``suite``, ``torch``, ``against``, ``old_tree``, ``new_tree``, ``runs``, ``quick``, ``overrides``, ``env``,
``cache_dir``, ``prepare``, ``runs_detail``, ``weights_identical``, ``rows``: one per measure with ``old``, ``new``,
``ratio``, ``target``, ``met``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks._harness import ROOT, env_info, md_table, write_report

DEFAULT_AGAINST = "9d07fe6"
PROBE_DIR = ROOT / "benchmarks" / "_probe"
PROBE_TARGET = "mn_flagship_probe.FirstStepTimer"
EXPERIMENT = "+experiment=spd_eeg"
QUICK = ("trainer.max_epochs=2",)
ENV_DROP = ("HYDRA_", "SLURM_", "TORCHELASTIC_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK",
            "NODE_RANK", "WANDB_", "PYTHONPATH")
# measure -> (target on new/old or on new, how it is read)
TARGETS = {"wall_s": ("ratio <= 0.5", lambda ratio, new: ratio <= 0.5),
           "peak_rss_mb": ("new <= 1024 MB", lambda ratio, new: new <= 1024),
           "startup_s": ("new <= 5 s", lambda ratio, new: new <= 5.0),
           "test_bacc": ("equal", lambda ratio, new: ratio == 1.0)}
LABELS = {"wall_s": "wall (s)", "cpu_s": "process CPU, user + system (s)", "peak_rss_mb": "peak RSS (MB)",
          "startup_s": "start-up to the first training step (s)",
          "stack_import_s": "start-up floor: importing torch, lightning, hydra, geoopt, wandb (s)",
          "test_bacc": "test balanced accuracy"}
STACK_IMPORT = "import torch, lightning.pytorch, hydra, omegaconf, geoopt, wandb"

# The first step of the data setup: compose the tree's own config and set its data module up (filling the cache).
_PREPARE = """
import sys, time
t0 = time.perf_counter()
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
with initialize_config_dir(config_dir={conf!r}, version_base="1.3"):
    cfg = compose("train", overrides={overrides!r})
dm = instantiate(cfg.data)
dm.prepare_data()
dm.setup("fit")
print("PREPARED", time.perf_counter() - t0)
"""


def __getattr__(name: str):  # noqa: ANN202 - the probe, importable as benchmarks.flagship.FirstStepTimer too
    if name == "FirstStepTimer":  # imported on demand: this process itself needs neither Lightning nor torch
        from benchmarks._probe.mn_flagship_probe import FirstStepTimer

        return FirstStepTimer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------- the trees
def _git(*args: str, cwd: Path = ROOT) -> str:
    proc = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def worktree_root() -> Path:
    """Where the worktrees of older commits are kept between invocations."""
    return Path(tempfile.gettempdir()) / "manifoldnorm-bench-worktrees"


def resolve_tree(against: str, repo: Path = ROOT) -> tuple[Path, str]:
    """The checkout to compare with: ``against`` itself if it is a directory holding ``launch/train.py``, else a
    detached git worktree of the commit ``against`` names (created, or reused when it is already there).

    Returns the tree and a description (the path, or the commit's full hash).
    """
    path = Path(against).expanduser()
    if path.is_dir():
        if not (path / "launch" / "train.py").is_file() or not (path / "manifoldnorm").is_dir():
            raise SystemExit(f"--against {against}: not a manifoldnorm checkout (no launch/train.py, manifoldnorm/)")
        return path.resolve(), str(path.resolve())
    try:
        sha = _git("rev-parse", "--verify", "--quiet", f"{against}^{{commit}}", cwd=repo)
    except RuntimeError:
        raise SystemExit(f"--against {against}: neither a directory nor a commit of {repo}") from None
    tree = worktree_root() / sha[:12]
    if tree.is_dir():
        try:
            if _git("rev-parse", "HEAD", cwd=tree) == sha and not _git("status", "--porcelain", cwd=tree):
                return tree, sha
        except RuntimeError:
            pass
        raise SystemExit(f"{tree} exists but is not a clean worktree of {sha}; remove it "
                         f"(git worktree remove --force {tree}) and run again")
    tree.parent.mkdir(parents=True, exist_ok=True)
    _git("worktree", "add", "--detach", str(tree), sha, cwd=repo)
    return tree, sha


# -------------------------------------------------------------------------------------------------- runs
def run_env(tree: Path, cache_dir: Path, extra: dict[str, str]) -> dict[str, str]:
    """The environment of a run of ``tree``: this one without job/launcher/W&B variables, the tree then the
    probe on ``PYTHONPATH``, the shared cache, unbuffered output, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_DROP)}
    env.update(PYTHONPATH=os.pathsep.join([str(tree), str(PROBE_DIR)]), MANIFOLDNORM_CACHE=str(cache_dir),
               PYTHONUNBUFFERED="1", **extra)
    return env


def prepare(tree: Path, cache_dir: Path, overrides: Sequence[str], extra: dict[str, str]) -> float:
    """Fill the data cache of ``tree`` for the flagship (its own data module, in a child); returns seconds."""
    code = _PREPARE.format(conf=str(tree / "conf"), overrides=[EXPERIMENT, *overrides])
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=tree, env=run_env(tree, cache_dir, extra),
                          capture_output=True, text=True)
    if proc.returncode != 0 or "PREPARED" not in proc.stdout:
        raise RuntimeError(f"preparing the data of {tree} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def stack_import(tree: Path, cache_dir: Path, extra: dict[str, str]) -> float:
    """Wall seconds of a process that imports the required stack and nothing else (the start-up floor)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", STACK_IMPORT], cwd=tree, env=run_env(tree, cache_dir, extra),
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"importing the stack failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


_METRIC = re.compile(r"^(test/bacc)\s+([0-9.]+)\s*$", re.M)


def flagship_run(tree: Path, run_dir: Path, cache_dir: Path, overrides: Sequence[str],
                 extra: dict[str, str]) -> dict:
    """One flagship run of ``tree`` in ``run_dir``: wall, CPU, peak RSS, start-up, test balanced accuracy."""
    run_dir.mkdir(parents=True, exist_ok=True)
    probe = run_dir / "probe.json"
    cmd = [sys.executable, str(tree / "launch" / "train.py"), EXPERIMENT, *overrides,
           f"hydra.run.dir={run_dir / 'run'}", f"+callbacks.first_step._target_={PROBE_TARGET}",
           f"+callbacks.first_step.out={probe}"]
    with open(run_dir / "stdout.txt", "w") as out, open(run_dir / "stderr.txt", "w") as err:
        spawned = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=tree, env=run_env(tree, cache_dir, extra), stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = (run_dir / "stdout.txt").read_text()
    if proc.returncode != 0 or not probe.is_file():
        tail = (run_dir / "stderr.txt").read_text()[-3000:]
        raise RuntimeError(f"flagship run of {tree} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    events = json.loads(probe.read_text())["events"]
    found = _METRIC.findall(stdout)
    return {
        "tree": str(tree), "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
        "user_s": usage.ru_utime, "system_s": usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
        "startup_s": events["first_step_start"] - spawned,
        "train_s": events["train_end"] - events["first_step_start"],
        "test_s": events["test_end"] - events["test_start"] if "test_end" in events else None,
        "after_test_s": wall - (events.get("test_end", events["train_end"]) - spawned),
        "test_bacc": float(found[-1][1]) if found else None,
        "load_1min": os.getloadavg()[0], "run_dir": str(run_dir / "run"),
    }


def same_weights(a: Path, b: Path) -> bool | None:
    """Whether two checkpoints hold bitwise equal ``state_dict`` tensors (``None`` if one is missing)."""
    import torch

    if not (a.is_file() and b.is_file()):
        return None
    sa = torch.load(a, map_location="cpu", weights_only=False)["state_dict"]
    sb = torch.load(b, map_location="cpu", weights_only=False)["state_dict"]
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------- the table
def summarize(runs: Sequence[dict]) -> list[dict]:
    """One row per measure: medians of each tree, new/old, the target and whether it is met."""
    rows = []
    for key, label in LABELS.items():
        med = {}
        for arm in ("old", "new"):
            values = [r[key] for r in runs if r["arm"] == arm and r.get(key) is not None]
            med[arm] = statistics.median(values) if values else None
        ratio = med["new"] / med["old"] if med["old"] and med["new"] is not None else None
        target, check = TARGETS.get(key, (None, None))
        met = None if check is None or ratio is None else bool(check(ratio, med["new"]))
        rows.append({"measure": key, "label": label, "old": med["old"], "new": med["new"], "ratio": ratio,
                     "target": target, "met": met})
    return rows


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if key == "test_bacc" else f"{value:.0f}" if key == "peak_rss_mb" else f"{value:.1f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks flagship", description=__doc__.splitlines()[0])
    parser.add_argument("--against", default=DEFAULT_AGAINST,
                        help=f"a commit (a git worktree in a temp dir) or a checkout path (default {DEFAULT_AGAINST})")
    parser.add_argument("--runs", type=int, default=None, help="runs per tree, alternating (default 3, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="trainer.max_epochs=2 (smoke run)")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra Hydra overrides for both trees' runs")
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="environment variables for both trees' runs (e.g. OMP_WAIT_POLICY=ACTIVE)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="data cache of both trees (default $MANIFOLDNORM_CACHE or ~/.cache/manifoldnorm)")
    parser.add_argument("--keep-runs", type=Path, default=None, metavar="DIR",
                        help="keep the run directories under DIR (default: a temporary folder, removed)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_flagship.json", help="JSON path")
    return parser


def _pairs(items: Sequence[str], what: str, parser: argparse.ArgumentParser) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"{what} takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    if runs < 1:
        parser.error("--runs must be at least 1")
    extra_env = _pairs(args.env, "--env", parser)
    overrides = [*(QUICK if args.quick else ()), *args.override]
    if args.cache_dir is not None:
        cache_dir = args.cache_dir
    else:
        env_cache = os.environ.get("MANIFOLDNORM_CACHE", "").strip()
        cache_dir = Path(env_cache) if env_cache else Path.home() / ".cache" / "manifoldnorm"
    cache_dir = cache_dir.expanduser().resolve()
    old_tree, against = resolve_tree(args.against)
    trees = {"old": old_tree, "new": ROOT}
    print(f"old: {old_tree} ({against})\nnew: {ROOT}\ncache: {cache_dir}", flush=True)

    prepared = {arm: prepare(tree, cache_dir, overrides, extra_env) for arm, tree in trees.items()}
    print("data prepared: " + ", ".join(f"{arm} {s:.1f} s" for arm, s in prepared.items()), flush=True)
    keep = args.keep_runs is not None
    base = args.keep_runs.resolve() if keep else Path(tempfile.mkdtemp(prefix="bench_flagship_"))
    detail: list[dict] = []
    identical: list[bool | None] = []
    try:
        for r in range(runs):
            order = ("old", "new") if r % 2 == 0 else ("new", "old")
            this_round = {}
            for arm in order:
                floor = stack_import(trees[arm], cache_dir, extra_env)
                run = flagship_run(trees[arm], base / f"r{r}_{arm}", cache_dir, overrides, extra_env)
                run.update(arm=arm, round=r, stack_import_s=floor)
                this_round[arm] = run
                detail.append(run)
                print(f"  round {r} {arm}: wall {run['wall_s']:.1f} s, CPU {run['cpu_s']:.1f} s, peak RSS "
                      f"{run['peak_rss_mb']:.0f} MB, start-up {run['startup_s']:.1f} s (stack imports alone "
                      f"{floor:.1f} s), test bacc "
                      f"{_fmt('test_bacc', run['test_bacc'])} (load {run['load_1min']:.1f})", flush=True)
            identical.append(same_weights(*(Path(this_round[a]["run_dir"]) / "checkpoints" / "last.ckpt"
                                            for a in ("old", "new"))))
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    rows = summarize(detail)
    print()
    print(md_table(["measure", "old (median)", "new (median)", "new / old", "target", "met"],
                   [[r["label"], _fmt(r["measure"], r["old"]), _fmt(r["measure"], r["new"]),
                     "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}", r["target"] or "",
                     "" if r["met"] is None else ("yes" if r["met"] else "no")] for r in rows]))
    print(f"\n{runs} run(s) per tree, alternating; last.ckpt weights bitwise identical in every round: "
          f"{all(identical) if identical and None not in identical else identical}")
    meta = {**env_info("flagship"), "against": against, "old_tree": str(old_tree), "new_tree": str(ROOT),
            "runs": runs, "quick": args.quick, "overrides": overrides, "env": extra_env, "cache_dir": str(cache_dir),
            "prepare_s": prepared, "weights_identical": identical, "runs_detail": detail}
    return write_report(args.out, meta, rows)


if __name__ == "__main__":
    main()
