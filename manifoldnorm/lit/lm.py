"""Character-level language modelling in Lightning: the text data module and the next-character module."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from manifoldnorm.data.text import (
    CharVocab,
    CharWindows,
    RandomWindowSampler,
    eval_starts,
    load_text,
    split_text,
)
from manifoldnorm.lit.guard import numerical_errors
from manifoldnorm.lit.module import OptimizerFactory, OptimizerSetup, SchedulerFactory, check_module_options
from manifoldnorm.lit.resume import seeded_loader
from manifoldnorm.optim._validate import check_fractions, check_int

__all__ = ["CharLMDataModule", "LanguageModelModule"]

LN2 = math.log(2.0)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class CharLMDataModule(pl.LightningDataModule):
    """Windows of a character-level text: ``(x, y, domain)`` batches, ``y`` = ``x`` shifted by one character.

    The text (:func:`manifoldnorm.data.load_text`) is split contiguously into ``train | val | test``
    (:func:`manifoldnorm.data.split_text`): the last ``test_fraction`` is the test text, the ``val_fraction``
    before it the validation text. The vocabulary holds every character of the whole text.

    - training: every epoch is ``steps_per_epoch`` batches of windows at uniformly random starts in the training
      text, drawn from a generator seeded by ``(seed, epoch)``
      (:class:`~manifoldnorm.data.text.RandomWindowSampler`): a resumed run sees the same windows;
    - validation: a fixed set of ``val_batches * batch_size`` windows evenly spaced over the validation text;
    - test: consecutive non-overlapping windows covering the test text (every test character predicted once,
      except the last ``< block_size``). With ``test_fraction=0`` the test loader is the validation loader.

    Parameters
    ----------
    source : {"pydoc", "file", "jargon", "corpus"}
        Text of :func:`~manifoldnorm.data.load_text`; ``pydoc`` (Python's bundled help topics, ~465k characters)
        is always available, ``corpus`` (~2.9M characters, :func:`~manifoldnorm.data.load_corpus`) on Debian.
    path : str, optional
        The text file of ``source="file"`` (or another copy of the Jargon File).
    block_size : int
        Context length ``T``.
    batch_size : int
    val_fraction, test_fraction : float
        Fractions of the text (at its end) for validation and test.
    steps_per_epoch : int
        Training batches per epoch.
    val_batches : int
        Validation batches (fewer if the validation text has fewer distinct windows).
    seed : int
    num_workers : int

    Attributes
    ----------
    vocab : CharVocab
        After :meth:`setup`; ``vocab.decode`` turns ids back into text.
    """

    def __init__(
        self,
        source: str = "pydoc",
        path: str | None = None,
        block_size: int = 64,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.05,
        steps_per_epoch: int = 200,
        val_batches: int = 20,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.source, self.path = source, path
        self.block_size = _positive_int("block_size", block_size)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.steps_per_epoch = _positive_int("steps_per_epoch", steps_per_epoch)
        self.val_batches = _positive_int("val_batches", val_batches)
        self.val_fraction, self.test_fraction = check_fractions("CharLMDataModule", val_fraction, test_fraction)
        self.seed = check_int(seed, "seed", "CharLMDataModule")
        self.num_workers = check_int(num_workers, "num_workers", "CharLMDataModule", low=0)
        self.vocab: CharVocab | None = None
        self.datasets: dict[str, CharWindows] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        text = load_text(self.source, self.path)
        self.vocab = CharVocab.from_text(text)
        train, val, test = split_text(text, self.val_fraction, self.test_fraction)
        T = self.block_size
        val_ids = self.vocab.encode(val)
        self.datasets["train"] = CharWindows(self.vocab.encode(train), T)
        self.datasets["val"] = CharWindows(val_ids, T, eval_starts(len(val_ids), T, self.val_batches * self.batch_size))
        if test:
            test_ids = self.vocab.encode(test)
            self.datasets["test"] = CharWindows(test_ids, T, eval_starts(len(test_ids), T))
        else:
            self.datasets["test"] = self.datasets["val"]

    def info(self) -> dict[str, Any]:
        """``{"vocab_size", "block_size"}`` (after :meth:`setup`)."""
        if self.vocab is None:
            raise RuntimeError("CharLMDataModule.info() is available after setup()")
        return {"vocab_size": len(self.vocab), "block_size": self.block_size}

    def _loader(self, name: str) -> DataLoader:
        if name not in self.datasets:
            raise RuntimeError(f"CharLMDataModule: call setup() before requesting the {name} loader")
        ds = self.datasets[name]
        sampler = None
        if name == "train":
            sampler = RandomWindowSampler(len(ds), self.steps_per_epoch * self.batch_size, seed=self.seed)
        return seeded_loader(ds, train=name == "train", seed=self.seed, batch_size=self.batch_size, sampler=sampler,
                             num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class LanguageModelModule(OptimizerSetup, pl.LightningModule):
    """Train/evaluate ``model(x, domain=domain) -> logits (B, T, V)`` by next-token cross-entropy.

    The loss is the mean cross-entropy over every position of every window. Logs ``train/loss`` (per step and
    per epoch: ``train/loss_step``, ``train/loss_epoch``), ``val/loss``, ``val/bpc``, ``test/loss`` and
    ``test/bpc``, where bits per character :math:`\\mathrm{bpc} = \\mathrm{loss} / \\ln 2`. Epoch values are
    averages over all predicted tokens.

    If the model has a ``normalize_weights_()`` method (nGPT, Loshchilov et al., ICLR 2025: weights live on the
    unit hypersphere), it is called under ``torch.no_grad()`` after every optimizer step
    (:meth:`optimizer_step`), so the weights are back on the sphere before the next forward pass.

    Parameters
    ----------
    model : nn.Module
        Called as ``model(x, domain=domain)`` with ``x`` int64 ``(B, T)``; returns logits ``(B, T, V)``.
    optimizer : callable, optional
        ``optimizer(model) -> torch.optim.Optimizer`` (e.g. a ``functools.partial`` of
        :func:`manifoldnorm.optim.create_optimizer`); default: ``create_optimizer`` with its defaults.
    scheduler : callable, optional
        ``scheduler(optimizer) -> LRScheduler``.
    scheduler_interval : {"step", "epoch"}
        When the scheduler steps.
    scheduler_monitor : str
        Metric handed to schedulers that need one (``ReduceLROnPlateau``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        scheduler_monitor: str = "val/loss",
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        check_module_options("LanguageModelModule", optimizer, scheduler, scheduler_interval, scheduler_monitor)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        return self.model(x, domain=domain)

    def _loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, int]:
        x, y, domain = batch
        logits = self.model(x, domain=domain)
        if logits.ndim != 3 or logits.shape[:2] != y.shape:
            raise ValueError(f"the model must return logits (B, T, vocab) for input {tuple(x.shape)}, "
                             f"got {tuple(logits.shape)}")
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        return loss, int(y.numel())

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        with numerical_errors(self, batch, batch_idx):  # a diverged layer: one NonFiniteError line
            loss, n = self._loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=n, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor, Tensor], stage: str) -> Tensor:
        loss, n = self._loss(batch)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=n, prog_bar=stage == "val")
        self.log(f"{stage}/bpc", loss / LN2, on_step=False, on_epoch=True, batch_size=n, prog_bar=stage == "val")
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Callable[[], Any] | None = None) -> None:
        """Step the optimizer, then put nGPT-style weights back on the sphere (``model.normalize_weights_()``)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        normalize = getattr(self.model, "normalize_weights_", None)
        if callable(normalize):
            with torch.no_grad():
                normalize()

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` ``(B, t)``; the context is cropped to the model's
        ``block_size`` attribute when it has one. ``temperature=0`` picks the most likely token."""
        block = getattr(self.model, "block_size", None)
        was_training = self.model.training
        self.model.eval()
        try:
            for _ in range(_positive_int("max_new_tokens", max_new_tokens)):
                context = idx if block is None else idx[:, -int(block):]
                logits = self.model(context)[:, -1].float()
                if temperature <= 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator)
                idx = torch.cat([idx, nxt.to(idx.dtype)], dim=1)
        finally:
            self.model.train(was_training)
        return idx
