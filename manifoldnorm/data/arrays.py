"""User arrays as a PyTorch dataset: validation of raw trials / SPD matrices, labels and domains."""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from .splits import check_split_labels
from .types import domain_ids

__all__ = ["KINDS", "SYMMETRY_RTOL", "ArrayDataset", "BatchedView", "ValidatedArrays", "load_arrays",
           "validate_arrays"]

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("auto", "raw", "spd")
"""Accepted values of ``kind``: raw trials (N, C, T), SPD matrices (N, n, n), or inferred."""

SYMMETRY_RTOL: float = 1e-3
r"""Largest relative asymmetry :math:`\max_{ij}|X_{ij} - X_{ji}| / \max_{ij}|X_{ij}|` (per matrix) of a matrix read as
symmetric; it is then symmetrized, :math:`(X + X^\top)/2`. Round-off of covariances computed in float32 or written
with 4 significant digits stays below 1e-4; a raw trial with as many samples as channels has an asymmetry of order 1.
"""

_ROUNDING_RTOL = 1e-6  # asymmetry below this is float round-off: symmetrized without a warning


@dataclass
class ValidatedArrays:
    """Output of :func:`validate_arrays`."""

    X: np.ndarray
    y: np.ndarray
    domain: np.ndarray
    kind: str
    class_names: list[str]


def _asymmetry(X: np.ndarray) -> np.ndarray:
    """Relative asymmetry ``max|X - X^T| / max|X|`` of every matrix of a stack ``(N, n, n)`` (0 for zero matrices)."""
    X = X.astype(np.float64, copy=False)
    scale = np.abs(X).max(axis=(-2, -1)) + np.finfo(np.float64).tiny
    return np.abs(X - np.swapaxes(X, -1, -2)).max(axis=(-2, -1)) / scale


def _read_as_spd(X: np.ndarray, asym: np.ndarray, declared: bool) -> np.ndarray:
    """Symmetrize near-symmetric matrices (warning above round-off); refuse asymmetry above :data:`SYMMETRY_RTOL`."""
    worst = int(np.argmax(asym))
    if asym[worst] > SYMMETRY_RTOL:
        bad = int(np.sum(asym > SYMMETRY_RTOL))
        raise ValueError(
            f"X was declared SPD (kind='spd') but is not symmetric: {bad} of {len(X)} matrices have a relative "
            f"asymmetry max|X - X^T| / max|X| above {SYMMETRY_RTOL:g} (worst: index {worst}, {asym[worst]:.3g}); "
            f"if these are raw trials with as many samples as channels, set kind='raw'; if they are covariances, "
            f"symmetrize them, (X + X^T) / 2"
        )
    if asym[worst] > _ROUNDING_RTOL:
        warnings.warn(
            f"X holds {'declared ' if declared else ''}SPD matrices with a relative asymmetry up to {asym[worst]:.3g} "
            f"(index {worst}; tolerance {SYMMETRY_RTOL:g}): symmetrized as (X + X^T) / 2",
            UserWarning, stacklevel=3,
        )
    return (X + np.swapaxes(X, -1, -2)) / 2.0


def _infer_kind(X: np.ndarray, asym: np.ndarray | None) -> str:
    """``kind="auto"``: SPD if every matrix is square and symmetric to :data:`SYMMETRY_RTOL`, raw if none is; the
    choice and its reason are logged (INFO), and square trials read as raw give a warning."""
    shape = tuple(X.shape)
    if asym is None:
        log.info("X %s is not square: read as raw trials (N, C, T) (kind='auto'; set kind='raw' to say so)", shape)
        return "raw"
    near = asym <= SYMMETRY_RTOL
    if near.all():
        log.info("X %s is square and symmetric to within a relative %.3g <= %g: read as SPD matrices "
                 "(kind='auto'; set kind='raw' if these are raw trials with as many samples as channels)",
                 shape, float(asym.max()), SYMMETRY_RTOL)
        return "spd"
    if near.any():
        raise ValueError(
            f"X {shape} is ambiguous: {int(near.sum())} of {len(X)} square matrices are symmetric to within a relative "
            f"{SYMMETRY_RTOL:g} and the others are not (worst: index {int(np.argmax(asym))}, relative asymmetry "
            f"{float(asym.max()):.3g}); set kind='spd' for covariances (then all must be symmetric) or kind='raw' "
            f"for raw trials"
        )
    warnings.warn(
        f"X {shape} holds square but non-symmetric trials (smallest relative asymmetry {float(asym.min()):.3g} > "
        f"{SYMMETRY_RTOL:g}): read as raw trials with {shape[1]} channels and {shape[2]} samples (kind='auto'); "
        f"set kind='raw' to confirm, or kind='spd' if these are covariance matrices",
        UserWarning, stacklevel=3,
    )
    return "raw"


