r"""Domain-specific LieBN: Lie group batch normalization with one set of running statistics per domain."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from manifoldnorm import functional as mf
from manifoldnorm.functional._batch import Segments
from manifoldnorm.functional._liebn_ops import StepConfig, StepStats, aim_segment_step

from ._batch_stats import StatReducer, active_reducer, degenerate_segments
from ._common import (
    DomainStatsMixin,
    as_domain_ids,
    autocast_off,
    check_positive_int,
    from_channels,
    resolve_dtype,
    to_channels,
)
from .liebn import LieBatchNorm
from .registry import register_norm

__all__ = ["DomainLieBatchNorm"]


class DomainLieBatchNorm(DomainStatsMixin, LieBatchNorm):
    r"""LieBN of SPD matrices with per-domain running statistics and a shared bias and dispersion.

    The normalization of :class:`~manifoldnorm.nn.LieBatchNorm` (Chen, Song, Liu & Sebe, "A Lie Group Approach
    to Riemannian Batch Normalization", ICLR 2024, Alg. 1 on SPD manifolds, Sec. 5.2, scaling Eq. 14) under the
    (θ,α,β)-AIM, (α,β)-LEM or θ-LCM metric, made domain-specific as in the SPDDSMBN of Kobler, Hirayama, Zhao &
    Kawanabe ("SPD domain-specific batch normalization to crack interpretable unsupervised domain adaptation in
    EEG", NeurIPS 2022). With :math:`\phi` the metric's deformation, :math:`\odot` its group operation and
    :math:`E` the identity (see :mod:`manifoldnorm.functional._lie_groups`), a training step on a batch whose samples
    :math:`X_i` carry domain ids :math:`d_i` computes, for every domain :math:`d` present, over
    :math:`I_d = \{i : d_i = d\}`,

    .. math::

        M_d &= \mathrm{FM}\{\phi(X_i)\}_{i \in I_d},\qquad
        v_d^2 = \tfrac{1}{|I_d|} \textstyle\sum_{i \in I_d} d^2(M_d^{-1}\odot\phi(X_i), E),\\
        Y_i &= \phi^{-1}\Big(\phi(B) \odot \mathrm{Exp}_E\big(\tfrac{s}{\sqrt{v_{d_i}^2+\epsilon}}\,
               \mathrm{Log}_E(M_{d_i}^{-1}\odot\phi(X_i))\big)\Big),

    so the outputs of each domain have Fréchet mean :math:`B` and dispersion :math:`s^2 v_d^2/(v_d^2+\epsilon)`.
    The bias :math:`B` (``weight``, SPD, init :math:`I`) and dispersion :math:`s` (``shift``, init 1) are shared
    by all domains. Each domain's running statistics follow its batch statistics,
    :math:`R_d \leftarrow \gamma_{R_d \to M_d}(\text{momentum})` along the metric's geodesic and
    :math:`r_d \leftarrow (1-\text{momentum})\,r_d + \text{momentum}\,v_d^2`; evaluation normalizes each sample
    with :math:`(R_{d_i}, r_{d_i})`. For unsupervised domain adaptation, re-estimate the statistics of a new
    domain on its unlabeled data with :func:`manifoldnorm.nn.refit_domain_norms`: in refit mode :math:`R_d` and
    :math:`r_d` become the exact Fréchet mean (Karcher flow to convergence for AIM) and dispersion of the data.

    Parameters
    ----------
    n : int
        Matrix size; inputs are ``(N, n, n)`` or ``(N, C, n, n)``.
    num_domains : int or None
        Number of domains ``D`` of the data (the configs pass ``data_info.num_domains``): ``running_mean`` is
        ``(D, C, n, n)`` (SPD), ``running_var`` ``(D, C)``, every slot starting at (identity, 1), so a domain first
        seen at test time (refit) has its slot. Ids outside ``0..D-1`` raise a ValueError naming the valid range
        and the largest id seen. ``None`` (undeclared): one slot to start, a larger id grows the buffers with a
        warning. ``load_state_dict`` adopts the stored size. Declare it under DistributedDataParallel, which
        requires constant buffer shapes.
    metric, theta, alpha, beta, momentum, train_momentum, karcher_steps, eps, channels, detach_mean, detach_var,
    validate, compute_dtype, dtype, device
        As :class:`~manifoldnorm.nn.LieBatchNorm` (per domain: ``train_mean``/``train_var`` are ``(D, ...)`` too).
    refit_karcher_steps : int
        Maximum Karcher-flow iterations of the AIM mean when refitting (early stop at float precision).

    Shapes
    ------
    ``(N, n, n)`` or ``(N, C, n, n)`` -> same shape. ``forward(x, domain)``: ``domain`` is a LongTensor ``(N,)``
    of ids (or an int); ``None`` means domain 0.

    Notes
    -----
    Training, refit and evaluation are batched over the domains: the per-domain statistics are segment
    reductions over the batch (samples grouped by domain id once; segment sums by ``index_add``, statistics
    gathered back per sample), the AIM Karcher flow whitens every sample with its own domain's mean and
    decomposes the means of all domains in one batched ``eigh`` (:func:`manifoldnorm.functional.segment_mean_aim`;
    the refit's flow stops in each domain on its own), and the momentum updates index the stacked buffers. A
    training step or a refit therefore makes the same number of batched decompositions whether the batch holds
    one domain or many, with the results of one :class:`~manifoldnorm.nn.LieBatchNorm` per domain. Under AIM at
    θ = 1 with a detached mean and local statistics (the defaults) the training step is one autograd node with a
    written-out backward (:func:`manifoldnorm.functional._liebn_ops.aim_segment_step`, the kernel of
    ``LieBatchNorm``'s fused step with per-domain whitening and factors), equal to the composed group operations
    to round-off; set ``_fused = False`` on the layer to compose them. Synchronized
    (:func:`manifoldnorm.distributed.convert_sync_norm`), each reduction is one all-reduce of the packed sums of
    every domain present on any process. A domain whose part of the batch is degenerate (a single sample, or
    all samples equal to working precision) is scaled with its running variance, which is then left
    unchanged; every other domain is normalized by the formula above, however small its dispersion (as in
    :class:`~manifoldnorm.nn.LieBatchNorm`).

    Deviations
    ----------
    * Neither paper has this layer: Chen et al. keep one set of statistics, Kobler et al. use per-domain
      statistics with the AIM momentum batch norm. Combining LieBN with per-domain statistics is our own.
    * Evaluation uses the LieBN running statistics (momentum ``momentum``); with ``train_momentum < 1``
      training normalizes with per-domain momentum statistics as Kobler's layer.
    * The statistics are kept as SPD matrices only (no codomain copies ``*_phi``: the batched path deforms the
      statistics of the domains present once per step).
    * Everything listed under :class:`~manifoldnorm.nn.LieBatchNorm` applies; statistics live in stacked
      buffers instead of one module per domain.
    """

    domain_aware = True
    _stat_names = ("running_mean", "running_var", "train_mean", "train_var")
    #: no codomain copies of the means: the batched domain path reads and writes the SPD statistics of the
    #: domains present (one batched deformation per step, whatever the number of domains)
    _phi_means: tuple[str, ...] = ()

    def __init__(
        self,
        n: int,
        num_domains: int | None = None,
        metric: str = "aim",
        theta: float = 1.0,
        alpha: float = 1.0,
        beta: float = 0.0,
        momentum: float = 0.1,
        train_momentum: float = 1.0,
        karcher_steps: int = 1,
        eps: float = 1e-5,
        channels: int = 1,
        refit_karcher_steps: int = 50,
        detach_mean: bool = True,
        detach_var: bool = False,
        validate: bool = True,
        compute_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype = torch.float64,
        device=None,
    ) -> None:
        self._domains_declared = num_domains is not None
        self._num_domains_init = 1 if num_domains is None else check_positive_int(num_domains, "num_domains",
                                                                                   type(self).__name__)
        super().__init__(n, metric=metric, theta=theta, alpha=alpha, beta=beta, momentum=momentum,
                         train_momentum=train_momentum, karcher_steps=karcher_steps, eps=eps, channels=channels,
                         detach_mean=detach_mean, detach_var=detach_var, validate=validate,
                         refit_karcher_steps=refit_karcher_steps,
                         compute_dtype=compute_dtype, dtype=dtype, device=device)

    def _stats_lead(self) -> tuple[int, ...]:
        return (self._num_domains_init,)

    def forward(self, x: Tensor, domain: Tensor | int | None = None) -> Tensor:
        """Normalize ``x`` with the statistics of each sample's domain; ``domain``: ``(N,)`` ids."""
        owner = type(self).__name__
        red = active_reducer(self) if (self.training or self.refitting) else None
        x4 = to_channels(x, self.n, self.channels, owner, self.validate, allow_empty=red is not None)
        d = as_domain_ids(domain, x4.shape[0], x4.device, owner)
        seg = self._prepare_domains(d, red, owner, segments=self.training or self.refitting)
        g = self.group
        with autocast_off(x4):
            cdt, odt = resolve_dtype(x4, self.weight, self.compute_dtype)
            Z = g.deform(x4.to(cdt))
            if self.refitting:
                y = self._refit_segments(Z, seg, g.deform(self.weight.to(cdt)))
            elif self.training:
                y = self._train_segments(Z, seg, g.deform(self.weight.to(cdt)), red)
            else:
                Zc = g.center(Z, g.deform(self.running_mean.to(cdt))[d])
                y = self._bias(g.scale(Zc, self._factor(self.running_var.to(cdt)[d], cdt)), cdt)
        return from_channels(y.to(odt), x)

    def _segment_mean(self, Z: Tensor, seg: Segments, steps: int, tol: float | None) -> Tensor:
        """Fréchet mean of every domain ``(S, C, n, n)`` in the codomain, all domains batched.

        Arithmetic segment means for the flat metrics (LEM, LCM); for AIM (and CRIM) the Karcher flow of
        :func:`manifoldnorm.functional.segment_mean_aim` (``tol=0``: exactly ``steps`` unit steps).
        """
        if self.group.name in ("aim", "crim"):
            return mf.segment_mean_aim(Z, seg, karcher_steps=steps, tol=tol)
        return seg.mean(Z)

    def _train_segments(self, Z: Tensor, seg: Segments, B: Tensor, red: StatReducer | None) -> Tensor:
        """Normalize deformed inputs ``(N, C, n, n)`` with the statistics of their domains; update those.

        :meth:`LieBatchNorm._train_group` for every domain of the batch at once: per-domain means, dispersions,
        degeneracy tests and momentum updates are segment reductions over the batch (one ``red.sum`` each when
        synchronized), so the number of decompositions does not depend on the number of domains. ``B`` is the
        deformed bias; returns the layer output.
        """
        g = self.group
        R, r, T, t = self._segment_stats(seg, Z.dtype)
        if self._fused and red is None and self.detach_mean and self.metric == "aim" and self.theta == 1.0:
            return self._train_segments_fused(Z, seg, R, r, T, t)
        if self.detach_mean:
            with torch.no_grad():
                M = self._segment_mean(Z.detach(), seg, self.karcher_steps, 0.0)
        else:
            M = self._segment_mean(Z, seg, self.karcher_steps, 0.0)
        eta = self.train_momentum
        centre = M if eta == 1.0 else g.geodesic(g.deform(T), M.detach(), eta)
        d2, scaler = g.dispersion(g.center(Z, seg.gather(centre)))
        if self.detach_var:  # the variance of the detached centred batch: a constant for autograd
            d2 = d2.detach()
        v = seg.mean(d2)
        v_eta = v if eta == 1.0 else (1.0 - eta) * t + eta * v
        degenerate = degenerate_segments(Z, seg, red)
        out = scaler(seg.gather(self._factor(torch.where(degenerate, r, v_eta), Z.dtype)), B)
        self._update_segment_stats(seg, R, r, t, StepStats(M.detach(), centre.detach(), v.detach(), v_eta.detach(),
                                                           degenerate))
        return out

    @torch.no_grad()
    def _update_segment_stats(self, seg: Segments, R: Tensor, r: Tensor, t: Tensor, st: StepStats) -> None:
        r""":meth:`LieBatchNorm._update_stats` for the domains of the batch: :math:`R_d \leftarrow
        \gamma_{R_d\to M_d}(\text{momentum})` in the codomain, :math:`r_d` and the training statistics; a
        degenerate domain leaves both variances unchanged. ``st`` holds codomain means (``(S, ...)`` each)."""
        g, m = self.group, self.momentum
        R_new = g.undeform(g.geodesic(g.deform(R), st.mean, m))
        r_new = torch.where(st.degenerate, r, (1.0 - m) * r + m * st.var)
        t_new = torch.where(st.degenerate, t, st.var_eta)
        self._set_segment_stats(seg, (R_new, r_new, g.undeform(st.centre), t_new))

    def _train_segments_fused(self, X: Tensor, seg: Segments, R: Tensor, r: Tensor, T: Tensor, t: Tensor) -> Tensor:
        """:meth:`_train_segments` for AIM at θ = 1 with a detached mean and local statistics, as one autograd node
        (:func:`manifoldnorm.functional._liebn_ops.aim_segment_step`: the kernel of
        :class:`~manifoldnorm.nn.LieBatchNorm`'s fused step with per-domain whitening and factors); same
        results to round-off. ``X`` is the input (the deformation is the identity at θ = 1)."""
        g = self.group
        with torch.no_grad():
            M = self._segment_mean(X.detach(), seg, self.karcher_steps, 0.0)
            eta = self.train_momentum
            centre = M if eta == 1.0 else g.geodesic(T, M, eta)
            degenerate = degenerate_segments(X, seg, None)
        cfg = StepConfig(eta, T, t, r, self.eps, self.alpha, self.beta, self.detach_var, seg=seg,
                         degenerate=degenerate)
        y = aim_segment_step(X, self.weight.to(X.dtype), self.shift.to(X.dtype), M, centre, cfg)
        assert cfg.stats is not None
        self._update_segment_stats(seg, R, r, t, cfg.stats)
        return y

    @torch.no_grad()
    def _refit_segments(self, Z: Tensor, seg: Segments, B: Tensor) -> Tensor:
        """Exact Fréchet mean and dispersion of every domain of the batch (full Karcher flow, per-domain stop)."""
        g = self.group
        M = self._segment_mean(Z, seg, self.refit_karcher_steps, None)
        d2, scaler = g.dispersion(g.center(Z, seg.gather(M)))
        v = seg.mean(d2)
        R = g.undeform(M)
        self._set_segment_stats(seg, (R, v, R.clone(), v.clone()))
        return scaler(seg.gather(self._factor(v, Z.dtype)), B)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_domains={self.num_domains}"


register_norm("dsliebn_aim", "spd")(functools.partial(DomainLieBatchNorm, metric="aim"))
register_norm("dsliebn_lem", "spd")(functools.partial(DomainLieBatchNorm, metric="lem"))
register_norm("dsliebn_lcm", "spd")(functools.partial(DomainLieBatchNorm, metric="lcm"))
