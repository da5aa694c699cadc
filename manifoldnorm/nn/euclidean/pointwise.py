"""Per-token normalizations over the last (feature) dimension and their point-wise replacements.

Every layer here acts on inputs of shape ``(..., C)`` with the features in the LAST dimension, keeps no running
statistics (identical output in train and eval mode), and returns the input's shape and dtype (parameters are
cast to the input dtype).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._common import check_positive_int
from ..registry import register_norm

__all__ = [
    "LayerNorm",
    "RMSNorm",
    "CRMSNorm",
    "QKNorm",
    "DyT",
    "Derf",
    "HypersphereNorm",
    "EigenLR",
    "normalize_weights_",
]


def _check_input(x: Tensor, num_features: int, owner: str) -> None:
    """Raise a TypeError/ValueError unless ``x`` is a floating tensor of shape ``(..., num_features)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: expected a real floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{owner}: expected an input of shape (..., {num_features}), got a 0-d tensor")
    if x.shape[-1] != num_features:
        raise ValueError(f"{owner}: expected the last dimension (features) to have size {num_features}, "
                         f"got input of shape {tuple(x.shape)}")


def _check_positive(value: float, name: str, owner: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{owner}: {name} must be a finite positive number, got {value}")
    return value


def _check_finite(value: float, name: str, owner: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value}")
    return value


def _cast(p: Tensor | None, x: Tensor) -> Tensor | None:
    return None if p is None else p.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    r"""Layer normalization over the last dimension, with the norm-slot signature ``forward(x, domain=None)``.

    .. math::
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \odot \gamma + \beta,\qquad
        \mu = \tfrac1C \textstyle\sum_i x_i,\quad \sigma^2 = \tfrac1C \textstyle\sum_i (x_i - \mu)^2

    Ba, Kiros, Hinton, "Layer Normalization", arXiv:1607.06450, 2016, Eqs. (3)-(4). A thin subclass of
    :class:`torch.nn.LayerNorm` (biased variance, ``eps`` inside the square root).

    Parameters
    ----------
    num_features : int
        Feature size ``C``.
    eps : float, default 1e-5
    elementwise_affine : bool, default True
        Learnable per-feature ``weight`` (ones) and ``bias`` (zeros).
    bias : bool, default True
        Whether the affine part has a bias.

    Shapes
    ------
    ``x``: ``(..., C)`` -> ``(..., C)``; ``domain`` is accepted and ignored.

    Deviations
    ----------
    Parameters are cast to the input dtype, so a float64 input through a float32 layer stays float64.
    """

    feature_dim = -1

    def __init__(self, num_features: int, *, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        check_positive_int(num_features, "num_features", "LayerNorm")
        super().__init__(num_features, eps=_check_positive(eps, "eps", "LayerNorm"),
                         elementwise_affine=elementwise_affine, bias=bias, device=device, dtype=dtype)
        self.num_features = num_features

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:  # type: ignore[override]
        _check_input(x, self.num_features, "LayerNorm")
        return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x), _cast(self.bias, x), self.eps)


