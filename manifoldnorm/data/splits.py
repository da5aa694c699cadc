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
``official``
    The split the data ship with: a ``split`` field of ``"train"``/``"val"``/``"test"`` per trial
    (:func:`check_split_labels`) gives the indices exactly; without ``"val"`` entries, ``val_fraction`` of
    every (domain, class) cell of the training trials is moved to validation (seeded, as for the protocols).
``auto``
    ``official`` when the data carry a ``split`` field, else ``cross_session``.

A ``split`` field with one of the three protocols named explicitly is an error: the data say how they are to
be evaluated and the protocol would silently ignore it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .types import domain_ids

__all__ = ["PROTOCOLS", "SPLIT_LABELS", "SPLIT_PROTOCOLS", "Split", "check_split_labels", "split_indices",
           "target_domains"]

log = logging.getLogger(__name__)

PROTOCOLS: tuple[str, ...] = ("within_session", "cross_session", "cross_subject")
"""Evaluation protocols that derive a split from subjects and sessions (see the module docstring)."""

SPLIT_PROTOCOLS: tuple[str, ...] = (*PROTOCOLS, "official", "auto")
"""Every ``protocol`` accepted by :func:`split_indices`: the protocols, the data's own split, or either."""

SPLIT_LABELS: tuple[str, ...] = ("train", "val", "test")
"""Values of a ``split`` field (the data's official split), one per trial."""


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


def check_split_labels(split: Any, y: Any, class_names: Sequence[str] | None = None) -> np.ndarray:
    """Validate a data set's official split: one of :data:`SPLIT_LABELS` per trial.

    Parameters
    ----------
    split : array_like of str or bytes, shape (N,)
        ``"train"``, ``"val"`` or ``"test"`` per trial (bytes, as ``np.savez`` may store them, are decoded).
    y : array_like of int, shape (N,)
        Class labels, for the length and the class check.
    class_names : sequence of str, optional
        Names used in the messages instead of the class ids.

    Returns
    -------
    ndarray of str, shape (N,)

    Raises
    ------
    TypeError
        ``split`` does not hold strings.
    ValueError
        Wrong length, unknown labels (the valid ones are listed), no ``"train"`` or no ``"test"`` trial, or a
        class with test trials but no training trial. The last is an error rather than a warning: a classifier
        cannot learn a class it never sees, and its test accuracy would then measure the split, not the model.
    """
    y = np.asarray(y).reshape(-1)
    arr = np.asarray(split)
    if arr.shape != y.shape:
        raise ValueError(f"split has shape {arr.shape} but there are {len(y)} trials: give one of "
                         f"{'/'.join(SPLIT_LABELS)} per trial, shape ({len(y)},)")
    if arr.dtype.kind == "S":
        arr = np.char.decode(arr, "utf-8", errors="replace")
    elif arr.dtype == object and all(isinstance(v, (str, bytes)) for v in arr.tolist()):
        arr = np.array([v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in arr.tolist()],
                       dtype=str).reshape(arr.shape)
    if arr.dtype.kind != "U":
        raise TypeError(f"split must hold the strings {list(SPLIT_LABELS)} (one per trial), got dtype {arr.dtype}")
    unknown = ~np.isin(arr, SPLIT_LABELS)
    if unknown.any():
        bad = sorted(set(arr[unknown].tolist()))
        raise ValueError(f"split holds unknown labels {bad[:10]} ({int(unknown.sum())} trials, first at index "
                         f"{int(np.flatnonzero(unknown)[0])}); valid labels: {', '.join(SPLIT_LABELS)}")
    counts = {name: int(np.sum(arr == name)) for name in SPLIT_LABELS}
    for name in ("train", "test"):
        if counts[name] == 0:
            raise ValueError(f"split marks no trial {name!r} (counts: {counts}); mark some trials {name!r}")
    unseen = np.setdiff1d(y[arr == "test"], y[arr == "train"])
    if unseen.size:
        names = [class_names[c] if class_names is not None and 0 <= c < len(class_names) else int(c)
                 for c in unseen.tolist()]
        raise ValueError(f"classes {names} have 'test' trials in split but no 'train' trial, so no model can learn "
                         f"them; move some of their trials to 'train' or remove them from the data")
    return arr.astype(f"<U{max(len(s) for s in SPLIT_LABELS)}")


def _official_split(labels: np.ndarray, y: np.ndarray, domain: np.ndarray, val_fraction: float,
                    rng: np.random.Generator) -> Split:
    """The ``official`` protocol: indices from ``split`` labels; a seeded stratified val part when none is given."""
    labels = check_split_labels(labels, y)
    all_idx = np.arange(len(y), dtype=np.int64)
    train, val, test = (all_idx[labels == name] for name in SPLIT_LABELS)
    if len(val):
        how = "as given (val_fraction not used)"
    else:
        train, val = _stratified_holdout(train, y, domain, val_fraction, rng)
        how = f"carved from train (val_fraction={val_fraction:g}, stratified by domain and class, seeded)"
    log.info("official split from the data's 'split' array (the protocols are not used): train %d, val %d %s, "
             "test %d", len(train), len(val), how, len(test))
    return Split(train, val, test, protocol="official", domain=domain)


def split_indices(
    data_or_meta: Any,
    protocol: str = "auto",
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
        ``within_session``), each of shape (N,); optionally ``split`` (the official split, see
        :func:`check_split_labels`).
    protocol : {"auto", "official", "within_session", "cross_session", "cross_subject"}
        See the module docstring. ``auto`` (default): ``official`` when ``split`` is present, else
        ``cross_session``. A ``split`` field with an explicit protocol raises a ``ValueError``.
        *Deviation from earlier versions:* the default was ``within_session``.
    seed : int
        Seed for the shuffles (and the choice of test subjects).
    val_fraction : float
        Fraction of the training pool of every domain and class moved to validation (``official``: only when
        ``split`` has no ``"val"`` entry).
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
    if protocol not in SPLIT_PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid protocols are {list(SPLIT_PROTOCOLS)}")
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    y, subject, session, domain = _meta(data_or_meta)
    rng = np.random.default_rng(seed)
    labels = _field(data_or_meta, "split")
    if protocol == "auto":
        protocol = "cross_session" if labels is None else "official"
    if protocol == "official":
        if labels is None:
            raise ValueError("protocol 'official' needs the data's own split: a 'split' field (an .npz key 'split') "
                             f"of {'/'.join(SPLIT_LABELS)} per trial; without one choose one of {list(PROTOCOLS)}")
        return _official_split(labels, y, domain, val_fraction, rng)
    if labels is not None:
        raise ValueError(f"the data carry an official 'split' array, which protocol {protocol!r} would ignore; "
                         f"set protocol='auto' or 'official' to use it, or remove 'split' from the data to "
                         f"evaluate by protocol")
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
