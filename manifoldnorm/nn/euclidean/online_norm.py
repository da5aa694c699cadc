"""Online Normalization: normalize with running mean/variance, correct the backward with a control process.

Acts on ``(N, C)`` or ``(N, C, *spatial)`` inputs (features in dim 1). Parameters and buffers are cast to the
input dtype for the computation, so the output keeps the input's shape and dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .._common import check_momentum, check_positive_int
from ..registry import register_norm
from .batch_free import _check_channels_first, _check_eps, _per_channel

__all__ = ["OnlineNorm"]


class _OnlineNormalize(torch.autograd.Function):
    """``y = (x - mu) / s`` per channel, with the error-controlled backward of :class:`OnlineNorm`.

    ``err_y`` and ``err_1`` (``(C,)`` buffers) are read and updated in place when the backward runs.
    """

    @staticmethod
    def forward(ctx, x: Tensor, mu: Tensor, scale: Tensor, err_y: Tensor, err_1: Tensor,  # type: ignore[override]
                alpha_bkw: float) -> Tensor:
        y = (x - _per_channel(mu, x)) / _per_channel(scale, x)
        ctx.save_for_backward(y, scale)
        ctx.err = (err_y, err_1)
        ctx.alpha_bkw = alpha_bkw
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        y, scale = ctx.saved_tensors
        err_y, err_1 = ctx.err
        c = 1.0 - ctx.alpha_bkw
        dims = (0, *range(2, grad.ndim))
        x_tilde = grad - c * _per_channel(err_y, grad) * y                                   # Eq. (11a)
        grad_x = x_tilde / _per_channel(scale, grad) - c * _per_channel(err_1, grad)          # Eq. (12a)
        with torch.no_grad():
            err_y.add_((x_tilde * y).mean(dims).to(err_y.dtype))                             # Eq. (11b)
            err_1.add_(grad_x.mean(dims).to(err_1.dtype))                                    # Eq. (12b)
        return grad_x, None, None, None, None, None


class OnlineNorm(nn.Module):
    r"""Online Normalization: running (not batch) mean and variance, and an error-controlled backward.

    Training step :math:`t` on a batch :math:`X_t` of shape ``(N, C, *spatial)``. Per channel, :math:`\mu(X_t)`
    and :math:`\sigma^2(X_t)` are the mean and biased variance over the ``N * prod(spatial)`` values of the
    batch. With the running estimates from BEFORE this step:

    .. math::
        y = \frac{x - \mu_{t-1}}{\sqrt{\sigma^2_{t-1} + \epsilon}}, \qquad
        \mu_t = \alpha_f\,\mu_{t-1} + (1-\alpha_f)\,\mu(X_t),

        \sigma^2_t = \alpha_f\,\sigma^2_{t-1} + (1-\alpha_f)\,\sigma^2(X_t)
                     + \alpha_f(1-\alpha_f)\,\big(\mu(X_t) - \mu_{t-1}\big)^2,

    then the affine map :math:`z = \gamma y + \beta` and, with ``layer_scaling``, per sample
    :math:`\mathrm{out} = z / \sqrt{\langle z^2\rangle + \epsilon}` (:math:`\langle\cdot\rangle` = mean over
    ``(C, *spatial)``); otherwise :math:`\mathrm{out} = z`.

    Backward (``approx_backward=True``). With :math:`g = \partial L/\partial y` (autograd through the layer
    scaling and the affine map), the control process removes from the gradient its running components along
    :math:`y` and along :math:`1`, estimated by the buffers ``err_y`` (:math:`\varepsilon^{(y)}`) and ``err_1``
    (:math:`\varepsilon^{(1)}`), both zeros at start; :math:`\mu_B(\cdot)` is the per-channel mean over the batch:

    .. math::
        \tilde g = g - (1-\alpha_b)\,\varepsilon^{(y)}_{t-1}\,y, \qquad
        \varepsilon^{(y)}_t = \varepsilon^{(y)}_{t-1} + \mu_B(\tilde g \odot y),

        \frac{\partial L}{\partial x} = \frac{\tilde g}{\sqrt{\sigma^2_{t-1} + \epsilon}}
            - (1-\alpha_b)\,\varepsilon^{(1)}_{t-1}, \qquad
        \varepsilon^{(1)}_t = \varepsilon^{(1)}_{t-1} + \mu_B\Big(\frac{\partial L}{\partial x}\Big).

    Expanding, :math:`\varepsilon^{(1)}_t = \alpha_b\varepsilon^{(1)}_{t-1} + \mu_B(\tilde g)/\sqrt{\sigma^2_{t-1}
    + \epsilon}` and :math:`\varepsilon^{(y)}_t = \varepsilon^{(y)}_{t-1}(1 - (1-\alpha_b)\mu_B(y^2)) +
    \mu_B(g \odot y)` with :math:`\mu_B(y^2) \approx 1`: :math:`(1-\alpha_b)\varepsilon` are exponential averages
    of the two projections that batch normalization's exact backward subtracts within each batch. Gradients of
    :math:`\gamma, \beta` are exact. With
    ``approx_backward=False`` the gradient is plain autograd through the forward with :math:`\mu_{t-1},
    \sigma_{t-1}` constant (:math:`\partial L/\partial x = g / \sqrt{\sigma^2_{t-1} + \epsilon}`).

    In eval mode :math:`y = (x - \mu)/\sqrt{\sigma^2 + \epsilon}` with the running estimates, so a training
    forward returns exactly what an eval forward would have returned before the step; train and eval differ
    only through the updates of the running statistics (forward) and of the control buffers (backward).

    Chiley, Sharapov, Kosson, Koster, Reece, Samaniego de la Fuente, Subbiah, James, "Online Normalization for
    Training Neural Networks", NeurIPS 2019: forward Eqs. (8a)-(8c) (statistics of multi-valued samples),
    backward control process Eqs. (11a)-(11b) and (12a)-(12b), layer scaling as the guard against exploding
    activations (equation labels of arXiv:1905.05894 as used by the authors' reference implementation).

    Parameters
    ----------
    num_features : int
        Number of channels ``C``.
    alpha_fwd : float, default 0.999
        Decay :math:`\alpha_f` of the running mean and variance, in ``[0, 1]`` (weight of the OLD value).
    alpha_bkw : float, default 0.99
        Decay :math:`\alpha_b` of the backward control process, in ``[0, 1]``.
    eps : float, default 1e-5
        Added to the variance under the square root, and to the second moment in the layer scaling.
    layer_scaling : bool, default True
        Divide each sample by the root mean square of its affine output over ``(C, *spatial)``.
    approx_backward : bool, default True
        Use the control-process backward above; ``False`` gives the plain gradient with fixed statistics.
    dtype, device
        Of ``weight`` (ones), ``bias`` (zeros) and the buffers ``running_mean`` (zeros), ``running_var`` (ones),
        ``err_y``, ``err_1`` (zeros, all ``(C,)``) and ``num_batches_tracked``.

    Shapes
    ------
    ``x``: ``(N, C)`` or ``(N, C, *spatial)`` (features in dim 1) -> same shape and dtype; ``domain`` is
    accepted and ignored. Any batch size, including 1, works in training.

    Deviations
    ----------
    Batched form: one step :math:`t` per mini-batch, taking the whole per-channel batch (all samples and
    positions) as the paper's multi-valued sample :math:`x_t`. The paper and its reference code instead process
    the ``N`` samples of a mini-batch one after the other (one step per sample, :math:`\mu(x_t)` over the spatial
    positions of one sample), so here :math:`\alpha_f, \alpha_b` decay once per batch; :math:`\alpha^N` per batch
    corresponds to :math:`\alpha` per sample for batches of ``N``. ``eps`` is added inside the square root (the
    paper writes :math:`\sigma_{t-1}` alone). The paper's alternative guard, activation clamping, is not
    implemented. The control buffers are updated when the backward runs: a training forward without backward
    leaves them unchanged, and back-propagating twice through one graph updates them twice. The control-process
    gradient is not the derivative of the forward, so ``gradcheck`` applies only to ``approx_backward=False``.
    """

    feature_dim = 1

    def __init__(self, num_features: int, *, alpha_fwd: float = 0.999, alpha_bkw: float = 0.99,
                 eps: float = 1e-5, layer_scaling: bool = True, approx_backward: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        owner = "OnlineNorm"
        self.num_features = check_positive_int(num_features, "num_features", owner)
        self.alpha_fwd = check_momentum(alpha_fwd, "alpha_fwd", owner)
        self.alpha_bkw = check_momentum(alpha_bkw, "alpha_bkw", owner)
        self.eps = _check_eps(eps, owner)
        self.layer_scaling = bool(layer_scaling)
        self.approx_backward = bool(approx_backward)
        factory = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("err_y", torch.zeros(num_features, **factory))
        self.register_buffer("err_1", torch.zeros(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, eps={self.eps}, "
                f"layer_scaling={self.layer_scaling}, approx_backward={self.approx_backward}")

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        _check_channels_first(x, self.num_features, "OnlineNorm")
        mu = self.running_mean.detach().clone()
        scale = (self.running_var.to(x.dtype) + self.eps).sqrt()
        if self.training:
            if x.numel() == 0:
                raise ValueError(f"OnlineNorm: expected a non-empty batch when training, got shape {tuple(x.shape)}")
            if self.approx_backward:
                y = _OnlineNormalize.apply(x, mu, scale, self.err_y, self.err_1, self.alpha_bkw)
            else:
                y = (x - _per_channel(mu, x)) / _per_channel(scale, x)
            self._update_statistics(x.detach())
        else:
            y = (x - _per_channel(mu, x)) / _per_channel(scale, x)
        out = y * _per_channel(self.weight, x) + _per_channel(self.bias, x)
        if self.layer_scaling:
            dims = tuple(range(1, x.ndim))
            out = out * (out.square().mean(dims, keepdim=True) + self.eps).rsqrt()
        return out

    @torch.no_grad()
    def _update_statistics(self, x: Tensor) -> None:
        dims = (0, *range(2, x.ndim))
        a = self.alpha_fwd
        batch_mean = x.mean(dims).to(self.running_mean.dtype)
        batch_var = x.var(dims, unbiased=False).to(self.running_var.dtype)
        delta = batch_mean - self.running_mean
        self.running_var.mul_(a).add_((1.0 - a) * batch_var + a * (1.0 - a) * delta.square())   # Eq. (8c)
        self.running_mean.add_((1.0 - a) * delta)                                                # Eq. (8b)
        self.num_batches_tracked.add_(1)


register_norm("onlinenorm", "euclidean")(OnlineNorm)