def _encode_labels(y: Any, n: int, class_names: list[str] | None) -> tuple[np.ndarray, list[str]]:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D with one label per trial, got shape {y.shape}")
    if len(y) != n:
        raise ValueError(f"X has {n} trials but y has {len(y)} labels")
    if np.issubdtype(y.dtype, np.str_) or y.dtype == object:
        y = y.astype(str)
        if class_names is None:
            names, codes = np.unique(y, return_inverse=True)
            return codes.reshape(-1).astype(np.int64), [str(c) for c in names]
        unknown = sorted(set(y.tolist()) - set(class_names))
        if unknown:
            raise ValueError(f"labels {unknown} are not in class_names {class_names}")
        lookup = {c: i for i, c in enumerate(class_names)}
        return np.array([lookup[v] for v in y], dtype=np.int64), list(class_names)
    if np.issubdtype(y.dtype, np.bool_) or not np.issubdtype(y.dtype, np.number):
        raise TypeError(f"y must hold integer or string class labels, got dtype {y.dtype}")
    if not np.all(np.isfinite(y)):
        raise ValueError("y contains NaN or Inf")
    if not np.all(np.equal(np.mod(y, 1), 0)) or (n and y.min() < 0):
        raise ValueError("integer labels y must be non-negative whole numbers (0 .. n_classes-1)")
    y = y.astype(np.int64)
    n_classes = int(y.max()) + 1 if n else 0
    if class_names is None:
        return y, [str(k) for k in range(n_classes)]
    if len(class_names) < n_classes:
        raise ValueError(f"class_names has {len(class_names)} entries but labels reach {n_classes - 1}")
    return y, list(class_names)


