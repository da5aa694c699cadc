"""The normalized optimizers inside the composite, under a real Lightning Trainer: automatic optimisation,
gradient clipping, a per-step warmup+cosine schedule, and checkpoint resume at an epoch boundary."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from manifoldnorm.lit import CharLMDataModule, LanguageModelModule
from manifoldnorm.models import GPT
from manifoldnorm.optim import CompositeOptimizer, WarmupCosine, create_optimizer, warmup_cosine_factor

TEXT = ("abcdefgh\n" * 10 + "the quick brown fox jumps over the lazy dog\n") * 40
MATRIX = {
    "muon": {"name": "muon", "lr": 3e-3, "adjust_lr_fn": "match_rms_adamw"},
    "normuon": {"name": "normuon", "lr": 3e-3, "adjust_lr_fn": "match_rms_adamw"},
    "conda": {"name": "conda", "lr": 1e-2, "update_proj_gap": 3},
    "sinkgd": {"name": "sinkgd", "lr": 1e-3},
}


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _setup(text_file: Path, matrix: dict, steps_per_epoch: int = 4):
    dm = CharLMDataModule(source="file", path=str(text_file), block_size=8, batch_size=4, val_fraction=0.2,
                          test_fraction=0.1, steps_per_epoch=steps_per_epoch, val_batches=2)
    dm.setup("fit")
    torch.manual_seed(0)
    model = GPT(len(dm.vocab), 8, n_layer=1, n_head=2, d_model=16)
    opt = functools.partial(create_optimizer, manifold=None, matrix=matrix, rest={"name": "adamw", "lr": 3e-3},
                            rules=[{"match": r"\.bias$|norm", "into": "rest", "weight_decay": 0.0}])
    sched = functools.partial(WarmupCosine, total_steps=None, warmup_steps=2, min_lr_ratio=0.1)
    return dm, LanguageModelModule(model, optimizer=opt, scheduler=sched, scheduler_interval="step")


def _trainer(tmp_path: Path, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                      default_root_dir=tmp_path, deterministic=True, **kw)


class _Record(Callback):
    """After every optimizer step: the norm of the (clipped) gradients and every group's lr."""

    def __init__(self) -> None:
        self.grad_norms: list[float] = []
        self.lrs: list[list[float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.grad_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_fit_with_clipping_and_warmup_cosine(name: str, text_file: Path, tmp_path: Path) -> None:
    dm, module = _setup(text_file, MATRIX[name])
    record = _Record()
    trainer = _trainer(tmp_path, max_epochs=2, gradient_clip_val=1e-3, callbacks=[record])
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.fit(module, dm)
    opt = trainer.optimizers[0]
    assert isinstance(opt, CompositeOptimizer) and type(opt.optimizers["matrix"]).__name__.lower() == name
    assert all(torch.isfinite(v).all() for v in module.state_dict().values())
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]
    assert any("attn" in k or "mlp" in k for k in changed), changed  # the matrix optimizer moved the matrices
    # the gradients left after each step are the clipped ones (no optimizer rewrote p.grad)
    assert len(record.grad_norms) == 8 and max(record.grad_norms) <= 1e-3 * (1 + 1e-4)
    # the schedule ran per optimizer step, in every group of every sub-optimizer (total from the trainer: 8)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.total_steps == 8
    for step, lrs in enumerate(record.lrs, start=1):
        factor = warmup_cosine_factor(step, 8, 2, 0.1)
        assert lrs == pytest.approx([factor * g for g in sched.base_lrs])


class _StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


@pytest.mark.parametrize("name", ["normuon", "conda"])
def test_checkpoint_resume_equals_uninterrupted(name: str, text_file: Path, tmp_path: Path) -> None:
    dm, module = _setup(text_file, MATRIX[name])
    _trainer(tmp_path, max_epochs=2).fit(module, dm)
    straight = module.state_dict()

    dm, module = _setup(text_file, MATRIX[name])
    first = _trainer(tmp_path, max_epochs=2, callbacks=[_StopAfterFirstEpoch()])  # same run length: same schedule
    first.fit(module, dm)
    assert first.global_step == 4
    ckpt = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(ckpt)
    dm, module = _setup(text_file, MATRIX[name])
    _trainer(tmp_path, max_epochs=2).fit(module, dm, ckpt_path=str(ckpt))
    resumed = module.state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
