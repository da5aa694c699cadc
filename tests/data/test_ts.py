"""``.ts`` time-series archives: reader, errors naming file and line, covariances of unequal lengths, the split."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_ts
from sklearn.covariance import ledoit_wolf, oas

from manifoldnorm.data import covariances, load_ts, read_ts, trial_covariances, ts_archive_files
from manifoldnorm.data import ts as ts_module
from manifoldnorm.lit import EEGDataModule

CLASSES = ["walk", "run", "rest"]
HAS_AEON = importlib.util.find_spec("aeon") is not None


def _trials(n: int, lengths, n_ch: int = 3, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """``n`` trials of the given lengths (cycled); class k has 3x the power on channel k."""
    rng = np.random.default_rng(seed)
    trials, labels = [], []
    for i in range(n):
        k = i % len(CLASSES)
        X = rng.standard_normal((n_ch, lengths[i % len(lengths)]))
        X[k % n_ch] *= 3.0
        trials.append(X), labels.append(CLASSES[k])
    return trials, labels


def _pair(tmp_path: Path, lengths=(40,), n_train: int = 30, n_test: int = 15, **header) -> tuple[Path, Path]:
    train = write_ts(tmp_path / "Toy_TRAIN.ts", *_trials(n_train, lengths, seed=0), CLASSES, header=header)
    test = write_ts(tmp_path / "Toy_TEST.ts", *_trials(n_test, lengths, seed=1), CLASSES, header=header)
    return train, test


def _edit(path: Path, line: int, text: str) -> Path:
    """Replace the 1-based ``line`` of ``path``."""
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")
    return path


def _first_case_line(path: Path) -> int:
    return path.read_text().splitlines().index("@data") + 2


# ---------------------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("lengths", [(40,), (12, 40, 25)])
def test_read_returns_the_written_values_labels_and_lines(tmp_path: Path, lengths) -> None:
    trials, labels = _trials(7, lengths)
    path = write_ts(tmp_path / "a.ts", trials, labels, CLASSES)
    f = read_ts(path)
    assert len(f) == 7 and f.n_channels == 3 and f.class_names == CLASSES and f.problem_name == "a"
    for got, want in zip(f.trials, trials, strict=True):
        np.testing.assert_array_equal(got, want)  # repr() round trip: exact
    assert f.labels.tolist() == labels
    first = _first_case_line(path)
    assert f.lines.tolist() == list(range(first, first + 7))
    assert f.lengths.tolist() == [lengths[i % len(lengths)] for i in range(7)]


def test_header_keys_are_case_insensitive_and_blank_lines_comments_skipped(tmp_path: Path) -> None:
    path = write_ts(tmp_path / "a.ts", *_trials(3, (10,)), CLASSES)
    text = path.read_text().replace("@equalLength", "@EQUALLENGTH").replace("@classLabel", "@classlabel")
    path.write_text(text.replace("@data\n", "@data\n\n# a comment\n") + "\n\n")
    assert len(read_ts(path)) == 3


def test_class_order_is_the_declared_one_and_labels_map_to_it(tmp_path: Path) -> None:
    declared = ["rest", "walk", "run"]
    train = write_ts(tmp_path / "T_TRAIN.ts", *_trials(9, (20,)), declared)
    test = write_ts(tmp_path / "T_TEST.ts", *_trials(6, (20,), seed=1), ["run", "rest", "walk"])  # other order
    archive = load_ts(train_file=train, test_file=test)
    assert archive.class_names == declared
    labels = np.concatenate([read_ts(train).labels, read_ts(test).labels])
    assert [archive.class_names[k] for k in archive.y] == labels.tolist()
    assert archive.split.tolist() == ["train"] * 9 + ["test"] * 6
    assert archive.where[0] == f"{train}, line {_first_case_line(train)}"
    assert archive.where[9] == f"{test}, line {_first_case_line(test)}"


# --------------------------------------------------------------------------------------------- missing values
def test_missing_values_are_an_error_naming_file_and_line(tmp_path: Path) -> None:
    trials, labels = _trials(4, (20,))
    trials[2][1, 5] = np.nan
    path = write_ts(tmp_path / "m.ts", trials, labels, CLASSES)
    line = _first_case_line(path) + 2
    with pytest.raises(ValueError, match=rf"^{path}, line {line}: missing values \('\?' or NaN\) in channels \[1\] "
                                         r"\(1 values\); impute them, or set missing='trim'"):
        read_ts(path)
    _edit(path, line, path.read_text().splitlines()[line - 1].replace("?", "NaN"))  # NaN is missing too
    with pytest.raises(ValueError, match=rf"line {line}: missing values"):
        read_ts(path)


def test_trim_drops_missing_samples_at_the_ends_only(tmp_path: Path) -> None:
    trials, labels = _trials(3, (20,))
    trials[0][0, :3] = np.nan  # leading padding on one channel
    trials[0][2, -4:] = np.nan  # trailing padding on another
    trials[1][1, 10] = np.nan  # inside
    path = write_ts(tmp_path / "m.ts", trials[:1] + trials[2:], labels[:1] + labels[2:], CLASSES)
    f = read_ts(path, missing="trim")
    np.testing.assert_array_equal(f.trials[0], trials[0][:, 3:-4])
    np.testing.assert_array_equal(f.trials[1], trials[2])
    inside = write_ts(tmp_path / "inside.ts", trials, labels, CLASSES)
    with pytest.raises(ValueError, match=rf"{inside}, line {_first_case_line(inside) + 1}: .*some inside the case"):
        read_ts(inside, missing="trim")
    with pytest.raises(ValueError, match=r"unknown missing-value policy 'drop'; valid: error, trim"):
        read_ts(path, missing="drop")


# ----------------------------------------------------------------------------------------------- malformed
@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c.replace(":", ",", 1), r"this case has 2 channels but @dimensions has 3"),
    (lambda c: c.rsplit(":", 1)[0] + ":jump", r"class label 'jump' is not among the @classLabel labels "
                                              r"\['walk', 'run', 'rest'\]"),
    (lambda c: "1.0,abc," + c, r"channel 0 holds 'abc', not a number"),
    (lambda c: "1.0,," + c, r"channel 0 holds '', not a number"),
    (lambda c: "inf" + c[c.index(","):], r"this case holds an infinite value"),
    (lambda c: "walk", r"a case needs at least one channel and a class label"),
    (lambda c: "0.5," + c, r"the channels of this case have different lengths \[21, 20, 20\]"),
])
def test_malformed_cases_name_file_and_line(tmp_path: Path, edit, message: str) -> None:
    path = write_ts(tmp_path / "bad.ts", *_trials(4, (20,)), CLASSES, header={"seriesLength": None})
    line = _first_case_line(path) + 1
    _edit(path, line, edit(path.read_text().splitlines()[line - 1]))
    with pytest.raises(ValueError, match=rf"^{path}, line {line}: {message}"):
        read_ts(path)


def test_channel_count_is_checked_against_the_first_case_without_dimensions(tmp_path: Path) -> None:
    trials, labels = _trials(3, (15,))
    trials[2] = trials[2][:2]
    path = write_ts(tmp_path / "c.ts", trials, labels, CLASSES, header={"dimensions": None})
    first = _first_case_line(path)
    with pytest.raises(ValueError, match=rf"line {first + 2}: this case has 2 channels but the first case "
                                         rf"\(line {first}\) has 3"):
        read_ts(path)


@pytest.mark.parametrize(("header", "message"), [
    ({"classLabel": None}, r"no @classLabel line in the header"),
    ({"classLabel": "false"}, r"@classLabel is not true: the file has no class labels"),
    ({"classLabel": "true"}, r"@classLabel true lists no class labels"),
    ({"classLabel": "true walk run walk rest"}, r"@classLabel lists a label twice"),
    ({"timeStamps": "true"}, r"@timeStamps true: time-stamped .ts files are not supported"),
    ({"targetLabel": "true"}, r"@targetLabel true marks a regression file"),
    ({"equalLength": "maybe"}, r"@equalLength must be true or false, got 'maybe'"),
    ({"dimensions": "three"}, r"@dimensions must be a whole number, got 'three'"),
    ({"seriesLength": 30}, r"this case has 20 values per channel but the header says @equalLength true, "
                           r"@seriesLength 30"),
    ({"univariate": "true"}, r"@univariate true but this case has 3 channels"),
])
def test_bad_headers_are_refused(tmp_path: Path, header: dict, message: str) -> None:
    path = write_ts(tmp_path / "h.ts", *_trials(3, (20,)), CLASSES, header=header)
    with pytest.raises(ValueError, match=rf"^{path}(, line \d+)?: {message}"):
        read_ts(path)


def test_structure_errors(tmp_path: Path) -> None:
    path = write_ts(tmp_path / "s.ts", *_trials(3, (20,)), CLASSES)
    text = path.read_text()
    path.write_text(text.replace("@data\n", ""))
    with pytest.raises(ValueError, match=r"line \d+: expected a header line \(@key value\), a comment \(#\) or @data"):
        read_ts(path)
    path.write_text(text.split("@data")[0])
    with pytest.raises(ValueError, match=rf"^{path}: no @data line"):
        read_ts(path)
    path.write_text(text.split("@data")[0] + "@data\n")
    with pytest.raises(ValueError, match=rf"^{path}: no case after @data"):
        read_ts(path)
    with pytest.raises(FileNotFoundError, match="no such .ts file"):
        read_ts(tmp_path / "absent.ts")


# -------------------------------------------------------------------------------------------- train and test
def test_train_and_test_must_agree(tmp_path: Path) -> None:
    train, test = _pair(tmp_path)
    other = write_ts(tmp_path / "o.ts", [t[:2] for t in _trials(3, (20,))[0]], _trials(3, (20,))[1], CLASSES)
    with pytest.raises(ValueError, match=rf"{train} has 3 channels but {other} has 2"):
        load_ts(train_file=train, test_file=other)
    fewer = write_ts(tmp_path / "f.ts", *_trials(2, (20,)), CLASSES[:2])
    with pytest.raises(ValueError, match=rf"{train} declares the classes \['walk', 'run', 'rest'\] but {fewer} "
                                         r"declares \['walk', 'run'\]"):
        load_ts(train_file=train, test_file=fewer)
    with pytest.raises(ValueError, match="give both train_file and test_file"):
        load_ts(train_file=train)
    with pytest.raises(ValueError, match="no .ts data named: set archive"):
        load_ts()


def test_test_class_without_training_cases_is_an_error(tmp_path: Path) -> None:
    trials, labels = _trials(6, (20,))
    train = write_ts(tmp_path / "T_TRAIN.ts", trials[:2] + trials[3:5], labels[:2] + labels[3:5], CLASSES)
    test = write_ts(tmp_path / "T_TEST.ts", trials, labels, CLASSES)  # 'rest' only in test
    dm = EEGDataModule(source="ts", band=None, source_kwargs={"train_file": str(train), "test_file": str(test)})
    with pytest.raises(ValueError, match=rf"^{train} and {test}: classes \['rest'\] have 'test' trials in split "
                                         r"but no 'train' trial"):
        dm.setup()


# ------------------------------------------------------------------------------------------------ covariances
@pytest.mark.parametrize(("estimator", "reference"), [("oas", oas), ("lwf", ledoit_wolf)])
def test_each_covariance_is_estimated_from_its_own_samples(estimator: str, reference) -> None:
    trials, _ = _trials(6, (5, 40, 17), n_ch=4)
    C = trial_covariances(trials, estimator)
    for X, got in zip(trials, C, strict=True):
        np.testing.assert_allclose(got, reference(X.T)[0], rtol=1e-10, atol=1e-12)  # scikit-learn, trial by trial
    assert np.all(np.linalg.eigvalsh(C)[:, 0] > 0)  # shrinkage: positive definite from 5 samples for 4 channels


def test_band_pass_per_length_matches_the_stacked_computation() -> None:
    trials, _ = _trials(6, (64, 96), n_ch=3)
    C = trial_covariances(trials, "oas", sfreq=32.0, band=(2.0, 8.0))
    from manifoldnorm.data import bandpass

    for X, got in zip(trials, C, strict=True):
        np.testing.assert_allclose(got, covariances(bandpass(X[None], 32.0, 2.0, 8.0), "oas")[0], rtol=1e-12)


def test_covariance_errors_name_the_trial() -> None:
    trials, _ = _trials(4, (30, 3), n_ch=3)
    where = [f"f.ts, line {10 + i}" for i in range(4)]
    with pytest.raises(ValueError, match=r"^f.ts, line 11: 3 time samples for 3 channels \(trials this short: 2\); "
                                         r"a sample covariance \(cov_estimator=scm\) of C channels needs at least "
                                         r"C \+ 1 samples"):
        trial_covariances(trials, "scm", where=where)
    with pytest.raises(ValueError, match=r"line 11: 3 time samples are too short for the band-pass"):
        trial_covariances(trials, "oas", sfreq=32.0, band=(2.0, 8.0), where=where)
    with pytest.raises(ValueError, match=r"band-pass filtering needs the sampling rate"):
        trial_covariances(trials, "oas", band=(2.0, 8.0))
    flat = [t.copy() for t in trials[:1]]
    flat[0][1] = 1.0  # a constant channel: singular sample covariance
    with pytest.raises(ValueError, match=r"^f.ts, line 10: the covariance is not positive definite"):
        trial_covariances(flat, "scm", where=where)
    assert np.linalg.eigvalsh(trial_covariances(flat, "oas"))[0, 0] > 0  # shrinkage keeps it positive definite
    with pytest.raises(ValueError, match=r"^trial 1: 1 time samples for 3 channels \(trials this short: 1\); "
                                         r"a covariance needs at least 2 samples"):
        trial_covariances([trials[0], trials[0][:, :1]], "oas")


# ------------------------------------------------------------------------------------------------ data module
def test_data_module_keeps_the_files_split(tmp_path: Path) -> None:
    train, test = _pair(tmp_path, lengths=(12, 40, 25))
    kwargs = {"train_file": str(train), "test_file": str(test)}
    dm = EEGDataModule(source="ts", band=None, batch_size=4, seed=3, source_kwargs=kwargs)
    dm.setup()
    assert dm.split.protocol == "official"
    np.testing.assert_array_equal(dm.split["test"], np.arange(30, 45))  # the test file, exactly
    np.testing.assert_array_equal(np.sort(np.concatenate([dm.split["train"], dm.split["val"]])), np.arange(30))
    assert np.bincount(dm.datasets["val"].y).tolist() == [2, 2, 2]  # 0.2 of the 10 train cases per class
    test_trials = read_ts(test).trials
    np.testing.assert_allclose(dm.datasets["test"].X, trial_covariances(test_trials, "oas"), rtol=1e-12)
    assert dm.info() == {"n_channels": 3, "n_times": 0, "num_classes": 3, "num_domains": 1}
    other = EEGDataModule(source="ts", band=None, seed=4, source_kwargs=kwargs)
    other.setup()
    assert not np.array_equal(other.split["val"], dm.split["val"])  # the carve-out is seeded
    np.testing.assert_array_equal(other.split["test"], dm.split["test"])


def test_data_module_options(tmp_path: Path) -> None:
    train, test = _pair(tmp_path, lengths=(48,))
    kwargs = {"train_file": str(train), "test_file": str(test)}
    dm = EEGDataModule(source="ts", band=None, trace_norm=True, source_kwargs=kwargs)
    dm.setup()
    np.testing.assert_allclose(np.trace(dm.datasets["train"].X, axis1=1, axis2=2), 1.0, rtol=1e-12)
    raw = EEGDataModule(source="ts", representation="raw", band=(2.0, 8.0),
                        source_kwargs={**kwargs, "sfreq": 32.0})
    raw.setup()
    assert raw.datasets["test"].X.shape == (15, 3, 48) and raw.info()["n_times"] == 48
    with pytest.raises(ValueError, match=r"needs the sampling rate, which .ts files do not carry: set "
                                         r"source_kwargs.sfreq"):
        EEGDataModule(source="ts", band=(2.0, 8.0), source_kwargs=kwargs).setup()
    with pytest.raises(ValueError, match=r"source='ts' keeps the split of its train and test files"):
        EEGDataModule(source="ts", protocol="cross_session", source_kwargs=kwargs)
    with pytest.raises(ValueError, match=r"trace_norm=true scales covariance matrices"):
        EEGDataModule(source="ts", representation="raw", trace_norm=True, source_kwargs=kwargs)
    (tmp_path / "u").mkdir()
    uneq = _pair(tmp_path / "u", lengths=(20, 30))
    with pytest.raises(ValueError, match=r"representation='raw' stacks the cases, but their lengths differ "
                                         r"\(20 to 30 samples\)"):
        EEGDataModule(source="ts", representation="raw", band=None,
                      source_kwargs={"train_file": str(uneq[0]), "test_file": str(uneq[1])}).setup()


# ---------------------------------------------------------------------------------------- bundled archives
def test_archive_without_aeon_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(ts_module.importlib.util, "find_spec", lambda name, *a: None if name == "aeon" else
                        real(name, *a))
    with pytest.raises(ValueError, match=r"archive 'BasicMotions' is read from the aeon package, which is not "
                                         r"installed: pip install 'manifoldnorm\[ts\]', or give train_file and "
                                         r"test_file"):
        load_ts("BasicMotions")
    assert ts_module.bundled_archives() == []


@pytest.mark.skipif(not HAS_AEON, reason="needs the ts extra (aeon)")
def test_bundled_archive_is_found_without_importing_aeon() -> None:
    code = ("import sys; from manifoldnorm.data import load_ts; a = load_ts('BasicMotions'); "
            "print(len(a), a.n_channels, a.class_names, 'aeon' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split("\n")[0] == "80 6 ['Standing', 'Running', 'Walking', 'Badminton'] False"
    with pytest.raises(ValueError, match=r"no archive 'NoSuchArchive' .* bundled archives: .*BasicMotions"):
        ts_archive_files("NoSuchArchive")


@pytest.mark.skipif(not HAS_AEON, reason="needs the ts extra (aeon)")
@pytest.mark.parametrize("archive", ["BasicMotions", "JapaneseVowels"])  # equal lengths; 7 to 29 samples
def test_reader_agrees_with_aeon(archive: str) -> None:
    from aeon.datasets import load_from_ts_file

    for path in ts_archive_files(archive):
        ours = read_ts(path)
        X, y = load_from_ts_file(str(path))
        assert len(ours) == len(X)
        for got, want in zip(ours.trials, X, strict=True):
            np.testing.assert_array_equal(got, want)
        # aeon lower-cases the labels; ours keep the header's spelling
        assert [c.lower() for c in ours.labels.tolist()] == [str(c) for c in y.tolist()]
