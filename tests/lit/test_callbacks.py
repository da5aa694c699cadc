"""MomentumSchedule under a real Lightning Trainer: per-epoch momenta, logging, resume, defaults, errors, config."""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from manifoldnorm.lit import ClassificationModule, run
from manifoldnorm.lit.callbacks import MomentumSchedule
from manifoldnorm.models import SPDNet
from manifoldnorm.nn import SPDMomentumBatchNorm
from manifoldnorm.nn.schedule import kobler_momentum
from manifoldnorm.optim import create_optimizer

CONF = Path(__file__).resolve().parents[2] / "conf"
OPT = functools.partial(create_optimizer, manifold={"name": "riemannian_adam", "lr": 1e-2},
                        rest={"name": "adamw", "lr": 1e-2})


class MomentumRecorder(pl.Callback):
    """Records (epoch, train_momentum, momentum) of every SPDMomentumBatchNorm at each training batch."""

    def __init__(self) -> None:
        self.seen: dict[int, set[tuple[float, float]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        for m in pl_module.modules():
            if isinstance(m, SPDMomentumBatchNorm):
                self.seen.setdefault(trainer.current_epoch, set()).add((m.train_momentum, m.momentum))


def _module(norm: str = "spdmbn", seed: int = 0) -> ClassificationModule:
    torch.manual_seed(seed)
    return ClassificationModule(SPDNet(22, [6, 4], 4, norm_layer=norm), num_classes=4, optimizer=OPT)


def _trainer(tmp_path: Path, epochs: int, callbacks: list, **kw) -> pl.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(max_epochs=epochs, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, accelerator="cpu", devices=1, num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=callbacks, **kw)


def test_layer_momenta_follow_the_schedule_and_are_logged(make_dm, tmp_path: Path) -> None:
    dm = make_dm(batch_size=16)
    module, rec = _module(), MomentumRecorder()
    sched = MomentumSchedule(epochs=3, base_batch_size=64, tau0=0.85)
    trainer = _trainer(tmp_path, 4, [sched, rec], logger=CSVLogger(tmp_path, name="csv"))
    trainer.fit(module, datamodule=dm)
    expected = {e: kobler_momentum(e + 1, 3, 16, 64, 0.85) for e in range(4)}
    assert expected[0] == (1.0, pytest.approx(0.15)) and expected[2][0] == pytest.approx(0.25)
    assert sorted(rec.seen) == [0, 1, 2, 3]
    for epoch, values in rec.seen.items():  # both SPDMBN layers, every batch of the epoch
        assert values == {expected[epoch]}, epoch
    assert len({v for vals in rec.seen.values() for v in vals}) == 3  # epochs 3 and 4 share the final values
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as fh:
        logged = [r for r in csv.DictReader(fh) if r.get("norm/train_momentum")]
    assert [int(r["epoch"]) for r in logged] == [0, 1, 2, 3]
    for r in logged:
        train, test = expected[int(r["epoch"])]
        assert float(r["norm/train_momentum"]) == pytest.approx(train, rel=1e-6)
        assert float(r["norm/test_momentum"]) == pytest.approx(test, rel=1e-6)


def test_resumed_run_continues_the_schedule(make_dm, tmp_path: Path) -> None:
    sched = functools.partial(MomentumSchedule, epochs=4, base_batch_size=32)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path / "a", 2, [sched(), ckpt], enable_checkpointing=True).fit(_module(), datamodule=make_dm())
    resumed, rec = _module(seed=1), MomentumRecorder()
    for m in resumed.modules():
        if isinstance(m, SPDMomentumBatchNorm):
            m.set_momentum(train=0.9, test=0.9)  # stale values must be replaced
    _trainer(tmp_path / "b", 4, [sched(), rec]).fit(resumed, datamodule=make_dm(),
                                                     ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert sorted(rec.seen) == [2, 3]
    for epoch in (2, 3):
        assert rec.seen[epoch] == {kobler_momentum(epoch + 1, 4, 16, 32)}


def test_defaults_from_trainer_and_loader(make_dm, tmp_path: Path) -> None:
    sched = MomentumSchedule()
    assert sched.resolve_epochs(pl.Trainer(max_epochs=50, logger=False)) == 40  # the paper: K = epochs - 10
    assert sched.resolve_epochs(pl.Trainer(max_epochs=4, logger=False)) == 1
    with pytest.raises(ValueError, match="no finite max_epochs; pass epochs=K"):
        sched.resolve_epochs(pl.Trainer(max_epochs=-1, logger=False))
    # no data module: the batch size comes from the training loader
    dm, rec = make_dm(batch_size=8), MomentumRecorder()
    _trainer(tmp_path, 2, [MomentumSchedule(), rec]).fit(_module(), train_dataloaders=dm.train_dataloader())
    assert rec.seen == {0: {kobler_momentum(1, 1, 8, 64)}, 1: {kobler_momentum(2, 1, 8, 64)}}


def test_errors(make_dm, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no norm layer with set_momentum"):
        _trainer(tmp_path, 1, [MomentumSchedule(epochs=2)]).fit(_module("none"), datamodule=make_dm())
    with pytest.raises(ValueError, match="must not exceed base_batch_size"):
        MomentumSchedule(batch_size=128, base_batch_size=64)
    with pytest.raises(ValueError, match="must not exceed base_batch_size"):  # batch size known only at fit time
        _trainer(tmp_path, 1, [MomentumSchedule(base_batch_size=8)]).fit(_module(), datamodule=make_dm())
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        MomentumSchedule(epochs=0)


def test_hydra_option_adds_the_schedule_to_the_default_callbacks(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MANIFOLDNORM_CACHE", str(tmp_path / "cache"))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        base = compose("train", overrides=[f"paths.output_dir={tmp_path}"])
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", "callbacks=momentum_schedule",
                                          "callbacks.momentum_schedule.epochs=7"])
    assert set(cfg.callbacks) == set(base.callbacks) | {"momentum_schedule"}
    cbs = run.build_callbacks(cfg)
    (sched,) = [cb for cb in cbs if isinstance(cb, MomentumSchedule)]
    assert sched.epochs == 7 and sched.batch_size is None and sched.tau0 == 0.85
    assert {type(cb).__name__ for cb in cbs} >= {"ModelCheckpoint", "MomentumSchedule"}
