r"""Multivariate time-series classification archives in the ``.ts`` format (UEA/UCR archives, sktime, aeon).

A ``.ts`` file is a header of ``@key value`` lines (``#`` lines are comments), an ``@data`` line, then one case per
line: the channels separated by ``:``, the values of a channel by ``,``, and the class label as the last field;
``?`` (or ``NaN``) marks a missing value::

    @problemName Toy
    @dimensions 2
    @equalLength true
    @seriesLength 4
    @classLabel true up down
    @data
    0.1,0.2,0.3,0.4:1.0,0.9,0.8,0.7:up

Header keys are case-insensitive. :func:`read_ts` reads one file, :func:`load_ts` a train and a test file (or an
archive bundled with the ``aeon`` package, :func:`ts_archive_files`) with their official split, and
:func:`trial_covariances` turns trials of unequal lengths into covariance matrices, each from its own samples.

Not read: time-stamped files (``@timeStamps true``) and regression files (``@targetLabel``, ``@classLabel false``).
Every error names the file and, for a case, its line number.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .preprocess import COV_ESTIMATORS, bandpass_covariances

__all__ = ["TS_MISSING", "TSArchive", "TSFile", "bundled_archives", "load_ts", "read_ts", "trial_covariances",
           "ts_archive_files"]

log = logging.getLogger(__name__)

TS_MISSING: tuple[str, ...] = ("error", "trim")
"""Policies for missing values (``?`` or ``NaN``) of :func:`read_ts`: ``error`` refuses a case that has any;
``trim`` drops the time points at the start and the end of a case where a channel is missing (the padding of
unequal-length series), and refuses missing values inside a case."""

_BOOL_KEYS = ("timestamps", "missing", "univariate", "equallength")
_INT_KEYS = ("dimensions", "serieslength")
_MISSING_TOKENS = frozenset({"?", "nan"})


@dataclass
class TSFile:
    """The content of one ``.ts`` file (:func:`read_ts`).

    Attributes
    ----------
    path : Path
    problem_name : str or None
        ``@problemName``.
    class_names : list of str
        The labels of ``@classLabel``, in the declared order.
    trials : list of ndarray, each (C, T_i), float64
        One array per case; ``T_i`` may differ between cases (after ``missing="trim"`` too).
    labels : ndarray of str, shape (N,)
    lines : ndarray of int, shape (N,)
        1-based line number of every case in the file.
    n_channels : int
    header : dict
        The header values read (lower-case keys: ``problemname``, ``dimensions``, ``classlabel``, ...).
    """

    path: Path
    problem_name: str | None
    class_names: list[str]
    trials: list[np.ndarray]
    labels: np.ndarray
    lines: np.ndarray
    n_channels: int
    header: dict[str, object] = field(default_factory=dict)

    @property
    def lengths(self) -> np.ndarray:
        """Time samples of every case, shape (N,), int64."""
        return np.array([t.shape[-1] for t in self.trials], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.trials)


class _Reader:
    """Line-by-line parser of one ``.ts`` file; errors are ``ValueError``\\ s naming the file and the line."""

    def __init__(self, path: Path, missing: str) -> None:
        self.path, self.missing = path, missing
        self.header: dict[str, object] = {}
        self.trials: list[np.ndarray] = []
        self.labels: list[str] = []
        self.lines: list[int] = []

    def fail(self, line: int | None, message: str) -> ValueError:
        where = f"{self.path}" if line is None else f"{self.path}, line {line}"
        return ValueError(f"{where}: {message}")

    # ------------------------------------------------------------------ header
    def header_line(self, number: int, text: str) -> None:
        shown, _, value = text[1:].partition(" ")
        key, value = shown.strip().lower(), value.strip()
        if key in _BOOL_KEYS:
            if value.lower() not in ("true", "false"):
                raise self.fail(number, f"@{shown} must be true or false, got {value!r}")
            self.header[key] = value.lower() == "true"
        elif key in _INT_KEYS:
            try:
                self.header[key] = int(value)
            except ValueError:
                raise self.fail(number, f"@{shown} must be a whole number, got {value!r}") from None
            if self.header[key] < 1:
                raise self.fail(number, f"@{shown} must be at least 1, got {value!r}")
        elif key == "classlabel":
            flag, *names = value.split()
            if flag.lower() != "true":
                raise self.fail(number, "@classLabel is not true: the file has no class labels (a regression or "
                                        "unlabelled file); only classification files can be read")
            if not names:
                raise self.fail(number, "@classLabel true lists no class labels; write them after it, "
                                        "e.g. '@classLabel true walk run'")
            if len(set(names)) != len(names):
                raise self.fail(number, f"@classLabel lists a label twice: {names}")
            self.header[key] = names
        elif key == "targetlabel" and value.lower().startswith("true"):
            raise self.fail(number, "@targetLabel true marks a regression file; only classification files "
                                    "(@classLabel true <labels>) can be read")
        elif key == "problemname":
            self.header[key] = value
        # other @ keys are not needed to read the cases and are left alone

    def check_header(self, data_line: int | None) -> None:
        if data_line is None:
            raise self.fail(None, "no @data line: the header must end with @data, followed by one case per line")
        if self.header.get("timestamps"):
            raise self.fail(None, "@timeStamps true: time-stamped .ts files are not supported; write the values "
                                  "without time stamps")
        if "classlabel" not in self.header:
            raise self.fail(None, "no @classLabel line in the header: declare the classes, "
                                  "e.g. '@classLabel true walk run'")

    # ------------------------------------------------------------------ cases
    def values(self, number: int, channel: int, text: str) -> np.ndarray:
        tokens = [t.strip() for t in text.split(",")]
        try:
            return np.array([np.nan if t.lower() in _MISSING_TOKENS else float(t) for t in tokens])
        except ValueError:
            bad = next(t for t in tokens if t.lower() not in _MISSING_TOKENS and not _is_float(t))
            raise self.fail(number, f"channel {channel} holds {bad!r}, not a number (values are numbers separated "
                                    f"by ',', channels by ':', '?' for a missing value)") from None

    def case(self, number: int, text: str) -> None:
        fields = text.split(":")
        if len(fields) < 2:
            raise self.fail(number, "a case needs at least one channel and a class label, separated by ':' "
                                    f"(got {_clip(text)!r})")
        label, channels = fields[-1].strip(), fields[:-1]
        n_dim = self.header.get("dimensions")
        expected = n_dim if n_dim is not None else (self.trials[0].shape[0] if self.trials else None)
        if expected is not None and len(channels) != expected:
            source = "@dimensions" if n_dim is not None else f"the first case (line {self.lines[0]})"
            raise self.fail(number, f"this case has {len(channels)} channels but {source} has {expected}; every "
                                    "case needs the same channels, separated by ':'")
        if self.header.get("univariate") and len(channels) > 1:
            raise self.fail(number, f"@univariate true but this case has {len(channels)} channels")
        series = [self.values(number, c, text) for c, text in enumerate(channels)]
        lengths = {len(s) for s in series}
        if len(lengths) > 1:
            raise self.fail(number, f"the channels of this case have different lengths {[len(s) for s in series]}; "
                                    "all channels of a case need the same number of values")
        if label not in self.header["classlabel"]:
            raise self.fail(number, f"class label {label!r} is not among the @classLabel labels "
                                    f"{self.header['classlabel']}; add it to the header or fix the case")
        length = self.header.get("serieslength")
        if self.header.get("equallength") and length is not None and len(series[0]) != length:
            raise self.fail(number, f"this case has {len(series[0])} values per channel but the header says "
                                    f"@equalLength true, @seriesLength {length}")
        X = self.finish_missing(number, np.stack(series))
        self.trials.append(X)
        self.labels.append(label)
        self.lines.append(number)

    def finish_missing(self, number: int, X: np.ndarray) -> np.ndarray:
        if np.isinf(X).any():
            raise self.fail(number, "this case holds an infinite value; replace it")
        gaps = np.isnan(X)
        if not gaps.any():
            return X
        where = (f"missing values ('?' or NaN) in channels {np.flatnonzero(gaps.any(1)).tolist()} "
                 f"({int(gaps.sum())} values)")
        if self.missing == "error":
            raise self.fail(number, f"{where}; impute them, or set missing='trim' to drop missing samples at "
                                    "the start and end of a case")
        full = np.flatnonzero(~gaps.any(0))
        if not len(full):
            raise self.fail(number, f"{where}: no time point has all channels; remove the case or impute it")
        X = X[:, full[0]:full[-1] + 1]
        if np.isnan(X).any():
            raise self.fail(number, f"{where}, some inside the case (missing='trim' drops only those at the start "
                                    "and end); impute them")
        return X


def _is_float(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."


def read_ts(path: str | os.PathLike, missing: str = "error") -> TSFile:
    """Read one ``.ts`` classification file (format in the module docstring).

    Parameters
    ----------
    path : str or PathLike
    missing : {"error", "trim"}
        What to do with missing values (``?`` or ``NaN``), see :data:`TS_MISSING`.

    Returns
    -------
    TSFile
        Cases as float64 arrays (C, T_i); cases may differ in length (``@equalLength false``).

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        A malformed header or case, naming the file and the line: no ``@data`` or ``@classLabel``, time stamps,
        a label not declared in ``@classLabel``, a channel count other than ``@dimensions`` (or than the first
        case's), channels of different lengths in one case, a value that is not a number, an infinite value,
        missing values (unless ``missing="trim"`` and only at the ends), a length other than ``@seriesLength``
        under ``@equalLength true``, or no case at all.
    """
    if missing not in TS_MISSING:
        raise ValueError(f"unknown missing-value policy {missing!r}; valid: {', '.join(TS_MISSING)}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such .ts file: {path}")
    reader = _Reader(path, missing)
    data_line = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, raw in enumerate(f, start=1):
            text = raw.strip()
            if not text or text.startswith("#"):
                continue
            if data_line is None:
                if not text.startswith("@"):
                    raise reader.fail(number, f"expected a header line (@key value), a comment (#) or @data before "
                                              f"the cases, got {_clip(text)!r}")
                if text.lower() == "@data":
                    data_line = number
                    reader.check_header(data_line)
                else:
                    reader.header_line(number, text)
                continue
            reader.case(number, text)
    reader.check_header(data_line)
    if not reader.trials:
        raise reader.fail(None, f"no case after @data (line {data_line})")
    return TSFile(path=path, problem_name=reader.header.get("problemname"),
                  class_names=list(reader.header["classlabel"]), trials=reader.trials,
                  labels=np.array(reader.labels, dtype=str), lines=np.array(reader.lines, dtype=np.int64),
                  n_channels=int(reader.trials[0].shape[0]), header=dict(reader.header))


def _aeon_data_dir() -> Path | None:
    """The folder of the archives bundled with aeon, found without importing aeon (which loads numba)."""
    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def bundled_archives() -> list[str]:
    """Names of the archives bundled with the installed ``aeon`` package (empty without aeon).

    An archive ``<name>`` is a folder ``<name>/`` holding ``<name>_TRAIN.ts`` and ``<name>_TEST.ts``. Univariate
    and regression archives are among them; :func:`read_ts` refuses the regression ones.
    """
    root = _aeon_data_dir()
    if root is None or not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir()
                  if (d / f"{d.name}_TRAIN.ts").is_file() and (d / f"{d.name}_TEST.ts").is_file())


def ts_archive_files(archive: str) -> tuple[Path, Path]:
    """The train and test ``.ts`` files of an archive bundled with ``aeon`` (the ``ts`` extra), e.g.
    ``"BasicMotions"`` (6 channels, 4 classes, 40 + 40 cases of length 100) or ``"JapaneseVowels"`` (12 channels,
    9 classes, 270 + 370 cases of 7 to 29 samples).

    aeon is located with :func:`importlib.util.find_spec`, not imported.
    """
    root = _aeon_data_dir()
    if root is None:
        raise ValueError(f"archive {archive!r} is read from the aeon package, which is not installed: "
                         f"pip install 'manifoldnorm[ts]', or give train_file and test_file (paths of .ts files)")
    folder = root / str(archive)
    files = (folder / f"{archive}_TRAIN.ts", folder / f"{archive}_TEST.ts")
    if not all(f.is_file() for f in files):
        raise ValueError(f"no archive {archive!r} with {archive}_TRAIN.ts and {archive}_TEST.ts in {root}; "
                         f"bundled archives: {', '.join(bundled_archives())}; or give train_file and test_file")
    return files


@dataclass
class TSArchive:
    """A train and a test ``.ts`` file read together (:func:`load_ts`): the official split of the archive.

    Attributes
    ----------
    name : str
        ``@problemName`` of the train file (else the archive name or the file name).
    trials : list of ndarray, each (C, T_i), float64
        The train file's cases, then the test file's.
    y : ndarray, shape (N,), int64
        Index into ``class_names``.
    split : ndarray of str, shape (N,)
        ``"train"`` for the train file's cases, ``"test"`` for the test file's.
    class_names : list of str
        The train file's ``@classLabel`` labels, in that order.
    where : list of str
        ``"<file>, line <n>"`` of every case, for messages.
    sfreq : float or None
        Sampling rate in Hz when known (the format does not carry it).
    files : (Path, Path)
        The train and the test file.
    """

    name: str
    trials: list[np.ndarray]
    y: np.ndarray
    split: np.ndarray
    class_names: list[str]
    where: list[str]
    sfreq: float | None
    files: tuple[Path, Path]

    @property
    def n_channels(self) -> int:
        """Channels of every case."""
        return int(self.trials[0].shape[0])

    @property
    def lengths(self) -> np.ndarray:
        """Time samples of every case, shape (N,), int64."""
        return np.array([t.shape[-1] for t in self.trials], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.trials)

    def __repr__(self) -> str:
        lengths = self.lengths
        return (f"TSArchive({self.name!r}, train={int(np.sum(self.split == 'train'))}, "
                f"test={int(np.sum(self.split == 'test'))}, channels={self.n_channels}, "
                f"lengths={int(lengths.min())}..{int(lengths.max())}, classes={self.class_names})")


def load_ts(archive: str | None = None, train_file: str | os.PathLike | None = None,
            test_file: str | os.PathLike | None = None, sfreq: float | None = None,
            missing: str = "error") -> TSArchive:
    """Read a train and a test ``.ts`` file as one data set with their official split.

    Parameters
    ----------
    archive : str, optional
        An archive bundled with aeon (:func:`ts_archive_files`); used when ``train_file``/``test_file`` are not
        given (when they are, it is ignored and the log says so).
    train_file, test_file : str or PathLike, optional
        Paths of the two files; give both or neither.
    sfreq : float, optional
        Sampling rate in Hz, needed only to band-pass (``.ts`` files do not carry it).
    missing : {"error", "trim"}
        See :data:`TS_MISSING`.

    Returns
    -------
    TSArchive

    Raises
    ------
    ValueError
        The errors of :func:`read_ts`; only one of the two files given, or neither and no archive; train and test
        files that disagree on the number of channels or on the class labels (both are named).
    """
    if (train_file is None) != (test_file is None):
        raise ValueError(f"give both train_file and test_file (got train_file={train_file!r}, "
                         f"test_file={test_file!r})")
    if train_file is None:
        if not archive:
            raise ValueError("no .ts data named: set archive (e.g. archive=BasicMotions, needs "
                             "'pip install manifoldnorm[ts]') or train_file and test_file")
        train_file, test_file = ts_archive_files(archive)
    elif archive:
        log.info("reading train_file %s and test_file %s (archive %r not used)", train_file, test_file, archive)
    if sfreq is not None and not float(sfreq) > 0:
        raise ValueError(f"sfreq must be positive (Hz) or null, got {sfreq!r}")
    train, test = read_ts(train_file, missing), read_ts(test_file, missing)
    if train.n_channels != test.n_channels:
        raise ValueError(f"{train.path} has {train.n_channels} channels but {test.path} has {test.n_channels}; "
                         f"the train and test files must come from the same archive")
    if set(train.class_names) != set(test.class_names):
        raise ValueError(f"{train.path} declares the classes {train.class_names} but {test.path} declares "
                         f"{test.class_names}; the train and test files must declare the same @classLabel labels")
    lookup = {c: i for i, c in enumerate(train.class_names)}
    labels = np.concatenate([train.labels, test.labels])
    where = [f"{f.path}, line {n}" for f in (train, test) for n in f.lines.tolist()]
    name = train.problem_name or archive or train.path.stem.removesuffix("_TRAIN")
    return TSArchive(name=str(name), trials=[*train.trials, *test.trials],
                     y=np.array([lookup[c] for c in labels.tolist()], dtype=np.int64),
                     split=np.array(["train"] * len(train) + ["test"] * len(test)),
                     class_names=list(train.class_names), where=where,
                     sfreq=None if sfreq is None else float(sfreq), files=(train.path, test.path))


def trial_covariances(trials: Sequence[np.ndarray], estimator: str = "oas", sfreq: float | None = None,
                      band: Sequence[float] | None = None, order: int = 4,
                      where: Sequence[str] | None = None) -> np.ndarray:
    r"""Covariance matrix of every trial, each from its own samples (trials may differ in length).

    Trials of the same length are processed together by
    :func:`~manifoldnorm.data.bandpass_covariances` (band-pass, centring over time, shrinkage), so the result of a
    trial does not depend on the others.

    Parameters
    ----------
    trials : sequence of ndarray, each (C, T_i)
        The same channels C in every trial.
    estimator : {"oas", "lwf", "scm"}
        Oracle approximating shrinkage, Ledoit-Wolf, or the plain sample covariance (no shrinkage).
    sfreq : float, optional
        Sampling rate in Hz; needed when ``band`` is given.
    band : (fmin, fmax), optional
        Zero-phase Butterworth band-pass before the covariance (``None``: no filter).
    order : int
        Butterworth order of the band-pass.
    where : sequence of str, optional
        A name for every trial (e.g. ``"file, line n"``), used in the messages.

    Returns
    -------
    ndarray, shape (N, C, C), float64

    Raises
    ------
    ValueError
        Naming the first offending trial: fewer than 2 samples; for ``estimator="scm"`` fewer than ``C + 1``
        samples (a sample covariance of T centred samples has rank at most T - 1, so it is singular; the shrinkage
        estimators are positive definite from 2 samples on); too few samples for the band-pass; a matrix that is
        not positive definite (e.g. a constant channel under ``scm``).
    """
    if estimator not in COV_ESTIMATORS:
        raise ValueError(f"unknown covariance estimator {estimator!r}; valid names are {list(COV_ESTIMATORS)}")
    if not len(trials):
        raise ValueError("no trials")
    names = list(where) if where is not None else [f"trial {i}" for i in range(len(trials))]
    n_ch = int(np.shape(trials[0])[0])
    lengths = np.array([np.shape(t)[-1] for t in trials], dtype=np.int64)
    for i, t in enumerate(trials):
        if np.ndim(t) != 2 or np.shape(t)[0] != n_ch:
            raise ValueError(f"{names[i]}: expected an array (channels, samples) with {n_ch} channels, "
                             f"got shape {np.shape(t)}")
    need = n_ch + 1 if estimator == "scm" else 2
    short = np.flatnonzero(lengths < need)
    if short.size:
        i = int(short[0])
        hint = ("a sample covariance (cov_estimator=scm) of C channels needs at least C + 1 samples; use a "
                "shrinkage estimator (cov_estimator=oas or lwf)" if estimator == "scm" else
                "a covariance needs at least 2 samples")
        raise ValueError(f"{names[i]}: {lengths[i]} time samples for {n_ch} channels (trials this short: "
                         f"{short.size}); {hint}, or remove those trials")
    if band is not None and sfreq is None:
        raise ValueError("band-pass filtering needs the sampling rate: give sfreq (Hz), or set band to null")
    out = np.empty((len(trials), n_ch, n_ch), dtype=np.float64)
    for length in np.unique(lengths):
        idx = np.flatnonzero(lengths == length)
        X = np.stack([np.asarray(trials[i], dtype=np.float64) for i in idx])
        try:
            out[idx] = bandpass_covariances(X, sfreq, band, order, estimator)
        except ValueError as err:
            if band is None or "padlen" not in str(err):
                raise
            raise ValueError(f"{names[int(idx[0])]}: {length} time samples are too short for the band-pass of "
                             f"order {order} (trials of this length: {len(idx)}; {err}); lower filter_order or set "
                             f"band to null") from err
    min_eig = np.linalg.eigvalsh(out)[:, 0]
    bad = np.flatnonzero(~(min_eig > 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{names[i]}: the covariance is not positive definite (smallest eigenvalue "
                         f"{min_eig[i]:.3g}; trials affected: {bad.size}), e.g. a constant channel; use a shrinkage "
                         f"estimator (cov_estimator=oas or lwf) or remove the trial")
    return out
