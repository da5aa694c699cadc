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
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import CACHE_READ_ERRORS, default_cache_dir, load_eegdata, params_key, save_eegdata
from .montage import BCI2A_CHANNELS, channel_positions, grid_to_sphere
from .sources import colored_noise, gaussian_patterns, peak, pink, small_rotation, spectrum_norm, tangent_jitter
from .types import EEGData

__all__ = ["CLASS_NAMES", "SimulationParams", "load_simulated", "simulate_motor_imagery"]

CLASS_NAMES: tuple[str, ...] = ("left_hand", "right_hand", "feet", "tongue")
"""Class names of the simulated data, in label order."""

GENERATOR_VERSION = 1
"""Bumped whenever the generator changes its output for fixed parameters (invalidates caches)."""

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


def _simulate(params: SimulationParams) -> EEGData:
    xs, ys, subjects, sessions = [], [], [], []
    for subject in range(params.n_subjects):
        model = _subject_model(params, subject)
        for session in range(params.n_sessions):
            X, y = _session_trials(params, model, subject, session)
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
        info={"generator": "simulate_motor_imagery", "version": GENERATOR_VERSION,
              "params": params.to_dict()},
    )


def _make_params(**kwargs: object) -> SimulationParams:
    valid = {f.name for f in dataclasses.fields(SimulationParams)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(f"unknown simulation parameters {unknown}; valid parameters are {sorted(valid)}")
    return SimulationParams(**kwargs)  # type: ignore[arg-type]


def load_simulated(
    cache_dir: str | os.PathLike | None = None, refresh: bool = False, **kwargs: object
) -> EEGData:
    """:func:`simulate_motor_imagery` with an on-disk cache.

    The cache entry is ``<cache_dir>/simulated_mi_<hash>.npz``, keyed by a hash of the generator
    version and all parameters. A missing, unreadable or inconsistent entry is regenerated; writes
    are atomic. If the cache folder is not writable the data are returned with a warning.

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
    desc = {"generator": "simulate_motor_imagery", "version": GENERATOR_VERSION, "params": params.to_dict()}
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = folder / f"simulated_mi_{params_key(desc)}.npz"
    if path.exists() and not refresh:
        try:
            data = load_eegdata(path)
            expected = (params.n_subjects * params.n_sessions * len(CLASS_NAMES) * params.trials_per_class,
                        len(BCI2A_CHANNELS), int(round(params.duration * params.sfreq)))
            if data.info == desc and data.X.shape == expected:
                return data
        except CACHE_READ_ERRORS:
            pass
    data = _simulate(params)
    try:
        save_eegdata(path, data)
    except OSError as err:
        warnings.warn(f"could not write the simulation cache {path}: {err}", RuntimeWarning, stacklevel=2)
    return data
