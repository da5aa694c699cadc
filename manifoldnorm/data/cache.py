"""On-disk cache of :class:`EEGData` and :class:`EEGCovariances` as ``.npz`` files: cache directory, atomic
writes, safe reads.

An entry's file name carries a hash of everything its content depends on (generator version, parameters and,
for features, the preprocessing and the cache format); the same description is stored inside the file and
compared on reading, so an entry written by another version or for other parameters is never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .types import EEGCovariances, EEGData

__all__ = ["CACHE_ENV", "default_cache_dir", "load_covariances", "load_eegdata", "params_key", "read_entry",
           "save_covariances", "save_eegdata"]

log = logging.getLogger(__name__)

T = TypeVar("T")

CACHE_ENV = "MANIFOLDNORM_CACHE"
"""Environment variable naming the cache directory (default ``~/.cache/manifoldnorm``)."""

# Errors that mean "this file is not a readable cache entry" (truncated, corrupted, wrong content).
CACHE_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile,
)


def default_cache_dir() -> Path:
    """``$MANIFOLDNORM_CACHE`` if set and non-empty, else ``~/.cache/manifoldnorm``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "manifoldnorm"


def params_key(params: dict[str, Any]) -> str:
    """Short stable hash (16 hex digits) of a JSON-serialisable parameter dict."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_entry(path: Path, reader: Callable[[Path], T], info: dict[str, Any],
               check: Callable[[T], str | None] | None = None) -> T | None:
    """The cache entry at ``path`` read by ``reader``, or ``None`` when it must be (re)built.

    ``None`` without a message when there is no file; with a logged warning (the entry is then rebuilt by the
    caller and overwritten) when the file is unreadable (truncated, not an ``.npz``, missing arrays), when the
    description stored in it differs from ``info`` (another generator version, parameters or format), or when
    ``check(data)`` returns a reason (e.g. wrong shapes).
    """
    if not path.exists():
        return None
    try:
        data = reader(path)
    except CACHE_READ_ERRORS as err:
        log.warning("cache entry %s is unreadable (%s: %s); rebuilding it", path, type(err).__name__, err)
        return None
    stored = getattr(data, "info", None)
    reason = (f"it describes {json.dumps(stored, sort_keys=True)[:200]}" if stored != info
              else check(data) if check is not None else None)
    if reason:
        log.warning("cache entry %s does not hold the data its name stands for (%s); rebuilding it", path, reason)
        return None
    return data


def _save_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    """Write ``arrays`` to ``path`` (.npz, uncompressed) atomically: a temporary file in the same folder, synced,
    then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_eegdata(path: str | os.PathLike, data: EEGData) -> Path:
    """Write ``data`` to ``path`` (.npz) atomically: a temporary file in the same folder, then rename.

    A reader never sees a half-written file, and concurrent writers of the same entry are safe (the
    last rename wins and both wrote the same content).
    """
    return _save_npz(
        path,
        X=data.X,
        y=data.y,
        subject=data.subject,
        session=data.session,
        sfreq=np.float64(data.sfreq),
        ch_names=np.asarray(data.ch_names, dtype=str),
        class_names=np.asarray(data.class_names, dtype=str),
        info_json=np.asarray(json.dumps(data.info, sort_keys=True)),
    )


def save_covariances(path: str | os.PathLike, data: EEGCovariances) -> Path:
    """Write ``data`` to ``path`` (.npz) atomically, as :func:`save_eegdata`."""
    return _save_npz(
        path,
        X=data.X,
        y=data.y,
        subject=data.subject,
        session=data.session,
        sfreq=np.float64(data.sfreq),
        n_times=np.int64(data.n_times),
        ch_names=np.asarray(data.ch_names, dtype=str),
        class_names=np.asarray(data.class_names, dtype=str),
        info_json=np.asarray(json.dumps(data.info, sort_keys=True)),
    )


def load_eegdata(path: str | os.PathLike) -> EEGData:
    """Read an :class:`EEGData` written by :func:`save_eegdata` (no pickles are loaded)."""
    with np.load(Path(path), allow_pickle=False) as f:
        return EEGData(
            X=f["X"],
            y=f["y"],
            subject=f["subject"],
            session=f["session"],
            sfreq=float(f["sfreq"]),
            ch_names=f["ch_names"].tolist(),
            class_names=f["class_names"].tolist(),
            info=json.loads(str(f["info_json"])),
        )


def load_covariances(path: str | os.PathLike) -> EEGCovariances:
    """Read an :class:`EEGCovariances` written by :func:`save_covariances` (no pickles are loaded)."""
    with np.load(Path(path), allow_pickle=False) as f:
        return EEGCovariances(
            X=f["X"],
            y=f["y"],
            subject=f["subject"],
            session=f["session"],
            sfreq=float(f["sfreq"]),
            n_times=int(f["n_times"]),
            ch_names=f["ch_names"].tolist(),
            class_names=f["class_names"].tolist(),
            info=json.loads(str(f["info_json"])),
        )
