"""Building blocks of the simulated EEG forward model: coloured Gaussian sources, scalp patterns."""

from __future__ import annotations

import numpy as np

from .montage import HEAD_RADIUS_MM

__all__ = [
    "colored_noise",
    "gaussian_patterns",
    "peak",
    "pink",
    "small_rotation",
    "spectrum_norm",
    "tangent_jitter",
]


def spectrum_norm(amp: np.ndarray, n: int) -> np.ndarray:
    """Scale rfft amplitude responses (..., n//2+1) so the synthesised process has unit variance."""
    power = amp**2
    weights = np.full(power.shape[-1], 2.0)
    weights[0] = 1.0
    if n % 2 == 0:
        weights[-1] = 1.0
    var = (power * weights).sum(-1, keepdims=True) / n
    return amp / np.sqrt(var)


def colored_noise(rng: np.random.Generator, amp: np.ndarray, n_trials: int, n: int) -> np.ndarray:
    """Gaussian processes with rfft amplitude response ``amp`` (S, n//2+1) -> (n_trials, S, n)."""
    white = rng.standard_normal((n_trials, amp.shape[0], n))
    return np.fft.irfft(np.fft.rfft(white, axis=-1) * amp, n=n, axis=-1)


def pink(freqs: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """Amplitude response of 1/f^exponent power (S, F), flattened below 1 Hz."""
    return (np.maximum(freqs, 1.0)[None, :]) ** (-exponent[:, None] / 2.0)


def peak(freqs: np.ndarray, centre: np.ndarray, width: float) -> np.ndarray:
    """Gaussian power peak (S, F) -> its amplitude response."""
    return np.exp(-((freqs[None, :] - centre[:, None]) ** 2) / (4.0 * width**2))


def tangent_jitter(rng: np.random.Generator, dirs: np.ndarray, sd_mm: float) -> np.ndarray:
    """Move unit vectors (S, 3) by a random tangential displacement of ``sd_mm`` per axis."""
    step = rng.standard_normal(dirs.shape) * (sd_mm / HEAD_RADIUS_MM)
    step -= (step * dirs).sum(-1, keepdims=True) * dirs
    out = dirs + step
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def small_rotation(rng: np.random.Generator, sd_mm: float) -> np.ndarray:
    """Rotation matrix about a random horizontal axis, angle ~ N(0, sd_mm / R)."""
    axis = np.array([*rng.standard_normal(2), 0.0])
    axis /= np.linalg.norm(axis)
    angle = rng.standard_normal() * sd_mm / HEAD_RADIUS_MM
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def gaussian_patterns(dirs: np.ndarray, widths: np.ndarray, electrodes_mm: np.ndarray) -> np.ndarray:
    """Gaussian scalp patterns, electrodes (C, 3) mm, sources (S, 3) unit -> mixing (C, S)."""
    d2 = ((electrodes_mm[:, None, :] - HEAD_RADIUS_MM * dirs[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2.0 * widths[None, :] ** 2))
