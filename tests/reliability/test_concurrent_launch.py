"""Runs started in the same second never share a run directory (``mn.run_dir`` in ``conf/hydra/default.yaml``).

Before: ``${now:%Y-%m-%d_%H-%M-%S}``, so two launches in one second wrote into one directory (one ``last.ckpt``
clobbered, config files that disagreed on the seed).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from manifoldnorm.lit import checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY = ["+experiment=spd_eeg", "data.source_kwargs.n_subjects=2", "data.source_kwargs.trials_per_class=8",
        "data.batch_size=8", "model.dims=[6]", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "callbacks.progress_bar=null", "trainer.enable_model_summary=false", "logger=none", "test=false"]


def _reserve_in_child(base: str, stamp: str, start: mp.Barrier, out: mp.Queue) -> None:
    checkpoint._RESERVED.clear()  # a fresh process: nothing reserved yet
    start.wait()
    out.put(checkpoint._reserve(base, stamp))


def test_concurrent_reservations_of_one_second_are_distinct(tmp_path: Path) -> None:
    """Eight processes released together reserve a directory for the same start second: eight distinct ones."""
    ctx = mp.get_context("fork")
    start, out = ctx.Barrier(8), ctx.Queue()
    base, stamp = str(tmp_path / "train"), "2026-01-01_00-00-00"
    procs = [ctx.Process(target=_reserve_in_child, args=(base, stamp, start, out)) for _ in range(8)]
    for p in procs:
        p.start()
    dirs = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sorted(dirs) == sorted([f"{base}/{stamp}", *(f"{base}/{stamp}_{i}" for i in range(1, 8))])
    assert len(os.listdir(base)) == 8


def test_run_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "outputs" / "train" / "2026-01-01_00-00-00"
    (run / "checkpoints" / "steps").mkdir(parents=True)
    (run / "config_resolved.yaml").write_text("seed: 0\n")
    base = str(tmp_path / "outputs" / "train")
    # a resume continues in the run directory that holds the checkpoint, whatever the key
    assert checkpoint.run_dir(base, "4242", str(run / "checkpoints" / "last.ckpt")) == str(run)
    assert checkpoint.run_dir(base, None, str(run / "checkpoints" / "steps" / "step8.ckpt")) == str(run)
    assert checkpoint.run_dir(base, "4242", str(tmp_path / "loose.ckpt")) == f"{base}/4242"  # not in a run dir
    assert checkpoint.run_dir(base, "4242", "last") == f"{base}/4242"  # Lightning's keyword
    # composing only (no Hydra job): the start time, nothing created
    name = checkpoint.run_dir(base, None, None)
    assert name.startswith(f"{base}/{datetime.date.today():%Y-%m-%d}_") and not Path(name).exists()


def launch(log_dir: Path, cache: Path, *overrides: str, flags: tuple[str, ...] = ()) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "WANDB_", "SLURM_", "TORCHELASTIC"))}
    env.update(MANIFOLDNORM_CACHE=str(cache), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "launch/train.py", *flags, *TINY, f"paths.log_dir={log_dir}", *overrides]
    return subprocess.Popen(cmd,
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def take_two_minutes(base: Path) -> set[str]:
    """Create a directory for every second of the next two minutes (as if a run had started in each)."""
    now = datetime.datetime.now()
    for s in range(120):
        (base / f"{now + datetime.timedelta(seconds=s):%Y-%m-%d_%H-%M-%S}").mkdir(parents=True)
    return set(os.listdir(base))


def finish(procs: dict[int, subprocess.Popen]) -> dict[int, str]:
    """Wait for the launches (by seed); each must succeed. Returns their output."""
    outputs = {}
    for seed, proc in procs.items():
        try:
            outputs[seed] = proc.communicate(timeout=600)[0]
        finally:
            proc.kill()
        assert proc.returncode == 0, outputs[seed][-3000:]
    return outputs


@pytest.mark.parametrize("first", [[], pytest.param(["trainer=ddp_cpu"], marks=pytest.mark.slow, id="ddp_cpu")])
def test_two_launches_in_one_second_get_distinct_dirs(first: list[str], tmp_path: Path) -> None:
    """Two runs launched together; in the slow case the first is ``trainer=ddp_cpu`` (Lightning starts its second
    process, which must join rank 0's directory, not reserve its own). Every second of the next two minutes is
    taken already (a run started in that second), so both runs take a suffixed name and race for it."""
    base = tmp_path / "outputs" / "spd_eeg"
    taken = take_two_minutes(base)
    outputs = finish({seed: launch(tmp_path / "outputs", tmp_path / "cache", f"seed={seed}", *extra)
                      for seed, extra in ((1, first), (2, []))})
    new = sorted(set(os.listdir(base)) - taken)
    assert len(new) == 2 and all("_" in name[len("2026-01-01_00-00-00"):] for name in new), new  # suffixed
    by_seed = {}
    for name in new:
        run = base / name
        seed = OmegaConf.load(run / "config_resolved.yaml").seed
        assert OmegaConf.load(run / ".hydra" / "config.yaml").seed == seed  # the files of one run agree
        assert f"run directory: {run}" in outputs[seed]
        by_seed[seed] = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert sorted(by_seed) == [1, 2]
    w1, w2 = (by_seed[s]["state_dict"] for s in (1, 2))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # each directory holds its own run's checkpoint


def _sweep_in_child(base: str, argv: list[str], start: mp.Barrier, out: mp.Queue) -> None:
    checkpoint._RESERVED.clear()
    sys.argv = argv
    start.wait()
    out.put(checkpoint.sweep_dir(base))


def test_sweep_dirs_are_claimed_only_by_a_sweep_command(tmp_path: Path) -> None:
    """Four sweep commands released together claim four directories; a composed config or a single run claims none."""
    ctx = mp.get_context("fork")
    base = str(tmp_path / "multirun")
    start, out = ctx.Barrier(4), ctx.Queue()
    argvs = [["train.py", "-m", "seed=1"], ["train.py", "--multirun"], ["train.py", "hydra.mode=MULTIRUN"],
             ["train.py", "-m"]]
    procs = [ctx.Process(target=_sweep_in_child, args=(base, a, start, out)) for a in argvs]
    for p in procs:
        p.start()
    dirs = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert len(set(dirs)) == 4 and all(Path(d).is_dir() for d in dirs), dirs
    start, out = ctx.Barrier(1), ctx.Queue()
    p = ctx.Process(target=_sweep_in_child, args=(str(tmp_path / "single"), ["train.py", "seed=1"], start, out))
    p.start()
    name = out.get(timeout=60)
    p.join(timeout=60)
    assert not Path(name).exists() and not (tmp_path / "single").exists()


@pytest.mark.slow
def test_two_sweeps_in_one_second_get_distinct_dirs(tmp_path: Path) -> None:
    """Two one-point sweeps launched together, every second of the next two minutes taken already: each sweep
    claims its own suffixed directory and its job writes there (before: both wrote into ``multirun/<time>/0``)."""
    base = tmp_path / "outputs" / "spd_eeg" / "multirun"
    taken = take_two_minutes(base)
    finish({seed: launch(tmp_path / "outputs", tmp_path / "cache", f"seed={seed}", flags=("-m",)) for seed in (1, 2)})
    new = sorted(set(os.listdir(base)) - taken)
    assert len(new) == 2, new
    seeds = sorted(OmegaConf.load(base / name / "0" / "config_resolved.yaml").seed for name in new)
    assert seeds == [1, 2]
    for name in new:
        assert (base / name / "0" / "checkpoints" / "last.ckpt").is_file()
