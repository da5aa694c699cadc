"""Weight-side normalizations: weight normalization, weight standardization and spectral normalization.

Each is a reparametrization registered with :mod:`torch.nn.utils.parametrize`: ``module.weight`` becomes a function
of unconstrained tensors stored under ``module.parametrizations.weight.original*``, so ``state_dict``, optimizers and
``module.parameters()`` keep working unchanged. The functions return the module they were given (modified in place)
and are registered under the keys ``weight_norm``, ``weight_std`` and ``spectral_norm`` with
``inputs=("weight",)``: they take a module, not a feature count, and cannot fill an activation-norm slot.

>>> conv = weight_std(nn.Conv2d(3, 8, 3))
>>> w = conv.weight  # standardized: zero mean, unit (biased) variance per output channel
"""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

from ..registry import register_norm

__all__ = ["WeightStandardization", "weight_norm", "weight_std", "spectral_norm", "WSConv2d", "WSLinear"]


def _check_eps(eps: float, owner: str) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{owner}: eps must be a float, got {type(eps).__name__}")
    eps = float(eps)
    if not (math.isfinite(eps) and eps > 0.0):
        raise ValueError(f"{owner}: eps must be a finite positive number, got {eps}")
    return eps


def _target_weight(module: nn.Module, name: str, owner: str) -> Tensor:
    """The floating-point parameter ``module.<name>`` (possibly already parametrized); errors otherwise."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{owner}: expected the nn.Module whose weight to reparametrize, got {type(module).__name__}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"{owner}: name must be a non-empty str, got {name!r}")
    params = dict(module.named_parameters(recurse=False))
    if name not in params and not parametrize.is_parametrized(module, name):
        have = ", ".join(params) or "(none)"
        raise TypeError(f"{owner}: {type(module).__name__} has no parameter named {name!r}; "
                        f"its parameters: {have}")
    weight = getattr(module, name)
    if not isinstance(weight, Tensor):
        raise TypeError(f"{owner}: {type(module).__name__}.{name} is not a tensor ({type(weight).__name__})")
    if not weight.is_floating_point():
        raise TypeError(f"{owner}: {type(module).__name__}.{name} must be a real floating-point tensor, "
                        f"got dtype {weight.dtype}")
    return weight


def _canonical_dim(dim: int | None, ndim: int, owner: str) -> int | None:
    if dim is None:
        return None
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{owner}: dim must be an int or None, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{owner}: dim must lie in [-{ndim}, {ndim - 1}] for a {ndim}-d weight, got {dim}")
    return dim % ndim


def weight_norm(module: nn.Module, *, name: str = "weight", dim: int | None = 0) -> nn.Module:
    r"""Reparametrize ``module.<name>`` as a magnitude times a unit direction (weight normalization).

    .. math::
        w = g\,\frac{v}{\lVert v \rVert}

    with the norm taken over every dim except ``dim`` (one magnitude per slice along ``dim``; per output unit for
    ``dim=0``), or over the whole tensor for ``dim=None``. Salimans & Kingma, "Weight Normalization: A Simple
    Reparameterization to Accelerate Training of Deep Neural Networks", NeurIPS 2016, Eq. (2).

    Parameters
    ----------
    module : nn.Module
        Holder of the floating-point parameter ``name``; modified in place and returned.
    name : str, default "weight"
    dim : int or None, default 0
        Dim that keeps one magnitude per index; negative values count from the end (``-1`` is the last dim).

    Returns
    -------
    nn.Module
        ``module``, with ``parametrizations.<name>.original0`` = :math:`g` (shape of the weight with every dim but
        ``dim`` set to 1; a 0-d tensor for ``dim=None``) and ``original1`` = :math:`v`, initialised
        so that the weight is unchanged.

    Deviations
    ----------
    None in the formula. ``dim=-1`` means the last dim here; :func:`torch.nn.utils.parametrizations.weight_norm`,
    which does the work, reads ``-1`` as "whole tensor", so negative dims are converted before the call.
    """
    owner = "weight_norm"
    weight = _target_weight(module, name, owner)
    canonical = _canonical_dim(dim, weight.ndim, owner)
    return parametrizations.weight_norm(module, name=name, dim=canonical)


class WeightStandardization(nn.Module):
    r"""Parametrization standardizing a weight per output channel: zero mean, unit variance over the fan-in.

    For a weight :math:`W` of shape ``(C_out, *fan_in)`` and :math:`I` the fan-in size (product of the trailing
    dims), row :math:`i` of the flattened ``(C_out, I)`` matrix becomes

    .. math::
        \hat W_{i,j} = \frac{W_{i,j} - \mu_i}{\sigma_i},\qquad
        \mu_i = \frac1I \sum_j W_{i,j},\qquad
        \sigma_i = \sqrt{\frac1I \sum_j W_{i,j}^2 - \mu_i^2 + \epsilon}

    Qiao, Wang, Liu, Shen, Yuille, "Micro-Batch Training with Batch-Channel Normalization and Weight
    Standardization", arXiv:1903.10520 (2019), section "Weight Standardization", the equations defining
    :math:`\hat W`.

    Parameters
    ----------
    eps : float, default 1e-5
        :math:`\epsilon`, inside the square root.

    Shapes
    ------
    ``weight``: ``(C_out, *fan_in)`` with at least 2 dims and a fan-in of more than one value -> same shape and
    dtype.

    Deviations
    ----------
    The variance is the biased one of the equation (divide by :math:`I`); the authors' released code divides by
    :math:`I - 1`.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = _check_eps(eps, "WeightStandardization")

    def extra_repr(self) -> str:
        return f"eps={self.eps}"

    def forward(self, weight: Tensor) -> Tensor:
        if weight.ndim < 2 or weight[0].numel() < 2:
            raise ValueError(f"WeightStandardization: expected a weight (C_out, *fan_in) with at least 2 dims and "
                             f"a fan-in of more than one value, got shape {tuple(weight.shape)}")
        flat = weight.reshape(weight.shape[0], -1)
        mean = flat.mean(dim=1, keepdim=True)
        var = flat.var(dim=1, unbiased=False, keepdim=True)
        return ((flat - mean) / (var + self.eps).sqrt()).reshape(weight.shape)