class RMSNorm(nn.RMSNorm):
    r"""Root-mean-square normalization over the last dimension.

    .. math::
        y_i = \frac{x_i}{\sqrt{\tfrac1C \sum_{j=1}^C x_j^2 + \epsilon}}\, g_i

    Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019, Eq. (4). A thin subclass of
    :class:`torch.nn.RMSNorm`.

    Parameters
    ----------
    num_features : int
        Feature size ``C``.
    eps : float, default 1e-6
        Added to the mean square inside the root.
    elementwise_affine : bool, default True
        Learnable per-feature gain ``weight`` (ones).

    Shapes
    ------
    ``x``: ``(..., C)`` -> ``(..., C)``; ``domain`` is accepted and ignored.

    Deviations
    ----------
    ``eps`` is added inside the root (the paper's Eq. 4 has none); no re-centering bias (the paper's optional
    bias is omitted, as in common use). Parameters are cast to the input dtype.
    """

    feature_dim = -1

    def __init__(self, num_features: int, *, eps: float = 1e-6, elementwise_affine: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        owner = type(self).__name__
        check_positive_int(num_features, "num_features", owner)
        super().__init__(num_features, eps=_check_positive(eps, "eps", owner),
                         elementwise_affine=elementwise_affine, device=device, dtype=dtype)
        self.num_features = num_features

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:  # type: ignore[override]
        _check_input(x, self.num_features, type(self).__name__)
        return F.rms_norm(x, self.normalized_shape, _cast(self.weight, x), self.eps)


class QKNorm(RMSNorm):
    r"""Query/key normalization: RMSNorm over the head dimension, applied to ``q`` and ``k`` before attention.

    Use one instance on the queries and one on the keys of shape ``(batch, heads, tokens, head_dim)`` (or any
    ``(..., head_dim)``), then form the attention logits from the normalized vectors:

    .. math::
        \hat q = \frac{q}{\sqrt{\tfrac1d \sum_j q_j^2 + \epsilon}} \odot g_q,\qquad
        \hat k = \frac{k}{\sqrt{\tfrac1d \sum_j k_j^2 + \epsilon}} \odot g_k,\qquad
        \text{logits} = \hat q\, \hat k^\top / \sqrt{d}

    Henry, Dachapally, Pawar, Chen, "Query-Key Normalization for Transformers", Findings of EMNLP 2020, Sec. 3
    (there an L2 normalization with a learned scalar temperature); the per-dimension-gain RMS variant here is the
    form used in recent large language models.

    Parameters
    ----------
    num_features : int
        Head dimension ``d``.
    eps : float, default 1e-6
    elementwise_affine : bool, default True
        Learnable per-dimension gain (ones), shared across heads.

    Shapes
    ------
    ``x``: ``(..., d)`` -> ``(..., d)``; ``domain`` is accepted and ignored.

    Deviations
    ----------
    RMS normalization with a per-dimension gain instead of the paper's L2 normalization with a single learnable
    scale ``g`` (the attention temperature is left to the attention module).
    """


class CRMSNorm(nn.Module):
    r"""Compressed RMSNorm: RMSNorm of a zero-mean ``(C+1)``-vector stored in its first ``C`` coordinates.

    The stored ``x`` stands for :math:`\tilde x = [x_1, \dots, x_C, -\sum_i x_i]`, whose RMS is computed without
    building it:

    .. math::
        \mathrm{RMS}(x) = \sqrt{\frac{\sum_{i=1}^C x_i^2 + \big(\sum_{i=1}^C x_i\big)^2}{C+1} + \epsilon},\qquad
        y = \frac{x}{\mathrm{RMS}(x)} \odot g

    Jiang, Gu, Zhu, Pan, "Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient Pre-LN
    Transformers", NeurIPS 2023, Sec. 3.3 (definition of CRMSNorm).

    Parameters
    ----------
    num_features : int
        Stored size ``C`` (the represented vector has ``C + 1`` entries).
    eps : float, default 1e-6
    elementwise_affine : bool, default True
        Learnable per-feature gain ``weight`` (ones) on the ``C`` stored coordinates.

    Shapes
    ------
    ``x``: ``(..., C)`` -> ``(..., C)``; ``domain`` is accepted and ignored.
    """

    feature_dim = -1

    def __init__(self, num_features: int, *, eps: float = 1e-6, elementwise_affine: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features", "CRMSNorm")
        self.eps = _check_positive(eps, "eps", "CRMSNorm")
        self.elementwise_affine = bool(elementwise_affine)
        if self.elementwise_affine:
            self.weight = nn.Parameter(torch.ones(num_features, dtype=dtype, device=device))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        _check_input(x, self.num_features, "CRMSNorm")
        sq = x.square().sum(-1, keepdim=True) + x.sum(-1, keepdim=True).square()
        y = x * torch.rsqrt(sq / (self.num_features + 1) + self.eps)
        return y if self.weight is None else y * self.weight.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class _ScalarSquash(nn.Module):
    """Shared parameters of DyT/Derf: scalar ``alpha``, per-feature ``weight`` (ones) and ``bias`` (zeros)."""

    feature_dim = -1
    normalization_free = True  # no statistics: sees the raw scale of its input (models may rescale, see GPT)

    def __init__(self, num_features: int, alpha0: float, elementwise_affine: bool,
                 dtype: torch.dtype | None, device: torch.device | str | None) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_features = check_positive_int(num_features, "num_features", owner)
        self.alpha0 = _check_finite(alpha0, "alpha0", owner)
        self.elementwise_affine = bool(elementwise_affine)
        self.alpha = nn.Parameter(torch.full((1,), self.alpha0, dtype=dtype, device=device))
        if self.elementwise_affine:
            self.weight = nn.Parameter(torch.ones(num_features, dtype=dtype, device=device))
            self.bias = nn.Parameter(torch.zeros(num_features, dtype=dtype, device=device))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def _affine(self, y: Tensor) -> Tensor:
        if self.weight is None:
            return y
        return y * self.weight.to(y.dtype) + self.bias.to(y.dtype)


class DyT(_ScalarSquash):
    r"""Dynamic Tanh: an element-wise, statistics-free replacement of LayerNorm.

    .. math::
        y = \gamma \odot \tanh(\alpha x) + \beta

    with a learnable scalar :math:`\alpha` (initialised to ``alpha0``) and per-feature :math:`\gamma` (ones),
    :math:`\beta` (zeros). Zhu, Chen, He, LeCun, Liu, "Transformers without Normalization", CVPR 2025, Eq. (1).

    Parameters
    ----------
    num_features : int
        Feature size ``C``.
    alpha0 : float, default 0.5
    elementwise_affine : bool, default True

    Shapes
    ------
    ``x``: ``(..., C)`` -> ``(..., C)``; ``domain`` is accepted and ignored.
    """

    def __init__(self, num_features: int, *, alpha0: float = 0.5, elementwise_affine: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(num_features, alpha0, elementwise_affine, dtype, device)

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        _check_input(x, self.num_features, "DyT")
        return self._affine(torch.tanh(self.alpha.to(x.dtype) * x))

    def extra_repr(self) -> str:
        return f"{self.num_features}, alpha0={self.alpha0}, elementwise_affine={self.elementwise_affine}"


class Derf(_ScalarSquash):
    r"""Dynamic erf: an element-wise, statistics-free replacement of LayerNorm/RMSNorm.

    .. math::
        y = \gamma \odot \operatorname{erf}(\alpha x + s) + \beta,\qquad
        \operatorname{erf}(z) = \frac{2}{\sqrt\pi}\int_0^z e^{-t^2}\,dt

    with learnable scalars :math:`\alpha` (initialised to ``alpha0``) and :math:`s` (initialised to ``shift0``)
    and per-feature :math:`\gamma` (ones), :math:`\beta` (zeros). Chen, Lu, Zhu, Sun, Liu, "Stronger
    Normalization-Free Transformers", arXiv:2512.10938, 2025 (definition of Derf).

    Parameters
    ----------
    num_features : int
        Feature size ``C``.
    alpha0 : float, default 0.5
    shift0 : float, default 0.0
    elementwise_affine : bool, default True

    Shapes
    ------
    ``x``: ``(..., C)`` -> ``(..., C)``; ``domain`` is accepted and ignored.
    """

    def __init__(self, num_features: int, *, alpha0: float = 0.5, shift0: float = 0.0,
                 elementwise_affine: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(num_features, alpha0, elementwise_affine, dtype, device)
        self.shift0 = _check_finite(shift0, "shift0", "Derf")
        self.shift = nn.Parameter(torch.full((1,), self.shift0, dtype=dtype, device=device))

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        _check_input(x, self.num_features, "Derf")
        return self._affine(torch.erf(self.alpha.to(x.dtype) * x + self.shift.to(x.dtype)))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, alpha0={self.alpha0}, shift0={self.shift0}, "
                f"elementwise_affine={self.elementwise_affine}")


def _unit(x: Tensor, eps: float) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


class HypersphereNorm(nn.Module):
    r"""Projection onto the unit hypersphere over the last dimension (the ``Norm`` of nGPT); no parameters.

    .. math::
        y = \frac{x}{\max(\lVert x \rVert_2, \epsilon)}

    Loshchilov, Hsieh, Sun, Ginsburg, "nGPT: Normalized Transformer with Representation Learning on the
    Hypersphere", ICLR 2025, Sec. 2. See also :class:`EigenLR` and :func:`normalize_weights_`.

    Parameters
    ----------
    num_features : int
        Feature size ``C``.
    eps : float, default 1e-12
        Lower bound of the norm (a zero vector maps to zero).

    Shapes
    ------
    ``x``: ``(..., C)`` -> ``(..., C)``; ``domain`` is accepted and ignored.
    """

    feature_dim = -1

    def __init__(self, num_features: int, *, eps: float = 1e-12, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features", "HypersphereNorm")
        self.eps = _check_positive(eps, "eps", "HypersphereNorm")

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        _check_input(x, self.num_features, "HypersphereNorm")
        return _unit(x, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


@torch.no_grad()
def normalize_weights_(module: nn.Module, dim: int = -1, eps: float = 1e-12) -> int:
    r"""Rescale in place every ``nn.Linear`` / ``nn.Embedding`` weight of ``module`` to unit L2 norm along ``dim``.

    .. math::
        W \leftarrow W / \max(\lVert W \rVert_{2,\text{dim}}, \epsilon)

    nGPT (Loshchilov et al., ICLR 2025, Sec. 2.6) applies this after every optimizer step so that embeddings
    and matrix rows stay on the hypersphere. With the default ``dim=-1`` each row of a ``Linear`` weight
    ``(out, in)`` and each embedding vector of an ``Embedding`` weight ``(num, C)`` gets unit norm.

    Returns
    -------
    int
        Number of weight tensors renormalized.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"normalize_weights_: expected an nn.Module, got {type(module).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -2 <= dim <= 1:
        raise ValueError(f"normalize_weights_: dim must be an int in [-2, 1] (weights are 2-d), got {dim!r}")
    eps = _check_positive(eps, "eps", "normalize_weights_")
    count = 0
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            w = sub.weight
            w.div_(torch.linalg.vector_norm(w, dim=dim, keepdim=True).clamp_min(eps))
            count += 1
    return count


class EigenLR(nn.Module):
    r"""nGPT residual update on the hypersphere with learnable per-dimension "eigen learning rates".

    .. math::
        h \leftarrow \operatorname{Norm}\big(h + \alpha \odot (\operatorname{Norm}(h_A) - h)\big),\qquad
        \alpha = a \cdot \frac{\alpha_\text{init}}{\alpha_\text{scale}}

    where ``Norm`` is the unit-L2 projection over the last dimension, :math:`h_A` the output of the block
    (attention or MLP) and :math:`a` the stored parameter, initialised to :math:`\alpha_\text{scale}` so that
    :math:`\alpha = \alpha_\text{init}` at the start. Loshchilov et al., "nGPT", ICLR 2025, Eqs. (10)-(11) and
    the scaling of Sec. 2.5 (default :math:`\alpha_\text{scale} = 1/\sqrt C`).

    Parameters
    ----------
    num_features : int
        Feature size ``C``.
    alpha_init : float, default 0.05
        Effective learning rate at initialisation.
    alpha_scale : float, optional
        Stored scale; default ``1 / sqrt(C)``.
    eps : float, default 1e-12

    Shapes
    ------
    ``h``, ``h_block``: ``(..., C)`` -> ``(..., C)`` (unit norm over the last dimension).
    """

    def __init__(self, num_features: int, *, alpha_init: float = 0.05, alpha_scale: float | None = None,
                 eps: float = 1e-12, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features", "EigenLR")
        self.alpha_init = _check_finite(alpha_init, "alpha_init", "EigenLR")
        scale = 1.0 / math.sqrt(num_features) if alpha_scale is None else alpha_scale
        self.alpha_scale = _check_positive(scale, "alpha_scale", "EigenLR")
        self.eps = _check_positive(eps, "eps", "EigenLR")
        self.alpha = nn.Parameter(torch.full((num_features,), self.alpha_scale, dtype=dtype, device=device))

    def effective_alpha(self) -> Tensor:
        """The per-dimension step :math:`a \\cdot \\alpha_\\text{init} / \\alpha_\\text{scale}`, shape ``(C,)``."""
        return self.alpha * (self.alpha_init / self.alpha_scale)

    def forward(self, h: Tensor, h_block: Tensor) -> Tensor:
        _check_input(h, self.num_features, "EigenLR")
        _check_input(h_block, self.num_features, "EigenLR")
        alpha = self.effective_alpha().to(h.dtype)
        return _unit(h + alpha * (_unit(h_block, self.eps) - h), self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, alpha_init={self.alpha_init}, alpha_scale={self.alpha_scale}"


register_norm("layernorm", "euclidean")(LayerNorm)
register_norm("rmsnorm", "euclidean")(RMSNorm)
register_norm("crmsnorm", "euclidean")(CRMSNorm)
register_norm("qknorm", "euclidean")(QKNorm)
register_norm("dyt", "euclidean")(DyT)
register_norm("derf", "euclidean")(Derf)
register_norm("ngpt_norm", "euclidean")(HypersphereNorm)
