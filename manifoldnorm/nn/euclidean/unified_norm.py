"""Unified Normalization: PowerNorm-style scaling with window-smoothed statistics and outlier filtration.

Acts on ``(..., C)`` inputs (features in the LAST dim, the token layout of transformers). Parameters and buffers
are cast to the input dtype for the computation, so the output keeps the input's shape and dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .._common import check_momentum, check_positive_int
from ..registry import register_norm
from .batch_free import _check_eps, _check_tensor

__all__ = ["UnifiedNorm"]


@dataclass
class _BackwardState:
    """What the approximate backward of one training step reads and updates."""

    running_grad: Tensor   # (C,) exponential average nu of the smoothed gradient statistic
    window_grad: Tensor    # (M_b, C) ring buffer of gradient statistics
    step: int              # t, 1-based
    per_batch: bool        # t <= M_b or t < warmup: use this batch's statistic, not the window mean
    skipped: bool          # the batch was filtered as an outlier (or M = 1)
    alpha: float


class _UnifiedNormalize(torch.autograd.Function):
    """``y = gamma * x * inv + beta`` with the approximate backward of :class:`UnifiedNorm`."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, inv: Tensor, r: Tensor,  # type: ignore[override]
                state: _BackwardState) -> Tensor:
        z = x * inv
        ctx.save_for_backward(z, inv, r, weight)
        ctx.state = state
        return z * weight + bias

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        z, inv, r, weight = ctx.saved_tensors
        st: _BackwardState = ctx.state
        c = z.shape[-1]
        g = grad * weight * r
        with torch.no_grad():
            gam = (g * z).reshape(-1, c).mean(0).to(st.running_grad.dtype)
            slot = st.step % st.window_grad.shape[0]
            st.window_grad[slot].copy_(st.running_grad if st.skipped else gam)
            smoothed = gam if (st.per_batch or st.skipped) else st.window_grad.mean(0)
            st.running_grad.mul_(st.alpha).add_((1.0 - st.alpha) * smoothed)
            proj = smoothed if st.skipped else st.running_grad
        grad_x = (g - proj.to(g.dtype) * z) * inv
        grad_w = (grad * r * z).reshape(-1, c).sum(0)
        grad_b = grad.reshape(-1, c).sum(0)
        return grad_x, grad_w, grad_b, None, None, None


def _check_window(window_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(window_size, (tuple, list)):
        if len(window_size) != 2:
            raise ValueError(f"UnifiedNorm: window_size must be an int or a pair (forward, backward), got "
                             f"{window_size!r}")
        fwd, bwd = window_size
    else:
        fwd = bwd = window_size
    return (check_positive_int(fwd, "window_size", "UnifiedNorm"),
            check_positive_int(bwd, "window_size", "UnifiedNorm"))


def _check_nonneg_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"UnifiedNorm: {name} must be a non-negative int, got {value!r}")
    return value


