"""ImageDataModule: digits/arrays/folder sources, stratified split, standardization, seeded order and
augmentation, and training a small CNN (defined here) with ClassificationModule."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from manifoldnorm.data import load_digits_images
from manifoldnorm.lit import ClassificationModule, ImageDataModule
from manifoldnorm.optim import create_optimizer


class TinyCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(x)


@pytest.fixture(scope="module")
def digits() -> ImageDataModule:
    dm = ImageDataModule(batch_size=64, seed=0)
    dm.setup("fit")
    return dm


def test_digits_split_standardization_and_batches(digits: ImageDataModule) -> None:
    assert digits.info() == {"in_channels": 1, "num_classes": 10, "image_size": [8, 8]}
    sizes = {k: len(v) for k, v in digits.datasets.items()}
    assert sum(sizes.values()) == 1797 and sizes["val"] == sizes["test"] == pytest.approx(0.15 * 1797, abs=10)
    X, y, _ = load_digits_images()
    split = digits.split
    assert sorted(np.concatenate(list(split.values())).tolist()) == list(range(1797))
    for name in ("val", "test"):  # stratified: every class in proportion
        counts = np.bincount(y[split[name]], minlength=10)
        np.testing.assert_allclose(counts, 0.15 * np.bincount(y), atol=1)
    # standardization with training statistics, applied to every split
    train_raw = X[split["train"]]
    assert digits.mean[0] == pytest.approx(train_raw.mean(), rel=1e-5)
    assert digits.std[0] == pytest.approx(train_raw.std(), rel=1e-5)
    train = digits.datasets["train"].X
    assert abs(train.mean().item()) < 1e-5 and train.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-4)
    expected_val = (X[split["val"]] - digits.mean[0]) / digits.std[0]
    np.testing.assert_allclose(digits.datasets["val"].X.numpy(), expected_val, rtol=1e-5, atol=1e-6)
    x, yb, domain = next(iter(digits.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and yb.dtype == torch.int64
    assert domain.shape == (64,) and domain.dtype == torch.int64 and not domain.any()
    assert len(digits.train_dataloader()) == sizes["train"] // 64  # drop_last
    assert len(digits.test_dataloader()) == -(-sizes["test"] // 64)


def test_training_order_is_seeded_by_epoch_and_split_by_seed(digits: ImageDataModule) -> None:
    loader = digits.train_dataloader()
    first = next(iter(loader))[1]
    assert torch.equal(first, next(iter(digits.train_dataloader()))[1])
    loader.sampler.set_epoch(1)
    assert not torch.equal(first, next(iter(loader))[1])
    other = ImageDataModule(seed=1)
    other.setup()
    assert not np.array_equal(other.split["test"], digits.split["test"])
    raw = ImageDataModule(normalize=False)
    raw.setup()
    assert raw.datasets["train"].X.max().item() == 1.0 and raw.mean.tolist() == [0.0]


def test_augmentation_shifts_training_images_reproducibly(digits: ImageDataModule) -> None:
    aug = ImageDataModule(augment=True, max_shift=1)
    aug.setup()
    loader = aug.train_dataloader()
    x1, y1, _ = next(iter(loader))
    x2, y2, _ = next(iter(aug.train_dataloader()))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # the same (seed, epoch): the same augmentation
    x0, y0, _ = next(iter(digits.train_dataloader()))
    assert torch.equal(y0, y1)  # the same order as without augmentation
    assert not torch.equal(x0, x1)
    background = -aug.mean[0] / aug.std[0]
    # every image is its un-augmented self translated by at most one pixel, uncovered pixels = background
    for a, b in zip(x1, x0, strict=True):
        ok = False
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ref = torch.full_like(b, background)
                ys, yd = slice(max(0, -dy), 8 - max(0, dy)), slice(max(0, dy), 8 - max(0, -dy))
                xs, xd = slice(max(0, -dx), 8 - max(0, dx)), slice(max(0, dx), 8 - max(0, -dx))
                ref[:, yd, xd] = b[:, ys, xs]
                ok |= torch.allclose(a, ref)
        assert ok
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], x1)
    assert torch.equal(aug.datasets["val"].X, digits.datasets["val"].X)  # evaluation data is never augmented
    assert torch.equal(next(iter(aug.val_dataloader()))[0], next(iter(digits.val_dataloader()))[0])


def test_arrays_and_folder_sources(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, size=(40, 3, 5, 5), dtype=np.uint8)
    y = np.repeat(["bird", "cat"], 20)
    np.savez(tmp_path / "imgs.npz", X=X, y=y)
    dm = ImageDataModule(source="arrays", path=str(tmp_path / "imgs.npz"), batch_size=8, val_fraction=0.25,
                         test_fraction=0.25)
    dm.setup()
    assert dm.info() == {"in_channels": 3, "num_classes": 2, "image_size": [5, 5]}
    assert dm.class_names == ["bird", "cat"] and len(dm.datasets["test"]) == 10
    assert dm.mean.shape == (3,) and next(iter(dm.val_dataloader()))[0].shape == (8, 3, 5, 5)

    for cls in ("a", "b"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (6, 7), dtype=np.uint8), mode="L").save(
                tmp_path / "folder" / cls / f"{i}.png")
    dm = ImageDataModule(source="folder", path=str(tmp_path / "folder"), batch_size=4, val_fraction=0.34,
                         test_fraction=0.0, image_size=[4, 4])
    dm.setup()
    assert dm.info() == {"in_channels": 1, "num_classes": 2, "image_size": [4, 4]}
    assert len(dm.datasets["val"]) == 4 and len(dm.datasets["test"]) == 0
    with pytest.raises(RuntimeError, match="test split is empty"):
        dm.test_dataloader()


def test_data_module_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown image source 'cifar'; valid: digits, arrays, folder"):
        ImageDataModule(source="cifar")
    with pytest.raises(ValueError, match="needs path"):
        ImageDataModule(source="arrays")
    with pytest.raises(ValueError, match="takes no path"):
        ImageDataModule(path="x.npz")
    with pytest.raises(ValueError, match="batch_size"):
        ImageDataModule(batch_size=0)
    with pytest.raises(ValueError, match="val_fraction must be > 0"):
        ImageDataModule(val_fraction=0.0)
    with pytest.raises(RuntimeError, match="after setup"):
        ImageDataModule().info()
    np.savez(tmp_path / "one.npz", X=np.zeros((10, 4, 4)), y=np.zeros(10, dtype=int))
    with pytest.raises(ValueError, match="at least 2 classes"):
        ImageDataModule(source="arrays", path=str(tmp_path / "one.npz")).setup()


def test_small_cnn_learns_digits_with_classification_module(digits: ImageDataModule, tmp_path: Path) -> None:
    torch.manual_seed(0)
    opt = functools.partial(create_optimizer, manifold=None, rest={"name": "adamw", "lr": 1e-2})
    module = ClassificationModule(TinyCNN(**{k: digits.info()[k] for k in ("in_channels", "num_classes")}),
                                  num_classes=10, optimizer=opt)
    trainer = pl.Trainer(max_epochs=10, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu", devices=1,
                         num_sanity_val_steps=0)
    trainer.fit(module, datamodule=digits)
    (results,) = trainer.test(module, datamodule=digits, verbose=False)
    assert results["test/acc"] > 0.85  # chance: 0.1
