"""Lightning data module for image classification: scikit-learn digits, user arrays or image folders."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from manifoldnorm.data.images import (
    ImageDataset,
    Images,
    load_digits_images,
    load_image_arrays,
    load_image_folder,
    stratified_split,
)
from manifoldnorm.lit.datamodule import EpochSeededSampler
from manifoldnorm.lit.resume import seeded_loader
from manifoldnorm.optim._validate import check_bool, check_fractions, check_int

__all__ = ["IMAGE_SOURCES", "ImageDataModule"]

IMAGE_SOURCES: tuple[str, ...] = ("digits", "arrays", "folder")


class _AugmentKeys(Sampler[tuple[int, int]]):
    """Yields ``(index, seed)`` keys: the order of :class:`EpochSeededSampler`, one augmentation seed per item
    drawn from ``(seed, epoch)``, so augmented epochs are reproducible and resumable."""

    def __init__(self, n: int, seed: int) -> None:
        self.order = EpochSeededSampler(n, seed)

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.order.seed * 100_003 + self.order.epoch + 7_919)
        seeds = torch.randint(2**62, (len(self.order),), generator=g).tolist()
        return iter(zip(self.order, seeds, strict=True))

    def __len__(self) -> int:
        return len(self.order)


class ImageDataModule(pl.LightningDataModule):
    """Seeded stratified train/val/test loaders of ``(x, y, domain)`` image batches.

    ``x`` is float32 ``(B, C, H, W)``, ``y`` int64 class ids, ``domain`` int64 zeros (one domain). Trained with
    :class:`manifoldnorm.lit.ClassificationModule`.

    Parameters
    ----------
    source : {"digits", "arrays", "folder"}
        ``digits``: scikit-learn's 1797 8x8 handwritten digits (bundled, offline;
        :func:`manifoldnorm.data.load_digits_images`); ``arrays``: an ``.npz`` with ``X`` ``(N, H, W)`` or
        ``(N, C, H, W)`` and ``y`` (:func:`~manifoldnorm.data.load_image_arrays`); ``folder``: one subfolder per
        class of PNG/JPEG files (:func:`~manifoldnorm.data.load_image_folder`, needs Pillow).
    path : str, optional
        The file (``arrays``) or the folder (``folder``).
    batch_size : int
    val_fraction, test_fraction : float
        Fractions of every class held out for validation and test (:func:`manifoldnorm.data.stratified_split`).
    seed : int
        Seed of the split, of the training order (:class:`~manifoldnorm.lit.datamodule.EpochSeededSampler`) and
        of the augmentation.
    normalize : bool
        Standardize every channel with the mean and standard deviation of the training images.
    num_workers : int
    augment : bool
        Random translations of up to ``max_shift`` pixels of the training images (uncovered pixels are set to
        the value of a 0 input pixel), drawn from ``(seed, epoch)``.
    max_shift : int
        Largest translation of ``augment``, in pixels.
    image_size : int or (height, width), optional
        Resize the images of ``folder`` to this size.
    drop_last : bool
        Drop the last incomplete training batch (batch norms dislike tiny batches).

    Attributes
    ----------
    mean, std : ndarray, shape (C,)
        Channel statistics of the training images (zeros and ones with ``normalize=False``), after :meth:`setup`.
    class_names : list of str
    """

    def __init__(
        self,
        source: str = "digits",
        path: str | None = None,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        normalize: bool = True,
        num_workers: int = 0,
        augment: bool = False,
        max_shift: int = 1,
        image_size: int | Sequence[int] | None = None,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        if source not in IMAGE_SOURCES:
            raise ValueError(f"unknown image source {source!r}; valid: {', '.join(IMAGE_SOURCES)}")
        if source != "digits" and not path:
            raise ValueError(f"source={source!r} needs path=<{'file.npz' if source == 'arrays' else 'folder'}>")
        if source == "digits" and path:
            raise ValueError("source='digits' takes no path (use source='arrays' or 'folder' for your own images)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
            raise ValueError(f"max_shift must be a non-negative int, got {max_shift!r}")
        for flag, value in (("normalize", normalize), ("augment", augment), ("drop_last", drop_last)):
            check_bool(value, flag, "ImageDataModule")  # bool("maybe") would be True
        self.source, self.path = source, path
        self.batch_size, self.max_shift = batch_size, max_shift
        self.seed = check_int(seed, "seed", "ImageDataModule")
        self.num_workers = check_int(num_workers, "num_workers", "ImageDataModule", low=0)
        self.val_fraction, self.test_fraction = check_fractions("ImageDataModule", val_fraction, test_fraction)
        self.normalize, self.augment = normalize, augment
        self.image_size, self.drop_last = image_size, drop_last
        self.datasets: dict[str, ImageDataset] = {}
        self.split: dict[str, np.ndarray] | None = None
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.class_names: list[str] = []

    def _load(self) -> Images:
        if self.source == "digits":
            return load_digits_images()
        if self.source == "arrays":
            return load_image_arrays(self.path)
        return load_image_folder(self.path, image_size=self.image_size)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        X, y, self.class_names = self._load()
        num_classes = max(len(self.class_names), int(y.max()) + 1)
        if num_classes < 2:
            raise ValueError(f"image classification needs at least 2 classes, found {num_classes}")
        self.split = stratified_split(y, self.val_fraction, self.test_fraction, seed=self.seed)
        train = X[self.split["train"]]
        c = X.shape[1]
        if self.normalize:
            self.mean = train.mean(axis=(0, 2, 3), dtype=np.float64).astype(np.float32)
            self.std = np.maximum(train.std(axis=(0, 2, 3), dtype=np.float64), 1e-6).astype(np.float32)
        else:
            self.mean, self.std = np.zeros(c, np.float32), np.ones(c, np.float32)
        Xn = (X - self.mean[:, None, None]) / self.std[:, None, None]
        fill = -self.mean / self.std  # a 0 input pixel (background)
        for name, idx in self.split.items():
            shift = self.max_shift if (name == "train" and self.augment) else 0
            self.datasets[name] = ImageDataset(Xn[idx], y[idx], max_shift=shift, fill=fill)
        self._info = {"in_channels": int(c), "num_classes": int(num_classes),
                      "image_size": [int(X.shape[2]), int(X.shape[3])]}

    def info(self) -> dict[str, Any]:
        """``{"in_channels", "num_classes", "image_size": [H, W]}`` (after :meth:`setup`)."""
        if not self.datasets:
            raise RuntimeError("ImageDataModule.info() is available after setup()")
        return dict(self._info)

    def _loader(self, name: str, train: bool) -> DataLoader:
        if name not in self.datasets:
            raise RuntimeError(f"ImageDataModule: call setup() before requesting the {name} loader")
        ds = self.datasets[name]
        if len(ds) == 0:
            raise RuntimeError(f"ImageDataModule: the {name} split is empty (test_fraction=0?)")
        sampler: Sampler | None = None
        if train:
            sampler = _AugmentKeys(len(ds), self.seed) if ds.max_shift else EpochSeededSampler(len(ds), self.seed)
        return seeded_loader(
            ds,
            train=train,
            seed=self.seed,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=train and self.drop_last and len(ds) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
