"""Data for manifoldnorm: simulated and MOABB motor-imagery EEG, preprocessing, splits, array datasets,
multivariate time-series archives (``.ts`` files); character-level text and small image classification sets.

No Lightning or Hydra here; MOABB/MNE are imported lazily by :func:`load_moabb` only, scikit-learn by
:func:`load_digits_images`, Pillow by :func:`load_image_folder` and SciPy by the band-pass filter.
"""

from .arrays import ArrayDataset, ValidatedArrays, load_arrays, validate_arrays
from .cache import default_cache_dir
from .images import (
    ImageDataset,
    Images,
    load_digits_images,
    load_image_arrays,
    load_image_folder,
    stratified_split,
)
from .moabb import load_moabb
from .montage import BCI2A_CHANNELS, channel_positions, channel_positions_2d
from .preprocess import (
    CHUNK_TRIALS,
    COV_ESTIMATORS,
    bandpass,
    bandpass_covariances,
    covariances,
    recenter,
    riemannian_mean,
    trace_normalize,
)
from .rotations import simulate_rotation_sequences
from .simulate import (
    CLASS_NAMES,
    COVARIANCE_CACHE_FORMAT,
    SimulationParams,
    load_simulated,
    load_simulated_covariances,
    simulate_motor_imagery,
)
from .splits import PROTOCOLS, SPLIT_LABELS, SPLIT_PROTOCOLS, Split, check_split_labels, split_indices, target_domains
from .text import (
    CORPUS_PARTS,
    TEXT_SOURCES,
    CharVocab,
    CharWindows,
    RandomWindowSampler,
    corpus_parts,
    eval_starts,
    load_corpus,
    load_text,
    split_text,
)
from .ts import (
    TS_MISSING,
    TSArchive,
    TSFile,
    bundled_archives,
    load_ts,
    read_ts,
    trial_covariances,
    ts_archive_files,
)
from .types import EEGCovariances, EEGData, domain_ids

__all__ = [
    "simulate_rotation_sequences",
    "BCI2A_CHANNELS",
    "CHUNK_TRIALS",
    "CLASS_NAMES",
    "COVARIANCE_CACHE_FORMAT",
    "COV_ESTIMATORS",
    "PROTOCOLS",
    "SPLIT_LABELS",
    "SPLIT_PROTOCOLS",
    "check_split_labels",
    "ArrayDataset",
    "EEGCovariances",
    "EEGData",
    "SimulationParams",
    "Split",
    "ValidatedArrays",
    "bandpass",
    "bandpass_covariances",
    "channel_positions",
    "channel_positions_2d",
    "covariances",
    "default_cache_dir",
    "domain_ids",
    "load_arrays",
    "load_moabb",
    "load_simulated",
    "load_simulated_covariances",
    "recenter",
    "riemannian_mean",
    "trace_normalize",
    "TS_MISSING",
    "TSArchive",
    "TSFile",
    "bundled_archives",
    "load_ts",
    "read_ts",
    "trial_covariances",
    "ts_archive_files",
    "simulate_motor_imagery",
    "split_indices",
    "target_domains",
    "validate_arrays",
    "TEXT_SOURCES",
    "CORPUS_PARTS",
    "CharVocab",
    "CharWindows",
    "RandomWindowSampler",
    "corpus_parts",
    "eval_starts",
    "load_corpus",
    "load_text",
    "split_text",
    "ImageDataset",
    "Images",
    "load_digits_images",
    "load_image_arrays",
    "load_image_folder",
    "stratified_split",
]
