"""CharLMDataModule and LanguageModelModule under a real Lightning Trainer, with a tiny model defined here."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from manifoldnorm.data import load_text
from manifoldnorm.lit import CharLMDataModule, LanguageModelModule
from manifoldnorm.optim import create_optimizer

OPT = functools.partial(create_optimizer, manifold=None, rest={"name": "adamw", "lr": 3e-2})
TEXT = ("abcdefgh\n" * 10 + "the quick brown fox jumps over the lazy dog\n") * 40


class TinyLM(nn.Module):
    """Next character from the current one: embedding -> linear."""

    def __init__(self, vocab_size: int, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, d)
        self.head = nn.Linear(d, vocab_size)

    def forward(self, idx: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.emb(idx))


class SphereLM(TinyLM):
    """TinyLM whose embedding rows must stay unit-norm (an nGPT-style constraint)."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__(vocab_size)
        self.calls = 0
        self.normalize_weights_()

    def normalize_weights_(self) -> None:
        self.calls += 1
        self.emb.weight.data = F.normalize(self.emb.weight.data, dim=-1)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _dm(path: Path, **kw) -> CharLMDataModule:
    kw = {"block_size": 8, "batch_size": 4, "val_fraction": 0.2, "test_fraction": 0.1, "steps_per_epoch": 5,
          "val_batches": 3, **kw}
    dm = CharLMDataModule(source="file", path=str(path), **kw)
    dm.setup("fit")
    return dm


def _trainer(tmp_path: Path, epochs: int, **kw) -> pl.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, accelerator="cpu", devices=1, num_sanity_val_steps=0, **kw)


def test_batches_are_shifted_windows_of_each_split(text_file: Path) -> None:
    dm = _dm(text_file)
    assert dm.info() == {"vocab_size": len(set(TEXT)), "block_size": 8}
    n = len(TEXT)
    n_test, n_val = round(0.1 * n), round(0.2 * n)
    train_text, val_text, test_text = TEXT[:n - n_val - n_test], TEXT[n - n_val - n_test:n - n_test], TEXT[-n_test:]
    loader = dm.train_dataloader()
    assert len(loader) == 5
    batches = list(loader)
    assert len(batches) == 5
    for x, y, domain in batches:
        assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
        assert domain.shape == (4,) and domain.dtype == torch.int64 and not domain.any()
        assert torch.equal(x[:, 1:], y[:, :-1])
        for xi, yi in zip(x, y, strict=True):
            assert dm.vocab.decode(xi) + dm.vocab.decode(yi[-1:]) in train_text
    val = list(dm.val_dataloader())
    assert len(val) == 3 and all(dm.vocab.decode(torch.cat([x[i], y[i, -1:]])) in val_text
                                 for x, y, _ in val for i in range(len(x)))
    # test: consecutive non-overlapping windows covering the test text
    xs = torch.cat([x for x, _, _ in dm.test_dataloader()])
    assert dm.vocab.decode(xs.reshape(-1)) == test_text[:len(xs) * 8]
    assert len(xs) == (len(test_text) - 1) // 8


def test_training_windows_are_seeded_by_seed_and_epoch(text_file: Path) -> None:
    a, b, c = _dm(text_file, seed=1), _dm(text_file, seed=1), _dm(text_file, seed=2)
    la, lb = a.train_dataloader(), b.train_dataloader()
    first = [x for x, _, _ in la]
    assert all(torch.equal(u, v) for u, v in zip(first, [x for x, _, _ in lb], strict=True))
    la.sampler.set_epoch(1)  # what Lightning does at the start of every epoch
    assert not all(torch.equal(u, v) for u, v in zip(first, [x for x, _, _ in la], strict=True))
    assert not torch.equal(first[0], next(iter(c.train_dataloader()))[0])
    # validation windows are fixed: independent of the seed
    assert all(torch.equal(u[0], v[0]) for u, v in zip(a.val_dataloader(), c.val_dataloader(), strict=True))


def test_default_pydoc_source_and_test_fraction_zero(text_file: Path) -> None:
    dm = CharLMDataModule(val_batches=2)
    dm.setup()
    assert dm.info() == {"vocab_size": len(set(load_text("pydoc"))), "block_size": 64}
    assert len(dm.val_dataloader()) == 2 and len(dm.train_dataloader()) == 200
    no_test = _dm(text_file, test_fraction=0.0)
    assert no_test.datasets["test"] is no_test.datasets["val"]


