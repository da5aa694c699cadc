"""``launch/baseline.py`` on a ``.ts`` archive (``data=ts_archive``): the train and test files' split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_ts

from manifoldnorm.lit import EEGDataModule

pytest.importorskip("pyriemann")
CLASSES = ["a", "b", "c"]



def _files(tmp_path: Path) -> tuple[Path, Path]:
    """Three classes (more power on channel k for class k), 4 channels, cases of 20 to 59 samples."""
    rng = np.random.default_rng(0)
    paths = []
    for part, n in (("TRAIN", 30), ("TEST", 18)):
        trials, labels = [], []
        for i in range(n):
            X = rng.standard_normal((4, int(rng.integers(20, 60))))
            X[i % 3] *= 3.0
            trials.append(X), labels.append(CLASSES[i % 3])
        paths.append(write_ts(tmp_path / f"Toy_{part}.ts", trials, labels, CLASSES))
    return paths[0], paths[1]


def test_baseline_uses_the_files_split(baseline, tmp_path: Path) -> None:
    train, test = _files(tmp_path)
    overrides = ["data=ts_archive", f"data.source_kwargs.train_file={train}", f"data.source_kwargs.test_file={test}",
                 "seed=2"]
    report, dm = baseline.datamodule_report(baseline.compose_config(None, overrides))
    direct = EEGDataModule(source="ts", band=None, seed=2, source_kwargs={"train_file": str(train),
                                                                          "test_file": str(test)})
    direct.setup()
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(dm.split[name], direct.split[name])
    np.testing.assert_array_equal(dm.split["test"], np.arange(30, 48))  # the test file's cases
    assert report["split"] == {"protocol": "official", "seed": 2, "n_train": 24, "n_val": 6, "n_test": 18}
    assert report["data"]["source"] == "ts" and report["data"]["test_file"] == str(test)
    assert report["data"]["lengths"][0] >= 20 and report["data"]["lengths"][1] < 60
    for res in report["results"].values():
        assert res["n_train"] == 24 and res["n_test"] == 18
        assert res["balanced_accuracy"] > 0.8  # separable classes: both baselines learn them


def test_baseline_cli_with_the_experiment(baseline, tmp_path: Path) -> None:
    train, test = _files(tmp_path)
    out = tmp_path / "baseline.json"
    returned = baseline.main(["--out", str(out), "--experiment", "spd_ts", f"data.source_kwargs.train_file={train}",
                              f"data.source_kwargs.test_file={test}"])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))
    assert written["experiment"] == "spd_ts" and written["split"]["n_test"] == 18
    assert set(written["results"]) == {"ts_lr", "mdm"}
