r"""LieBN: Riemannian batch normalization on SPD matrices through a Lie group structure."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from manifoldnorm import functional as mf

from ._common import (
    check_momentum,
    check_positive_int,
    compute_dtype,
    from_channels,
    spd_identity_parameter,
    to_channels,
)
from ._lie_groups import make_group

__all__ = ["LieBatchNorm"]


class LieBatchNorm(nn.Module):
    r"""Lie group batch normalization of SPD matrices under the (θ,α,β)-AIM, (α,β)-LEM or θ-LCM metric.

    Chen, Song, Liu & Sebe, "A Lie Group Approach to Riemannian Batch Normalization", ICLR 2024, Alg. 1 as
    instantiated on SPD manifolds in Sec. 5.2 (scaling: Eq. 14). With :math:`\phi` the metric's deformation,
    :math:`\odot` its group operation and :math:`E` the identity (all in the codomain of :math:`\phi`, see
    :mod:`manifoldnorm.nn._lie_groups`), a training step on a batch :math:`\{X_i\}_{i=1}^N` is

    .. math::

        M &= \mathrm{FM}\{\phi(X_i)\},\qquad v^2 = \tfrac1N \textstyle\sum_i d^2(M^{-1}\odot\phi(X_i), E),\\
        Y_i &= \phi^{-1}\Big(\phi(B) \odot \mathrm{Exp}_E\big(\tfrac{s}{\sqrt{v^2+\epsilon}}\,
               \mathrm{Log}_E(M^{-1}\odot\phi(X_i))\big)\Big),

    with the learnable SPD bias :math:`B` (``weight``, init :math:`I`) and dispersion :math:`s` (``shift``, init
    1). The outputs have Fréchet mean :math:`B` and dispersion :math:`s^2 v^2/(v^2+\epsilon)` (the paper's
    guarantee on the statistics). Running statistics: :math:`R \leftarrow \gamma_{R \to M}(\text{momentum})`
    along the metric's geodesic, :math:`r \leftarrow (1-\text{momentum})\,r + \text{momentum}\,v^2`;
    evaluation uses :math:`(R, r)`.

    Parameters
    ----------
    n : int
        Matrix size; inputs are ``(N, n, n)`` or ``(N, C, n, n)`` with statistics per channel over ``N``.
    metric : {'aim', 'lem', 'lcm'}
    theta : float
        Power deformation :math:`\theta \neq 0` (AIM and LCM; must stay 1 for LEM, where it has no effect).
    alpha, beta : float
        (α,β) weights of the O(n)-invariant inner product, :math:`\alpha>0`, :math:`\beta>-\alpha/n`
        (AIM and LEM; must stay (1, 0) for LCM).
    momentum : float
        Running-statistics momentum in [0, 1].
    karcher_steps : int
        Karcher-flow iterations for the AIM batch mean (from the arithmetic mean; 1 in the paper).
    eps : float
        :math:`\epsilon` of the scaling factor.
    channels : int
        Number of channels ``C``; parameters and buffers are ``(C, n, n)`` and ``(C,)``.
    detach_mean : bool
        Treat the batch mean :math:`M` as a constant for autograd (default, as the paper's toolbox).
    validate : bool
        Check symmetry and positive definiteness of the input (one Cholesky per matrix); shape and NaN/Inf
        are always checked.

    Shapes
    ------
    ``(N, n, n)`` or ``(N, C, n, n)`` -> same shape, in the promoted dtype of input and parameters.

    Notes
    -----
    Degenerate batches: a channel whose batch dispersion :math:`v^2` is below ``eps`` (a batch of one matrix,
    or identical matrices) is scaled with the running variance :math:`r`, which is then left unchanged. This
    keeps :math:`\|\partial L/\partial X\|` at the size of a normal batch instead of the :math:`1/\sqrt\epsilon`
    blow-up of the reference code. The running mean is still updated.

    Deviations
    ----------
    * The batch mean is detached by default (the 2025 toolbox's ``is_detach=True``; the ICLR'24 code keeps the
      graph); ``detach_mean=False`` differentiates through the unrolled Karcher iterations.
    * The Karcher flow runs exactly ``karcher_steps`` steps; the toolbox's early stop tests
      :math:`\|\bar T\|_F \le 0.1` *before* its first update and may return the arithmetic mean.
    * The exponent of the AIM scaling :math:`X^{s/\sqrt{v^2+\epsilon}}` is differentiated, so ``shift`` learns
      under every metric (the toolbox drops this gradient for AIM).
    * The AIM variance is computed from the eigenvalues of the centred matrices (exact given :math:`M`), not
      re-derived from the Karcher tangent vectors.
    * ``running_mean`` is stored as an SPD matrix (the running Fréchet mean itself, not its image under
      :math:`\phi`); all running statistics are registered buffers.
    * Degenerate batches reuse the running variance (see Notes); the paper has no such rule.
    """

    def __init__(
        self,
        n: int,
        metric: str = "aim",
        theta: float = 1.0,
        alpha: float = 1.0,
        beta: float = 0.0,
        momentum: float = 0.1,
        karcher_steps: int = 1,
        eps: float = 1e-5,
        channels: int = 1,
        detach_mean: bool = True,
        validate: bool = True,
        dtype: torch.dtype = torch.float64,
        device=None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.n = check_positive_int(n, "n", owner)
        self.channels = check_positive_int(channels, "channels", owner)
        self.metric = mf.check_metric(metric, mf.METRICS)
        theta, alpha, beta = float(theta), float(alpha), float(beta)
        if theta == 0.0 or not math.isfinite(theta):
            raise ValueError(f"{owner}: theta must be finite and non-zero, got {theta}")
        if not alpha > 0.0:
            raise ValueError(f"{owner}: alpha must be > 0, got {alpha}")
        if not beta > -alpha / self.n:
            raise ValueError(f"{owner}: beta must be > -alpha/n = {-alpha / self.n:.6g}, got {beta}")
        if self.metric == "lem" and theta != 1.0:
            raise ValueError(f"{owner}: theta has no effect under the LEM metric (log X^θ = θ log X); "
                             f"leave theta=1, got {theta}")
        if self.metric == "lcm" and (alpha, beta) != (1.0, 0.0):
            raise ValueError(f"{owner}: the θ-LCM metric has no (alpha, beta); leave alpha=1, beta=0, "
                             f"got alpha={alpha}, beta={beta}")
        if not float(eps) > 0.0:
            raise ValueError(f"{owner}: eps must be > 0, got {eps}")
        self.theta, self.alpha, self.beta = theta, alpha, beta
        self.momentum = check_momentum(momentum, "momentum", owner)
        self.karcher_steps = check_positive_int(karcher_steps, "karcher_steps", owner)
        self.eps = float(eps)
        self.detach_mean = bool(detach_mean)
        self.validate = bool(validate)
        self.group = make_group(self.metric, theta, alpha, beta)

        self.weight = spd_identity_parameter(self.channels, self.n, dtype, device)
        self.shift = nn.Parameter(torch.ones(self.channels, dtype=dtype, device=device))
        self.register_buffer("running_mean", torch.eye(self.n, dtype=dtype, device=device)
                             .expand(self.channels, self.n, self.n).clone())
        self.register_buffer("running_var", torch.ones(self.channels, dtype=dtype, device=device))

    def reset_running_stats(self) -> None:
        """Running mean back to the identity, running variance back to one."""
        with torch.no_grad():
            self.running_mean.copy_(torch.eye(self.n, dtype=self.running_mean.dtype).expand_as(self.running_mean))
            self.running_var.fill_(1.0)

    def reset_parameters(self) -> None:
        """Bias back to the identity, dispersion back to one; running statistics reset too."""
        self.reset_running_stats()
        with torch.no_grad():
            self.weight.copy_(torch.eye(self.n, dtype=self.weight.dtype).expand_as(self.weight))
            self.shift.fill_(1.0)

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        """Normalize ``x`` (``domain`` is accepted and ignored: this layer is not domain-aware)."""
        x4 = to_channels(x, self.n, self.channels, type(self).__name__, self.validate)
        dtype = compute_dtype(x4, self.weight)
        Z = self.group.deform(x4.to(dtype))
        if self.training:
            Zc, var, new = self._train_group(Z, self.running_mean.to(dtype), self.running_var.to(dtype))
            with torch.no_grad():
                self.running_mean.copy_(new[0])
                self.running_var.copy_(new[1])
        else:
            Zc = self.group.center(Z, self.group.deform(self.running_mean.to(dtype)))
            var = self.running_var.to(dtype)
        return from_channels(self._scale_and_bias(Zc, var, dtype), x)

    def _train_group(self, Z: Tensor, R: Tensor, r: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """Centre one group of deformed inputs ``(N, C, n, n)`` with its batch statistics.

        ``R`` (SPD, ``(C, n, n)``) and ``r`` (``(C,)``) are the running statistics of the group. Returns the
        centred codomain elements, the variance to scale with (``(C,)``) and the updated running statistics.
        """
        g = self.group
        if self.detach_mean:
            with torch.no_grad():
                M = g.mean(Z.detach(), self.karcher_steps)
        else:
            M = g.mean(Z, self.karcher_steps)
        Zc = g.center(Z, M)
        v2 = g.sqdist_identity(Zc).mean(dim=0)
        degenerate = v2.detach() < self.eps
        if Z.shape[0] == 1:
            degenerate = torch.ones_like(degenerate)
        var = torch.where(degenerate, r, v2)
        with torch.no_grad():
            m = self.momentum
            R_new = g.undeform(g.geodesic(g.deform(R), M.detach(), m))
            r_new = torch.where(degenerate, r, (1.0 - m) * r + m * v2.detach())
        return Zc, var, (R_new, r_new)

    def _scale_and_bias(self, Zc: Tensor, var: Tensor, dtype: torch.dtype) -> Tensor:
        r"""Scale and bias centred codomain elements, back on the manifold; ``var``: ``(C,)`` or ``(N, C)``.

        :math:`\phi^{-1}(\phi(B) \odot \mathrm{Exp}_E(s/\sqrt{v^2+\epsilon}\,\mathrm{Log}_E Z_c))`.
        """
        g = self.group
        c = self.shift.to(dtype) / torch.sqrt(var + self.eps)
        return g.undeform(g.translate(g.deform(self.weight.to(dtype)), g.scale(Zc, c)))

    def extra_repr(self) -> str:
        return (f"{self.n}, metric={self.metric!r}, theta={self.theta:g}, alpha={self.alpha:g}, "
                f"beta={self.beta:g}, momentum={self.momentum:g}, karcher_steps={self.karcher_steps}, "
                f"eps={self.eps:g}, channels={self.channels}")
