r"""Simulated four-class motor-imagery EEG with subject and session shifts.

All numbers obtained on this data are synthetic. The generator is a small forward model meant to
reproduce the *structure* that matters for Riemannian methods on motor-imagery EEG: class
information carried by band-power changes of localized sources, strong spatially correlated
background activity, and domain shifts between subjects and sessions that a per-domain
re-centring largely removes. It is not a physiological model and its accuracies say nothing about
real recordings.

Generative model
----------------
Channels are the 22 electrodes of BCI Competition IV-2a (:mod:`manifoldnorm.data.montage`) on a
spherical head of radius 90 mm. A trial is

.. math::
    x(t) = d \, G \big( A\, s(t) + n(t) \big),

where

* :math:`s(t)` holds the source time courses. Five *sensorimotor* sources (hand areas under C3 and
  C4, the foot area near Cz, and two lateral tongue/face sources near C5/C6) carry a rhythm with a
  μ peak (9–12 Hz) and a β peak (18–24 Hz) on top of a :math:`1/f` floor; twelve *background*
  sources at random cortical positions carry :math:`1/f^{\gamma}` activity, :math:`\gamma \in
  [1, 2]`, plus an α peak (8–12 Hz) of random strength.
* Motor imagery of class *k* is an event-related desynchronisation: the rhythm power of the
  sources of class *k* drops by a fraction :math:`e \in [0, 0.95]` (left hand → source under C4,
  right hand → under C3, feet → near Cz, tongue → both lateral sources). *e* varies by subject,
  class and trial.
* :math:`A` maps sources to electrodes with Gaussian scalp patterns of width ≈ 25 mm
  (background sources 25–45 mm).
* :math:`n(t)` is white sensor noise at ``snr_db`` (10 dB) below the mean channel power.
* :math:`G = \mathrm{diag}(g)` are channel gains (log-normal) of a session, :math:`d` a per-trial
  amplitude factor drifting slowly within a session.

Domains. A *subject* draws jittered sensorimotor source positions, its own μ/β frequencies,
rhythm strengths, ERD strength and background sources. A *session* draws channel gains, a cap
displacement (a small rotation of all sources relative to the electrodes, i.e. a small change of
:math:`A`), a new background state (source powers) and a new drift. Class labels are shuffled
within a session.

Calibration (defaults, 8–30 Hz band-pass, OAS covariances, pyRiemann ``TangentSpace`` +
``LogisticRegression`` trained on the pooled training trials of all domains, splits of
:func:`manifoldnorm.data.split_indices` with seed 0; ``launch/baseline.py`` prints them): balanced
accuracy 0.77 within session, 0.62 across sessions, and 0.80 across sessions when each domain is
re-centred to the identity (:func:`manifoldnorm.data.recenter`); averaged over data seeds 0–3:
0.77 / 0.61 / 0.77 (chance 0.25). The cross-session loss comes from the session shifts together
(channel gains, background state, cap displacement); the covariances of strongly correlated
channels make even a few percent of gain change matter.

Every random draw comes from a generator seeded by ``(seed, subject[, session])``, so a subject's
data do not depend on how many subjects are generated.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import (
    default_cache_dir,
    load_covariances,
    load_eegdata,
    params_key,
    read_entry,
    save_covariances,
    save_eegdata,
)
from .montage import BCI2A_CHANNELS, channel_positions, grid_to_sphere
from .preprocess import COV_ESTIMATORS, bandpass_covariances
from .sources import colored_noise, gaussian_patterns, peak, pink, small_rotation, spectrum_norm, tangent_jitter
from .types import EEGCovariances, EEGData

__all__ = ["CLASS_NAMES", "COVARIANCE_CACHE_FORMAT", "SimulationParams", "load_simulated",
           "load_simulated_covariances", "simulate_motor_imagery"]

log = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("left_hand", "right_hand", "feet", "tongue")
"""Class names of the simulated data, in label order."""

GENERATOR_VERSION = 1
"""Bumped whenever the generator changes its output for fixed parameters (invalidates caches)."""

COVARIANCE_CACHE_FORMAT = 1
"""Bumped whenever the layout or the computation of the cached covariances changes: part of their cache key, so
an entry of another format is never read (:func:`load_simulated_covariances`)."""

# Sensorimotor sources: (class index, lateral deg, anterior deg) on the 10-20 grid (18 deg = 10 %).
_MOTOR_SOURCES: tuple[tuple[int, float, float], ...] = (
    (0, 36.0, 0.0),  # left hand -> right hemisphere hand area, under C4
    (1, -36.0, 0.0),  # right hand -> left hemisphere hand area, under C3
    (2, 0.0, -4.0),  # feet -> medial foot area, near Cz
    (3, -56.0, 8.0),  # tongue -> lateral face/tongue areas, near C5 ...
    (3, 56.0, 8.0),  # ... and C6
)


@dataclass(frozen=True)
class SimulationParams:
    """Parameters of :func:`simulate_motor_imagery` (see there for their meaning)."""

    n_subjects: int = 5
    n_sessions: int = 2
    trials_per_class: int = 40
    sfreq: float = 128.0
    duration: float = 3.0
    n_background: int = 12
    snr_db: float = 10.0
    erd_range: tuple[float, float] = (0.5, 0.8)
    erd_trial_std: float = 0.35
    rhythm_power_range: tuple[float, float] = (1.0, 3.0)
    source_width_mm: float = 25.0
    subject_jitter_mm: float = 8.0
    session_gain_std: float = 0.04
    session_shift_mm: float = 6.0
    session_state_std: float = 0.4
    trial_power_std: float = 0.3
    drift_std: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # canonical types, so equal parameters hash equally
            value = getattr(self, f.name)
            if f.type == "float" and isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
            elif f.type == "tuple[float, float]":
                if len(value) != 2:
                    raise ValueError(f"{f.name} must be a (low, high) pair, got {value!r}")
                object.__setattr__(self, f.name, (float(value[0]), float(value[1])))
            elif f.type == "int" and isinstance(value, np.integer):
                object.__setattr__(self, f.name, int(value))
        for name in ("n_subjects", "n_sessions", "trials_per_class", "n_background"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not self.sfreq >= 64.0:
            raise ValueError(f"sfreq must be at least 64 Hz to hold the 8-30 Hz rhythms, got {self.sfreq}")
        if not self.duration > 0:
            raise ValueError(f"duration must be positive, got {self.duration}")
        for name in ("erd_range", "rhythm_power_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must satisfy 0 <= low <= high, got {(lo, hi)}")
        if self.erd_range[1] >= 1:
            raise ValueError(f"erd_range must lie in [0, 1), got {self.erd_range}")
        for name in (
            "erd_trial_std", "source_width_mm", "subject_jitter_mm", "session_gain_std",
            "session_shift_mm", "session_state_std", "trial_power_std", "drift_std",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if not self.source_width_mm > 0:
            raise ValueError("source_width_mm must be positive")

    def to_dict(self) -> dict:
        """Plain-Python dict of the parameters (JSON-serialisable)."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = [float(v) for v in value]
        return out


