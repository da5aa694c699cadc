r"""Synthetic skeleton-like rotation sequences for testing rotation networks (all results on it are synthetic).

A small seeded generator of sequences of 3D rotations, one per joint and frame, with the layout of
skeleton-based action recognition data in the Lie group representation (Huang et al., "Deep Learning on Lie
Groups for Skeleton-based Action Recognition", CVPR 2017): ``X[i, t, j]`` is the rotation of joint (or body
part pair) ``j`` at frame ``t`` of sequence ``i``. It is not a model of human motion; it only gives classes
that differ by their rotation trajectories, with nuisance variation a rotation network must tolerate.

Generative model
----------------
For class :math:`c` and joint :math:`j` a trajectory :math:`\Gamma_{cj}(\tau) = \exp(\tau\,\Omega_{cj} +
\sin(\pi\tau)\,\Psi_{cj})`, :math:`\tau \in [0, 1]`, with random axis-angle vectors :math:`\Omega_{cj}`
(magnitude 0.6–1.4 rad) and :math:`\Psi_{cj}` (magnitude 0.2–0.5 rad, a curved path). Sequence :math:`i` of
class :math:`c` is

.. math::

    X_{itj} = P_j\, G_i\, \Gamma_{cj}(\tau_{it})\, \exp(\sigma\,\xi_{itj}),\qquad
    \tau_{it} = \tau_{0,i} + a_i\, \frac{t}{T-1}\,(1 - \tau_{0,i}),

with a base pose :math:`P_j` per joint (shared by all classes), a per-sequence rotation :math:`G_i` of about
0.15 rad (subject/sensor variation), a start offset :math:`\tau_{0,i} \in [0, 0.15]`, a speed
:math:`a_i \in [0.8, 1]` and i.i.d. noise :math:`\xi_{itj} \sim \mathcal N(0, I_3)` scaled by ``noise``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from manifoldnorm.functional.so3 import so3_exp

__all__ = ["simulate_rotation_sequences"]


def _check_int(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"simulate_rotation_sequences: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _random_axis_angle(shape: tuple[int, ...], low: float, high: float, g: torch.Generator) -> Tensor:
    axis = torch.randn(*shape, 3, generator=g, dtype=torch.float64)
    axis = axis / torch.linalg.vector_norm(axis, dim=-1, keepdim=True)
    angle = low + (high - low) * torch.rand(*shape, 1, generator=g, dtype=torch.float64)
    return axis * angle


def simulate_rotation_sequences(n_classes: int = 3, n_per_class: int = 40, num_frames: int = 16,
                                num_joints: int = 5, noise: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    r"""Seeded synthetic sequences of joint rotations whose classes differ by their rotation trajectories.

    Parameters
    ----------
    n_classes : int
        Number of classes (>= 2).
    n_per_class : int
        Sequences per class.
    num_frames : int
        Frames ``T`` per sequence (>= 2).
    num_joints : int
        Joints ``J`` (rotations per frame).
    noise : float
        Standard deviation (rad, per axis) of the per-frame rotation noise.
    seed : int
        Seed of every random draw (class templates included).

    Returns
    -------
    X : Tensor, shape (N, T, J, 3, 3), float64
        Rotation matrices, ``N = n_classes * n_per_class``, in shuffled order.
    y : Tensor, shape (N,), int64
        Class labels ``0 .. n_classes - 1``.

    Notes
    -----
    Synthetic data (see the module docstring for the generative model); accuracies measured on it say nothing
    about real skeleton recordings.
    """
    _check_int(n_classes, "n_classes", 2)
    _check_int(n_per_class, "n_per_class", 1)
    T = _check_int(num_frames, "num_frames", 2)
    J = _check_int(num_joints, "num_joints", 1)
    noise = float(noise)
    if not (math.isfinite(noise) and noise >= 0.0):
        raise ValueError(f"simulate_rotation_sequences: noise must be finite and >= 0, got {noise}")
    g = torch.Generator().manual_seed(int(seed))
    omega = _random_axis_angle((n_classes, J), 0.6, 1.4, g)
    psi = _random_axis_angle((n_classes, J), 0.2, 0.5, g)
    pose = so3_exp(_random_axis_angle((J,), 0.0, math.pi * 0.9, g))

    N = n_classes * n_per_class
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    y = y[torch.randperm(N, generator=g)]
    G = so3_exp(0.15 * torch.randn(N, 1, 1, 3, generator=g, dtype=torch.float64))
    tau0 = 0.15 * torch.rand(N, 1, generator=g, dtype=torch.float64)
    speed = 0.8 + 0.2 * torch.rand(N, 1, generator=g, dtype=torch.float64)
    tau = tau0 + speed * torch.linspace(0.0, 1.0, T, dtype=torch.float64) * (1.0 - tau0)  # (N, T)
    tau = tau.unsqueeze(-1).unsqueeze(-1)  # (N, T, 1, 1)
    path = so3_exp(tau * omega[y].unsqueeze(1) + torch.sin(math.pi * tau) * psi[y].unsqueeze(1))  # (N, T, J, 3, 3)
    jitter = so3_exp(noise * torch.randn(N, T, J, 3, generator=g, dtype=torch.float64))
    X = pose @ G @ path @ jitter
    return X, y
