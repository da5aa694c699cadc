"""Motor-imagery datasets from MOABB (optional dependency) as :class:`EEGData`.

MOABB and MNE are imported only when :func:`load_moabb` is called; install them with
``pip install "manifoldnorm[eeg]"``. Data are downloaded by MOABB into MNE's data folder
(``MNE_DATA``) on first use.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .types import EEGData

__all__ = ["MI_CLASS_ORDER", "load_moabb"]

MI_CLASS_ORDER: tuple[str, ...] = ("left_hand", "right_hand", "feet", "tongue", "rest")
"""Preferred class order for the usual motor-imagery event names (others follow, sorted)."""

_INSTALL_HINT = 'load_moabb needs the optional EEG dependencies: pip install "manifoldnorm[eeg]"'


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence MOABB/MNE logging and warnings for the duration of the block."""
    loggers = [logging.getLogger(name) for name in ("moabb", "mne")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _imagery_datasets(datasets_module: Any, base: type) -> list[str]:
    names = []
    for name in dir(datasets_module):
        obj = getattr(datasets_module, name)
        if isinstance(obj, type) and issubclass(obj, base) and obj is not base and not name.startswith("_"):
            names.append(name)
    return sorted(names)


def _resolve_dataset(dataset: Any) -> Any:
    import moabb.datasets as datasets
    from moabb.datasets.base import BaseDataset

    if isinstance(dataset, BaseDataset):
        return dataset
    if isinstance(dataset, str):
        cls = getattr(datasets, dataset, None)
        if not (isinstance(cls, type) and issubclass(cls, BaseDataset)):
            raise ValueError(
                f"unknown MOABB dataset {dataset!r}; valid names are {_imagery_datasets(datasets, BaseDataset)}"
            )
        with _quiet():
            return cls()
    raise TypeError(f"dataset must be a MOABB dataset name or instance, got {type(dataset).__name__}")


def _class_names(labels: np.ndarray, events: Sequence[str] | None) -> list[str]:
    present = sorted(set(labels.tolist()))
    if events is not None:
        return [e for e in events if e in present]
    known = [c for c in MI_CLASS_ORDER if c in present]
    return known + [c for c in present if c not in known]


def _session_ordinals(subject: np.ndarray, session: np.ndarray) -> np.ndarray:
    """Per subject, map session names to 0, 1, ... in sorted (recording) order."""
    out = np.zeros(len(subject), dtype=np.int64)
    for s in np.unique(subject):
        mask = subject == s
        _, codes = np.unique(session[mask], return_inverse=True)
        out[mask] = codes.reshape(-1)
    return out


def load_moabb(
    dataset: Any = "BNCI2014_001",
    subjects: Sequence[int] | None = None,
    fmin: float = 4.0,
    fmax: float = 36.0,
    tmin: float = 0.5,
    tmax: float = 3.5,
    resample: float | None = None,
    events: Sequence[str] | None = None,
    channels: Sequence[str] | None = None,
    scale: float = 1e6,
) -> EEGData:
    """Epoched motor-imagery trials of a MOABB dataset via its ``MotorImagery`` paradigm.

    Parameters
    ----------
    dataset : str or moabb dataset
        Class name in ``moabb.datasets`` (default BCI Competition IV-2a, ``"BNCI2014_001"``) or a
        dataset instance (e.g. ``moabb.datasets.fake.FakeDataset``).
    subjects : sequence of int, optional
        Subjects to load (default: all of the dataset).
    fmin, fmax : float
        Band-pass of the paradigm in Hz.
    tmin, tmax : float
        Epoch window in seconds relative to the task interval start (cue).
    resample : float, optional
        New sampling frequency in Hz.
    events : sequence of str, optional
        Event names to keep (default: all the dataset's events); also fixes the class order.
    channels : sequence of str, optional
        Channels to keep (default: all EEG channels).
    scale : float
        Factor applied to the signals; the default converts volts to microvolts.

    Returns
    -------
    EEGData
        Sessions are numbered 0, 1, ... per subject in sorted order of MOABB's session names;
        ``info`` holds the dataset code and the original session names.

    Raises
    ------
    ImportError
        MOABB/MNE are not installed.
    RuntimeError
        The data could not be downloaded or read.
    """
    try:
        import moabb  # noqa: F401
        from moabb.paradigms import MotorImagery
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    ds = _resolve_dataset(dataset)
    if subjects is None:
        subjects = list(ds.subject_list)
    else:
        subjects = [int(s) for s in subjects]
        unknown = sorted(set(subjects) - set(ds.subject_list))
        if unknown or not subjects:
            raise ValueError(f"subjects {unknown or subjects} not in dataset {ds.code}; valid: {list(ds.subject_list)}")
    if not 0 < fmin < fmax:
        raise ValueError(f"need 0 < fmin < fmax, got fmin={fmin}, fmax={fmax}")
    if not tmin < tmax:
        raise ValueError(f"need tmin < tmax, got tmin={tmin}, tmax={tmax}")
    with _quiet():
        paradigm = MotorImagery(
            n_classes=len(events) if events is not None else None,
            fmin=fmin, fmax=fmax, tmin=tmin, tmax=tmax, resample=resample,
            events=list(events) if events is not None else None,
            channels=list(channels) if channels is not None else None,
        )
        try:
            epochs, labels, meta = paradigm.get_data(ds, subjects=subjects, return_epochs=True)
        except OSError as err:  # includes ConnectionError, URLError, requests' errors, missing files
            raise RuntimeError(
                f"could not download or read MOABB dataset {ds.code} (subjects {subjects}): {err}. "
                "The files are fetched from the internet on first use and stored under MNE's data "
                "folder; check the network connection, or point the MNE_DATA environment variable "
                "(or mne.set_config('MNE_DATA', path)) at a folder that already holds the dataset."
            ) from err
        X = epochs.get_data(copy=True)
        ch_names = list(epochs.ch_names)
        sfreq = float(epochs.info["sfreq"])
    labels = np.asarray(labels).astype(str)
    class_names = _class_names(labels, events)
    lookup = {c: i for i, c in enumerate(class_names)}
    subject = meta["subject"].to_numpy().astype(np.int64)
    session_names = meta["session"].to_numpy().astype(str)
    return EEGData(
        X=(X * scale).astype(np.float32),
        y=np.array([lookup[v] for v in labels], dtype=np.int64),
        subject=subject,
        session=_session_ordinals(subject, session_names),
        sfreq=sfreq,
        ch_names=ch_names,
        class_names=class_names,
        info={"source": "moabb", "dataset": str(ds.code), "fmin": fmin, "fmax": fmax, "tmin": tmin,
              "tmax": tmax, "resample": resample, "scale": scale,
              "session_names": sorted(set(session_names.tolist()))},
    )