def _subject_model(p: SimulationParams, subject: int) -> dict:
    """Draw the subject-level model: source positions, spectra, ERD strengths."""
    rng = np.random.default_rng([p.seed, 1, subject])
    base = np.array([[lat, ant] for _, lat, ant in _MOTOR_SOURCES])
    motor_dirs = tangent_jitter(rng, grid_to_sphere(base[:, 0], base[:, 1]), p.subject_jitter_mm)
    n_motor = len(_MOTOR_SOURCES)
    cos_theta = rng.uniform(np.cos(np.deg2rad(80.0)), 1.0, p.n_background)
    phi = rng.uniform(0.0, 2 * np.pi, p.n_background)
    sin_theta = np.sqrt(1 - cos_theta**2)
    bg_dirs = np.stack([sin_theta * np.cos(phi), sin_theta * np.sin(phi), cos_theta], axis=-1)
    erd_subject = rng.uniform(*p.erd_range)
    return {
        "dirs": np.concatenate([motor_dirs, bg_dirs]),
        "widths": np.concatenate(
            [p.source_width_mm * np.exp(0.1 * rng.standard_normal(n_motor)),
             rng.uniform(p.source_width_mm, 1.8 * p.source_width_mm, p.n_background)]
        ),
        "mu": rng.uniform(9.0, 12.0) + 0.3 * rng.standard_normal(n_motor),
        "beta": rng.uniform(18.0, 24.0) + 0.5 * rng.standard_normal(n_motor),
        "rhythm_power": rng.uniform(*p.rhythm_power_range, n_motor),
        "erd": np.clip(erd_subject * rng.uniform(0.8, 1.2, len(CLASS_NAMES)), 0.0, 0.95),
        "bg_exponent": rng.uniform(1.0, 2.0, p.n_background),
        "bg_alpha": rng.uniform(8.0, 12.0, p.n_background),
        "bg_alpha_power": rng.uniform(0.0, 3.0, p.n_background),
        "bg_power": np.exp(rng.uniform(np.log(0.5), np.log(2.0), p.n_background)),
    }


