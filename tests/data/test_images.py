"""Image data: scikit-learn digits, .npz arrays, class-per-folder images, stratified splits, shift augmentation."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from manifoldnorm.data import (
    ImageDataset,
    load_digits_images,
    load_image_arrays,
    load_image_folder,
    stratified_split,
)
from manifoldnorm.data.images import random_shift


def test_digits_are_sklearn_images_scaled_to_unit_range() -> None:
    from sklearn.datasets import load_digits

    X, y, names = load_digits_images()
    assert X.shape == (1797, 1, 8, 8) and X.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64 and names == [str(d) for d in range(10)]
    assert X.min() == 0.0 and X.max() == 1.0
    ref = load_digits()
    np.testing.assert_array_equal(X[:, 0] * 16, ref.images)
    np.testing.assert_array_equal(y, ref.target)
    assert np.bincount(y).min() >= 170


def test_image_arrays_layouts_scaling_and_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(6, 5, 4), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", X=gray, y=np.array(["cat", "dog", "cat", "ant", "dog", "cat"]))
    X, y, names = load_image_arrays(tmp_path / "g.npz")
    assert X.shape == (6, 1, 5, 4) and X.dtype == np.float32
    np.testing.assert_allclose(X[:, 0], gray / 255.0, rtol=1e-6)
    assert names == ["ant", "cat", "dog"] and y.tolist() == [1, 2, 1, 0, 2, 1]

    rgb = rng.standard_normal((4, 3, 6, 6))
    np.savez(tmp_path / "c.npz", X=rgb, y=np.array([0, 2, 1, 2]), class_names=np.array(["a", "b", "c"]))
    X, y, names = load_image_arrays(str(tmp_path / "c.npz"))
    np.testing.assert_allclose(X, rgb.astype(np.float32))  # float images are kept as they are
    assert y.tolist() == [0, 2, 1, 2] and names == ["a", "b", "c"]


def test_image_arrays_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image_arrays(tmp_path / "none.npz")
    np.savez(tmp_path / "noy.npz", X=np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match=r"has no y \(found: X\)"):
        load_image_arrays(tmp_path / "noy.npz")
    np.savez(tmp_path / "bad.npz", X=np.zeros((2, 3)), y=np.zeros(2))
    with pytest.raises(ValueError, match=r"\(N, H, W\) or \(N, C, H, W\)"):
        load_image_arrays(tmp_path / "bad.npz")
    X = np.zeros((2, 3, 3))
    X[1, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", X=X, y=np.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        load_image_arrays(tmp_path / "nan.npz")
    np.savez(tmp_path / "neg.npz", X=np.zeros((2, 3, 3)), y=np.array([0, -1]))
    with pytest.raises(ValueError, match="non-negative"):
        load_image_arrays(tmp_path / "neg.npz")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_image_arrays(tmp_path / "text.npz")


def _write(path: Path, array: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_image_folder_grayscale_classes_in_sorted_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pics = {("zebra", "a.png"): rng.integers(0, 256, (4, 6), dtype=np.uint8),
            ("apple", "b.png"): rng.integers(0, 256, (4, 6), dtype=np.uint8),
            ("apple", "a.PNG"): rng.integers(0, 256, (4, 6), dtype=np.uint8)}
    for (cls, name), arr in pics.items():
        _write(tmp_path / cls / name, arr, "L")
    (tmp_path / "apple" / "notes.txt").write_text("ignored")
    X, y, names = load_image_folder(tmp_path)
    assert names == ["apple", "zebra"] and y.tolist() == [0, 0, 1]
    assert X.shape == (3, 1, 4, 6) and X.dtype == np.float32
    np.testing.assert_allclose(X[0, 0], pics[("apple", "a.PNG")] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(X[2, 0], pics[("zebra", "a.png")] / 255.0, rtol=1e-6)


def test_image_folder_rgb_mix_resize_and_errors(tmp_path: Path) -> None:
    rgb = np.zeros((5, 5, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    _write(tmp_path / "red" / "r.png", rgb, "RGB")
    _write(tmp_path / "gray" / "g.jpg", np.full((5, 5), 128, dtype=np.uint8), "L")
    X, y, names = load_image_folder(tmp_path)
    assert names == ["gray", "red"] and X.shape == (2, 3, 5, 5)  # one color image: everything RGB
    np.testing.assert_allclose(X[1, :, 2, 2], [1.0, 0.0, 0.0])
    assert np.allclose(X[0], X[0, 0]) and abs(X[0, 0, 2, 2] - 128 / 255) < 0.02  # gray replicated (JPEG)

    _write(tmp_path / "red" / "big.png", np.zeros((7, 9, 3), dtype=np.uint8), "RGB")
    with pytest.raises(ValueError, match="different sizes.*image_size"):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, image_size=(4, 3)).X.shape == (3, 3, 4, 3)
    assert load_image_folder(tmp_path, image_size=6).X.shape == (3, 3, 6, 6)
    with pytest.raises(ValueError, match="image_size"):
        load_image_folder(tmp_path, image_size=(4, 0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no .png/.jpg/.jpeg images"):
        load_image_folder(tmp_path)
    with pytest.raises(ValueError, match="no class subfolders"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image_folder(tmp_path / "missing")


def test_image_folder_without_pillow_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now raises ImportError
    with pytest.raises(ImportError, match="needs Pillow: pip install pillow"):
        load_image_folder(tmp_path)


def test_stratified_split_partitions_every_class() -> None:
    y = np.repeat(np.arange(3), [40, 20, 60])
    split = stratified_split(y, val_fraction=0.25, test_fraction=0.1, seed=5)
    all_idx = np.concatenate(list(split.values()))
    assert sorted(all_idx.tolist()) == list(range(len(y)))  # disjoint and covering
    for c, n in enumerate((40, 20, 60)):
        assert (y[split["test"]] == c).sum() == round(n * 0.1)
        assert (y[split["val"]] == c).sum() == round(n * 0.25)
    again = stratified_split(y, 0.25, 0.1, seed=5)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert not np.array_equal(split["val"], stratified_split(y, 0.25, 0.1, seed=6)["val"])
    assert len(stratified_split(y, 0.2, 0.0)["test"]) == 0
    with pytest.raises(ValueError, match="< 1"):
        stratified_split(y, 0.5, 0.5)
    with pytest.raises(ValueError, match="val split is empty"):
        stratified_split(np.array([0, 0, 1, 1]), 0.1, 0.0)


def _shift_reference(x: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    c, h, w = x.shape
    out = torch.full_like(x, fill)
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[:, i, j] = x[:, i - dy, j - dx]
    return out


def test_random_shift_matches_pixelwise_translation() -> None:
    x = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(2, 5, 6)
    seen = set()
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        dy, dx = torch.randint(-2, 3, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
        out = random_shift(x, 2, g, fill=-1.0)
        torch.testing.assert_close(out, _shift_reference(x, dy, dx, -1.0))
        seen.add((dy, dx))
    assert len(seen) > 10
    assert random_shift(x, 0, torch.Generator()) is x
    per_channel = random_shift(x, 3, torch.Generator().manual_seed(0), fill=torch.tensor([7.0, 9.0]))
    uncovered = per_channel != x
    assert set(per_channel[0][uncovered[0]].tolist()) <= {7.0} | set(x[0].flatten().tolist())


def test_image_dataset_items_and_seeded_augmentation() -> None:
    X = np.random.default_rng(0).standard_normal((4, 1, 6, 6)).astype(np.float32)
    ds = ImageDataset(X, [0, 1, 0, 1], max_shift=1)
    x, y, d = ds[2]
    assert torch.equal(x, torch.as_tensor(X[2])) and y.item() == 0 and d.item() == 0 and d.dtype == torch.int64
    a, b = ds[(2, 123)][0], ds[(2, 123)][0]
    assert torch.equal(a, b)
    assert any(not torch.equal(ds[(2, s)][0], a) for s in range(124, 134))
    with pytest.raises(ValueError, match=r"X \(N, C, H, W\) and y \(N,\)"):
        ImageDataset(X[0], [0])
