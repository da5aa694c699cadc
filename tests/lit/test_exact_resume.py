"""Exact resume: a run killed in the middle of an epoch and resumed from its last step checkpoint trains exactly
like an uninterrupted run with the same seed (deterministic mode): the same loss, learning rates and global
random state at every step after the resume, and the same final weights, running statistics and optimizer
states.

Each case runs ``launch/train.py`` three times in fresh processes: uninterrupted; with a step checkpoint every
``EVERY`` steps and a SIGKILL after step ``KILL``; resumed from the checkpoint of step ``RESUME`` (mid-epoch).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from manifoldnorm.lit.resume import ResumableDataLoader

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
EVERY, RESUME, KILL = 4, 8, 10  # steps; RESUME is a multiple of EVERY inside the second epoch
COMMON = ["trainer.max_epochs=3", "trainer.deterministic=true", "trainer.enable_progress_bar=false",
          "callbacks.progress_bar=null", "trainer.enable_model_summary=false", "logger=none", "test=false"]
CASES = {
    # LieBN (AIM, Karcher flow running statistics) + Riemannian Adam on SPDNet: 48 training trials, 6 steps an epoch
    "spd_eeg_liebn_riemannian_adam": [
        "+experiment=spd_eeg", "norm=liebn_aim", "optimizer=riemannian_adam", "data.source_kwargs.n_subjects=2",
        "data.source_kwargs.trials_per_class=8", "data.batch_size=8", "model.dims=[6]",
    ],
    # the domain-specific LieBN of the experiment (running statistics per domain), cosine schedule per epoch
    "spd_eeg_dsliebn": [
        "+experiment=spd_eeg", "data.source_kwargs.n_subjects=2", "data.source_kwargs.trials_per_class=8",
        "data.batch_size=8", "model.dims=[6]",
    ],
    # NorMuon + AdamW with a per-step warmup-cosine schedule on a GPT with dropout (random draws every step)
    "lm_char_normuon": [
        "+experiment=lm_char", "optimizer=normuon", "scheduler=warmup_cosine", "model.dropout=0.1",
        "model.n_layer=1", "model.d_model=32", "model.n_head=2", "data.block_size=16", "data.batch_size=8",
        "data.steps_per_epoch=6", "data.val_batches=2",
    ],
}


def train(out: Path, cache: Path, *overrides: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "WANDB_", "SLURM_"))}
    env.update(MANIFOLDNORM_CACHE=str(cache), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "launch/train.py", f"hydra.run.dir={out}",  # the log first: it sees the killed step
           "+callbacks.loss_log._target_=_resume_callbacks.LossLog", f"+callbacks.loss_log.path={out}/steps.jsonl",
           *overrides]
    out.mkdir(parents=True)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        output = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    return proc.returncode, output


def steps(run: Path, name: str = "steps.jsonl") -> dict[int, dict]:
    return _load(HERE / "_resume_callbacks.py").read_steps(run / name)


def _load(path: Path):  # noqa: ANN202 - a test helper module by file path, without touching sys.path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same_state(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("case", list(CASES))
def test_killed_mid_epoch_resumes_exactly(case: str, cache: Path, tmp_path: Path) -> None:
    overrides = [*CASES[case], *COMMON]
    step_ckpt = step_checkpoints(tmp_path / "killed" / "steps")
    full = train(tmp_path / "full", cache, *overrides)
    killed = train(tmp_path / "killed", cache, *overrides, *step_ckpt,
                   "+callbacks.kill._target_=_resume_callbacks.KillAt", f"+callbacks.kill.step={KILL}")
    code, output = finish(full)
    assert code == 0, output[-3000:]
    code, output = finish(killed)
    assert code == -9, output[-3000:]  # SIGKILL

    reference, before = steps(tmp_path / "full"), steps(tmp_path / "killed")
    total = max(reference)
    per_epoch = total // 3
    assert RESUME % per_epoch not in (0,) and RESUME < KILL < total  # the resume point is inside an epoch
    assert sorted(before) == list(range(1, KILL + 1))
    for s in before:  # the two runs agree up to the crash: the comparison below can only fail through the resume
        assert before[s] == reference[s], s

    ckpt = tmp_path / "killed" / "steps" / f"step{RESUME}.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == RESUME and state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"batches": RESUME - per_epoch}]
    assert len(state["callbacks"]["RNGStates"]["states"]) == 1

    code, output = finish(train(tmp_path / "resumed", cache, *overrides, f"ckpt_path={ckpt}"))
    assert code == 0, output[-3000:]
    assert "not resumable" not in output  # Lightning's warning for loaders that restart the epoch
    after = steps(tmp_path / "resumed")
    assert sorted(after) == list(range(RESUME + 1, total + 1))
    for s in after:  # loss, learning rates, batch index, epoch and the global random state, bit for bit
        assert after[s] == reference[s], (s, after[s], reference[s])

    # the end states: weights, running statistics (buffers), optimizer states and schedules
    end_full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)
    end_resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert end_full["global_step"] == end_resumed["global_step"] == total
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert_same_state(end_full[key], end_resumed[key], key)
    assert any("running" in k for k in end_full["state_dict"]) or case.startswith("lm_char")


def step_checkpoints(dirpath: Path) -> list[str]:
    return ["+callbacks.step_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
            f"+callbacks.step_checkpoint.dirpath={dirpath}", "+callbacks.step_checkpoint.filename='step{step}'",
            "+callbacks.step_checkpoint.save_top_k=-1", f"+callbacks.step_checkpoint.every_n_train_steps={EVERY}",
            "+callbacks.step_checkpoint.auto_insert_metric_name=false"]


@pytest.mark.slow  # long: CI runs it in the bounded `-m slow` step
def test_ddp_resumes_mid_epoch_exactly(cache: Path, tmp_path: Path) -> None:
    """Two processes (trainer=ddp_cpu, gloo), each with its shard of every batch: resumed from a mid-epoch step
    checkpoint of the uninterrupted run, every process repeats its losses, lrs and random states exactly."""
    overrides = [*CASES["spd_eeg_liebn_riemannian_adam"], *COMMON, "trainer=ddp_cpu", "trainer.max_epochs=4"]
    code, output = finish(train(tmp_path / "full", cache, *overrides, *step_checkpoints(tmp_path / "full" / "steps")))
    assert code == 0, output[-3000:]
    reference = [steps(tmp_path / "full", f"steps.jsonl.{rank}") for rank in (0, 1)]
    total = max(reference[0])
    assert total == 12 and sorted(reference[1]) == sorted(reference[0])  # 48 trials / (2 x 8) = 3 steps an epoch
    assert reference[0][RESUME]["loss"] != reference[1][RESUME]["loss"]  # the processes see different batches
    ckpt = tmp_path / "full" / "steps" / f"step{RESUME}.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"batches": RESUME - 6}]  # mid-epoch
    assert len(state["callbacks"]["RNGStates"]["states"]) == 2

    code, output = finish(train(tmp_path / "resumed", cache, *overrides, f"ckpt_path={ckpt}"))
    assert code == 0, output[-3000:]
    for rank in (0, 1):
        after = steps(tmp_path / "resumed", f"steps.jsonl.{rank}")
        assert sorted(after) == list(range(RESUME + 1, total + 1))
        for s in after:
            assert after[s] == reference[rank][s], (rank, s)
    end_full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)
    end_resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert_same_state(end_full[key], end_resumed[key], key)


def test_loader_skips_the_batches_of_the_checkpoint() -> None:
    data = torch.arange(10.0)
    sampler = torch.utils.data.SequentialSampler(data)
    loader = ResumableDataLoader(data, batch_size=3, sampler=sampler, generator=torch.Generator())
    it = iter(loader)
    first = [next(it), next(it)]
    assert loader.state_dict() == {"batches": 2}
    resumed = ResumableDataLoader(data, batch_size=3, sampler=sampler, generator=torch.Generator())
    resumed.load_state_dict(loader.state_dict())
    rest = list(resumed)
    assert torch.equal(torch.cat([*first, *rest]), data)
    assert resumed.state_dict() == {"batches": 4}
    assert [len(b) for b in resumed] == [3, 3, 3, 1]  # only the first iteration after the load skips
    resumed.load_state_dict({"batches": 4})  # a whole epoch (checkpoint at its end): nothing to skip
    assert len(list(resumed)) == 4


def test_loader_passes_the_epoch_to_the_sampler_lightning_wraps() -> None:
    """Under DDP Lightning wraps our sampler and sets the epoch on the wrapper only; the loader passes it on,
    so a ``(seed, epoch)`` sampler draws a new order each epoch (and the same order after a resume)."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    from manifoldnorm.lit.datamodule import EpochSeededSampler

    data = torch.arange(16.0)

    def epoch_order(epoch: int, rank: int) -> list[float]:
        inner = EpochSeededSampler(len(data), seed=3)
        wrapper = DistributedSamplerWrapper(inner, num_replicas=2, rank=rank, shuffle=False)
        loader = ResumableDataLoader(data, batch_size=4, sampler=wrapper, generator=torch.Generator())
        wrapper.set_epoch(epoch)
        order = torch.cat(list(loader)).tolist()
        assert inner.epoch == epoch
        return order

    e0, e1 = [epoch_order(0, r) for r in (0, 1)], [epoch_order(1, r) for r in (0, 1)]
    assert sorted(e0[0] + e0[1]) == sorted(e1[0] + e1[1]) == data.tolist()  # each epoch covers the data once
    assert e0 != e1 and epoch_order(1, 0) == e1[0]