def _session_trials(p: SimulationParams, model: dict, subject: int, session: int) -> tuple:
    """Simulate one session of one subject -> (X (N, C, T) float32, y (N,))."""
    rng = np.random.default_rng([p.seed, 2, subject, session])
    n_motor = len(_MOTOR_SOURCES)
    n_classes = len(CLASS_NAMES)
    n_trials = n_classes * p.trials_per_class
    n_times = int(round(p.duration * p.sfreq))
    pad = int(round(0.5 * p.sfreq))
    n_fft = n_times + 2 * pad
    freqs = np.fft.rfftfreq(n_fft, d=1.0 / p.sfreq)
    y = rng.permutation(np.repeat(np.arange(n_classes), p.trials_per_class))

    # Session: gains, cap displacement, background state.
    gains = np.exp(p.session_gain_std * rng.standard_normal(len(BCI2A_CHANNELS)))
    dirs = model["dirs"] @ small_rotation(rng, p.session_shift_mm).T
    mixing = gaussian_patterns(dirs, model["widths"], channel_positions(unit="mm"))
    bg_power = model["bg_power"] * np.exp(p.session_state_std * rng.standard_normal(p.n_background))
    rhythm_power = model["rhythm_power"] * np.exp(0.1 * rng.standard_normal(n_motor))

    # Sensorimotor sources: 1/f floor + (mu + beta) rhythm; ERD scales the rhythm power.
    floor = colored_noise(rng, spectrum_norm(pink(freqs, np.ones(n_motor)), n_fft), n_trials, n_fft)
    rhythm_amp = peak(freqs, model["mu"], 1.0) + 0.6 * peak(freqs, model["beta"], 2.0)
    rhythm = colored_noise(rng, spectrum_norm(rhythm_amp, n_fft), n_trials, n_fft)
    source_class = np.array([k for k, _, _ in _MOTOR_SOURCES])
    active = source_class[None, :] == y[:, None]  # (N, n_motor)
    erd = model["erd"][y][:, None] * np.exp(p.erd_trial_std * rng.standard_normal((n_trials, n_motor)))
    keep = np.where(active, 1.0 - np.clip(erd, 0.0, 0.95), 1.0)
    jitter = np.exp(p.trial_power_std * rng.standard_normal((n_trials, n_motor)))
    motor = floor + np.sqrt(rhythm_power[None, :, None] * keep[..., None] * jitter[..., None]) * rhythm

    # Background sources: 1/f^gamma + alpha peak, per-trial power jitter.
    bg_amp = spectrum_norm(pink(freqs, model["bg_exponent"]), n_fft) + np.sqrt(
        model["bg_alpha_power"][:, None]
    ) * spectrum_norm(peak(freqs, model["bg_alpha"], 1.0), n_fft)
    background = colored_noise(rng, bg_amp, n_trials, n_fft)
    bg_scale = bg_power[None, :] * np.exp(p.trial_power_std * rng.standard_normal((n_trials, p.n_background)))
    background *= np.sqrt(bg_scale)[..., None]

    sources = np.concatenate([motor, background], axis=1)[..., pad : pad + n_times]
    signal = np.einsum("cs,nst->nct", mixing, sources)
    noise_var = signal.var(axis=-1).mean(axis=0) / 10.0 ** (p.snr_db / 10.0)
    noise = rng.standard_normal(signal.shape) * np.sqrt(noise_var)[None, :, None]

    # Slow amplitude drift over the session (random walk, normalised) plus trial jitter.
    walk = np.cumsum(rng.standard_normal(n_trials))
    walk = (walk - walk.mean()) / (walk.std() + 1e-12)
    drift = np.exp(p.drift_std * (0.8 * walk + 0.6 * rng.standard_normal(n_trials)))
    X = _MICROVOLT_SCALE * drift[:, None, None] * gains[None, :, None] * (signal + noise)
    return X.astype(np.float32), y


