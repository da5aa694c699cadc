"""Data for manifoldnorm: simulated and MOABB motor-imagery EEG, preprocessing, splits, array datasets.

No Lightning or Hydra here; MOABB/MNE are imported lazily by :func:`load_moabb` only.
"""

from .arrays import ArrayDataset, ValidatedArrays, load_arrays, validate_arrays
from .cache import default_cache_dir
from .moabb import load_moabb
from .montage import BCI2A_CHANNELS, channel_positions, channel_positions_2d
from .preprocess import COV_ESTIMATORS, bandpass, covariances, recenter, riemannian_mean
from .rotations import simulate_rotation_sequences
from .simulate import CLASS_NAMES, SimulationParams, load_simulated, simulate_motor_imagery
from .splits import PROTOCOLS, Split, split_indices, target_domains
from .types import EEGData, domain_ids

__all__ = [
    "simulate_rotation_sequences",
    "BCI2A_CHANNELS",
    "CLASS_NAMES",
    "COV_ESTIMATORS",
    "PROTOCOLS",
    "ArrayDataset",
    "EEGData",
    "SimulationParams",
    "Split",
    "ValidatedArrays",
    "bandpass",
    "channel_positions",
    "channel_positions_2d",
    "covariances",
    "default_cache_dir",
    "domain_ids",
    "load_arrays",
    "load_moabb",
    "load_simulated",
    "recenter",
    "riemannian_mean",
    "simulate_motor_imagery",
    "split_indices",
    "target_domains",
    "validate_arrays",
]
