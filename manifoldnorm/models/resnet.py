"""ResNet for small images (8x8 up to 32x32) with a configurable Euclidean norm slot, Weight Standardization and
Fixup initialization."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from manifoldnorm.nn.euclidean.layout import adapt_layout
from manifoldnorm.nn.euclidean.weight_norms import weight_std
from manifoldnorm.nn.registry import IdentityNorm, NormSpec, create_norm_layer

__all__ = ["ResNet", "BasicBlock"]

_LAYERS_PER_BRANCH = 2  # m in Fixup: two 3x3 convolutions per residual branch


def _check_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ResNet: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"ResNet: {name} must be >= 1, got {value}")
    return value


def _check_widths(widths: Any) -> tuple[int, ...]:
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
        raise TypeError(f"ResNet: widths must be a sequence of ints (channels per stage), got {widths!r}")
    out = tuple(widths)
    if not out or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in out):
        raise ValueError(f"ResNet: widths must be a non-empty sequence of positive ints, got {out!r}")
    return out


def _check_switch(value: Any, name: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"ResNet: {name} must be None (automatic), True or False, got {value!r}")
    return value


def _scalar(init: float) -> nn.Parameter:
    """A learnable scalar of Fixup (shape ``(1,)``, broadcasts against ``(N, C, H, W)``)."""
    return nn.Parameter(torch.full((1,), float(init)))


def _shift(x: Tensor, bias: Tensor | None) -> Tensor:
    return x if bias is None else x + bias


def _apply_norm(layer: nn.Module, x: Tensor, domain: Tensor | None) -> Tensor:
    return layer(x) if domain is None else layer(x, domain=domain)


def _conv(c_in: int, c_out: int, kernel: int, stride: int, standardize: bool) -> nn.Conv2d:
    """Bias-free conv with He (fan-in, ReLU) init; ``standardize`` reparametrizes its weight with WS."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
    return weight_std(conv) if standardize else conv


def _norm(spec: NormSpec, channels: int) -> nn.Module:
    return adapt_layout(create_norm_layer(spec, channels, expect="euclidean"), 1)