_MICROVOLT_SCALE = 5.0  # puts channel standard deviations around 10-20 microvolts


def simulate_motor_imagery(
    n_subjects: int = 5,
    n_sessions: int = 2,
    trials_per_class: int = 40,
    sfreq: float = 128.0,
    seed: int = 0,
    **kwargs: float,
) -> EEGData:
    """Simulate multi-subject, multi-session four-class motor-imagery EEG.

    See the module docstring for the generative model. Runs in about a second for the defaults.

    Parameters
    ----------
    n_subjects, n_sessions : int
        Number of subjects and of sessions per subject.
    trials_per_class : int
        Trials of each class in every session.
    sfreq : float
        Sampling frequency in Hz (≥ 64).
    seed : int
        Seed of every random draw.
    **kwargs
        Further fields of :class:`SimulationParams`: ``duration`` (s, default 3), ``n_background``,
        ``snr_db``, ``erd_range`` (fraction of rhythm power removed, per subject), ``erd_trial_std``,
        ``rhythm_power_range``, ``source_width_mm``, ``subject_jitter_mm``, ``session_gain_std``
        (log-std of channel gains), ``session_shift_mm`` (cap displacement), ``session_state_std``
        (log-std of background powers), ``trial_power_std``, ``drift_std``.

    Returns
    -------
    EEGData
        ``X`` of shape (n_subjects · n_sessions · 4 · trials_per_class, 22, round(duration · sfreq)),
        float32 in microvolt-like units; subjects ``0 .. n_subjects-1``, sessions
        ``0 .. n_sessions-1``; classes :data:`CLASS_NAMES`.
    """
    params = _make_params(
        n_subjects=n_subjects, n_sessions=n_sessions, trials_per_class=trials_per_class, sfreq=sfreq,
        seed=seed, **kwargs,
    )
    return _simulate(params)


def _sessions(params: SimulationParams) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """``(subject, session, X, y)`` of every session in order; one session's trials in memory at a time."""
    for subject in range(params.n_subjects):
        model = _subject_model(params, subject)
        for session in range(params.n_sessions):
            X, y = _session_trials(params, model, subject, session)
            yield subject, session, X, y


def _describe(params: SimulationParams) -> dict:
    return {"generator": "simulate_motor_imagery", "version": GENERATOR_VERSION, "params": params.to_dict()}


