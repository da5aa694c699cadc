"""Approximate 10-20 electrode positions of the 22-channel BCI Competition IV-2a montage.

Positions are written on a spherical head of radius :data:`HEAD_RADIUS_MM`. Each electrode is placed
from its 10-20 grid coordinates: one 10 % step of the nasion–inion or preauricular arc is 18° of
polar angle from the vertex (Cz). The map from the grid to the sphere is the azimuthal equidistant
one (polar angle = distance from Cz on the grid), which is accurate to a few millimetres over the
central region covered by this montage. Coordinates: x to the right ear, y to the nasion, z up.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "BCI2A_CHANNELS",
    "HEAD_RADIUS_MM",
    "channel_positions",
    "channel_positions_2d",
    "grid_to_sphere",
]

HEAD_RADIUS_MM = 90.0
"""Radius of the spherical head model in millimetres."""

# (lateral, anterior) position in degrees of arc from Cz; one 10 % step = 18 degrees.
_GRID_DEG: dict[str, tuple[float, float]] = {
    "Fz": (0.0, 36.0),
    "FC3": (-36.0, 18.0),
    "FC1": (-18.0, 18.0),
    "FCz": (0.0, 18.0),
    "FC2": (18.0, 18.0),
    "FC4": (36.0, 18.0),
    "C5": (-54.0, 0.0),
    "C3": (-36.0, 0.0),
    "C1": (-18.0, 0.0),
    "Cz": (0.0, 0.0),
    "C2": (18.0, 0.0),
    "C4": (36.0, 0.0),
    "C6": (54.0, 0.0),
    "CP3": (-36.0, -18.0),
    "CP1": (-18.0, -18.0),
    "CPz": (0.0, -18.0),
    "CP2": (18.0, -18.0),
    "CP4": (36.0, -18.0),
    "P1": (-17.0, -36.0),
    "Pz": (0.0, -36.0),
    "P2": (17.0, -36.0),
    "POz": (0.0, -54.0),
}

BCI2A_CHANNELS: tuple[str, ...] = tuple(_GRID_DEG)
"""The 22 EEG channel names of BCI Competition IV dataset 2a, in recording order."""


def grid_to_sphere(lateral_deg: np.ndarray, anterior_deg: np.ndarray) -> np.ndarray:
    """Unit vectors for 10-20 grid coordinates (azimuthal equidistant projection around Cz).

    Parameters
    ----------
    lateral_deg, anterior_deg : array_like, shape (...)
        Arc distance from Cz towards the right ear / the nasion, in degrees.

    Returns
    -------
    ndarray, shape (..., 3)
        Unit vectors ``(x, y, z)`` with z towards the vertex.
    """
    lat = np.deg2rad(np.asarray(lateral_deg, dtype=np.float64))
    ant = np.deg2rad(np.asarray(anterior_deg, dtype=np.float64))
    theta = np.hypot(lat, ant)
    phi = np.arctan2(ant, lat)
    return np.stack(
        [np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], axis=-1
    )


def _check_names(ch_names: list[str] | tuple[str, ...] | None) -> list[str]:
    names = list(BCI2A_CHANNELS if ch_names is None else ch_names)
    unknown = [c for c in names if c not in _GRID_DEG]
    if unknown:
        raise ValueError(f"unknown channel names {unknown}; valid names are {list(BCI2A_CHANNELS)}")
    return names


def channel_positions(
    ch_names: list[str] | tuple[str, ...] | None = None, unit: str = "mm"
) -> np.ndarray:
    """3-D electrode positions on the spherical head.

    Parameters
    ----------
    ch_names : list of str, optional
        Channels to return (default: all 22 of :data:`BCI2A_CHANNELS`, in that order).
    unit : {"mm", "unit"}
        Millimetres on a head of radius :data:`HEAD_RADIUS_MM`, or unit-sphere coordinates.

    Returns
    -------
    ndarray, shape (C, 3)
    """
    names = _check_names(ch_names)
    if unit not in ("mm", "unit"):
        raise ValueError(f"unknown unit {unit!r}; valid units are ['mm', 'unit']")
    grid = np.array([_GRID_DEG[c] for c in names], dtype=np.float64)
    pos = grid_to_sphere(grid[:, 0], grid[:, 1])
    return pos * HEAD_RADIUS_MM if unit == "mm" else pos


def channel_positions_2d(ch_names: list[str] | tuple[str, ...] | None = None) -> np.ndarray:
    """2-D topographic layout: grid coordinates scaled so that the preauricular points lie at ±1.

    Returns
    -------
    ndarray, shape (C, 2)
        ``(x, y)`` with x to the right and y to the nose.
    """
    names = _check_names(ch_names)
    return np.array([_GRID_DEG[c] for c in names], dtype=np.float64) / 90.0