def _integer_ids(name: str, values: Any, n: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match X, got {arr.shape}")
    if np.issubdtype(arr.dtype, np.str_) or arr.dtype == object:
        _, arr = np.unique(arr.astype(str), return_inverse=True)
        return arr.reshape(-1).astype(np.int64)
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must hold finite integer ids")
    if not np.all(np.equal(np.mod(arr, 1), 0)) or (n and arr.min() < 0):
        raise ValueError(f"{name} ids must be non-negative integers")
    return arr.astype(np.int64)


def validate_arrays(
    X: Any,
    y: Any,
    domain: Any = None,
    kind: str = "auto",
    subject: Any = None,
    session: Any = None,
    class_names: list[str] | None = None,
) -> ValidatedArrays:
    r"""Check user arrays and put them in canonical form.

    Parameters
    ----------
    X : array_like, shape (N, C, T) or (N, n, n)
        Raw trials or SPD matrices.
    y : array_like, shape (N,)
        Integer labels ``0 .. K-1`` or strings (encoded in sorted order).
    domain : array_like, shape (N,), optional
        Domain ids; if omitted, derived from ``subject`` and ``session`` when both are given, else 0.
    kind : {"auto", "raw", "spd"}
        What ``X`` holds; say it when you know it (``data.kind`` in ``conf/data/arrays.yaml``).

        * ``"spd"``: symmetric positive-definite matrices ``(N, n, n)``. A matrix whose relative asymmetry
          :math:`\max|X - X^\top| / \max|X|` is at most :data:`SYMMETRY_RTOL` (1e-3) is symmetrized,
          :math:`(X + X^\top)/2`, with a ``UserWarning`` when the asymmetry exceeds float round-off (1e-6);
          a larger asymmetry raises a ``ValueError`` naming the worst matrix. Positive definiteness is checked.
        * ``"raw"``: trials ``(N, C, T)``. Square input that is symmetric to within :data:`SYMMETRY_RTOL` (it
          looks like covariances) gives a ``UserWarning`` and is still read as raw, as asked.
        * ``"auto"`` (default): non-square input is raw; square input is SPD when every matrix is symmetric to
          within :data:`SYMMETRY_RTOL` (then as ``"spd"``), raw with a ``UserWarning`` when none is, and a
          ``ValueError`` when only some are (ambiguous). The choice and its reason are logged at INFO level.

        *Deviation from earlier versions:* ``"auto"`` used a tolerance of 1e-6, so covariances with a small
        asymmetry (1e-4, e.g. from float32 or rounded exports) were silently read as raw trials.
    subject, session : array_like, shape (N,), optional
        Used for ``domain`` when it is not given.
    class_names : list of str, optional
        Names of the classes; string labels are encoded by their position in it.

    Returns
    -------
    ValidatedArrays
        ``X`` float64 for SPD input (exactly symmetric), float32 for raw input; ``y``/``domain`` int64.
    """
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds are {list(KINDS)}")
    X = np.asarray(X)
    if X.dtype == object or not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise TypeError(f"X must be a real numeric array, got dtype {X.dtype}")
    if X.ndim != 3:
        raise ValueError(
            f"X must have shape (N, C, T) for raw trials or (N, n, n) for SPD matrices, got {X.shape}"
        )
    if X.shape[0] == 0:
        raise ValueError("X holds no trials")
    if not np.all(np.isfinite(X)):
        bad = int(np.sum(~np.isfinite(X).all(axis=(1, 2))))
        raise ValueError(f"X contains NaN or Inf values (in {bad} of {X.shape[0]} trials)")
    n = X.shape[0]
    if class_names is not None:
        class_names = [str(c) for c in class_names]
    y, class_names = _encode_labels(y, n, class_names)
    square = X.shape[1] == X.shape[2]
    asym = _asymmetry(X) if square else None
    declared = kind == "spd"
    if kind == "auto":
        kind = _infer_kind(X, asym)
    elif kind == "raw" and asym is not None and np.all(asym <= SYMMETRY_RTOL):
        warnings.warn(f"X {X.shape} is square and symmetric (relative asymmetry <= {SYMMETRY_RTOL:g}), like "
                      f"covariance matrices, but kind='raw': read as raw trials as asked", UserWarning, stacklevel=2)
    if kind == "spd":
        if asym is None:
            raise ValueError(f"SPD input must have shape (N, n, n), got {X.shape}")
        X = _read_as_spd(X.astype(np.float64), asym, declared)
        min_eig = np.linalg.eigvalsh(X)[:, 0]
        bad = np.flatnonzero(min_eig <= 0)
        if bad.size:
            raise ValueError(
                f"X was declared SPD but {bad.size} matrices are not positive definite "
                f"(first: index {bad[0]}, smallest eigenvalue {min_eig[bad[0]]:.3g})"
            )
    else:
        if X.shape[2] < 2:
            raise ValueError(f"raw trials need at least 2 time samples, got shape {X.shape}")
        X = X.astype(np.float32)
    if domain is not None:
        domain = _integer_ids("domain", domain, n)
    elif subject is not None and session is not None:
        domain = domain_ids(_integer_ids("subject", subject, n), _integer_ids("session", session, n))
    else:
        domain = np.zeros(n, dtype=np.int64)
    return ValidatedArrays(X=X, y=y, domain=domain, kind=kind, class_names=class_names)


class ArrayDataset(Dataset):
    """Map-style dataset over validated arrays; items are ``(x, y, domain)`` tensors.

    Parameters
    ----------
    X : array_like, shape (N, C, T) or (N, n, n)
        Raw trials (served as float32) or SPD matrices (served as float64).
    y : array_like, shape (N,)
        Class labels (integers or strings).
    domain : array_like, shape (N,), optional
        Domain ids (default: from ``subject``/``session`` if both given, else all 0).
    kind : {"auto", "raw", "spd"}
        See :func:`validate_arrays` (tolerance of asymmetry, what ``"auto"`` chooses and logs).
    subject, session : array_like, shape (N,), optional
        Kept as attributes (used by :func:`manifoldnorm.data.split_indices`).
    class_names : list of str, optional
        Class names (string labels are encoded by their position in it).
    sfreq : float, optional
        Sampling frequency of raw trials in Hz (kept as an attribute).
    split : array_like of str or bytes, shape (N,), optional
        The data's official split, ``"train"``/``"val"``/``"test"`` per trial, checked by
        :func:`manifoldnorm.data.check_split_labels` (unknown labels, wrong length, no train or test trial, a test
        class without training trials are errors); :func:`~manifoldnorm.data.split_indices` then uses it.

    Attributes
    ----------
    X, y, domain, subject, session : ndarray
    split : ndarray of str or None
    kind : str
    class_names : list of str
    sfreq : float or None
    """

    def __init__(self, X: Any, y: Any, domain: Any = None, kind: str = "auto", subject: Any = None,
                 session: Any = None, class_names: list[str] | None = None,
                 sfreq: float | None = None, split: Any = None) -> None:
        v = validate_arrays(X, y, domain=domain, kind=kind, subject=subject, session=session,
                            class_names=class_names)
        self.X, self.y, self.domain, self.kind = v.X, v.y, v.domain, v.kind
        n = len(v.y)
        self.subject = None if subject is None else _integer_ids("subject", subject, n)
        self.session = None if session is None else _integer_ids("session", session, n)
        self.class_names = v.class_names
        if sfreq is not None and not float(sfreq) > 0:
            raise ValueError(f"sfreq must be positive, got {sfreq}")
        self.sfreq = None if sfreq is None else float(sfreq)
        self.split = None if split is None else check_split_labels(split, self.y, self.class_names)
        self._X = torch.from_numpy(np.ascontiguousarray(self.X))
        self._y = torch.from_numpy(self.y)
        self._d = torch.from_numpy(self.domain)

    def __len__(self) -> int:
        return int(self._y.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._X[i], self._y[i], self._d[i]

    def batched(self) -> BatchedView:
        """This dataset as a ``DataLoader`` should fetch it: one gather per array and batch (:class:`BatchedView`)."""
        return BatchedView(self)

    def __repr__(self) -> str:
        return (f"ArrayDataset(n={len(self)}, kind={self.kind!r}, shape={tuple(self.X.shape[1:])}, "
                f"classes={len(self.class_names)}, domains={np.unique(self.domain).size})")


class _Batch(tuple):
    """``(x, y, domain)`` of a whole batch, already gathered by :meth:`BatchedView.__getitems__`."""


class BatchedView(Dataset):
    """An :class:`ArrayDataset` for a ``DataLoader`` with automatic batching: a batch is gathered with one indexing
    per array (``__getitems__``) instead of one per trial and a stack. Give the loader
    ``collate_fn=BatchedView.collate``; its batches are then equal, value for value and dtype for dtype, to those of
    the default collation of ``(x, y, domain)`` samples: the list ``[x, y, domain]``.
    """

    def __init__(self, dataset: ArrayDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.dataset[i]

    def __getitems__(self, indices: list[int]) -> _Batch:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        ds = self.dataset  # index_select: a plain row copy (advanced indexing starts a parallel region per call)
        return _Batch((ds._X.index_select(0, idx), ds._y.index_select(0, idx), ds._d.index_select(0, idx)))

    @staticmethod
    def collate(batch: Any) -> Any:
        """A batch of :meth:`__getitems__` as ``[x, y, domain]``; anything else through ``default_collate``."""
        return list(batch) if isinstance(batch, _Batch) else default_collate(batch)


def load_arrays(path: str | os.PathLike, kind: str = "auto") -> ArrayDataset:
    """Load a user ``.npz`` file into an :class:`ArrayDataset`.

    Required keys: ``X`` (N, C, T) or (N, n, n) and ``y`` (N,). Optional: ``domain``, or ``subject``
    and ``session`` (domain then derived per pair); ``class_names``; ``sfreq`` (Hz, for raw trials); ``split``
    (``"train"``/``"val"``/``"test"`` per trial: the official split, used by ``protocol="auto"``/``"official"`` of
    :func:`~manifoldnorm.data.split_indices`).
    Pickled objects are refused. ``kind`` (``"auto"``, ``"raw"``, ``"spd"``) is that of :func:`validate_arrays`,
    which says how near-symmetric matrices are read; its errors are raised with the file's path in front.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            content = {k: f[k] for k in f.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"could not read {path} as a .npz archive without pickles: {err}") from err
    missing = [k for k in ("X", "y") if k not in content]
    if missing:
        raise ValueError(f"{path} lacks required keys {missing}; found keys {sorted(content)}")
    class_names = content["class_names"].tolist() if "class_names" in content else None
    sfreq = float(content["sfreq"]) if "sfreq" in content else None
    try:
        return ArrayDataset(content["X"], content["y"], domain=content.get("domain"), kind=kind,
                            subject=content.get("subject"), session=content.get("session"),
                            class_names=class_names, sfreq=sfreq, split=content.get("split"))
    except (ValueError, TypeError) as err:
        raise type(err)(f"{path}: {err}") from err
