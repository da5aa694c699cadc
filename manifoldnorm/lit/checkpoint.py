"""Checkpoint files that are never left half-written, refused when damaged, and the run directory of a resume.

- :class:`AtomicCheckpointIO` (Lightning ``CheckpointIO`` plugin, added to every trainer by
  :func:`manifoldnorm.lit.run.build_trainer`) writes each checkpoint to a temporary file beside it, syncs it to the
  disk and renames it over the old one, and verifies every checkpoint it loads (:func:`verify_checkpoint`).
- :func:`verify_checkpoint` checks the CRC-32 that ``torch.save``'s zip format stores for every record, so flipped
  bytes, a truncated or an empty file are refused with one line (:class:`CheckpointError`) before anything is
  restored.
- :class:`CarryBestCheckpoint` keeps the best-checkpoint state of a run resumed in another directory.
- :func:`run_dir` (the ``mn.run_dir`` resolver of ``conf/hydra/default.yaml``) picks the run directory: the one
  that holds the checkpoint of a resume, else the SLURM/torchrun key, else a fresh directory named after the start
  time, created exclusively so that two runs started in the same second never share it.

See ``docs/resume.md``.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
import pickle
import secrets
import shutil
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import OmegaConf

__all__ = [
    "CheckpointError",
    "verify_checkpoint",
    "atomic_save",
    "AtomicCheckpointIO",
    "CarryBestCheckpoint",
    "run_dir_of",
    "run_dir",
]

log = logging.getLogger(__name__)

# ckpt_path values that Lightning resolves itself (not file names)
_LIGHTNING_CKPT_KEYWORDS = frozenset({"best", "last", "hpc", "registry"})
_ZIP_LOCAL_HEADER = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, empty, truncated, damaged) or could not be written."""


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Refuse a checkpoint file that is missing, empty, truncated or damaged, with one line naming it.

    ``torch.save`` writes a zip archive that stores a CRC-32 of every record (the pickled structure and each
    tensor's bytes). Every record is read and its CRC-32 compared (``zipfile.ZipFile.testzip``), which also reads
    the zip directory at the end of the file, so a truncated file has none. ``torch.load`` itself checks neither:
    a flipped byte in a tensor loads silently. Directories (sharded checkpoints) and remote URLs are not checked.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint file.

    Raises
    ------
    CheckpointError
        What is wrong and with which file, in one line.
    """
    p = Path(path)
    if not _is_local_file_protocol(str(path)) or p.is_dir():
        return
    if not p.exists():
        raise CheckpointError(f"checkpoint {p}: no such file")
    size = p.stat().st_size
    hint = "resume from an earlier checkpoint"
    if size == 0:
        raise CheckpointError(f"checkpoint {p} is empty (0 bytes): its write never finished; {hint}")
    with open(p, "rb") as f:
        head = f.read(4)
    if head != _ZIP_LOCAL_HEADER:
        raise CheckpointError(
            f"checkpoint {p} ({_size(size)}) is not a torch.save zip archive (it starts with {head!r}); "
            f"only zip checkpoints can be verified: re-save it with torch.save (default format) or {hint}")
    try:
        with zipfile.ZipFile(p) as zf:
            bad = zf.testzip()
            names = zf.namelist()
    except zipfile.BadZipFile as err:
        raise CheckpointError(
            f"checkpoint {p} ({_size(size)}) is truncated or damaged: no valid zip directory ({err}); {hint}"
        ) from err
    except (OSError, EOFError, ValueError, RuntimeError, NotImplementedError, zlib.error) as err:
        raise CheckpointError(f"checkpoint {p} ({_size(size)}) is damaged: {type(err).__name__}: {err}; {hint}") \
            from err
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {p} ({_size(size)}) is damaged: record '{bad}' fails its CRC-32 check (changed bytes); "
            f"{hint}")
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        raise CheckpointError(f"checkpoint {p} is a zip archive but not a torch.save file (no data.pkl); {hint}")


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync directories
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` so that ``path`` holds either its previous content or all of ``obj``.

    Writes ``.<name>.<random>.tmp`` in the same directory, flushes and fsyncs it, renames it over ``path``
    (``os.replace``, atomic on POSIX) and fsyncs the directory. A failed write (disk full, quota, I/O error)
    removes the temporary file and raises :class:`CheckpointError`; a process killed during the write leaves
    ``path`` untouched and a stray ``.tmp`` file beside it.

    Raises
    ------
    CheckpointError
        The write failed; the message names the file, the reason and the free space, and the old file is kept.
    """
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not isinstance(err, OSError | RuntimeError):  # KeyboardInterrupt, pickling errors: as they are
            raise
        raise CheckpointError(f"could not write checkpoint {path}: {_write_reason(err, directory)}; "
                              f"the previous {path.name} (if any) is kept unchanged") from err
    _fsync_dir(directory)


def _write_reason(err: BaseException, directory: Path) -> str:
    try:
        free = f"{_size(shutil.disk_usage(directory).free)} free on its file system"
    except OSError:
        free = "free space unknown"
    # torch.save reports a failed write of its zip writer as a RuntimeError; the OSError is its context
    os_err = err if isinstance(err, OSError) else err.__context__ if isinstance(err.__context__, OSError) else None
    if os_err is not None and os_err.errno is not None:
        if os_err.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"disk full ({os.strerror(os_err.errno)}, {free})"
        return f"{os.strerror(os_err.errno)} ({free})"
    msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return f"{msg} ({free})"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic, durable writes and verified loads.

    ``save_checkpoint`` uses :func:`atomic_save` for local paths (Lightning's own local save goes through an
    ``fsspec`` transaction that writes a temporary file in the system temp directory and moves it, without fsync,
    which is not atomic across file systems); remote URLs keep Lightning's path. ``load_checkpoint`` calls
    :func:`verify_checkpoint` first, so a resume (``ckpt_path``), a SLURM requeue and ``trainer.test`` of the best
    checkpoint refuse a damaged file before restoring anything. Only the process that writes (global rank 0)
    calls ``save_checkpoint``; every process loads.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        verify_checkpoint(path)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as err:  # weights_only refused an object: never executed, reported in one line
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            first = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
            raise CheckpointError(
                f"checkpoint {path}: refused to load objects other than tensors and plain containers ({first[:200]}); "
                "it was not written by this project's training, or holds code: load it with "
                "torch.load(..., weights_only=False) yourself only if you trust its source") from err


class CarryBestCheckpoint(Callback):
    """Keep the best-checkpoint state when a run resumes in a directory other than the one it was written in.

    Lightning's ``ModelCheckpoint.load_state_dict`` drops ``best_model_score`` and ``best_k_models`` when the
    checkpoint directory changed, so the resumed run would report and test only what it saw after the resume.
    Before the callbacks are restored this rewrites the saved ``dirpath`` of every ``ModelCheckpoint`` state to
    the current one, so the whole state is restored. The best score and paths point to the files of the original
    directory, which Lightning never deletes (it removes only files inside its own ``dirpath``); a run directory
    that was moved or copied (the original gone) has its paths mapped to the same names under the new
    ``dirpath``. A better epoch after the resume is saved in the new directory. A warning names both
    directories. Nothing changes when the run resumes in its original directory (``conf/hydra/default.yaml``
    does that by default).
    """

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks") or {}
        for cb in trainer.checkpoint_callbacks:
            if not isinstance(cb, ModelCheckpoint) or cb.dirpath is None:
                continue
            state = states.get(cb.state_key)
            if not isinstance(state, dict) or state.get("dirpath") in (None, cb.dirpath):
                continue
            old, new = str(state["dirpath"]), str(cb.dirpath)
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                if state.get(key):
                    state[key] = _relocate(state[key], old, new)
            if isinstance(state.get("best_k_models"), dict):
                state["best_k_models"] = {_relocate(p, old, new): v for p, v in state["best_k_models"].items()}
            if state.get("best_model_path"):
                score = state.get("best_model_score")
                score = f"{cb.monitor}={float(score):.4f}: " if score is not None and cb.monitor else ""
                log.warning("resuming in %s, not in the checkpoint's directory %s: the best checkpoint so far "
                            "is carried over (%s%s)", new, old, score, state["best_model_path"])
            state["dirpath"] = new


def _relocate(path: str, old: str, new: str) -> str:
    """``path`` if it exists, else the same name under ``new`` when that exists (a moved run), else ``path``."""
    if not path or os.path.exists(path):
        return path
    rel = os.path.relpath(path, old)
    moved = os.path.join(new, rel)
    return moved if not rel.startswith("..") and os.path.exists(moved) else path


def run_dir_of(ckpt_path: str | os.PathLike, levels: int = 4) -> Path | None:
    """The run directory that holds a checkpoint, or ``None``.

    A run directory holds ``config_resolved.yaml`` (written by :func:`manifoldnorm.lit.run.save_config`) or
    ``.hydra/config.yaml``; the checkpoint's parents are searched up to ``levels`` levels
    (``<run>/checkpoints/last.ckpt``, ``<run>/checkpoints/steps/step8.ckpt``, ``<run>/hpc_ckpt_1.ckpt``).
    """
    p = Path(os.path.abspath(ckpt_path))
    for parent in list(p.parents)[:levels]:
        if (parent / "config_resolved.yaml").is_file() or (parent / ".hydra" / "config.yaml").is_file():
            return parent
    return None


def _reserving() -> bool:
    """True while Hydra runs a job (``hydra.main``); false when a config is only composed (tests, ``compose``)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized()


_RESERVED: dict[str, str] = {}  # base -> the directory this process reserved there


def _reserve(base: str, stamp: str) -> str:
    if base in _RESERVED:
        return _RESERVED[base]
    os.makedirs(base, exist_ok=True)
    for i in range(10_000):
        name = stamp if i == 0 else f"{stamp}_{i}"
        try:
            os.mkdir(os.path.join(base, name))  # exclusive: exactly one process creates each name
        except FileExistsError:
            continue
        _RESERVED[base] = f"{base}/{name}"
        return _RESERVED[base]
    raise RuntimeError(f"more than 10000 runs started at {stamp} in {base}")


def run_dir(base: str, key: str | None = None, ckpt_path: str | None = None) -> str:
    """The run directory: where a resume continues, the job's key, or a fresh directory named after the time.

    In order:

    1. ``ckpt_path`` given and inside a run directory (:func:`run_dir_of`): that directory, so the resumed run
       continues where it was (its checkpoint callbacks restore their best score and best models in full);
    2. ``key`` given (``SLURM_JOB_ID``, else ``TORCHELASTIC_RUN_ID``): ``<base>/<key>``, shared by every process
       and every requeue of the job;
    3. else ``<base>/<YYYY-mm-dd_HH-MM-SS>``, created here with an exclusive ``mkdir``; when another run took
       that name, ``_1``, ``_2``... is appended, so concurrent launches never share a directory. The result is
       cached per process (Hydra resolves the node more than once; Lightning hands the directory of rank 0 to
       the processes it starts for ``trainer=ddp_cpu`` as ``hydra.run.dir``). When a config is only composed
       (no Hydra job running) nothing is created.
    """
    if ckpt_path and str(ckpt_path) not in _LIGHTNING_CKPT_KEYWORDS and _is_local_file_protocol(str(ckpt_path)):
        found = run_dir_of(ckpt_path)
        if found is not None:
            return str(found)
    if key not in (None, ""):
        return f"{base}/{key}"
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    if not _reserving():
        return f"{base}/{stamp}"
    return _reserve(base, stamp)


def _multirun_command() -> bool:
    """True in the process that started a sweep (``-m``/``--multirun``/``hydra.mode=MULTIRUN`` on its command line)."""
    args = sys.argv[1:]
    return any(a in ("-m", "--multirun") or a.replace(" ", "") == "hydra.mode=MULTIRUN" for a in args)


def sweep_dir(base: str) -> str:
    """The directory of a sweep: ``<base>/<YYYY-mm-dd_HH-MM-SS>``, claimed with an exclusive ``mkdir``.

    In the process that starts the sweep, a name another sweep took already gets ``_1``, ``_2``..., so two sweeps
    started in the same second never share a directory (nor their job folders ``0/``, ``1/``...). The resolver's
    value is cached in the config (``use_cache=True``) and Hydra copies that cache into the config of every job
    of the sweep, also into the jobs the submitit launcher runs on SLURM nodes, so every job gets the directory
    its launcher claimed. Outside a sweep command (a config only composed, a single run) nothing is created.
    """
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    if not _multirun_command():
        return f"{base}/{stamp}"
    return _reserve(base, stamp)


def register_resolvers() -> None:
    """Register ``mn.run_dir`` and ``mn.sweep_dir`` with OmegaConf (idempotent); done when this module is imported."""
    OmegaConf.register_new_resolver("mn.run_dir", run_dir, replace=True)
    OmegaConf.register_new_resolver("mn.sweep_dir", sweep_dir, replace=True, use_cache=True)


register_resolvers()