def _simulate(params: SimulationParams) -> EEGData:
    xs, ys, subjects, sessions = [], [], [], []
    for subject, session, X, y in _sessions(params):
        xs.append(X)
        ys.append(y)
        subjects.append(np.full(len(y), subject))
        sessions.append(np.full(len(y), session))
    return EEGData(
        X=np.concatenate(xs),
        y=np.concatenate(ys),
        subject=np.concatenate(subjects),
        session=np.concatenate(sessions),
        sfreq=params.sfreq,
        ch_names=list(BCI2A_CHANNELS),
        class_names=list(CLASS_NAMES),
        info=_describe(params),
    )


def _make_params(**kwargs: object) -> SimulationParams:
    valid = {f.name for f in dataclasses.fields(SimulationParams)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(f"unknown simulation parameters {unknown}; valid parameters are {sorted(valid)}")
    return SimulationParams(**kwargs)  # type: ignore[arg-type]


def _n_trials(params: SimulationParams) -> int:
    return params.n_subjects * params.n_sessions * len(CLASS_NAMES) * params.trials_per_class


def _n_times(params: SimulationParams) -> int:
    return int(round(params.duration * params.sfreq))


def _folder(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _store(path: Path, save, data) -> None:  # noqa: ANN001 - save_eegdata / save_covariances and their data
    try:
        save(path, data)
    except OSError as err:
        warnings.warn(f"could not write the simulation cache {path}: {err}", RuntimeWarning, stacklevel=3)


def load_simulated(
    cache_dir: str | os.PathLike | None = None, refresh: bool = False, **kwargs: object
) -> EEGData:
    """:func:`simulate_motor_imagery` with an on-disk cache.

    The cache entry is ``<cache_dir>/simulated_mi_<hash>.npz`` (raw float32 trials), keyed by a hash of the
    generator version and all parameters. A missing entry is generated; an unreadable or inconsistent one is
    regenerated with a logged warning; writes are atomic. If the cache folder is not writable the data are
    returned with a warning. Covariance-based runs read :func:`load_simulated_covariances` instead, whose entry
    holds only the matrices.

    Parameters
    ----------
    cache_dir : path, optional
        Cache folder; default ``$MANIFOLDNORM_CACHE`` or ``~/.cache/manifoldnorm``.
    refresh : bool
        Regenerate and overwrite the entry even if it is readable.
    **kwargs
        Parameters of :func:`simulate_motor_imagery` (``n_subjects``, ``seed``, ...).

    Returns
    -------
    EEGData
    """
    params = _make_params(**kwargs)
    desc = _describe(params)
    path = _folder(cache_dir) / f"simulated_mi_{params_key(desc)}.npz"
    if not refresh and (data := _read_raw(path, params)) is not None:
        return data
    data = _simulate(params)
    _store(path, save_eegdata, data)
    return data


def _read_raw(path: Path, params: SimulationParams) -> EEGData | None:
    expected = (_n_trials(params), len(BCI2A_CHANNELS), _n_times(params))
    return read_entry(path, load_eegdata, _describe(params),
                      lambda d: None if d.X.shape == expected else f"X has shape {d.X.shape}, expected {expected}")


def load_simulated_covariances(
    band: Sequence[float] | None = (8.0, 30.0),
    filter_order: int = 4,
    estimator: str = "oas",
    cache_dir: str | os.PathLike | None = None,
    refresh: bool = False,
    chunk_size: int | None = None,
    **kwargs: object,
) -> EEGCovariances:
    """Band-pass filtered covariance matrices of the simulated trials, with an on-disk cache of the matrices only.

    Equal, value for value, to ``covariances(bandpass(load_simulated(...).X, sfreq, *band, filter_order),
    estimator)``: each chunk of trials is filtered in float64, rounded to float32 (as :func:`bandpass` returns
    float32 trials) and reduced to its covariances (:func:`~manifoldnorm.data.bandpass_covariances`).

    The entry is ``<cache_dir>/simulated_mi_cov_<hash>.npz``, keyed by a hash of the generator version, the
    simulation parameters, ``band``, ``filter_order``, ``estimator`` and :data:`COVARIANCE_CACHE_FORMAT`; it holds
    the ``(N, C, C)`` float64 matrices and the labels (20 MB for the ``spd_eeg`` experiment, against 175 MB of
    raw trials). On a miss the matrices are computed from the raw entry of :func:`load_simulated` if one is
    cached, else by simulating one session at a time (the raw trials are neither kept nor written). An
    unreadable entry, or one that describes other data, is rebuilt with a logged warning; writes are atomic; an
    unwritable cache folder gives a warning and the data.

    Parameters
    ----------
    band : (fmin, fmax) or None
        Band-pass edges in Hz; ``None`` skips the filter.
    filter_order : int
        Butterworth order of :func:`~manifoldnorm.data.bandpass`.
    estimator : {"oas", "scm", "lwf"}
        Covariance estimator (:func:`~manifoldnorm.data.covariances`).
    cache_dir : path, optional
        Cache folder; default ``$MANIFOLDNORM_CACHE`` or ``~/.cache/manifoldnorm``.
    refresh : bool
        Recompute and overwrite the entry even if it is readable.
    chunk_size : int, optional
        Trials filtered at a time (memory only; the result does not depend on it).
    **kwargs
        Parameters of :func:`simulate_motor_imagery`.

    Returns
    -------
    EEGCovariances
    """
    params = _make_params(**kwargs)
    if estimator not in COV_ESTIMATORS:
        raise ValueError(f"unknown covariance estimator {estimator!r}; valid names are {list(COV_ESTIMATORS)}")
    if band is not None:
        band = tuple(float(b) for b in band)
        if len(band) != 2:
            raise ValueError(f"band must be (fmin, fmax) or None, got {band}")
    if isinstance(filter_order, bool) or int(filter_order) != filter_order or filter_order < 1:
        raise ValueError(f"filter_order must be a positive integer, got {filter_order!r}")
    features = {"kind": "covariances", "format": COVARIANCE_CACHE_FORMAT, "band": None if band is None else list(band),
                "filter_order": int(filter_order), "estimator": estimator, "dtype": "float64"}
    desc = {**_describe(params), "features": features}
    folder = _folder(cache_dir)
    path = folder / f"simulated_mi_cov_{params_key(desc)}.npz"
    n, c = _n_trials(params), len(BCI2A_CHANNELS)

    def check(d: EEGCovariances) -> str | None:
        if d.X.shape != (n, c, c) or d.n_times != _n_times(params):
            return f"X has shape {d.X.shape} from {d.n_times} samples, expected {(n, c, c)} from {_n_times(params)}"
        return None

    if not refresh and (data := read_entry(path, load_covariances, desc, check)) is not None:
        return data

    def reduce(X: np.ndarray) -> np.ndarray:
        return bandpass_covariances(X, params.sfreq, band, int(filter_order), estimator, chunk_size=chunk_size)

    raw_path = folder / f"simulated_mi_{params_key(_describe(params))}.npz"
    raw = _read_raw(raw_path, params) if raw_path.exists() else None
    if raw is not None:
        X, y, subject, session = reduce(raw.X), raw.y, raw.subject, raw.session
        del raw
    else:
        parts = [(reduce(Xs), ys, np.full(len(ys), s), np.full(len(ys), k)) for s, k, Xs, ys in _sessions(params)]
        X, y, subject, session = (np.concatenate(a) for a in zip(*parts, strict=True))
    data = EEGCovariances(X=X, y=y, subject=subject, session=session, sfreq=params.sfreq, n_times=_n_times(params),
                          ch_names=list(BCI2A_CHANNELS), class_names=list(CLASS_NAMES), info=desc)
    _store(path, save_covariances, data)
    return data
