r"""GBWBN: Riemannian batch normalization of SPD matrices under the generalized Bures–Wasserstein metric."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from manifoldnorm import functional as mf
from manifoldnorm.functional import _gbwbn_ops as ops
from manifoldnorm.functional._batch import default_tol
from manifoldnorm.functional.spd_bw import geodesic_bw

from ._batch_stats import StatReducer, active_reducer, batch_mean, batch_mean_count, degenerate_batch, reduce_fn
from ._common import (
    autocast_off,
    check_compute_dtype,
    check_momentum,
    check_positive_int,
    from_channels,
    resolve_dtype,
    spd_identity_parameter,
    to_channels,
)
from ._gbwbn_ref import gbwbn_reference
from .base import RefittableNorm
from .registry import register_norm

__all__ = ["GBWBatchNorm"]


class _NonFinite(ArithmeticError):
    """Internal: a statistic of the batch came out non-finite (diagnosed by ``GBWBatchNorm._range_error``)."""


class GBWBatchNorm(RefittableNorm):
    r"""Batch normalization of SPD matrices under the power-deformed generalized Bures–Wasserstein metric.

    Wang, Jin, Chen, Luo & Wu, "Learning to Normalize on the SPD Manifold under Bures-Wasserstein Geometry",
    CVPR 2025 (GBWBN). The metric is the BW metric (:mod:`manifoldnorm.functional.spd_bw`) pulled back by
    :math:`\phi(X) = M^{-1/2}X^\theta M^{-1/2}` with a learnable SPD metric parameter :math:`M` (``metric_weight``,
    init :math:`I`; Han et al. 2023's GBW metric) and a power deformation :math:`\theta`. On
    :math:`Z_i = \phi(X_i)` a training step is

    .. math::

        G &= \mathrm{BW\text{-}barycenter}\{Z_i\},\qquad v^2 = \tfrac{1}{N\theta^2}\textstyle\sum_i d^2_{BW}(Z_i, G),
        \qquad c = s/\sqrt{v^2 + \epsilon},\\
        \bar Z_i &= \mathrm{Exp}_I\big(\Gamma_{G\to I}\,\mathrm{Log}_G Z_i\big),\qquad
        \hat Z_i = \mathrm{Exp}_I\big(c\,\mathrm{Log}_I \bar Z_i\big),\\
        Y_i &= \phi^{-1}\Big(\mathrm{Exp}_W\big(\Gamma_{I\to W}\,\mathrm{Log}_I \hat Z_i\big)\Big),\qquad
        W = \phi(B),

    (centering, scaling, biasing) with BW logarithm/exponential, the BW parallel transports :math:`\Gamma` along
    the geodesics through :math:`I` (closed form: :func:`~manifoldnorm.functional.transport_bw_to_identity`),
    the barycenter by :math:`\text{mean\_steps}` fixed-point iterations from the arithmetic mean, the SPD bias
    :math:`B` (``weight``, init :math:`I`) and the dispersion :math:`s` (``shift``, init 1). With an exact
    barycenter the outputs have generalized-BW mean :math:`B` and dispersion :math:`s^2 v^2/(v^2+\epsilon)`,
    as long as the logarithms invert the exponentials (see Notes). Running statistics: :math:`R \leftarrow
    \gamma^{BW}_{R\to G}(\text{momentum})`, :math:`r \leftarrow (1-\text{momentum})r + \text{momentum}\,v^2`;
    evaluation uses :math:`(R, r)`. ``train_momentum`` :math:`\eta<1` normalizes training batches with
    :math:`G_\eta = \gamma^{BW}_{T\to G}(\eta)` and :math:`(1-\eta)t + \eta v^2_\eta` (Kobler et al. 2022; buffers
    ``train_mean``, ``train_var``), :math:`v^2_\eta` measured around :math:`G_\eta`.

    Parameters
    ----------
    n : int
        Matrix size; inputs ``(N, n, n)`` or ``(N, C, n, n)``, statistics per channel over ``N``.
    theta : float
        Power deformation :math:`\theta \ne 0` (1: the plain generalized BW metric).
    momentum, train_momentum : float
        Momentum of the running (evaluation) statistics, and :math:`\eta \in (0, 1]` of the training statistics.
    eps : float
        :math:`\epsilon` of the scaling factor.
    channels : int
        ``C``; ``weight``/``metric_weight`` are ``(C, n, n)``, ``shift`` and variances ``(C,)``.
    mean_steps : int
        Fixed-point iterations of the training batch mean (1 in the reference code).
    refit_mean_steps : int
        Maximum iterations when refitting (:func:`~manifoldnorm.nn.refit_domain_norms`; early stop).
    learn_metric : bool
        Learn :math:`M`; ``False`` freezes it (``requires_grad=False``) at its current value.
    detach_mean : bool
        Treat the batch mean (and the momentum centre) as constants for autograd (the reference computes it
        under ``no_grad``); ``False`` differentiates through the unrolled iterations.
    validate : bool
        Check symmetry and positive definiteness of the input (one Cholesky per matrix).
    compute_dtype : None, torch.float32 or torch.float64
        Dtype of the computation (``None``: promoted dtype of input and parameters, at least float32). The
        output has the promoted dtype of input and parameters (float16/bfloat16 inputs: their own dtype).

    Notes
    -----
    :math:`\mathrm{Exp}_I V = (I+V/2)^2` and :math:`\mathrm{Log}_I X = 2X^{1/2} - 2I`, so
    :math:`\mathrm{Log}_I\mathrm{Exp}_I V = 2|I+V/2| - 2I`, which is :math:`V` only while :math:`I + V/2 \succ 0`.
    Both round trips are computed exactly: a batched Cholesky test picks the shortcut, and the matrices that fail
    it take an eigendecomposition. The mean and dispersion guarantee above holds while every exponential stays
    in its injectivity domain (:math:`I + cV_i/2 \succ 0` at :math:`I` and :math:`I + \mathcal L_W[U_i] \succ 0`
    at :math:`W`, i.e. the BW geodesics are minimizing up to time 1). This is a property of the BW geometry, not
    of the implementation: with :math:`s \approx 1`, a bias with small eigenvalues or a batch whose mean is far
    from the scale of :math:`I`, outlying samples leave it and the output mean drifts from :math:`B`.
    Degenerate batches (one matrix, or all :math:`X_i^\theta` equal to working precision; see the Notes of
    :class:`~manifoldnorm.nn.LieBatchNorm`) are scaled with the running variance, which is then left unchanged;
    every other batch is normalized by the formula above at any scale (e.g. a batch multiplied by
    :math:`10^{-8}`, whose dispersion scales with it). :math:`d^2_{BW}` is computed as
    :math:`\mathrm{tr}Z_i + \mathrm{tr}G - 2\,\mathrm{tr}(G^{1/2}Z_iG^{1/2})^{1/2}`, which cancels: its round-off
    is about :math:`\epsilon_{\mathrm{dtype}}\,\mathrm{tr}Z`, so dispersions below that are noise (a negative
    batch value is clamped to 0). Range: the BW steps form products of two matrices of the scale of
    :math:`X^\theta` (:math:`G^{1/2}Z_iG^{1/2}`), so float32 holds entries up to about :math:`10^{19}` and down
    to about :math:`10^{-15}`; beyond, the layer raises a ValueError that says overflow or underflow and what to
    try (rescale, ``compute_dtype=torch.float64``) instead of an ``eigh`` failure or a NaN, and leaves its
    statistics untouched. A training step costs two batched ``eigh`` (one fixed-point step, one centering) at
    :math:`\theta = 1`, plus two for :math:`X^\theta` and :math:`Y^{1/\theta}` otherwise; the Lyapunov solve and
    the transports share the eigendecompositions of :math:`G` and :math:`W`.

    Deviations
    ----------
    * The variance is the BW dispersion of the batch around its mean (the Fréchet variance, which the
      statistics guarantee needs); the reference code averages :math:`d^2(Z_i, I)` of the *uncentred* batch.
    * The variance is differentiated (the reference computes it under ``no_grad``), like the other norms here.
    * The bias starts at exactly :math:`I` (reference: :math:`I + 10^{-7}\mathrm{diag}(1..n)`): the spectral
      functions, the Lyapunov solve and the transports have exact gradients at repeated eigenvalues.
    * Statistics per channel (the reference pools ``N*C`` matrices) with one ``shift`` per channel; running
      statistics are buffers holding the means in input coordinates (:math:`\phi^{-1}` of the BW means), so
      they stay valid while :math:`M` learns; the reference stores them in :math:`\phi`-coordinates as a plain
      attribute and an ``nn.Parameter``.
    * ``weight`` and ``metric_weight`` are geoopt SPD parameters (affine-invariant Riemannian optimizers); the
      reference updates them with a BW Riemannian SGD step.
    * Degenerate batches reuse the running variance; ``train_momentum`` and refitting are additions.
    """

    _stat_names: tuple[str, ...] = ("running_mean", "running_var", "train_mean", "train_var")

    def __init__(self, n: int, theta: float = 1.0, momentum: float = 0.1, train_momentum: float = 1.0,
                 eps: float = 1e-5, channels: int = 1, mean_steps: int = 1, refit_mean_steps: int = 50,
                 learn_metric: bool = True, detach_mean: bool = True, validate: bool = True,
                 compute_dtype: torch.dtype | str | None = None, dtype: torch.dtype = torch.float64,
                 device=None) -> None:
        super().__init__()
        owner = type(self).__name__
        self.n = check_positive_int(n, "n", owner)
        self.channels = check_positive_int(channels, "channels", owner)
        theta = float(theta)
        if theta == 0.0 or not math.isfinite(theta):
            raise ValueError(f"{owner}: theta must be finite and non-zero, got {theta}")
        if not float(eps) > 0.0:
            raise ValueError(f"{owner}: eps must be > 0, got {eps}")
        self.theta, self.eps = theta, float(eps)
        self.momentum = check_momentum(momentum, "momentum", owner)
        self.train_momentum = self._check_train_momentum(train_momentum)
        self.mean_steps = check_positive_int(mean_steps, "mean_steps", owner)
        self.refit_mean_steps = check_positive_int(refit_mean_steps, "refit_mean_steps", owner)
        self.learn_metric, self.detach_mean, self.validate = bool(learn_metric), bool(detach_mean), bool(validate)
        self.compute_dtype = check_compute_dtype(compute_dtype, owner)
        self.refitting = False
        self.weight = spd_identity_parameter(self.channels, self.n, dtype, device)
        self.metric_weight = spd_identity_parameter(self.channels, self.n, dtype, device)
        self.metric_weight.requires_grad_(self.learn_metric)
        self.shift = nn.Parameter(torch.ones(self.channels, dtype=dtype, device=device))
        eye = torch.eye(self.n, dtype=dtype, device=device).expand(self.channels, self.n, self.n)
        one = torch.ones(self.channels, dtype=dtype, device=device)
        for name, value in zip(self._stat_names, (eye, one, eye, one), strict=True):
            self.register_buffer(name, value.clone())

    # statistics and momenta ------------------------------------------------------------------------------------

    @torch.no_grad()
    def _set_stats(self, values: tuple[Tensor, ...]) -> None:
        for name, value in zip(self._stat_names, values, strict=True):
            getattr(self, name).copy_(value)

    def reset_running_stats(self) -> None:
        """Running and training statistics back to (identity, 1)."""
        with torch.no_grad():
            for name in self._stat_names:
                buf = getattr(self, name)
                buf.copy_(torch.eye(self.n, dtype=buf.dtype, device=buf.device).expand_as(buf) if buf.dim() > 1
                          else torch.ones_like(buf))

    def reset_parameters(self) -> None:
        """Bias and metric parameter back to the identity, dispersion back to one; statistics reset too."""
        self.reset_running_stats()
        with torch.no_grad():
            for p in (self.weight, self.metric_weight):
                p.copy_(torch.eye(self.n, dtype=p.dtype, device=p.device).expand_as(p))
            self.shift.fill_(1.0)

    # coordinates -----------------------------------------------------------------------------------------------
    def _pow(self, X: Tensor, p: float) -> Tensor:
        return X if p == 1.0 else mf.sym_powm(X, p)

    def _phi(self, R: Tensor, Mih: Tensor) -> Tensor:
        """Input coordinates -> BW coordinates, :math:`M^{-1/2}R^\\theta M^{-1/2}` (per channel)."""
        return mf.congruence(Mih, self._pow(R, self.theta))

    def _phi_inv(self, Z: Tensor, Mh: Tensor) -> Tensor:
        return self._pow(mf.congruence(Mh, Z), 1.0 / self.theta)

    def distance(self, A: Tensor, B: Tensor) -> Tensor:
        r"""Power-deformed generalized BW distance :math:`d_{\mathrm{BW}}(\phi(A), \phi(B))/|\theta|`
        (:func:`~manifoldnorm.functional.distance_gbw` with the learned ``metric_weight``), the one the variance is
        measured in."""
        M = self.metric_weight.to(A.dtype)
        return mf.distance_gbw(self._pow(A, self.theta), self._pow(B, self.theta), M) / abs(self.theta)

    # forward -----------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        """Normalize ``x`` (``domain`` is accepted and ignored: this layer is not domain-aware).

        A non-finite intermediate (overflow or underflow of the compute dtype, or a non-finite parameter) never
        surfaces as an ``eigh`` failure or a NaN output: it raises a ValueError that says which, with the input's
        magnitude and what to try; the statistics are left untouched.
        """
        red = active_reducer(self)
        x4 = to_channels(x, self.n, self.channels, type(self).__name__, self.validate, allow_empty=red is not None)
        with autocast_off(x4):
            cdt, odt = resolve_dtype(x4, self.weight, self.compute_dtype)
            try:
                y, stats = self._forward(x4, cdt, red)
            except (torch.linalg.LinAlgError, _NonFinite) as err:
                raise self._range_error(x4, cdt) from err
            except ValueError as err:  # a matrix function refusing a non-finite intermediate
                diagnosis = self._range_error(x4, cdt, specific=True)
                if diagnosis is None:
                    raise
                raise diagnosis from err
            if y.numel() and not bool(torch.isfinite(y.detach().sum())) and not bool(torch.isfinite(y).all()):
                raise self._range_error(x4, cdt)
            if stats is not None:  # committed only once the output is known to be finite
                self._set_stats(stats)
        return from_channels(y.to(odt), x)

    def _range_error(self, x4: Tensor, cdt: torch.dtype, specific: bool = False) -> ValueError | None:
        """Diagnose a non-finite intermediate: overflow, underflow or non-finite parameters; say what to try.

        The internal failure (if any) is chained as the cause by the caller, not repeated in the message. With
        ``specific``, ``None`` when none of these causes is found (the caller re-raises the original error).
        """
        owner, info = type(self).__name__, torch.finfo(cdt)
        name = str(cdt).removeprefix("torch.")
        params = {k: getattr(self, k) for k in ("weight", "metric_weight", "shift")}
        bad = [k for k, p in params.items() if not bool(torch.isfinite(p.detach()).all())]
        if bad:
            return ValueError(f"{owner}: parameter(s) {', '.join(bad)} hold NaN/Inf (a diverged training step?); "
                              "lower the learning rate or restore the last good checkpoint")
        with torch.no_grad():
            X = x4.detach().double()
            top = float(X.abs().amax()) if X.numel() else 0.0
            diag = torch.diagonal(X, dim1=-2, dim2=-1)
            low = float(diag.amin()) if diag.numel() else 1.0
        scale = max(abs(self.theta), 1.0)
        # the BW steps form G^{1/2} Z G^{1/2}: products of two matrices of the input's scale (X^theta)
        big, small = top ** (2 * scale) if top > 1 else top, low ** (2 * scale) if low < 1 else low
        advice = ("rescale the input (e.g. divide each matrix by its trace / n, or the batch by a constant) or "
                  "pass compute_dtype=torch.float64")
        if big > info.max / (4 * self.n):
            return ValueError(
                f"{owner}: {name} overflow: input entries reach {top:.3g} and the Bures-Wasserstein steps form "
                f"products of two such matrices (about {big:.3g}), beyond the {name} range {info.max:.3g}; "
                f"{advice}")
        if 0.0 < small < info.tiny / info.eps:
            return ValueError(
                f"{owner}: {name} underflow: input diagonal entries go down to {low:.3g} and the "
                f"Bures-Wasserstein steps form products of two such matrices (about {small:.3g}), below the "
                f"{name} normal range {info.tiny:.3g}; {advice}")
        if specific:
            return None
        return ValueError(
            f"{owner}: a non-finite intermediate in {name} (input entries up to {top:.3g}, diagonal down to "
            f"{low:.3g}): the batch may be too ill-conditioned for {name}; pass compute_dtype=torch.float64 or "
            "regularize the input (add eps * I)")

    def _forward(self, x4: Tensor, cdt: torch.dtype,
                 red: StatReducer | None) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """The layer output in ``cdt`` (autocast is off) and the new statistics (training / refit) or ``None``."""
        stats = None
        Mh, Mih = mf.sym_sqrtm_invsqrtm(self.metric_weight.to(cdt))
        Xt = self._pow(x4.to(cdt), self.theta)
        trZ = (mf.congruence(Mih, torch.eye(self.n, dtype=cdt, device=x4.device)) * Xt).sum((-1, -2))
        if self.refitting:
            V, U, var, stats = self._refit(Xt, Mih, Mh, trZ, red)
        elif self.training:
            V, U, var, stats = self._train(Xt, Mih, Mh, trZ, red)
        else:
            R = self._phi(self.running_mean.to(cdt), Mih)
            V, U, d2 = self._centre(Xt, Mih, trZ, R)
            var = self.running_var.to(cdt)
        V = ops.log_exp_identity(V)
        c = self.shift.to(cdt) / torch.sqrt(var + self.eps)
        V = ops.log_exp_identity(c.unsqueeze(-1).unsqueeze(-1) * V)
        W = self._phi(self.weight.to(cdt), Mih)
        return self._pow(ops.bias(V, U, W, Mh), 1.0 / self.theta), stats

    @staticmethod
    def _centre(Xt: Tensor, Mih: Tensor, trZ: Tensor, G: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        if G.requires_grad and torch.is_grad_enabled():
            return ops.centre_generic(Xt, Mih, trZ, G)
        return ops.centre_constant(Xt, Mih, trZ, G)

    def _train(self, Xt: Tensor, Mih: Tensor, Mh: Tensor, trZ: Tensor,
               red: StatReducer | None = None) -> tuple[Tensor, Tensor | None, Tensor, tuple[Tensor, ...]]:
        """Centre one batch with its (momentum) statistics: ``(V, U, variance, new statistics)``.

        The new statistics are committed by :meth:`forward` once the output is known to be finite.
        """
        cdt = Xt.dtype
        R, r, T, t = (getattr(self, k).to(cdt) for k in self._stat_names)
        eta, m = self.train_momentum, self.momentum
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_mean):
            src, Mis = (Xt.detach(), Mih.detach()) if self.detach_mean else (Xt, Mih)
            G = ops.barycenter(src, Mis, self.mean_steps, tol=0.0, reduce=reduce_fn(red))
            centre = G if eta == 1.0 else geodesic_bw(self._phi(T, Mis).detach(), G.detach(), eta)
        V, U, d2 = self._centre(Xt, Mih, trZ, centre)
        v, count = batch_mean_count(d2, red)
        # d2 = tr Z + tr G - 2 tr S cancels: a batch of nearly equal matrices may give a round-off v < 0
        v = v.clamp_min(0.0) / self.theta**2
        v_eta = v if eta == 1.0 else (1.0 - eta) * t + eta * v
        degenerate = degenerate_batch(Xt, count, red)
        var = torch.where(degenerate, r, v_eta)
        with torch.no_grad():
            Mih0, Mh0, G0 = Mih.detach(), Mh.detach(), G.detach()
            R_new = self._phi_inv(geodesic_bw(self._phi(R, Mih0), G0, m), Mh0)
            r_new = torch.where(degenerate, r, (1.0 - m) * r + m * v.detach())
            t_new = torch.where(degenerate, t, v_eta.detach())
            new = (R_new, r_new, self._phi_inv(centre.detach(), Mh0), t_new)
            if not bool(torch.stack([torch.isfinite(u).all() for u in new]).all()):
                raise _NonFinite("non-finite batch statistics")
        return V, U, var, new

    @torch.no_grad()
    def _refit(self, Xt: Tensor, Mih: Tensor, Mh: Tensor, trZ: Tensor,
               red: StatReducer | None = None) -> tuple[Tensor, Tensor | None, Tensor, tuple[Tensor, ...]]:
        """Converged barycenter and exact dispersion of the batch: ``(V, U, variance, new statistics)``."""
        G = ops.barycenter(Xt, Mih, self.refit_mean_steps, tol=default_tol(Xt.dtype), reduce=reduce_fn(red))
        V, U, d2 = ops.centre_constant(Xt, Mih, trZ, G)
        v = batch_mean(d2, red).clamp_min(0.0) / self.theta**2
        R = self._phi_inv(G, Mh)
        if not (bool(torch.isfinite(R).all()) and bool(torch.isfinite(v).all())):
            raise _NonFinite("non-finite refitted statistics")
        return V, U, v, (R, v, R.clone(), v.clone())

    def forward_ref(self, x: Tensor) -> Tensor:
        """Training-mode output from batch statistics by an independent plain-autograd path (tests, benchmark)."""
        x4 = to_channels(x, self.n, self.channels, type(self).__name__, validate=False)
        cdt, odt = resolve_dtype(x4, self.weight, self.compute_dtype)
        y = gbwbn_reference(x4.to(cdt), self.theta, self.weight.to(cdt), self.metric_weight.to(cdt),
                            self.shift.to(cdt), self.eps, self.mean_steps, self.detach_mean,
                            self.running_var.to(cdt))
        return from_channels(y.to(odt), x)

    def extra_repr(self) -> str:
        return (f"{self.n}, theta={self.theta:g}, momentum={self.momentum:g}, "
                f"train_momentum={self.train_momentum:g}, eps={self.eps:g}, channels={self.channels}, "
                f"mean_steps={self.mean_steps}, learn_metric={self.learn_metric}")


register_norm("gbwbn", "spd")(GBWBatchNorm)
