r"""LieNet-style classifier of rotation sequences with a Lie group batch-norm slot."""

from __future__ import annotations

from typing import Any

import geoopt
import torch
from torch import Tensor, nn

from manifoldnorm.functional.so3 import check_rotation, left_mul, mean_so3, so3_exp, so3_log
from manifoldnorm.manifolds import SpecialOrthogonal
from manifoldnorm.nn.registry import IdentityNorm, NormSpec, create_norm_layer

from ._stages import check_dims, no_autocast

__all__ = ["SO3Net", "RotMap", "RotPooling", "POOLINGS"]

POOLINGS: tuple[str, ...] = ("max_angle", "mean", "none")


class RotMap(nn.Module):
    r"""Rotation mapping layer: :math:`X_{j} \mapsto W_{jk} X_{j}` with learnable rotations (LieNet RotMap).

    Huang, Wu & Van Gool, "Deep Learning on Lie Groups for Skeleton-based Action Recognition", CVPR 2017
    (RotMap layer). Each input feature (joint) ``j`` is left-multiplied by ``channels`` rotations
    :math:`W_{jk}` (a :class:`geoopt.ManifoldParameter` on
    :class:`~manifoldnorm.manifolds.SpecialOrthogonal`), shared over frames.

    ``forward``: ``(N, T, J, 3, 3)`` -> ``(N, T, J * channels, 3, 3)`` (feature index ``j * channels + k``).

    Notes
    -----
    The weights start at :math:`\exp(\hat\omega)` with :math:`\omega \sim \mathcal N(0, \text{init_std}^2 I)`
    (``torch``'s global generator), i.e. near the identity.
    """

    def __init__(self, num_features: int, channels: int = 1, init_std: float = 0.1,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.num_features, self.channels = num_features, channels
        w = so3_exp(float(init_std) * torch.randn(num_features * channels, 3, dtype=dtype))
        self.weight = geoopt.ManifoldParameter(w, manifold=SpecialOrthogonal())

    def forward(self, x: Tensor) -> Tensor:
        if self.channels > 1:
            x = x.repeat_interleave(self.channels, dim=2)
        return left_mul(self.weight.to(x.dtype), x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, channels={self.channels}"


class RotPooling(nn.Module):
    r"""Temporal pooling of rotations over non-overlapping windows of ``size`` frames.

    * ``'max_angle'``: per window and feature, the rotation with the largest rotation angle (smallest trace),
      LieNet's max pooling of rotations (Huang et al. 2017, RotPooling, temporal variant);
    * ``'mean'``: the Karcher mean of the window (3 iterations from the chordal mean, differentiable through the
      iterations);
    * ``'none'``: identity.

    ``forward``: ``(N, T, F, 3, 3)`` -> ``(N, T // size, F, 3, 3)``; trailing frames that do not fill a window
    are dropped.
    """

    def __init__(self, mode: str = "max_angle", size: int = 2) -> None:
        super().__init__()
        if mode not in POOLINGS:
            raise ValueError(f"RotPooling: unknown pooling {mode!r}; valid names: {', '.join(POOLINGS)}")
        (self.size,) = check_dims((size,), "RotPooling size")
        self.mode = mode

    def output_frames(self, frames: int) -> int:
        return frames if self.mode == "none" else frames // self.size

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "none" or self.size == 1:
            return x
        N, T, F = x.shape[:3]
        k = self.size
        w = x[:, : (T // k) * k].reshape(N, T // k, k, F, 3, 3)
        if self.mode == "mean":
            return mean_so3(w, dim=2, steps=3, tol=0.0)
        trace = torch.diagonal(w.detach(), dim1=-2, dim2=-1).sum(-1)  # (N, T', k, F)
        idx = trace.argmin(dim=2, keepdim=True)  # largest angle
        idx = idx.unsqueeze(-1).unsqueeze(-1).expand(N, T // k, 1, F, 3, 3)
        return torch.gather(w, 2, idx).squeeze(2)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, size={self.size}"


class SO3Net(nn.Module):
    r"""LieNet-style network: ``RotMap -> norm -> RotPooling -> LogMap -> ReLU -> Linear``.

    Huang, Wu & Van Gool, "Deep Learning on Lie Groups for Skeleton-based Action Recognition", CVPR 2017, one
    RotMap/RotPooling block, with the batch-norm slot of LieBN (Chen et al., ICLR 2024) after the RotMap layer.
    The LogMap layer maps each rotation to its axis-angle vector (:func:`manifoldnorm.functional.so3.so3_log`).

    Parameters
    ----------
    num_joints : int
        Rotations per frame ``J`` (joints or body-part pairs).
    num_frames : int
        Frames ``T`` per sequence.
    num_classes : int
    rot_channels : int
        RotMap rotations per joint (features ``F = J * rot_channels``).
    norm_layer : str, class, functools.partial or None
        A norm accepting SO(3) inputs (``'liebn_so3'``), built as ``factory(F, **norm_kwargs)``; ``None`` or
        ``'none'`` for no normalization. It receives ``(N * T, F, 3, 3)``: statistics are pooled over samples
        and frames, one set per feature (the LieBN toolbox's ``batchdim=[0, 1]``).
    pooling : {'max_angle', 'mean', 'none'}
        Temporal pooling (:class:`RotPooling`), LieNet uses max-angle pooling.
    pool_size : int
        Frames per pooling window.
    relu : bool
        ReLU on the axis-angle features (as LieNet).
    norm_kwargs : dict, optional
        Extra arguments of the norm layer (e.g. ``{'momentum': 0.05}``).
    validate : bool
        Check that the input holds rotation matrices.

    Notes
    -----
    ``forward(x, domain=None)``: ``x`` ``(N, T, J, 3, 3)`` rotations in any float dtype; the rotation part runs
    in float64 with autocast disabled, the classifier in its own dtype (float32 by default), so the logits
    ``(N, num_classes)`` are float32. ``domain`` is passed to the norm layer (repeated over frames).

    Deviations
    ----------
    One RotMap/RotPooling block and temporal pooling only (LieNet also pools spatially over body parts and
    stacks several blocks); ``'mean'`` pooling is an addition.
    """

    def __init__(self, num_joints: int, num_frames: int, num_classes: int, rot_channels: int = 1,
                 norm_layer: NormSpec | None = "liebn_so3", pooling: str = "max_angle", pool_size: int = 2,
                 relu: bool = True, norm_kwargs: dict[str, Any] | None = None, validate: bool = True) -> None:
        super().__init__()
        J, T, C, K = check_dims((num_joints, num_frames, num_classes, rot_channels), "SO3Net")
        self.num_joints, self.num_frames, self.num_classes = J, T, C
        self.validate = bool(validate)
        F = J * K
        self.rotmap = RotMap(J, K)
        if norm_layer is None or (isinstance(norm_layer, str) and norm_layer.lower() == "none"):
            self.norm: nn.Module = IdentityNorm(F)
        else:
            self.norm = create_norm_layer(norm_layer, F, expect="so3", **dict(norm_kwargs or {}))
        self.pool = RotPooling(pooling, pool_size)
        T_out = self.pool.output_frames(T)
        if T_out < 1:
            raise ValueError(f"SO3Net: pool_size={pool_size} leaves no frame of num_frames={T}")
        self.relu = nn.ReLU() if relu else nn.Identity()
        self.classifier = nn.Linear(T_out * F * 3, C)

    def features(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        """Axis-angle features ``(N, T' * F * 3)`` (float64) before the classifier."""
        J, T = self.num_joints, self.num_frames
        if not isinstance(x, Tensor) or x.dim() != 5 or tuple(x.shape[1:]) != (T, J, 3, 3):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"SO3Net: expected input of shape (N, {T}, {J}, 3, 3), got {shape}")
        with no_autocast(x.device):
            h = x.to(torch.float64)
            if self.validate:
                check_rotation(h, "SO3Net input")
            h = self.rotmap(h)
            N, F = h.shape[0], h.shape[2]
            d = None if domain is None else torch.as_tensor(domain).expand(N).repeat_interleave(T)
            h = self.norm(h.reshape(N * T, F, 3, 3), domain=d).reshape(N, T, F, 3, 3)
            h = self.pool(h)
            return self.relu(so3_log(h).flatten(1))

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        f = self.features(x, domain)
        return self.classifier(f.to(self.classifier.weight.dtype))