class UnifiedNorm(nn.Module):
    r"""Unified Normalization: quadratic-mean scaling smoothed over a window of iterations, offline at inference.

    Training step :math:`t = 1, 2, \dots` on a batch :math:`X` (all leading dims flattened to :math:`B` rows),
    per feature, with a window of the last :math:`M` batch statistics (buffer ``window_phi``, ring index
    :math:`t \bmod M`):

    .. math::
        \psi_B^2 = \tfrac1B \textstyle\sum_i x_i^2, \qquad
        \hat\psi_t^2 = \begin{cases} \psi_B^2 & t \le M \text{ or } t < T_w \text{ or filtered} \\
            \big(\prod_{k=0}^{M-1} \psi_{B,t-k}^2\big)^{1/M} & \text{otherwise (geometric mean)} \end{cases}

        z = \frac{x}{\sqrt{\hat\psi_t^2 + \epsilon}}, \qquad y = \gamma \odot z + \beta, \qquad
        \psi_t^2 = \alpha\,\psi_{t-1}^2 + (1-\alpha)\,\hat\psi_t^2 \quad (\text{buffer } \texttt{running\_phi}).

    Outlier filtration (``outlier_filtration=True``, :math:`t \ge T_w`): let :math:`s^2` be the unbiased
    variance of :math:`\sqrt{\cdot}` of all ``M * C`` window entries before :math:`\psi_B^2` enters. If, after it
    enters, :math:`\mathrm{AM} - \mathrm{GM} > M s^2` for any feature (arithmetic and geometric mean over the
    window), the batch is filtered: its window entry is replaced by :math:`\psi_{t-1}^2`, the batch statistic
    :math:`\psi_B^2` is used, and ``num_skipped`` is incremented. A window of size 1 always counts as filtered.

    Approximate backward (``approx_backward=True``), with :math:`g = r \gamma \odot \partial L/\partial y`:

    .. math::
        \Gamma_B = \tfrac1B \textstyle\sum_i z_i \odot g_i, \qquad
        \bar\Gamma_t = \begin{cases} \Gamma_B & t \le M_b \text{ or } t < T_w \text{ or filtered} \\
            \text{mean of the last } M_b\ \Gamma_B & \text{otherwise} \end{cases}, \qquad
        \nu_t = \alpha\,\nu_{t-1} + (1-\alpha)\,\bar\Gamma_t,

        \frac{\partial L}{\partial x} = \frac{g - \nu_t \odot z}{\sqrt{\hat\psi_t^2 + \epsilon}}
            \ \ (\text{filtered: } g - \Gamma_B \odot z), \qquad
        \frac{\partial L}{\partial \gamma} = \textstyle\sum_i \frac{\partial L}{\partial y_i} \odot r z_i,
        \qquad \frac{\partial L}{\partial \beta} = \textstyle\sum_i \frac{\partial L}{\partial y_i}

    (:math:`\nu` = buffer ``running_grad``; the window of :math:`\Gamma_B`, buffer ``window_grad``, receives
    :math:`\nu_{t-1}` for a filtered batch). The gradient compensation factor
    :math:`r = \mathrm{clip}\big(\sqrt{(\hat\psi_t^2 + \epsilon)/(\psi_{t-1}^2 + \epsilon)}, 1/c, c\big)` for
    :math:`t > \max(T_c, T_w)` and unfiltered batches, else :math:`r = 1`, makes the gradients those of the
    output scaled by the running statistic :math:`x / \sqrt{\psi_{t-1}^2 + \epsilon}`. The buffers of the
    backward are updated when it runs. With ``approx_backward=False`` the gradient is plain autograd through the
    forward (through :math:`\psi_B^2` of the current batch, alone or inside the geometric mean; earlier window
    entries are constants). In eval mode :math:`y = \gamma\, x / \sqrt{\psi^2 + \epsilon} + \beta` with the
    running :math:`\psi^2`, a per-feature affine map that fuses into the neighbouring linear layers.

    Yang, Zhang, Lan, Yang, Li, Tan, Xiao, Pu, "Unified Normalization for Accelerating and Stabilizing
    Transformers", ACM MM 2022 (arXiv:2208.01313): fluctuation smoothing of the activation and gradient
    statistics and adaptive outlier filtration; the rules above are those of the authors' released ``UN1d``.

    Parameters
    ----------
    num_features : int
        Feature size ``C`` (last dim).
    window_size : int or (int, int), default 4
        Window :math:`M` of the forward statistics and :math:`M_b` of the backward ones (one int: both).
    alpha : float, default 0.9
        Decay of :math:`\psi^2` and :math:`\nu`, in ``[0, 1]`` (weight of the OLD value).
    eps : float, default 1e-5
    warmup_iters : int, default 4000
        :math:`T_w`: before it, batch statistics are used in both passes and no batch is filtered.
    outlier_filtration : bool, default False
        Enable the filtration (the authors advise it for vision, not for language tasks).
    compensation_iters : int, default 1000
        :math:`T_c`: the compensation :math:`r` is 1 up to step :math:`\max(T_c, T_w)`.
    compensation_clip : float, default 5.0
        :math:`c \ge 1`, the clip of :math:`r`; ``1.0`` turns the compensation off.
    approx_backward : bool, default True
    dtype, device
        Of ``weight`` (ones), ``bias`` (zeros) and the buffers ``running_phi`` (ones), ``running_grad`` (zeros),
        ``window_phi`` ``(M, C)`` and ``window_grad`` ``(M_b, C)`` (zeros), ``num_batches_tracked``,
        ``num_skipped``.

    Shapes
    ------
    ``x``: ``(..., C)`` with at least 2 dims (features last; e.g. ``(N, L, C)`` tokens) -> same shape and dtype;
    ``domain`` is accepted and ignored.

    Deviations
    ----------
    The paper's full text could not be consulted; its abstract confirms the two components, and every rule and
    constant above (window ring buffers initialised to zeros, geometric mean forward / arithmetic mean then
    exponential average backward, the step thresholds, the pooled variance and the factor :math:`M` of the
    filtration test, the compensation :math:`r` and its clip, the updated :math:`\nu_t` in the projection) is
    taken from the authors' released implementation and is not checked against paper equations, so none are
    cited. Not implemented: the padding mask of that implementation (statistics are taken over all rows).
    Added: ``approx_backward=False``. With the filtration on before the window has filled (:math:`T_w < M`), the
    zero-initialised entries make the first batches count as outliers, as in the released code.
    """

    feature_dim = -1

    def __init__(self, num_features: int, *, window_size: int | tuple[int, int] = 4, alpha: float = 0.9,
                 eps: float = 1e-5, warmup_iters: int = 4000, outlier_filtration: bool = False,
                 compensation_iters: int = 1000, compensation_clip: float = 5.0, approx_backward: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        owner = "UnifiedNorm"
        self.num_features = check_positive_int(num_features, "num_features", owner)
        self.window_size = _check_window(window_size)
        self.alpha = check_momentum(alpha, "alpha", owner)
        self.eps = _check_eps(eps, owner)
        self.warmup_iters = _check_nonneg_int(warmup_iters, "warmup_iters")
        self.outlier_filtration = bool(outlier_filtration)
        self.compensation_iters = _check_nonneg_int(compensation_iters, "compensation_iters")
        clip = float(compensation_clip)
        if not (math.isfinite(clip) and clip >= 1.0):
            raise ValueError(f"{owner}: compensation_clip must be a finite number >= 1, got {compensation_clip}")
        self.compensation_clip = clip
        self.approx_backward = bool(approx_backward)
        factory = {"dtype": dtype, "device": device}
        m_fwd, m_bwd = self.window_size
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.register_buffer("running_phi", torch.ones(num_features, **factory))
        self.register_buffer("running_grad", torch.zeros(num_features, **factory))
        self.register_buffer("window_phi", torch.zeros(m_fwd, num_features, **factory))
        self.register_buffer("window_grad", torch.zeros(m_bwd, num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.register_buffer("num_skipped", torch.tensor(0, dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, window_size={self.window_size}, alpha={self.alpha}, eps={self.eps}, "
                f"warmup_iters={self.warmup_iters}, outlier_filtration={self.outlier_filtration}, "
                f"compensation_iters={self.compensation_iters}, compensation_clip={self.compensation_clip}, "
                f"approx_backward={self.approx_backward}")

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        _check_tensor(x, "UnifiedNorm")
        c = self.num_features
        if x.ndim < 2 or x.shape[-1] != c:
            raise ValueError(f"UnifiedNorm: expected an input of shape (..., {c}) with at least 2 dims "
                             f"(features last), got shape {tuple(x.shape)}")
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if not self.training:
            return x * (self.running_phi.to(x.dtype) + self.eps).rsqrt() * w + b
        if x.numel() == 0:
            raise ValueError(f"UnifiedNorm: expected a non-empty batch when training, got shape {tuple(x.shape)}")
        self.num_batches_tracked.add_(1)
        t = int(self.num_batches_tracked.item())
        psi2_batch = x.reshape(-1, c).square().mean(0)
        psi2, skipped = self._smoothed_statistic(psi2_batch, t)
        psi2_d = psi2.detach()
        prev = self.running_phi.detach().clone().to(x.dtype)
        with torch.no_grad():
            self.running_phi.mul_(self.alpha).add_((1.0 - self.alpha) * psi2_d.to(self.running_phi.dtype))
        if not self.approx_backward:
            return x * (psi2 + self.eps).rsqrt() * w + b
        if t > max(self.compensation_iters, self.warmup_iters) and not skipped:
            clip = self.compensation_clip
            r = ((psi2_d + self.eps) / (prev + self.eps)).sqrt().clamp(1.0 / clip, clip)
        else:
            r = torch.ones_like(psi2_d)
        m_bwd = self.window_size[1]
        state = _BackwardState(self.running_grad, self.window_grad, t,
                               per_batch=t <= m_bwd or t < self.warmup_iters, skipped=skipped, alpha=self.alpha)
        return _UnifiedNormalize.apply(x, w, b, (psi2_d + self.eps).rsqrt(), r, state)

    def _smoothed_statistic(self, psi2_batch: Tensor, t: int) -> tuple[Tensor, bool]:
        """:math:`\\hat\\psi_t^2` (differentiable through ``psi2_batch``) and whether the batch was filtered."""
        window = self.window_phi
        m = window.shape[0]
        slot = t % m
        skipped = m == 1
        with torch.no_grad():
            if self.outlier_filtration:
                recorded = window.sqrt().var()
            window[slot].copy_(psi2_batch.detach().to(window.dtype))
            if self.outlier_filtration and t >= self.warmup_iters:
                am = window.mean(0)
                gm = window.log().mean(0).exp()
                if bool(((am - gm) > recorded * m).any()):
                    window[slot].copy_(self.running_phi)
                    self.num_skipped.add_(1)
                    skipped = True
        if t <= m or t < self.warmup_iters or skipped:
            return psi2_batch, skipped
        others = torch.cat([window[:slot], window[slot + 1:]]).log().sum(0).to(psi2_batch.dtype)
        return ((others + psi2_batch.log()) / m).exp(), skipped


register_norm("unifiednorm", "euclidean")(UnifiedNorm)
