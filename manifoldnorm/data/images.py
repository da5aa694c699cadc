"""Small image classification data, offline: scikit-learn's digits, user arrays, class-per-folder images.

Every loader returns :class:`Images`: ``X`` float32 ``(N, C, H, W)`` in ``[0, 1]`` (floating user arrays are
kept as they are), ``y`` int64 ``(N,)`` and the class names. Pillow (``load_image_folder``) is imported lazily.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .arrays import _encode_labels

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "Images",
    "load_digits_images",
    "load_image_arrays",
    "load_image_folder",
    "random_shift",
    "stratified_split",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")
"""File suffixes read by :func:`load_image_folder` (case-insensitive)."""

_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


class Images(NamedTuple):
    """Images, labels and class names (``X, y, class_names = load_...()``)."""

    X: np.ndarray
    """float32 ``(N, C, H, W)``."""
    y: np.ndarray
    """int64 ``(N,)``, class ids ``0 .. K - 1``."""
    class_names: list[str]
    """Name of each class id."""


def load_digits_images() -> Images:
    """The 1797 handwritten digits of scikit-learn (8x8, bundled with the package, no download).

    Returns
    -------
    Images
        ``X`` float32 ``(1797, 1, 8, 8)``: the 0..16 gray levels divided by 16; ``y`` int64 digits 0..9;
        class names ``"0" .. "9"``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    X = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None]
    y = np.asarray(bunch.target, dtype=np.int64)
    return Images(np.ascontiguousarray(X), y, [str(int(c)) for c in bunch.target_names])


def _as_nchw(X: np.ndarray, what: str) -> np.ndarray:
    if X.dtype == object or not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise TypeError(f"{what}: X must be a real numeric array, got dtype {X.dtype}")
    if X.ndim == 3:
        X = X[:, None]
    if X.ndim != 4:
        raise ValueError(f"{what}: X must have shape (N, H, W) or (N, C, H, W), got {X.shape}")
    if X.shape[0] == 0:
        raise ValueError(f"{what}: X holds no images")
    if np.issubdtype(X.dtype, np.bool_) or np.issubdtype(X.dtype, np.uint8):
        X = X.astype(np.float32) / (1.0 if X.dtype == np.bool_ else 255.0)
    X = X.astype(np.float32)
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{what}: X contains NaN or Inf values")
    return np.ascontiguousarray(X)


