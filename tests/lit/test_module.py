"""ClassificationModule under a real Lightning Trainer: metrics, test-time refit, schedulers, exact resume."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from manifoldnorm.lit import ClassificationModule
from manifoldnorm.models import SPDNet
from manifoldnorm.nn import DomainSPDBatchNorm, refit_domain_norms
from manifoldnorm.optim import create_optimizer

OPT = functools.partial(create_optimizer, manifold={"name": "riemannian_adam", "lr": 1e-2},
                        rest={"name": "adamw", "lr": 1e-2})


def _trainer(tmp_path: Path, epochs: int, **kw) -> pl.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, accelerator="cpu", devices=1, num_sanity_val_steps=0, **kw)


def _module(norm: str = "liebn_aim", seed: int = 0, **kw) -> ClassificationModule:
    torch.manual_seed(seed)
    return ClassificationModule(SPDNet(22, [6], 4, norm_layer=norm), num_classes=4, optimizer=OPT, **kw)


def test_fit_logs_metrics_and_test_metrics_match_sklearn(make_dm, tmp_path: Path) -> None:
    dm = make_dm(protocol="within_session")
    module = _module()
    trainer = _trainer(tmp_path, 2)
    trainer.fit(module, datamodule=dm)
    for stage in ("train", "val"):
        for name in ("loss", "acc", "bacc"):
            assert torch.isfinite(trainer.callback_metrics[f"{stage}/{name}"])
    (results,) = trainer.test(module, datamodule=dm, verbose=False)

    ds = dm.datasets["test"]
    module.eval()
    with torch.no_grad():
        pred = module(torch.as_tensor(ds.X), domain=torch.as_tensor(ds.domain)).argmax(-1).numpy()
    assert results["test/acc"] == pytest.approx(accuracy_score(ds.y, pred), abs=1e-6)
    assert results["test/bacc"] == pytest.approx(balanced_accuracy_score(ds.y, pred), abs=1e-6)


class _StepLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[tuple[float, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses.append((outputs["loss"].detach(), int(batch[1].shape[0])))


def test_metrics_are_logged_once_per_epoch_with_the_per_step_values(make_dm, tmp_path: Path, monkeypatch) -> None:
    """The steps only accumulate; each epoch logs once, with the values per-step ``self.log(on_epoch=True)`` calls
    gave: the batch-size-weighted mean loss in Lightning's arithmetic (float32 sum of value x n, one division)."""
    dm = make_dm(protocol="within_session", drop_last=False, batch_size=24)  # 80 = 3 x 24 + 8: the weights matter
    module = _module()
    calls: list[str] = []
    real = pl.LightningModule.log
    monkeypatch.setattr(pl.LightningModule, "log", lambda self, name, *a, **k: calls.append(name) or real(
        self, name, *a, **k))
    steps = _StepLosses()
    trainer = _trainer(tmp_path, 2, callbacks=[steps], limit_val_batches=2)
    trainer.fit(module, datamodule=dm)
    assert sorted(calls) == sorted(f"{s}/{m}" for _ in range(2) for s in ("train", "val")
                                   for m in ("loss", "acc", "bacc"))  # once per epoch, none per step
    last = steps.losses[-len(steps.losses) // 2:]
    total, count = torch.tensor(0.0), torch.tensor(0)
    for loss, n in last:
        total, count = total + loss * n, count + n
    assert torch.equal(trainer.callback_metrics["train/loss"], total / count)
    assert len({n for _, n in last}) > 1  # the check saw batches of different sizes


def _domain_stats(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in model.modules() if isinstance(m, DomainSPDBatchNorm)]


@pytest.mark.parametrize("refit", [None, False])
def test_test_time_refit_of_domain_norms(make_dm, tmp_path: Path, refit: bool | None) -> None:
    dm = make_dm(protocol="cross_session")  # test domains (second sessions) are never seen in training
    module = _module("spddsmbn", refit_on_test=refit)
    trainer = _trainer(tmp_path, 1)
    trainer.fit(module, datamodule=dm)
    before = copy.deepcopy(module.model)
    trainer.test(module, datamodule=dm, verbose=False)
    test_domains = np.unique(dm.datasets["test"].domain).tolist()
    after = _domain_stats(module.model)
    if refit is False:
        for b, a in zip(_domain_stats(before), after, strict=True):
            assert torch.equal(b[: len(a)], a[: len(b)])
        return
    # the same statistics as refitting by hand, one target domain at a time
    ds = dm.datasets["test"]
    for dom in test_domains:
        mask = ds.domain == dom
        refit_domain_norms(before, torch.as_tensor(ds.X[mask]), torch.as_tensor(ds.domain[mask]),
                           domain_aware_only=True)
    expected = _domain_stats(before)
    eye = torch.eye(6, dtype=torch.float64)
    for e, a in zip(expected, after, strict=True):
        torch.testing.assert_close(a, e)
        assert all(not torch.allclose(a[d, 0], eye) for d in test_domains)


def test_refit_true_without_refittable_norm_is_an_error() -> None:
    with pytest.raises(ValueError, match="no refittable norm"):
        _module("none", refit_on_test=True)
    with pytest.raises(ValueError, match="scheduler_interval"):
        _module(scheduler_interval="batch")


def test_scheduler_steps_both_sub_optimizers(make_dm, tmp_path: Path) -> None:
    dm = make_dm()
    sched = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    module = _module(scheduler=sched)
    trainer = _trainer(tmp_path, 2)
    trainer.fit(module, datamodule=dm)
    opt = trainer.optimizers[0]
    assert opt.optimizers["manifold"].param_groups[0]["lr"] == pytest.approx(0.25e-2)
    assert opt.optimizers["rest"].param_groups[0]["lr"] == pytest.approx(0.25e-2)


def test_resume_from_checkpoint_is_bit_identical(make_dm, tmp_path: Path) -> None:
    full = _module(seed=1)
    _trainer(tmp_path / "full", 3).fit(full, datamodule=make_dm())

    part = _module(seed=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path / "part", 2, enable_checkpointing=True, callbacks=[ckpt]).fit(part, datamodule=make_dm())
    resumed = _module(seed=2)  # different initial weights: everything must come from the checkpoint
    _trainer(tmp_path / "resumed", 3, enable_checkpointing=True).fit(
        resumed, datamodule=make_dm(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))

    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(part.model.classifier.weight, full.model.classifier.weight)


def test_epoch_accuracy_equals_torchmetrics_micro_and_macro() -> None:
    """One confusion matrix per epoch gives torchmetrics' values bit for bit, also with a class that is only
    predicted (recall 0, counted) and a class absent from targets and predictions (left out)."""
    from torchmetrics.classification import MulticlassAccuracy

    from manifoldnorm.lit.confusion import EpochAccuracy

    g = torch.Generator().manual_seed(0)
    ours = EpochAccuracy(5, prefix="val/")
    micro, macro = MulticlassAccuracy(5, average="micro"), MulticlassAccuracy(5, average="macro")
    for _ in range(4):
        y = torch.randint(0, 3, (17,), generator=g)  # classes 3 and 4 never occur as targets
        logits = torch.randn(17, 5, generator=g)
        logits[:2, 3] = 10.0  # class 3 is predicted twice; class 4 stays out of the predictions
        logits[2:, 3:] = -10.0
        for m in (ours, micro, macro):
            m.update(logits, y)
    out = ours.compute()
    assert set(out) == {"val/acc", "val/bacc"}
    assert torch.equal(out["val/acc"], micro.compute()) and torch.equal(out["val/bacc"], macro.compute())
    ours.reset()
    assert int(ours.counts.sum()) == 0