def test_data_module_errors(text_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        CharLMDataModule(block_size=0)
    with pytest.raises(ValueError, match="val_fraction must be > 0"):
        CharLMDataModule(val_fraction=0.0)
    with pytest.raises(RuntimeError, match="after setup"):
        CharLMDataModule().info()
    short = tmp_path / "short.txt"
    short.write_text("abcdefghijklmnopqrstuvwxyz" * 2)
    with pytest.raises(ValueError, match="fewer than block_size"):
        _dm(short, block_size=16)
    with pytest.raises(FileNotFoundError):
        _dm(tmp_path / "missing.txt")


def test_fit_learns_and_logs_loss_and_bpc(text_file: Path, tmp_path: Path) -> None:
    dm = _dm(text_file, steps_per_epoch=20)
    torch.manual_seed(0)
    module = LanguageModelModule(TinyLM(len(dm.vocab)), optimizer=OPT)
    trainer = _trainer(tmp_path, 3)
    trainer.fit(module, datamodule=dm)
    m = trainer.callback_metrics
    for key in ("train/loss_step", "train/loss_epoch", "val/loss", "val/bpc"):
        assert torch.isfinite(m[key]), key
    assert m["val/bpc"].item() == pytest.approx(m["val/loss"].item() / math.log(2), rel=1e-6)
    assert m["val/bpc"] < 0.5 * math.log2(len(dm.vocab))  # far below uniform guessing
    (results,) = trainer.test(module, datamodule=dm, verbose=False)
    # test/loss: cross-entropy averaged over every predicted character of the test windows
    ds = dm.datasets["test"]
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.stack([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        logits = module.model(x)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    assert results["test/loss"] == pytest.approx(expected, rel=1e-5)
    assert results["test/bpc"] == pytest.approx(expected / math.log(2), rel=1e-5)
    # greedy generation continues the alphabet pattern
    start = torch.as_tensor(dm.vocab.encode("abc"))[None]
    out = module.generate(start, 6, temperature=0)
    assert dm.vocab.decode(out[0]) == "abcdefgh\n"
    assert module.model.training  # generate restores the mode


def test_normalize_weights_called_after_every_optimizer_step(text_file: Path, tmp_path: Path) -> None:
    dm = _dm(text_file)
    model = SphereLM(len(dm.vocab))
    calls0 = model.calls
    trainer = _trainer(tmp_path, 2)
    trainer.fit(LanguageModelModule(model, optimizer=OPT), datamodule=dm)
    assert trainer.global_step == 10 and model.calls - calls0 == 10
    norms = model.emb.weight.detach().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_resumed_run_matches_uninterrupted_run(text_file: Path, tmp_path: Path) -> None:
    def run(epochs: int, ckpt: str | None = None) -> tuple[LanguageModelModule, pl.Trainer]:
        torch.manual_seed(0)
        module = LanguageModelModule(TinyLM(len(set(TEXT))), optimizer=OPT)
        trainer = _trainer(tmp_path, epochs)
        trainer.fit(module, datamodule=_dm(text_file), ckpt_path=ckpt)
        return module, trainer

    full, trainer = run(2)
    assert trainer.train_dataloader.sampler.epoch == 1  # the trainer moved the window draw to the second epoch
    half, trainer = run(1)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed, _ = run(2, ckpt=str(tmp_path / "half.ckpt"))
    assert not torch.equal(half.model.emb.weight, full.model.emb.weight)
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_optimizers_schedulers_and_errors() -> None:
    sched = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=10)
    conf = LanguageModelModule(TinyLM(5), optimizer=OPT, scheduler=sched).configure_optimizers()
    assert conf["lr_scheduler"]["interval"] == "step" and conf["lr_scheduler"]["monitor"] == "val/loss"
    assert conf["lr_scheduler"]["scheduler"].optimizer is conf["optimizer"]
    plain = LanguageModelModule(TinyLM(5)).configure_optimizers()
    assert isinstance(plain, torch.optim.Optimizer)
    with pytest.raises(ValueError, match="unknown scheduler_interval 'batch'; valid: epoch, step"):
        LanguageModelModule(TinyLM(5), scheduler_interval="batch")
    with pytest.raises(TypeError, match="nn.Module"):
        LanguageModelModule(lambda x: x)
    class FlatLM(TinyLM):
        def forward(self, idx: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
            return super().forward(idx, domain).flatten(1)

    flat = LanguageModelModule(FlatLM(5))
    batch = (torch.zeros(2, 3, dtype=torch.long),) * 2 + (torch.zeros(2, dtype=torch.long),)
    with pytest.raises(ValueError, match=r"logits \(B, T, vocab\)"):
        flat.training_step(batch, 0)
