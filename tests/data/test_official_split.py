"""A data set's own split (``split`` array of an ``.npz``): exact indices, seeded val carve-out, clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from manifoldnorm.data import check_split_labels, load_arrays, split_indices
from manifoldnorm.lit import EEGDataModule

N_DOMAINS, N_CLASSES, PER_CELL = 2, 3, 10  # 60 trials


def _meta(seed: int = 0) -> dict:
    """Labels, subjects (2, one session each) and an official split: per (domain, class) 6 train, 1 val, 3 test."""
    y = np.tile(np.repeat(np.arange(N_CLASSES), PER_CELL), N_DOMAINS)
    subject = np.repeat(np.arange(N_DOMAINS), N_CLASSES * PER_CELL)
    rng = np.random.default_rng(seed)  # shuffled within each cell: interleaved, not in blocks
    cell = np.array(["train"] * 6 + ["val"] + ["test"] * 3)
    split = np.concatenate([cell[rng.permutation(PER_CELL)] for _ in range(N_DOMAINS * N_CLASSES)])
    return {"y": y, "subject": subject, "session": np.zeros_like(subject), "split": split}


def _spd(n: int, c: int = 4, seed: int = 0) -> np.ndarray:
    A = np.random.default_rng(seed).standard_normal((n, c, 2 * c))
    return A @ np.swapaxes(A, -1, -2) / (2 * c) + 1e-3 * np.eye(c)


def _write(path: Path, kind: str, split, **extra) -> Path:
    meta = _meta()
    n = len(meta["y"])
    X = _spd(n) if kind == "spd" else np.random.default_rng(1).standard_normal((n, 4, 64)).astype(np.float32)
    arrays = {"X": X, "y": meta["y"], "subject": meta["subject"], "session": meta["session"], **extra}
    if kind == "raw":
        arrays["sfreq"] = 64.0
    if split is not None:
        arrays["split"] = split
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("kind", ["spd", "raw"])
@pytest.mark.parametrize("as_bytes", [False, True])
def test_data_module_uses_the_files_split_exactly(tmp_path: Path, kind: str, as_bytes: bool, caplog) -> None:
    split = _meta()["split"]
    path = _write(tmp_path / f"{kind}.npz", kind, split.astype("S5") if as_bytes else split)
    dm = EEGDataModule(source="arrays", path=str(path), kind=kind, band=None if kind == "spd" else (4.0, 20.0),
                       batch_size=8, seed=3)
    with caplog.at_level(logging.INFO, logger="manifoldnorm.data.splits"):
        dm.setup()
    assert dm.split.protocol == "official"
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(dm.split[name], np.flatnonzero(split == name))
        assert len(dm.datasets[name]) == int(np.sum(split == name))
    # the trials served are the file's trials at those indices
    np.testing.assert_array_equal(dm.datasets["test"].y, _meta()["y"][split == "test"])
    assert "official split" in caplog.text and "protocols are not used" in caplog.text
    assert dm.info()["num_classes"] == N_CLASSES


def test_explicit_official_protocol_and_seed_does_not_matter_with_val(tmp_path: Path) -> None:
    path = _write(tmp_path / "f.npz", "spd", _meta()["split"])
    a = EEGDataModule(source="arrays", path=str(path), protocol="official", seed=0)
    b = EEGDataModule(source="arrays", path=str(path), protocol="official", seed=7, val_fraction=0.5)
    a.setup(), b.setup()
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(a.split[name], b.split[name])


def test_val_carved_from_train_seeded_stratified_disjoint() -> None:
    meta = _meta()
    meta["split"] = np.where(meta["split"] == "val", "train", meta["split"])  # no "val" entries: 7 train per cell
    file_train = np.flatnonzero(meta["split"] == "train")
    a = split_indices(meta, protocol="auto", seed=0, val_fraction=0.3)
    again = split_indices(meta, protocol="auto", seed=0, val_fraction=0.3)
    other = split_indices(meta, protocol="auto", seed=1, val_fraction=0.3)
    assert a.protocol == "official"
    np.testing.assert_array_equal(a["test"], np.flatnonzero(meta["split"] == "test"))  # test untouched
    np.testing.assert_array_equal(np.sort(np.concatenate([a["train"], a["val"]])), file_train)  # a partition of train
    assert not set(a["train"]) & set(a["val"])
    for name in ("train", "val"):
        np.testing.assert_array_equal(a[name], again[name])  # deterministic per seed
    assert not np.array_equal(a["val"], other["val"])  # and the seed matters
    # stratified: round(0.3 * 7) = 2 val trials in every (domain, class) cell
    cells = np.stack([meta["subject"][a["val"]], meta["y"][a["val"]]], axis=1)
    _, counts = np.unique(cells, axis=0, return_counts=True)
    assert counts.tolist() == [2] * (N_DOMAINS * N_CLASSES)


def test_auto_without_split_is_cross_session() -> None:
    meta = {k: v for k, v in _meta().items() if k != "split"}
    meta["session"] = np.tile(np.repeat([0, 1], PER_CELL * N_CLASSES // 2), N_DOMAINS)
    auto, cross = split_indices(meta, seed=0), split_indices(meta, "cross_session", seed=0)
    assert auto.protocol == "cross_session"
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(auto[name], cross[name])


@pytest.mark.parametrize(("split", "message"), [
    (lambda s: np.where(s == "val", "valid", s), r"unknown labels \['valid'\].*valid labels: train, val, test"),
    (lambda s: s[:-1], r"split has shape \(59,\) but there are 60 trials"),
    (lambda s: np.where(s == "train", "val", s), r"no trial 'train'"),
    (lambda s: np.where(s == "test", "train", s), r"no trial 'test'"),
    (lambda s: np.arange(len(s)), r"split must hold the strings"),
])
def test_bad_split_arrays_are_refused_naming_the_file(tmp_path: Path, split, message: str) -> None:
    path = _write(tmp_path / "bad.npz", "spd", split(_meta()["split"]))
    with pytest.raises((ValueError, TypeError), match=message) as err:
        load_arrays(path)
    assert str(path) in str(err.value)
    with pytest.raises((ValueError, TypeError), match=message):
        EEGDataModule(source="arrays", path=str(path)).setup()


def test_test_class_without_train_trials_is_an_error(tmp_path: Path) -> None:
    meta = _meta()
    split = np.where((meta["y"] == 2) & (meta["split"] != "test"), "val", meta["split"])  # class 2: no train trial
    path = _write(tmp_path / "unseen.npz", "spd", split, class_names=np.array(["left", "right", "feet"]))
    with pytest.raises(ValueError, match=r"classes \['feet'\] have 'test' trials in split but no 'train' trial"):
        load_arrays(path)
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        check_split_labels(split, meta["y"])


def test_split_with_an_explicit_protocol_conflicts(tmp_path: Path) -> None:
    path = _write(tmp_path / "f.npz", "spd", _meta()["split"])
    with pytest.raises(ValueError, match=rf"{path}: the data carry an official 'split' array, which protocol "
                                         r"'cross_subject' would ignore; set protocol='auto' or 'official'"):
        EEGDataModule(source="arrays", path=str(path), protocol="cross_subject").setup()
    nosplit = _write(tmp_path / "nosplit.npz", "spd", None)
    with pytest.raises(ValueError, match="protocol 'official' needs the data's own split"):
        EEGDataModule(source="arrays", path=str(nosplit), protocol="official").setup()
