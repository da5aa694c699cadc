"""On-disk cache of :class:`EEGData` as ``.npz`` files: cache directory, atomic writes, safe reads."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .types import EEGData

__all__ = ["CACHE_ENV", "default_cache_dir", "load_eegdata", "params_key", "save_eegdata"]

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


def save_eegdata(path: str | os.PathLike, data: EEGData) -> Path:
    """Write ``data`` to ``path`` (.npz) atomically: a temporary file in the same folder, then rename.

    A reader never sees a half-written file, and concurrent writers of the same entry are safe (the
    last rename wins and both wrote the same content).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(
                fh,
                X=data.X,
                y=data.y,
                subject=data.subject,
                session=data.session,
                sfreq=np.float64(data.sfreq),
                ch_names=np.asarray(data.ch_names, dtype=str),
                class_names=np.asarray(data.class_names, dtype=str),
                info_json=np.asarray(json.dumps(data.info, sort_keys=True)),
            )
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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