def load_image_arrays(path: str | Path) -> Images:
    """Images from an ``.npz`` file with ``X`` ``(N, H, W)`` or ``(N, C, H, W)`` and labels ``y`` ``(N,)``.

    ``uint8`` images are divided by 255, other numeric ones kept (cast to float32). Labels are non-negative
    integers (kept) or strings (numbered in sorted order); an optional ``class_names`` array names the classes.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError, TypeError
        Not an ``.npz`` archive, missing ``X``/``y``, bad shapes, NaN/Inf or bad labels.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image array file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a readable .npz archive (save X and y with numpy.savez)")
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("X", "y") if k not in f.files]
        if missing:
            raise ValueError(f"{path} has no {' or '.join(missing)} (found: {', '.join(f.files) or 'nothing'})")
        X, y = f["X"], f["y"]
        names = [str(c) for c in f["class_names"]] if "class_names" in f.files else None
    X = _as_nchw(np.asarray(X), str(path))
    y, class_names = _encode_labels(y, X.shape[0], names)
    return Images(X, y, class_names)


def _size_hw(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return int(size[0]), int(size[1])


def load_image_folder(root: str | Path, image_size: int | Sequence[int] | None = None) -> Images:
    """Images in one subfolder per class (``root/<class name>/*.png|jpg|jpeg``), read with Pillow.

    Class ids follow the sorted subfolder names. If every image is grayscale the result has one channel,
    otherwise all images are converted to RGB (3 channels; an alpha channel is dropped). Pixels are divided
    by 255.

    Parameters
    ----------
    root : str or Path
    image_size : int or (height, width), optional
        Resize every image to this size (bilinear); without it all images must have the same size.

    Raises
    ------
    ImportError
        Pillow is not installed.
    FileNotFoundError
        ``root`` is not a directory.
    ValueError
        No class subfolders, a class without images, or images of different sizes without ``image_size``.
    """
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError("load_image_folder needs Pillow: pip install pillow") from err
    size = _size_hw(image_size)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class subfolders (expected root/<class>/<image>.png)")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not found:
            raise ValueError(f"class folder {root / name} has no {'/'.join(IMAGE_EXTENSIONS)} images")
        files += [(p, label) for p in found]
    images = []
    for p, _ in files:
        with Image.open(p) as im:
            im.load()
            images.append(im.copy())
    gray = all(im.mode in _GRAY_MODES for im in images)
    arrays = []
    for im in images:
        im = im.convert("L" if gray else "RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.float32) / 255.0
        arrays.append(arr[None] if gray else arr.transpose(2, 0, 1))
    shapes = sorted({a.shape[1:] for a in arrays})
    if len(shapes) > 1:
        raise ValueError(f"images in {root} have different sizes {shapes[:4]}; pass image_size=(height, width)")
    X = np.ascontiguousarray(np.stack(arrays))
    y = np.array([label for _, label in files], dtype=np.int64)
    return Images(X, y, classes)


def stratified_split(y: np.ndarray, val_fraction: float, test_fraction: float, seed: int = 0
                     ) -> dict[str, np.ndarray]:
    """Seeded stratified train/val/test split of the indices of the labels ``y`` ``(N,)``.

    Per class ``c`` (``n_c`` samples, in a random order drawn from ``seed``): ``round(n_c * test_fraction)`` go
    to test, ``round(n_c * val_fraction)`` to val, the rest to train.

    Returns ``{"train", "val", "test"}``: sorted int64 index arrays (val/test may be empty when their fraction
    is 0). Raises ``ValueError`` for fractions outside ``[0, 1)`` summing to 1 or more, or a split leaving a
    requested part empty.
    """
    y = np.asarray(y)
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(f, bool) or not 0.0 <= float(f) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {f!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(idx) * test_fraction))
        n_val = int(round(len(idx) * val_fraction))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    out = {k: np.sort(np.concatenate(v)).astype(np.int64) if v else np.zeros(0, np.int64) for k, v in parts.items()}
    for name, f in (("train", 1.0), ("val", val_fraction), ("test", test_fraction)):
        if f > 0 and len(out[name]) == 0:
            raise ValueError(f"the {name} split is empty ({len(y)} samples); use a larger fraction or more data")
    return out


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator, fill: Tensor | float = 0.0) -> Tensor:
    """Translate an image ``(C, H, W)`` by a random number of whole pixels (at most ``max_shift`` per axis).

    Both offsets are drawn uniformly from ``[-max_shift, max_shift]`` with ``generator``; uncovered pixels take
    ``fill`` (a scalar or one value per channel ``(C,)``).
    """
    if max_shift <= 0:
        return x
    dy, dx = (torch.randint(-max_shift, max_shift + 1, (2,), generator=generator)).tolist()
    c, h, w = x.shape
    out = torch.empty_like(x)
    out[:] = torch.as_tensor(fill, dtype=x.dtype).reshape(-1, 1, 1).expand(c, 1, 1)
    src_y, dst_y = slice(max(0, -dy), min(h, h - dy)), slice(max(0, dy), min(h, h + dy))
    src_x, dst_x = slice(max(0, -dx), min(w, w - dx)), slice(max(0, dx), min(w, w + dx))
    out[:, dst_y, dst_x] = x[:, src_y, src_x]
    return out


class ImageDataset(Dataset):
    """Map-style dataset of images; items are ``(x, y, domain)`` with ``x`` float32 ``(C, H, W)``, domain 0.

    Parameters
    ----------
    X : array_like, shape (N, C, H, W)
    y : array_like of int, shape (N,)
    max_shift : int
        Random translation of up to this many pixels (:func:`random_shift`), applied to items requested with a
        key ``(index, seed)``: the shift is drawn from a generator seeded by ``seed``, so the augmentation is
        reproducible. Plain integer indices are never augmented.
    fill : float or array_like (C,)
        Value of the pixels uncovered by a shift.
    """

    def __init__(self, X: Any, y: Any, max_shift: int = 0, fill: Any = 0.0) -> None:
        self.X = torch.as_tensor(np.asarray(X, dtype=np.float32))
        self.y = torch.as_tensor(np.asarray(y, dtype=np.int64))
        if self.X.ndim != 4 or self.y.shape != (self.X.shape[0],):
            raise ValueError(f"ImageDataset needs X (N, C, H, W) and y (N,), got {tuple(self.X.shape)} and "
                             f"{tuple(self.y.shape)}")
        if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
            raise ValueError(f"max_shift must be a non-negative int, got {max_shift!r}")
        self.max_shift = max_shift
        self.fill = torch.as_tensor(np.asarray(fill, dtype=np.float32))
        self._zero = torch.zeros((), dtype=torch.int64)

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        if isinstance(key, tuple):
            i, seed = key
            x = random_shift(self.X[i], self.max_shift, torch.Generator().manual_seed(int(seed)), self.fill)
        else:
            i, x = key, self.X[key]
        return x, self.y[i], self._zero
