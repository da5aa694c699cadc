"""Seeded, stratified train/val/test splits for multi-domain EEG evaluation protocols.

Protocols (:data:`PROTOCOLS`):

``within_session``
    Every domain (subject × session) contributes to train, val and test: per domain and class a
    ``test_fraction`` of the trials is held out for test, and ``val_fraction`` of the rest for
    validation. Target domains = all domains.
``cross_session``
    Train on the first session of every subject, test on all its later sessions; validation trials
    are carved (stratified) from the training sessions. Target domains = the later sessions.
``cross_subject``
    Test on held-out subjects (``test_subjects``, or ``n_test_subjects`` drawn with ``seed``);
    validation trials are carved from the training subjects. Target domains = the held-out
    subjects' sessions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .types import domain_ids

__all__ = ["PROTOCOLS", "Split", "split_indices", "target_domains"]

PROTOCOLS: tuple[str, ...] = ("within_session", "cross_session", "cross_subject")
"""Names accepted by :func:`split_indices`."""


class Split(dict):
    """``dict(train=idx, val=idx, test=idx)`` of sorted int64 index arrays, plus domain roles.

    Attributes
    ----------
    protocol : str
        Protocol that produced the split.
    source_domains : ndarray
        Domain ids present in the training indices.
    target_domains : ndarray
        Domain ids of the test indices (the domains a model is evaluated on).
    """

    def __init__(self, train: np.ndarray, val: np.ndarray, test: np.ndarray, *, protocol: str,
                 domain: np.ndarray) -> None:
        super().__init__(train=train, val=val, test=test)
        self.protocol = protocol
        self.source_domains = np.unique(domain[train]).astype(np.int64)
        self.target_domains = np.unique(domain[test]).astype(np.int64)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.items())
        return f"Split(protocol={self.protocol!r}, {sizes}, target_domains={self.target_domains.tolist()})"


def _field(obj: Any, name: str) -> np.ndarray | None:
    if isinstance(obj, Mapping):
        value = obj.get(name)
    elif hasattr(obj, "columns"):  # pandas DataFrame
        value = obj[name].to_numpy() if name in obj.columns else None
    else:
        value = getattr(obj, name, None)
    return None if value is None else np.asarray(value)


def _meta(data_or_meta: Any) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray]:
    y = _field(data_or_meta, "y")
    if y is None:
        raise ValueError("split_indices needs class labels: an object or mapping with field 'y'")
    y = y.reshape(-1)
    subject, session = _field(data_or_meta, "subject"), _field(data_or_meta, "session")
    for name, arr in (("subject", subject), ("session", session)):
        if arr is not None and arr.shape != y.shape:
            raise ValueError(f"{name} has shape {arr.shape} but y has shape {y.shape}")
    if subject is not None and session is not None:
        domain = domain_ids(subject, session)
    else:
        domain = _field(data_or_meta, "domain")
        if domain is None:
            domain = np.zeros(len(y), dtype=np.int64)
        if domain.shape != y.shape:
            raise ValueError(f"domain has shape {domain.shape} but y has shape {y.shape}")
    return y, subject, session, np.asarray(domain, dtype=np.int64)


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value}")


def _stratified_holdout(
    idx: np.ndarray, y: np.ndarray, group: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (kept, held out): per (group, class) cell, ``fraction`` of it held out.

    A cell of at least two trials always keeps one and, when ``fraction > 0``, holds out one.
    """
    kept, held = [], []
    cells = np.unique(np.stack([group[idx], y[idx]], axis=1), axis=0) if len(idx) else []
    for g, c in cells:
        cell = idx[(group[idx] == g) & (y[idx] == c)]
        cell = cell[rng.permutation(len(cell))]
        n_hold = int(round(fraction * len(cell)))
        if fraction > 0 and len(cell) >= 2:
            n_hold = min(max(n_hold, 1), len(cell) - 1)
        held.append(cell[:n_hold])
        kept.append(cell[n_hold:])
    empty = np.zeros(0, dtype=np.int64)
    return (np.sort(np.concatenate(kept)) if kept else empty,
            np.sort(np.concatenate(held)) if held else empty)


def split_indices(
    data_or_meta: Any,
    protocol: str = "within_session",
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    test_subjects: Sequence[int] | None = None,
    n_test_subjects: int = 1,
) -> Split:
    """Disjoint, stratified, seeded train/val/test indices for an evaluation protocol.

    Parameters
    ----------
    data_or_meta : EEGData, ArrayDataset, mapping or DataFrame
        Anything with fields ``y`` and ``subject`` + ``session`` (or ``domain``; required only by
        ``within_session``), each of shape (N,).
    protocol : {"within_session", "cross_session", "cross_subject"}
        See the module docstring.
    seed : int
        Seed for the shuffles (and the choice of test subjects).
    val_fraction : float
        Fraction of the training pool of every domain and class moved to validation.
    test_fraction : float
        ``within_session`` only: fraction of every domain and class held out for test.
    test_subjects : sequence of int, optional
        ``cross_subject`` only: the held-out subjects (default: ``n_test_subjects`` drawn by seed).
    n_test_subjects : int
        ``cross_subject`` only, when ``test_subjects`` is not given.

    Returns
    -------
    Split
        ``{"train", "val", "test"}`` → sorted int64 arrays, with ``.target_domains`` and
        ``.source_domains``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid protocols are {list(PROTOCOLS)}")
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    y, subject, session, domain = _meta(data_or_meta)
    rng = np.random.default_rng(seed)
    all_idx = np.arange(len(y), dtype=np.int64)

    if protocol == "within_session":
        pool, test = _stratified_holdout(all_idx, y, domain, test_fraction, rng)
    else:
        if subject is None or (protocol == "cross_session" and session is None):
            need = "subject and session" if protocol == "cross_session" else "subject"
            raise ValueError(f"protocol {protocol!r} needs {need} labels per trial")
        subject = subject.astype(np.int64)
        if protocol == "cross_session":
            first = np.zeros(len(y), dtype=bool)
            for s in np.unique(subject):
                mask = subject == s
                first[mask] = session[mask] == session[mask].min()
            if first.all():
                raise ValueError("cross_session needs at least one subject with two or more sessions")
            pool, test = all_idx[first], all_idx[~first]
        else:
            subjects = np.unique(subject)
            if test_subjects is None:
                if not 1 <= n_test_subjects < len(subjects):
                    raise ValueError(
                        f"n_test_subjects must lie in [1, {len(subjects) - 1}] for {len(subjects)} subjects, "
                        f"got {n_test_subjects}"
                    )
                held_out = rng.choice(subjects, size=n_test_subjects, replace=False)
            else:
                held_out = np.asarray(list(test_subjects), dtype=np.int64)
                missing = sorted(set(held_out.tolist()) - set(subjects.tolist()))
                if missing or len(held_out) == 0 or len(np.unique(held_out)) == len(subjects):
                    raise ValueError(
                        f"test_subjects must be a non-empty proper subset of the subjects "
                        f"{subjects.tolist()}, got {held_out.tolist()}"
                    )
            is_test = np.isin(subject, held_out)
            pool, test = all_idx[~is_test], all_idx[is_test]
    train, val = _stratified_holdout(pool, y, domain, val_fraction, rng)
    return Split(train, val, np.sort(test), protocol=protocol, domain=domain)


def target_domains(data_or_meta: Any, split: Mapping[str, np.ndarray]) -> np.ndarray:
    """Domain ids of the test indices of ``split`` (sorted, int64)."""
    _, _, _, domain = _meta(data_or_meta)
    return np.unique(domain[np.asarray(split["test"], dtype=np.int64)]).astype(np.int64)