def weight_std(module: nn.Module, *, name: str = "weight", eps: float = 1e-5) -> nn.Module:
    r"""Reparametrize ``module.<name>`` with :class:`WeightStandardization` (per output channel, over the fan-in).

    .. math:: \hat W_{i,\cdot} = (W_{i,\cdot} - \mu_i) / \sigma_i

    Qiao et al., arXiv:1903.10520, section "Weight Standardization". Dim 0 of the weight must hold the output
    channels (``nn.Linear``, ``nn.Conv{1,2,3}d``); transposed convolutions, whose dim 0 holds the input channels,
    are refused.

    Parameters
    ----------
    module : nn.Module
        Holder of the floating-point parameter ``name`` with at least 2 dims; modified in place and returned.
    name : str, default "weight"
    eps : float, default 1e-5

    Returns
    -------
    nn.Module
        ``module``, with the raw weight at ``parametrizations.<name>.original``.
    """
    owner = "weight_std"
    weight = _target_weight(module, name, owner)
    eps = _check_eps(eps, owner)
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and name == "weight":
        raise ValueError(f"{owner}: {type(module).__name__} keeps input channels in dim 0 of its weight; "
                         f"weight standardization needs output channels first")
    if weight.ndim < 2 or weight[0].numel() < 2:
        raise ValueError(f"{owner}: {type(module).__name__}.{name} must have at least 2 dims and a fan-in of more "
                         f"than one value, got shape {tuple(weight.shape)}")
    parametrize.register_parametrization(module, name, WeightStandardization(eps))
    return module


def spectral_norm(module: nn.Module, *, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: int | None = None) -> nn.Module:
    r"""Reparametrize ``module.<name>`` as the weight divided by its largest singular value (power iteration).

    .. math::
        \bar W_{\mathrm{SN}} = \frac{W}{\sigma(W)},\qquad \sigma(W) \approx \tilde u^\top W \tilde v

    with :math:`W` flattened to ``(size along dim, -1)`` and :math:`\tilde u, \tilde v` the left/right singular
    vector estimates (buffers ``_u``, ``_v``), refined by ``n_power_iterations`` steps at every access in training
    mode and frozen in eval mode. Miyato, Kataoka, Koyama, Yoshida, "Spectral Normalization for Generative
    Adversarial Networks", ICLR 2018, Eq. (8) and Algorithm 1.

    Parameters
    ----------
    module : nn.Module
        Holder of the floating-point parameter ``name``; modified in place and returned.
    name : str, default "weight"
    n_power_iterations : int, default 1
        Power-iteration steps per training-mode access (>= 1).
    eps : float, default 1e-12
        Guard in the vector normalizations.
    dim : int or None, default None
        Dim of the output units: ``None`` picks 1 for transposed convolutions and 0 otherwise.

    Returns
    -------
    nn.Module
        ``module``, with the raw weight at ``parametrizations.<name>.original``.

    Deviations
    ----------
    As in :func:`torch.nn.utils.parametrizations.spectral_norm`, which does the work: the gradient treats
    :math:`\tilde u, \tilde v` as constants, and a 1-d weight is divided by its Euclidean norm exactly.
    """
    owner = "spectral_norm"
    weight = _target_weight(module, name, owner)
    if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int):
        raise TypeError(f"{owner}: n_power_iterations must be an int, got {type(n_power_iterations).__name__}")
    if n_power_iterations < 1:
        raise ValueError(f"{owner}: n_power_iterations must be >= 1, got {n_power_iterations}")
    eps = _check_eps(eps, owner)
    canonical = _canonical_dim(dim, weight.ndim, owner)
    return parametrizations.spectral_norm(module, name=name, n_power_iterations=n_power_iterations, eps=eps,
                                          dim=canonical)


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight is standardized (:func:`weight_std`) from construction on.

    Takes every argument of :class:`torch.nn.Conv2d`, plus the keyword ``eps`` (default 1e-5) of the
    standardization.
    """

    def __init__(self, *args, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        weight_std(self, eps=eps)


class WSLinear(nn.Linear):
    """``nn.Linear`` whose weight is standardized (:func:`weight_std`) from construction on.

    Takes every argument of :class:`torch.nn.Linear` (``in_features`` must be at least 2), plus the keyword
    ``eps`` (default 1e-5) of the standardization.
    """

    def __init__(self, *args, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        weight_std(self, eps=eps)


register_norm("weight_norm", "euclidean", inputs=("weight",))(weight_norm)
register_norm("weight_std", "euclidean", inputs=("weight",))(weight_std)
register_norm("spectral_norm", "euclidean", inputs=("weight",))(spectral_norm)
