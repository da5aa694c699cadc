"""Containers for epoched multi-domain EEG: :class:`EEGData` (raw trials) and :class:`EEGCovariances`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["EEGCovariances", "EEGData", "domain_ids"]


def domain_ids(subject: np.ndarray, session: np.ndarray) -> np.ndarray:
    """Dense domain id per trial, one id per distinct ``(subject, session)`` pair.

    Ids are assigned in lexicographic order of ``(subject, session)``, so they do not depend on the
    order of the trials.

    Parameters
    ----------
    subject, session : ndarray, shape (N,)
        Integer subject and session labels.

    Returns
    -------
    ndarray, shape (N,), int64
        Domain id in ``0 .. D-1``.
    """
    subject = np.asarray(subject).astype(np.int64, copy=False)
    session = np.asarray(session).astype(np.int64, copy=False)
    if subject.shape != session.shape or subject.ndim != 1:
        raise ValueError(
            f"subject and session must be 1-D arrays of equal length, got shapes {subject.shape} "
            f"and {session.shape}"
        )
    if subject.size == 0:
        return np.zeros(0, dtype=np.int64)
    pairs = np.stack([subject, session], axis=1)
    _, inverse = np.unique(pairs, axis=0, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64)


@dataclass
class EEGData:
    """Epoched EEG trials with labels and domain (subject, session) annotations.

    Parameters
    ----------
    X : ndarray, shape (N, C, T), float32
        Trials, channels × time samples (microvolts for the bundled loaders).
    y : ndarray, shape (N,), int64
        Class index into ``class_names``.
    subject : ndarray, shape (N,), int64
        Subject label of each trial.
    session : ndarray, shape (N,), int64
        Session label of each trial (ordinal within a subject: 0 is the first session).
    sfreq : float
        Sampling frequency in Hz.
    ch_names : list of str
        Channel names, length C.
    class_names : list of str
        Class names; ``y`` indexes into it.
    info : dict
        Free-form provenance (generator parameters, dataset name, ...).
    """

    X: np.ndarray
    y: np.ndarray
    subject: np.ndarray
    session: np.ndarray
    sfreq: float
    ch_names: list[str]
    class_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.X = np.asarray(self.X, dtype=np.float32)
        if self.X.ndim != 3:
            raise ValueError(f"X must have shape (N, C, T), got {self.X.shape}")
        n = self.X.shape[0]
        for name in ("y", "subject", "session"):
            arr = np.asarray(getattr(self, name))
            if arr.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},) to match X, got {arr.shape}")
            if arr.size and not np.all(np.equal(np.mod(arr, 1), 0)):
                raise ValueError(f"{name} must hold integers")
            setattr(self, name, arr.astype(np.int64))
        self.sfreq = float(self.sfreq)
        if not self.sfreq > 0:
            raise ValueError(f"sfreq must be positive, got {self.sfreq}")
        self.ch_names = [str(c) for c in self.ch_names]
        self.class_names = [str(c) for c in self.class_names]
        if len(self.ch_names) != self.X.shape[1]:
            raise ValueError(
                f"ch_names has {len(self.ch_names)} entries but X has {self.X.shape[1]} channels"
            )
        if n and (self.y.min() < 0 or self.y.max() >= len(self.class_names)):
            raise ValueError(
                f"y must lie in [0, {len(self.class_names)}) to index class_names {self.class_names}"
            )

    @property
    def domain(self) -> np.ndarray:
        """Domain id per trial, shape (N,), int64; one id per ``(subject, session)`` pair."""
        return domain_ids(self.subject, self.session)

    @property
    def n_channels(self) -> int:
        """Number of channels C."""
        return int(self.X.shape[1])

    @property
    def n_times(self) -> int:
        """Number of time samples T."""
        return int(self.X.shape[2])

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def subset(self, idx: np.ndarray | list[int] | slice) -> EEGData:
        """Return the trials selected by ``idx`` (integer indices, boolean mask or slice) as a new object.

        Domain ids of the subset are recomputed from its own ``(subject, session)`` pairs.
        """
        if not isinstance(idx, slice):
            idx = np.asarray(idx)
            if idx.dtype == bool:
                if idx.shape != (len(self),):
                    raise ValueError(f"boolean mask must have shape ({len(self)},), got {idx.shape}")
            elif idx.size and not np.issubdtype(idx.dtype, np.integer):
                raise TypeError(f"idx must hold integers or booleans, got dtype {idx.dtype}")
        return EEGData(
            X=self.X[idx],
            y=self.y[idx],
            subject=self.subject[idx],
            session=self.session[idx],
            sfreq=self.sfreq,
            ch_names=list(self.ch_names),
            class_names=list(self.class_names),
            info=dict(self.info),
        )

    def __repr__(self) -> str:
        return (
            f"EEGData(n_trials={len(self)}, n_channels={self.n_channels}, n_times={self.n_times}, "
            f"sfreq={self.sfreq:g}, classes={self.class_names}, "
            f"subjects={np.unique(self.subject).tolist()}, "
            f"domains={int(np.unique(self.domain).size) if len(self) else 0})"
        )


def _int_labels(name: str, values: Any, n: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match X, got {arr.shape}")
    if arr.size and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ValueError(f"{name} must hold integers")
    return arr.astype(np.int64)


@dataclass
class EEGCovariances:
    """Spatial covariance matrices of epoched EEG trials with labels and domain annotations.

    What a covariance-based run reads (:func:`manifoldnorm.data.load_simulated_covariances`): the raw trials
    they were computed from are not kept.

    Parameters
    ----------
    X : ndarray, shape (N, C, C), float64
        One covariance matrix per trial.
    y, subject, session : ndarray, shape (N,), int64
        As in :class:`EEGData`.
    sfreq : float
        Sampling frequency of the trials in Hz.
    n_times : int
        Time samples per trial the matrices were estimated from.
    ch_names, class_names : list of str
    info : dict
        Provenance: the generator, its parameters and the preprocessing.
    """

    X: np.ndarray
    y: np.ndarray
    subject: np.ndarray
    session: np.ndarray
    sfreq: float
    n_times: int
    ch_names: list[str]
    class_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.X = np.asarray(self.X, dtype=np.float64)
        if self.X.ndim != 3 or self.X.shape[1] != self.X.shape[2]:
            raise ValueError(f"X must have shape (N, C, C), got {self.X.shape}")
        n = self.X.shape[0]
        for name in ("y", "subject", "session"):
            setattr(self, name, _int_labels(name, getattr(self, name), n))
        self.sfreq, self.n_times = float(self.sfreq), int(self.n_times)
        self.ch_names = [str(c) for c in self.ch_names]
        self.class_names = [str(c) for c in self.class_names]
        if len(self.ch_names) != self.X.shape[1]:
            raise ValueError(f"ch_names has {len(self.ch_names)} entries but X has {self.X.shape[1]} channels")
        if n and (self.y.min() < 0 or self.y.max() >= len(self.class_names)):
            raise ValueError(f"y must lie in [0, {len(self.class_names)}) to index class_names {self.class_names}")

    @property
    def domain(self) -> np.ndarray:
        """Domain id per trial, shape (N,), int64; one id per ``(subject, session)`` pair."""
        return domain_ids(self.subject, self.session)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def __repr__(self) -> str:
        return (f"EEGCovariances(n_trials={len(self)}, n_channels={self.X.shape[1]}, n_times={self.n_times}, "
                f"classes={self.class_names}, subjects={np.unique(self.subject).tolist()})")
