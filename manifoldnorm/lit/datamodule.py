"""Lightning data module for multi-domain EEG and multivariate time series: simulated, MOABB, user arrays or
``.ts`` archives, as covariances or raw signals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from manifoldnorm.data import (
    ArrayDataset,
    EEGData,
    bandpass,
    bandpass_covariances,
    check_split_labels,
    load_arrays,
    load_moabb,
    load_simulated,
    load_simulated_covariances,
    load_ts,
    split_indices,
    trace_normalize,
    trial_covariances,
)
from manifoldnorm.data.arrays import KINDS, BatchedView
from manifoldnorm.data.types import domain_ids
from manifoldnorm.lit.resume import seeded_loader

__all__ = ["EEGDataModule", "EpochSeededSampler", "SOURCES", "REPRESENTATIONS"]

SOURCES: tuple[str, ...] = ("simulated", "moabb", "arrays", "ts")
REPRESENTATIONS: tuple[str, ...] = ("cov", "raw")


def _choice(value: str, valid: Sequence[str], what: str) -> str:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    return value


class EpochSeededSampler(Sampler[int]):
    """Random permutation drawn from ``seed`` and the epoch number (Lightning calls :meth:`set_epoch`).

    The order of epoch ``e`` does not depend on how many epochs ran in this process, so a run resumed from a
    checkpoint sees the same batches as an uninterrupted one.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class EEGDataModule(pl.LightningDataModule):
    """Seeded train/val/test loaders of ``(x, y, domain)`` for one evaluation protocol.

    Parameters
    ----------
    source : {"simulated", "moabb", "arrays", "ts"}
        ``simulated``: :func:`manifoldnorm.data.load_simulated` (cached); ``moabb``:
        :func:`manifoldnorm.data.load_moabb`; ``arrays``: a user ``.npz`` file (``path``) read by
        :func:`manifoldnorm.data.load_arrays` (``X`` raw trials ``(N, C, T)`` or SPD matrices ``(N, n, n)``,
        ``y``, ``domain`` or ``subject`` + ``session``), plus ``sfreq`` when raw trials are band-passed.
        Precomputed SPD matrices are used as they are. ``ts``: a train and a test ``.ts`` file read by
        :func:`manifoldnorm.data.load_ts` (``source_kwargs``: ``archive`` or ``train_file`` + ``test_file``,
        ``sfreq``, ``missing``), one domain, the files' split (``protocol`` ``auto`` or ``official``); every case's
        covariance is estimated from its own samples (:func:`manifoldnorm.data.trial_covariances`), so cases may
        differ in length (``representation="raw"`` needs equal lengths).
    representation : {"cov", "raw"}
        ``cov``: band-pass filtered (``band``) OAS covariances, float64 ``(N, C, C)`` (SPDNet input);
        ``raw``: band-pass filtered trials, float32 ``(N, C, T)`` (TSMNet input). Both are computed one chunk of
        trials at a time (:data:`manifoldnorm.data.CHUNK_TRIALS`), without a float64 copy of all raw trials.
    protocol : {"auto", "official", "within_session", "cross_session", "cross_subject"}
        See :func:`manifoldnorm.data.split_indices`. ``auto`` (default): the file's own ``split`` array when the
        ``arrays`` source has one (``official``), else ``cross_session``. An explicit protocol with a ``split``
        array is an error.
    batch_size : int
    seed : int
        Seed of the split and of the training-set shuffling (:class:`EpochSeededSampler`).
    num_workers : int
    band : (fmin, fmax) or None
        Band-pass edges in Hz; ``None`` skips filtering. For MOABB the band is passed to the loader.
    val_fraction : float
        Fraction of the training pool held out for validation.
    cov_estimator : str
        Covariance estimator (``"oas"``, ``"lwf"``, ``"scm"``).
    filter_order : int
        Butterworth order of the band-pass.
    path : str, optional
        The ``.npz`` file of the ``arrays`` source.
    cache_dir : str, optional
        Cache directory of the simulated data (default ``$MANIFOLDNORM_CACHE`` or ``~/.cache/manifoldnorm``). The
        cache holds what the run reads: the covariance matrices for ``cov``
        (:func:`manifoldnorm.data.load_simulated_covariances`), the float32 trials for ``raw``.
    source_kwargs : mapping, optional
        Extra arguments of the loader (e.g. ``n_subjects`` for the simulation, ``dataset`` for MOABB).
    split_kwargs : mapping, optional
        Extra arguments of :func:`~manifoldnorm.data.split_indices` (``test_fraction``, ``test_subjects``, ...).
    drop_last : bool
        Drop the last incomplete training batch (batch norms dislike tiny batches).
    kind : {"auto", "raw", "spd"}
        What the ``arrays`` file's ``X`` holds (:func:`manifoldnorm.data.validate_arrays`: near-symmetric
        matrices, what ``"auto"`` chooses and logs); ignored by the other sources.
    trace_norm : bool
        ``representation="cov"`` only: scale every covariance to unit trace
        (:func:`manifoldnorm.data.trace_normalize`) after estimating it.

    Attributes
    ----------
    n_channels, n_times, num_classes, num_domains : int
        Available after :meth:`setup`; :meth:`info` returns them as a dict (model configuration).
        ``n_times`` is 0 for precomputed SPD matrices and for ``.ts`` cases of unequal lengths.
    """

    def __init__(
        self,
        source: str = "simulated",
        representation: str = "cov",
        protocol: str = "auto",
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
        band: Sequence[float] | None = (8.0, 30.0),
        val_fraction: float = 0.2,
        cov_estimator: str = "oas",
        filter_order: int = 4,
        path: str | None = None,
        cache_dir: str | None = None,
        source_kwargs: Mapping[str, Any] | None = None,
        split_kwargs: Mapping[str, Any] | None = None,
        drop_last: bool = True,
        kind: str = "auto",
        trace_norm: bool = False,
    ) -> None:
        super().__init__()
        self.source = _choice(source, SOURCES, "data source")
        self.kind = _choice(kind, KINDS, "kind")
        self.representation = _choice(representation, REPRESENTATIONS, "representation")
        self.protocol = protocol
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if band is not None:
            band = tuple(float(b) for b in band)
            if len(band) != 2:
                raise ValueError(f"band must be (fmin, fmax) or null, got {band}")
        if source == "arrays" and not path:
            raise ValueError("source='arrays' needs path=<file.npz>")
        if source == "ts" and protocol not in ("auto", "official"):
            raise ValueError(f"source='ts' keeps the split of its train and test files: protocol must be 'auto' or "
                             f"'official', got {protocol!r}")
        if trace_norm and representation != "cov":
            raise ValueError("trace_norm=true scales covariance matrices: it needs representation='cov'")
        self.batch_size, self.seed, self.num_workers = batch_size, int(seed), int(num_workers)
        self.band, self.val_fraction = band, float(val_fraction)
        self.cov_estimator, self.filter_order = cov_estimator, int(filter_order)
        self.path, self.cache_dir = path, cache_dir
        self.source_kwargs = dict(source_kwargs or {})
        self.split_kwargs = dict(split_kwargs or {})
        self.drop_last = bool(drop_last)
        self.trace_norm = bool(trace_norm)
        self.ts_archive = None  # the source='ts' data set (manifoldnorm.data.TSArchive) after setup, for reports
        self.datasets: dict[str, ArrayDataset] = {}
        self.split: Mapping[str, np.ndarray] | None = None
        self._info: dict[str, Any] | None = None

    # ----------------------------------------------------------------- loading
    def _load_eeg(self) -> EEGData:
        if self.source == "simulated":
            return load_simulated(cache_dir=self.cache_dir, **self.source_kwargs)
        kwargs = dict(self.source_kwargs)
        if self.band is not None:
            kwargs.setdefault("fmin", self.band[0])
            kwargs.setdefault("fmax", self.band[1])
        return load_moabb(**kwargs)

    def _features(self) -> tuple[np.ndarray, dict[str, np.ndarray], int, int]:
        """Features, metadata (y, subject, session), number of classes and time samples."""
        if self.source == "arrays":
            return self._array_features()
        if self.source == "ts":
            return self._ts_features()
        if self.source == "simulated" and self.representation == "cov":  # the cache holds the matrices only
            cov = load_simulated_covariances(band=self.band, filter_order=self.filter_order,
                                             estimator=self.cov_estimator, cache_dir=self.cache_dir,
                                             **self.source_kwargs)
            return cov.X, {"y": cov.y, "subject": cov.subject, "session": cov.session}, cov.n_classes, cov.n_times
        data = self._load_eeg()
        meta = {"y": data.y, "subject": data.subject, "session": data.session}
        band = self.band if self.source != "moabb" else None  # MOABB filters in the loader
        return self._represent(data.X, data.sfreq, band), meta, data.n_classes, data.n_times

    def _represent(self, X: np.ndarray, sfreq: float | None, band: tuple[float, float] | None) -> np.ndarray:
        """Band-passed covariances (float64) or band-passed trials (float32), one chunk of trials at a time."""
        if self.representation == "cov":
            return bandpass_covariances(X, sfreq, band, self.filter_order, self.cov_estimator)
        if band is not None:
            X = bandpass(np.asarray(X, dtype=np.float32), sfreq, band[0], band[1], order=self.filter_order)
        return np.ascontiguousarray(X, dtype=np.float32)

    def _array_features(self) -> tuple[np.ndarray, dict[str, np.ndarray], int, int]:
        arrays = load_arrays(Path(self.path).expanduser(), kind=self.kind)
        meta = {"y": arrays.y, "domain": arrays.domain}
        if arrays.split is not None:
            meta["split"] = arrays.split
        if arrays.subject is not None and arrays.session is not None:
            meta.update(subject=arrays.subject, session=arrays.session)
        num_classes = len(arrays.class_names)
        if arrays.kind == "spd":
            if self.representation != "cov":
                raise ValueError(f"{self.path} holds SPD matrices; only representation='cov' can use them")
            return arrays.X.astype(np.float64), meta, num_classes, 0
        X, sfreq = arrays.X, arrays.sfreq
        if self.band is not None and sfreq is None:
            raise ValueError(f"{self.path}: band-pass filtering needs 'sfreq' in the file (or set band=null)")
        return self._represent(X, sfreq, self.band), meta, num_classes, int(X.shape[-1])

    def _ts_features(self) -> tuple[np.ndarray, dict[str, np.ndarray], int, int]:
        """A train and a test ``.ts`` file: covariances of every case from its own samples, the files' split."""
        archive = self.ts_archive = load_ts(**self.source_kwargs)
        lengths = archive.lengths
        equal = bool(np.all(lengths == lengths[0]))
        if self.band is not None and archive.sfreq is None:
            raise ValueError(f"{archive.files[0]}: band-pass filtering needs the sampling rate, which .ts files do "
                             f"not carry: set source_kwargs.sfreq (Hz), or band=null")
        try:  # here, to name the classes in the error
            check_split_labels(archive.split, archive.y, archive.class_names)
        except ValueError as err:
            raise ValueError(f"{self._where()}: {err}") from err
        meta = {"y": archive.y, "domain": np.zeros(len(archive), dtype=np.int64), "split": archive.split}
        if self.representation == "cov":
            X = trial_covariances(archive.trials, self.cov_estimator, archive.sfreq, self.band, self.filter_order,
                                  where=archive.where)
        elif not equal:
            raise ValueError(f"{archive.files[0]}: representation='raw' stacks the cases, but their lengths differ "
                             f"({int(lengths.min())} to {int(lengths.max())} samples); use representation='cov'")
        else:
            X = self._represent(np.stack(archive.trials).astype(np.float32), archive.sfreq, self.band)
        return X, meta, len(archive.class_names), int(lengths[0]) if equal else 0

    def _where(self) -> str:
        """The file(s) named in front of split errors."""
        if self.source == "arrays":
            return str(self.path)
        return " and ".join(str(f) for f in self.ts_archive.files)

    def prepare_data(self) -> None:
        if self.source == "moabb":  # downloads once (rank 0); setup then reads the local copy
            self._load_eeg()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        X, meta, num_classes, n_times = self._features()
        if self.trace_norm:
            X = trace_normalize(X)
        domain = meta["domain"] if "domain" in meta else domain_ids(meta["subject"], meta["session"])
        try:
            self.split = split_indices(meta, protocol=self.protocol, seed=self.seed,
                                       val_fraction=self.val_fraction, **self.split_kwargs)
        except ValueError as err:
            if self.source not in ("arrays", "ts"):
                raise
            raise ValueError(f"{self._where()}: {err}") from err
        for name, idx in self.split.items():
            idx = np.asarray(idx, dtype=np.int64)
            kind = "spd" if self.representation == "cov" else "raw"
            self.datasets[name] = ArrayDataset(X[idx], meta["y"][idx], domain[idx], kind=kind)
        self._info = {
            "n_channels": int(X.shape[1]),
            "n_times": int(n_times),
            "num_classes": int(num_classes),
            "num_domains": int(domain.max()) + 1 if len(domain) else 0,
        }

    # ----------------------------------------------------------------- metadata
    def info(self) -> dict[str, Any]:
        """``{"n_channels", "n_times", "num_classes", "num_domains"}`` (after :meth:`setup`)."""
        if self._info is None:
            raise RuntimeError("EEGDataModule.info() is available after setup()")
        return dict(self._info)

    @property
    def n_channels(self) -> int:
        return self.info()["n_channels"]

    @property
    def n_times(self) -> int:
        return self.info()["n_times"]

    @property
    def num_classes(self) -> int:
        return self.info()["num_classes"]

    @property
    def num_domains(self) -> int:
        return self.info()["num_domains"]

    # ----------------------------------------------------------------- loaders
    def _loader(self, name: str, train: bool) -> DataLoader:
        if name not in self.datasets:
            raise RuntimeError(f"EEGDataModule: call setup() before requesting the {name} loader")
        ds = self.datasets[name]
        return seeded_loader(
            ds.batched(),  # one gather per batch (BatchedView), not one indexing per trial and a stack
            train=train,
            seed=self.seed,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(len(ds), self.seed) if train else None,
            drop_last=train and self.drop_last and len(ds) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=BatchedView.collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