class BasicBlock(nn.Module):
    r"""Post-activation basic residual block: ``relu(branch(x) + shortcut(x))``.

    .. math::
        \mathrm{branch}(x) = s\,\big(N_2(W_2 * (\mathrm{relu}(N_1(W_1 * (x + b_{1a})) + b_{1b}) + b_{2a}))\big)
        + b_{2b},\qquad \mathrm{shortcut}(x) = N_p(W_p * (x + b_{1a}))\ \text{or}\ x

    He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, Fig. 2 / Eq. (2) (projection
    shortcut, option B, when the shape changes). The scalars :math:`b_{1a}, b_{1b}, b_{2a}, b_{2b}` (zeros) and
    :math:`s` (one) exist only with ``fixup=True`` (attributes ``bias1a`` ... ``scale``; ``None`` otherwise).

    Parameters
    ----------
    in_channels, out_channels : int
    stride : int
        Stride of the first 3x3 conv (and of the 1x1 projection).
    norm_layer : str, class or functools.partial
        Euclidean norm of the slots ``norm1``, ``norm2``, ``proj_norm``.
    weight_standardization : bool
        Reparametrize every conv weight with Weight Standardization.
    fixup : bool
        Add the Fixup scalar biases and multiplier.

    Shapes
    ------
    ``x``: ``(N, in_channels, H, W)`` -> ``(N, out_channels, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm_layer: NormSpec,
                 weight_standardization: bool = False, fixup: bool = False) -> None:
        super().__init__()
        ws = weight_standardization
        self.conv1 = _conv(in_channels, out_channels, 3, stride, ws)
        self.norm1 = _norm(norm_layer, out_channels)
        self.conv2 = _conv(out_channels, out_channels, 3, 1, ws)
        self.norm2 = _norm(norm_layer, out_channels)
        if stride != 1 or in_channels != out_channels:
            self.proj_conv: nn.Module | None = _conv(in_channels, out_channels, 1, stride, ws)
            self.proj_norm: nn.Module | None = _norm(norm_layer, out_channels)
        else:
            self.proj_conv = self.proj_norm = None
        for name in ("bias1a", "bias1b", "bias2a", "bias2b"):
            self.register_parameter(name, _scalar(0.0) if fixup else None)
        self.register_parameter("scale", _scalar(1.0) if fixup else None)

    def branch(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        """The residual branch alone (zero at Fixup initialization)."""
        h = _apply_norm(self.norm1, self.conv1(_shift(x, self.bias1a)), domain)
        h = F.relu(_shift(h, self.bias1b))
        h = _apply_norm(self.norm2, self.conv2(_shift(h, self.bias2a)), domain)
        if self.scale is not None:
            h = h * self.scale
        return _shift(h, self.bias2b)

    def shortcut(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        """Identity, or the 1x1 projection and its norm when the shape changes."""
        if self.proj_conv is None:
            return x
        return _apply_norm(self.proj_norm, self.proj_conv(_shift(x, self.bias1a)), domain)

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        return F.relu(self.branch(x, domain) + self.shortcut(x, domain))


class ResNet(nn.Module):
    r"""Small-image ResNet: ``conv3x3 -> norm -> ReLU``, stages of basic blocks, global average pool, linear head.

    Stage ``i`` has ``blocks_per_stage`` post-activation :class:`BasicBlock` s of width ``widths[i]``; every stage
    after the first halves the resolution with a stride-2 first conv (8x8 inputs with three stages run at
    8, 4, 2 pixels). He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016 (the CIFAR
    variant of Sec. 4.2, without the initial max-pool).

    **Weight Standardization** (Qiao, Wang, Liu, Shen, Yuille, "Micro-Batch Training with Batch-Channel
    Normalization and Weight Standardization", arXiv:1903.10520, 2019, Sec. 3) reparametrizes every conv weight
    :math:`W \in \mathbb{R}^{O \times I}` (``I = C_in * k * k``) per output channel:

    .. math::
        \hat W_{o,:} = \frac{W_{o,:} - \mu_o}{\sqrt{\sigma_o^2 + \epsilon}},\qquad
        \mu_o = \tfrac1I \textstyle\sum_j W_{o,j},\quad \sigma_o^2 = \tfrac1I \textstyle\sum_j (W_{o,j} - \mu_o)^2

    (see :func:`manifoldnorm.nn.euclidean.weight_norms.weight_std`).

    **Fixup** (Zhang, Dauphin, Ma, "Fixup Initialization: Residual Learning Without Normalization", ICLR 2019,
    Sec. 3): the classification layer and the last conv of every residual branch start at zero, the other branch
    convs are He-initialized and scaled by

    .. math:: L^{-1/(2m - 2)}\quad (L = \text{number of residual branches},\ m = 2\ \text{convs per branch}),

    and scalar biases (zeros) sit before every conv, activation and the linear layer, with a scalar multiplier
    (one) on every branch. At initialization every branch outputs zero, so the network is its shortcut path and
    the logits are zero.

    Parameters
    ----------
    in_channels : int
        Image channels ``C``.
    num_classes : int
    widths : sequence of int, default (16, 32, 64)
        Channels of each stage (one stage per entry).
    blocks_per_stage : int, default 1
    norm_layer : str, class, functools.partial or None, default "batchnorm"
        Any Euclidean norm from :func:`manifoldnorm.nn.list_norms` (``"batchnorm"``, ``"groupnorm"``,
        ``"evonorm_b0"``, ``"layernorm"``, ``"none"``, ...), built as
        ``create_norm_layer(norm_layer, channels, expect="euclidean")`` and wrapped by
        :func:`~manifoldnorm.nn.euclidean.layout.adapt_layout` (channels-last norms such as LayerNorm/RMSNorm
        then normalize each pixel over its channels). SPD norms raise a ValueError.
    weight_standardization : bool, optional
        ``None`` (default): on exactly when the norm class sets ``pairs_with_weight_standardization = True``
        (Batch-Channel Norm does).
    fixup : bool, optional
        ``None`` (default): on exactly when the norm is the identity (``"none"``). Cannot be combined with Weight
        Standardization, which would undo the Fixup scaling.

    Shapes
    ------
    ``forward(x, domain=None)``: ``x`` ``(N, in_channels, H, W)`` floating -> logits ``(N, num_classes)``.
    ``domain`` (``(N,)`` LongTensor) is passed to every norm layer. ``features`` returns the pooled
    ``(N, widths[-1])`` features.

    Deviations
    ----------
    Convs have no bias (the norms' shift, or Fixup's scalar biases, take that role); with ``norm_layer="none"`` and
    ``fixup=False`` the convs are therefore bias-free. The projection shortcut (1x1 conv + norm, He et al. option B)
    reads the same Fixup-biased input :math:`x + b_{1a}` as the branch's first conv, and under Fixup it is
    He-initialized without the branch scaling (it lies outside the residual branch). He initialization uses the
    fan-in of each conv. Norm-activation layers (EvoNorm) are followed by the same ReLU as every other norm; the
    EvoNorm paper replaces the BN-ReLU pair by the layer alone. Fixup's training recipe (e.g. mixup, learning rates of
    the scalars) is not part of the model; the scalars are the parameters named ``bias*`` and ``scale``.
    """

    def __init__(self, in_channels: int, num_classes: int, *, widths: Sequence[int] = (16, 32, 64),
                 blocks_per_stage: int = 1, norm_layer: NormSpec = "batchnorm",
                 weight_standardization: bool | None = None, fixup: bool | None = None) -> None:
        super().__init__()
        self.in_channels = _check_int(in_channels, "in_channels")
        self.num_classes = _check_int(num_classes, "num_classes")
        self.widths = _check_widths(widths)
        self.blocks_per_stage = _check_int(blocks_per_stage, "blocks_per_stage")
        ws = _check_switch(weight_standardization, "weight_standardization")
        fixup = _check_switch(fixup, "fixup")

        stem_norm = create_norm_layer(norm_layer, self.widths[0], expect="euclidean")
        if ws is None:
            ws = bool(getattr(type(stem_norm), "pairs_with_weight_standardization", False))
        if fixup is None:
            fixup = isinstance(stem_norm, IdentityNorm)
        if ws and fixup:
            raise ValueError("ResNet: fixup=True and weight_standardization=True cannot be combined (Weight "
                             "Standardization undoes the Fixup scaling of the conv weights); switch one off")
        self.weight_standardization, self.fixup = ws, fixup

        self.stem_conv = _conv(self.in_channels, self.widths[0], 3, 1, ws)
        self.stem_norm = adapt_layout(stem_norm, 1)
        blocks, c_in = [], self.widths[0]
        for i, width in enumerate(self.widths):
            for j in range(self.blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(c_in, width, stride, norm_layer, ws, fixup))
                c_in = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(self.widths[-1], self.num_classes)
        for name in ("stem_bias_in", "stem_bias_act", "head_bias_in"):
            self.register_parameter(name, _scalar(0.0) if fixup else None)
        self.fixup_scale = len(blocks) ** (-1.0 / (2 * _LAYERS_PER_BRANCH - 2)) if fixup else 1.0
        if fixup:
            self._fixup_init()

    @torch.no_grad()
    def _fixup_init(self) -> None:
        for block in self.blocks:
            block.conv1.weight.mul_(self.fixup_scale)
            block.conv2.weight.zero_()
        self.head.weight.zero_()
        self.head.bias.zero_()

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_classes={self.num_classes}, widths={self.widths}, "
                f"blocks_per_stage={self.blocks_per_stage}, weight_standardization={self.weight_standardization}, "
                f"fixup={self.fixup}")

    def _check_input(self, x: Any) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"ResNet: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"ResNet: expected a floating-point image tensor, got dtype {x.dtype}")
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ResNet: expected input of shape (N, {self.in_channels}, H, W), got "
                             f"{tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"ResNet: expected a non-empty batch of non-empty images, got {tuple(x.shape)}")

    def stem(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        """``conv3x3 -> norm -> ReLU`` on checked input ``(N, C, H, W)`` -> ``(N, widths[0], H, W)``."""
        h = _apply_norm(self.stem_norm, self.stem_conv(_shift(x, self.stem_bias_in)), domain)
        return F.relu(_shift(h, self.stem_bias_act))

    def features(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        """Globally average-pooled features ``(N, widths[-1])`` before the classifier."""
        self._check_input(x)
        h = self.stem(x, domain)
        for block in self.blocks:
            h = block(h, domain)
        return h.mean(dim=(2, 3))

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        return self.head(_shift(self.features(x, domain), self.head_bias_in))

