"""``launch/baseline.py data=arrays``: pyRiemann baselines on the data module's own split (the file's ``split``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from manifoldnorm.lit import EEGDataModule

pytest.importorskip("pyriemann")



def _write(path: Path, with_val: bool) -> tuple[Path, np.ndarray]:
    """Two well-separated classes of 5x5 SPD matrices, 2 subjects; split 6 train / 1 val / 3 test per cell."""
    rng = np.random.default_rng(0)
    n_cell, cells = 10, [(s, c) for s in range(2) for c in range(2)]
    X, y, subject, split = [], [], [], []
    for s, c in cells:
        A = rng.standard_normal((n_cell, 5, 10))
        C = A @ np.swapaxes(A, -1, -2) / 10 + np.eye(5)
        C[:, c, c] += 4.0  # class c: more power on channel c
        X.append(C), y.extend([c] * n_cell), subject.extend([s] * n_cell)
        labels = np.array(["train"] * 6 + ["val" if with_val else "train"] + ["test"] * 3)
        split.extend(labels[rng.permutation(n_cell)].tolist())
    split = np.array(split)
    np.savez(path, X=np.concatenate(X), y=np.array(y), subject=np.array(subject), session=np.zeros(len(y), int),
             split=split)
    return path, split


@pytest.mark.parametrize("with_val", [True, False])
def test_baseline_and_data_module_share_the_split(baseline, tmp_path: Path, with_val: bool) -> None:
    path, split = _write(tmp_path / "own.npz", with_val)
    overrides = ["data=arrays", f"data.path={path}", "seed=3"]
    report, dm = baseline.datamodule_report(baseline.compose_config(None, overrides))
    direct = EEGDataModule(source="arrays", path=str(path), seed=3, batch_size=8)
    direct.setup()
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(dm.split[name], direct.split[name])
    np.testing.assert_array_equal(dm.split["test"], np.flatnonzero(split == "test"))
    if with_val:
        np.testing.assert_array_equal(dm.split["train"], np.flatnonzero(split == "train"))
    assert report["split"] == {"protocol": "official", "seed": 3, "n_train": len(dm.split["train"]),
                               "n_val": len(dm.split["val"]), "n_test": 12}
    assert set(report["results"]) == {"ts_lr", "mdm"}
    for res in report["results"].values():
        assert res["n_train"] == len(dm.split["train"]) and res["n_test"] == 12
        assert res["balanced_accuracy"] > 0.8  # separable classes: both baselines learn them


def test_baseline_cli_writes_the_report(baseline, tmp_path: Path) -> None:
    path, split = _write(tmp_path / "own.npz", with_val=True)
    out = tmp_path / "baseline.json"
    returned = baseline.main(["--out", str(out), "data=arrays", f"data.path={path}"])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))
    assert written["split"]["n_test"] == int(np.sum(split == "test")) and written["data"]["source"] == "arrays"
    with pytest.raises(ValueError, match="would ignore"):  # an explicit protocol conflicts with the file's split
        baseline.main(["--out", str(out), "data=arrays", f"data.path={path}", "data.protocol=cross_subject"])
