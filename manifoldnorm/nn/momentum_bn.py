r"""SPD momentum batch normalization with dispersion, single- and domain-specific (Kobler et al. 2022)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from manifoldnorm import functional as mf
from manifoldnorm.functional._batch import Segments
from manifoldnorm.functional._liebn_ops import StepConfig, spdmbn_step
from manifoldnorm.functional.spd_aim import karcher_step_tangents

from ._batch_stats import (
    StatReducer,
    active_reducer,
    batch_mean,
    batch_mean_count,
    degenerate_batch,
    degenerate_segments,
    reduce_fn,
)
from ._common import (
    DomainStatsMixin,
    as_domain_ids,
    autocast_off,
    check_compute_dtype,
    check_momentum,
    check_positive_int,
    from_channels,
    resolve_dtype,
    spd_identity_parameter,
    to_channels,
)
from ._reference import spdmbn_reference
from .base import RefittableNorm
from .registry import register_norm

__all__ = ["SPDMomentumBatchNorm", "DomainSPDBatchNorm"]

_STATS = ("train_mean", "train_var", "running_mean", "running_var")


def _aim_sqdist(P_invsqrt: Tensor, X: Tensor) -> Tensor:
    r""":math:`d^2_{\mathrm{AIM}}(X, P) = \|\log(P^{-1/2} X P^{-1/2})\|_F^2` from eigenvalues only, ``(...)``."""
    lam = torch.linalg.eigvalsh(mf.congruence(P_invsqrt, X))
    return torch.log(lam).square().sum(-1)


#: how the test (running) variance is measured: exact distances or Kobler's tangent-space approximation
TEST_DISPERSIONS = ("exact", "tangent")


class SPDMomentumBatchNorm(RefittableNorm):
    r"""SPD batch normalization with momentum statistics and a learnable dispersion (SPDMBN).

    Kobler, Hirayama, Zhao & Kawanabe, "SPD domain-specific batch normalization to crack interpretable
    unsupervised domain adaptation in EEG", NeurIPS 2022 (SPD momentum batch norm). A training step with momentum
    :math:`\eta` on :math:`\{X_i\}_{i=1}^N`:

    .. math::

        G &= \mathrm{FM}_{\mathrm{AIM}}\{X_i\},\qquad R_\eta = \gamma_{R\to G}(\eta),\qquad
        r_\eta = (1-\eta)\,r + \eta\,\tfrac1N\textstyle\sum_i d^2(X_i, R_\eta),\\
        Y_i &= B^{1/2}\big(R_\eta^{-1/2} X_i R_\eta^{-1/2}\big)^{s/\sqrt{r_\eta+\epsilon}} B^{1/2},

    then :math:`R \leftarrow R_\eta`, :math:`r \leftarrow r_\eta`, and the test statistics follow the batch with
    momentum :math:`\eta_{\mathrm{test}}`: :math:`R_t \leftarrow \gamma_{R_t\to G}(\eta_{\mathrm{test}})`,
    :math:`r_t \leftarrow (1-\eta_{\mathrm{test}})r_t + \eta_{\mathrm{test}}\frac1N\sum_i d^2(X_i, R_t)`.
    Evaluation uses :math:`(R_t, r_t)`. :math:`B` (``weight``, SPD, init :math:`I`) and :math:`s` (``shift``,
    init 1) are learnable; :math:`\eta = 1` gives plain batch statistics.

    Parameters
    ----------
    n : int
        Matrix size; input ``(N, n, n)`` or ``(N, C, n, n)``, statistics per channel over ``N``.
    momentum : float
        :math:`\eta_{\mathrm{test}} \in [0, 1]`: momentum of the running (evaluation) statistics
        ``running_mean``/``running_var``.
    train_momentum : float
        Training momentum :math:`\eta \in (0, 1]` (scheduled from 1 towards ``bs/bs0`` in the paper, see
        :class:`manifoldnorm.lit.MomentumSchedule`; change it with :meth:`set_momentum`). Training statistics
        live in ``train_mean``/``train_var``.
        :math:`\eta_{\mathrm{test}} \in [0, 1]` of the evaluation statistics.
    karcher_steps : int
        Karcher-flow iterations for the batch mean during training (1 in the reference code).
    eps : float
        :math:`\epsilon` of the scaling factor.
    refit_karcher_steps : int
        Maximum Karcher iterations when refitting statistics (early stop at float precision).
    channels, detach_mean, validate, dtype, device
        As in :class:`~manifoldnorm.nn.LieBatchNorm`.
    test_dispersion : {'exact', 'tangent'}
        How the batch dispersion of the test statistics is measured. ``'exact'`` (default): the AIM squared
        distances :math:`d^2(X_i, R_t)`, one more batched eigendecomposition per step (3N + 7 matrices per
        training step at one Karcher step and :math:`\eta = 1`). ``'tangent'``: Kobler's approximation (TSMNet
        ``SPDBatchNormImpl``), :math:`\|T_i - \log(S^- R_t S^-)\|_F^2` from the tangent vectors
        :math:`T_i = \log(S^- X_i S^-)` of the last Karcher step at :math:`S^{-2}`: no further batched
        decomposition (2N + 7 matrices). Outputs, gradients and the training statistics do not depend on it;
        only ``running_var`` (evaluation) does.

    Notes
    -----
    Degenerate batches (one matrix, or all matrices equal to working precision; see the Notes of
    :class:`~manifoldnorm.nn.LieBatchNorm`) are scaled with the running variance :math:`r` and leave both
    variances unchanged, which keeps gradients bounded. Every batch of two or more distinct matrices is
    normalized by the formula above, however small its dispersion.

    A training step on local statistics with the detached mean (the default) runs the whitening, the power and
    the bias as one autograd node with a written-out backward (:func:`manifoldnorm.functional._liebn_ops.
    spdmbn_step`: one eigendecomposition of the whitened batch serves the dispersion, the power and its backward;
    equal to the composed spectral functions to round-off).

    Deviations
    ----------
    * Dispersions are exact AIM squared distances (eigenvalues of :math:`R^{-1/2}X_iR^{-1/2}`); the reference
      approximates them in the tangent space at the last Karcher base point (``test_dispersion='tangent'`` does so
      for the test statistics).
    * The batch mean is detached by default; the reference detaches the Karcher base point but keeps the
      gradient through the final tangent mean. ``detach_mean=False`` gives the full unrolled gradient.
    * ``shift`` is one scalar per channel (the reference: one scalar per layer, i.e. ``channels=1``).
    * Statistics are registered buffers (plain tensors, so ``.to(dtype)`` works); refitting uses the Karcher
      flow of :func:`manifoldnorm.functional.mean_aim` with unit step instead of the adaptive step size.
    """

    def __init__(self, n: int, momentum: float = 0.1, train_momentum: float = 1.0, karcher_steps: int = 1,
                 eps: float = 1e-5, channels: int = 1, refit_karcher_steps: int = 50, detach_mean: bool = True,
                 validate: bool = True, compute_dtype: torch.dtype | str | None = None,
                 dtype: torch.dtype = torch.float64, device=None, test_dispersion: str = "exact") -> None:
        super().__init__()
        owner = type(self).__name__
        if test_dispersion not in TEST_DISPERSIONS:
            raise ValueError(f"{owner}: test_dispersion must be one of {', '.join(TEST_DISPERSIONS)}, "
                             f"got {test_dispersion!r}")
        self.test_dispersion = test_dispersion
        self.n = check_positive_int(n, "n", owner)
        self.channels = check_positive_int(channels, "channels", owner)
        self.momentum = check_momentum(momentum, "momentum", owner)
        self.train_momentum = self._check_train_momentum(train_momentum)
        self.compute_dtype = check_compute_dtype(compute_dtype, owner)
        self.karcher_steps = check_positive_int(karcher_steps, "karcher_steps", owner)
        self.refit_karcher_steps = check_positive_int(refit_karcher_steps, "refit_karcher_steps", owner)
        if not float(eps) > 0.0:
            raise ValueError(f"{owner}: eps must be > 0, got {eps}")
        self.eps, self.detach_mean, self.validate = float(eps), bool(detach_mean), bool(validate)
        self.refitting = False
        self.weight = spd_identity_parameter(self.channels, self.n, dtype, device)
        self.shift = nn.Parameter(torch.ones(self.channels, dtype=dtype, device=device))
        for name, value in zip(_STATS, self._fresh_stats(self._stats_lead(), dtype, device), strict=True):
            self.register_buffer(name, value)

    # statistics storage (overridden by the domain-specific layer) --------------------------------------------
    def _stats_lead(self) -> tuple[int, ...]:
        return ()

    def _fresh_stats(self, lead: tuple[int, ...], dtype, device) -> tuple[Tensor, ...]:
        eye = torch.eye(self.n, dtype=dtype, device=device).expand(*lead, self.channels, self.n, self.n).clone()
        one = torch.ones(*lead, self.channels, dtype=dtype, device=device)
        return eye, one, eye.clone(), one.clone()

    def _get_stats(self, d: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
        return tuple(getattr(self, name).to(dtype) for name in _STATS)

    @torch.no_grad()
    def _set_stats(self, d: int, stats: tuple[Tensor, ...]) -> None:
        for name, value in zip(_STATS, stats, strict=True):
            getattr(self, name).copy_(value)

    def reset_running_stats(self) -> None:
        """All running statistics back to (identity, 1)."""
        ref = self.running_mean
        with torch.no_grad():
            for name, value in zip(_STATS, self._fresh_stats(tuple(ref.shape[:-3]), ref.dtype, ref.device),
                                   strict=True):
                getattr(self, name).copy_(value)


    # math ------------------------------------------------------------------------------------------------------
    def distance(self, A: Tensor, B: Tensor) -> Tensor:
        """Affine-invariant distance (:func:`~manifoldnorm.functional.distance_aim`), the metric of the dispersion."""
        return mf.distance_aim(A, B)

    def _factor(self, var: Tensor, dtype: torch.dtype) -> Tensor:
        return self.shift.to(dtype) / torch.sqrt(var + self.eps)

    def _bias(self, Zs: Tensor, dtype: torch.dtype) -> Tensor:
        return mf.congruence(mf.sym_sqrtm(self.weight.to(dtype)), Zs)

    def _scale_and_bias(self, Z: Tensor, var: Tensor, dtype: torch.dtype) -> Tensor:
        return self._bias(mf.sym_powm(Z, self._factor(var, dtype)), dtype)

    def forward_ref(self, x: Tensor) -> Tensor:
        """Training-mode output (batch statistics, :math:`\\eta = 1`) by an independent plain-autograd path."""
        x4 = to_channels(x, self.n, self.channels, type(self).__name__, validate=False)
        cdt, odt = resolve_dtype(x4, self.weight, self.compute_dtype)
        y = spdmbn_reference(x4.to(cdt), self.weight.to(cdt), self.shift.to(cdt), self.eps, self.karcher_steps,
                             self.running_var.reshape(-1, self.channels)[0].to(cdt))
        return from_channels(y.to(odt), x)

    #: one fused autograd node for the training step where it applies (local statistics, detached mean); a switch
    #: for the tests, which compare it with the composed spectral functions
    _fused: bool = True

    def _train_group(self, x4: Tensor, stats: tuple[Tensor, ...],
                     red: StatReducer | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Normalize one group of samples with momentum statistics; return outputs and updated statistics.

        With a reducer ``red`` the statistics are those of the group's union over all parts of the batch.
        """
        R, r, Rt, rt = stats
        tangents = None
        if self.test_dispersion == "tangent":  # the Karcher flow's last tangent vectors serve the test variance
            G, Si, T = karcher_step_tangents(x4.detach(), self.karcher_steps, reduce_fn(red))
            tangents = (Si, T)
        if self.detach_mean and tangents is None:
            G = mf.mean_aim(x4.detach(), dim=0, karcher_steps=self.karcher_steps, tol=0.0, reduce=reduce_fn(red))
        elif not self.detach_mean:
            G = mf.mean_aim(x4, dim=0, karcher_steps=self.karcher_steps, tol=0.0, reduce=reduce_fn(red))
        eta = self.train_momentum
        if self._fused and red is None and self.detach_mean:
            R_eta = G if eta == 1.0 else mf.geodesic_aim(R, G, eta)
            cfg = StepConfig(eta, R_eta, r, r, self.eps)
            y = spdmbn_step(x4, self.weight.to(x4.dtype), self.shift.to(x4.dtype), G, R_eta, cfg)
            assert cfg.stats is not None
            v_b, r_eta, degenerate = cfg.stats.var, cfg.stats.var_eta, cfg.stats.degenerate
        else:
            R_eta = G if eta == 1.0 else mf.geodesic_aim(R, G, eta)
            Z = mf.congruence(mf.sym_invsqrtm(R_eta), x4)
            E = mf.sym_eig(Z)  # one decomposition for the dispersion and the power
            v_b, count = batch_mean_count(torch.log(E.eigvals()).square().sum(-1), red)
            r_eta = (1.0 - eta) * r + eta * v_b
            degenerate = degenerate_batch(x4, count, red)
            var = torch.where(degenerate, r, r_eta)
            y = self._bias(E.powm(self._factor(var, x4.dtype)), x4.dtype)
        with torch.no_grad():
            G = G.detach()
            Rt_new = mf.geodesic_aim(Rt, G, self.momentum)
            vt = batch_mean(self._test_sqdist(Rt_new, x4.detach(), tangents), red)
            t = self.momentum
            rt_new = torch.where(degenerate, rt, (1.0 - t) * rt + t * vt)
            new = (R_eta.detach(), torch.where(degenerate, r, r_eta.detach()), Rt_new, rt_new)
        return y, new

    @staticmethod
    def _test_sqdist(Rt: Tensor, X: Tensor, tangents: tuple[Tensor, Tensor] | None) -> Tensor:
        r"""Squared distances of the batch to the test mean: exact, :math:`\|\log(R_t^{-1/2}X_iR_t^{-1/2})\|_F^2`
        (one more batched eigendecomposition), or with ``tangents = (S^-, T)`` of the last Karcher step Kobler's
        tangent-space approximation :math:`\|T_i - \log(S^- R_t S^-)\|_F^2` (TSMNet ``SPDBatchNormImpl``)."""
        if tangents is None:
            return _aim_sqdist(mf.sym_invsqrtm(Rt), X)
        Si, T = tangents
        return torch.linalg.vector_norm(T - mf.sym_logm(mf.congruence(Si, Rt)), dim=(-2, -1)).square()

    @torch.no_grad()
    def _refit_group(self, x4: Tensor, red: StatReducer | None = None) -> tuple[Tensor, Tensor]:
        """Exact Fréchet mean and dispersion of one group (full Karcher flow)."""
        G = mf.mean_aim(x4, dim=0, karcher_steps=self.refit_karcher_steps, reduce=reduce_fn(red))
        v = batch_mean(_aim_sqdist(mf.sym_invsqrtm(G), x4), red)
        return G, v

    def _eval(self, x4: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        return self._scale_and_bias(mf.congruence(mf.sym_invsqrtm(mean), x4), var, x4.dtype)

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        """Normalize ``x`` (``domain`` is accepted and ignored: one set of statistics)."""
        red = active_reducer(self)
        x4 = to_channels(x, self.n, self.channels, type(self).__name__, self.validate, allow_empty=red is not None)
        with autocast_off(x4):
            dtype, odt = resolve_dtype(x4, self.weight, self.compute_dtype)
            x4 = x4.to(dtype)
            if self.refitting:
                G, v = self._refit_group(x4, red)
                self._set_stats(0, (G, v, G, v))
                y = self._eval(x4, G, v)
            elif self.training:
                y, new = self._train_group(x4, self._get_stats(0, dtype), red)
                self._set_stats(0, new)
            else:
                _, _, Rt, rt = self._get_stats(0, dtype)
                y = self._eval(x4, Rt, rt)
        return from_channels(y.to(odt), x)

    def extra_repr(self) -> str:
        extra = "" if self.test_dispersion == "exact" else f", test_dispersion={self.test_dispersion!r}"
        return (f"{self.n}, momentum={self.momentum:g}, train_momentum={self.train_momentum:g}, "
                f"karcher_steps={self.karcher_steps}, eps={self.eps:g}, channels={self.channels}{extra}")


class DomainSPDBatchNorm(DomainStatsMixin, SPDMomentumBatchNorm):
    r"""SPD domain-specific momentum batch normalization (SPDDSMBN).

    Kobler et al., NeurIPS 2022 (SPDDSMBN): :class:`SPDMomentumBatchNorm` with one set of running statistics
    :math:`(R^{(d)}, r^{(d)}, R_t^{(d)}, r_t^{(d)})` per domain :math:`d` and a shared bias :math:`B` and
    dispersion :math:`s`. In training, each domain present in the batch is normalized with its own batch
    statistics; in evaluation each sample uses the test statistics of its domain. For unsupervised domain
    adaptation, re-estimate the statistics of a new domain on its unlabeled data with
    :func:`manifoldnorm.nn.refit_domain_norms` (Kobler's "refit" mode).

    Parameters
    ----------
    n : int
        Matrix size.
    num_domains : int or None
        Number of domains ``D`` of the data (the configs pass ``data_info.num_domains``). Buffers have a leading
        ``D`` dimension (``running_mean``: ``(D, C, n, n)``, ``running_var``: ``(D, C)``, and the ``train_*``
        twins), every slot starting at (identity, 1), so a domain first seen at test time (refit) has its slot.
        Ids outside ``0..D-1`` raise a ValueError naming the valid range and the largest id seen. ``None``
        (undeclared): one slot to start, a larger id grows the buffers with a warning. ``load_state_dict``
        adopts the stored size. Declare it under DistributedDataParallel, which requires constant buffer shapes.
    momentum, train_momentum, karcher_steps, eps, channels, refit_karcher_steps, detach_mean, validate,
    compute_dtype
        As :class:`SPDMomentumBatchNorm`.

    Notes
    -----
    ``forward(x, domain)``: ``domain`` is a LongTensor ``(N,)`` of ids (or an int); ``None`` means domain 0.
    Training, refit and evaluation are batched over the domains: per-domain Karcher means
    (:func:`manifoldnorm.functional.segment_mean_aim`: each sample whitened by its own domain's mean, one
    batched ``eigh`` of all domain means per step; the refit's flow stops in each domain on its own),
    dispersions, degeneracy tests and the updates of the training and test statistics are segment reductions
    over the batch, so a step makes the same number of batched decompositions for one domain or many, with the
    results of one :class:`SPDMomentumBatchNorm` per domain. Synchronized, each reduction is one all-reduce of
    the packed sums of every domain present on any process.

    Deviations
    ----------
    As :class:`SPDMomentumBatchNorm`; statistics live in stacked buffers instead of one module per domain.
    """

    domain_aware = True
    _stat_names = _STATS

    def __init__(self, n: int, num_domains: int | None = None, momentum: float = 0.1, train_momentum: float = 1.0,
                 karcher_steps: int = 1, eps: float = 1e-5, channels: int = 1, refit_karcher_steps: int = 50,
                 detach_mean: bool = True, validate: bool = True, compute_dtype: torch.dtype | str | None = None,
                 dtype: torch.dtype = torch.float64, device=None) -> None:
        self._domains_declared = num_domains is not None
        self._num_domains_init = 1 if num_domains is None else check_positive_int(num_domains, "num_domains",
                                                                                   "DomainSPDBatchNorm")
        super().__init__(n, momentum=momentum, train_momentum=train_momentum, karcher_steps=karcher_steps, eps=eps,
                         channels=channels, refit_karcher_steps=refit_karcher_steps, detach_mean=detach_mean,
                         validate=validate, compute_dtype=compute_dtype, dtype=dtype, device=device)

    def _stats_lead(self) -> tuple[int, ...]:
        return (self._num_domains_init,)

    def forward(self, x: Tensor, domain: Tensor | int | None = None) -> Tensor:
        """Normalize ``x`` with the statistics of each sample's domain; ``domain``: ``(N,)`` ids."""
        owner = type(self).__name__
        red = active_reducer(self) if (self.training or self.refitting) else None
        x4 = to_channels(x, self.n, self.channels, owner, self.validate, allow_empty=red is not None)
        d = as_domain_ids(domain, x4.shape[0], x4.device, owner)
        seg = self._prepare_domains(d, red, owner, segments=self.training or self.refitting)
        with autocast_off(x4):
            dtype, odt = resolve_dtype(x4, self.weight, self.compute_dtype)
            x4 = x4.to(dtype)
            if self.refitting:
                y = self._refit_segments(x4, seg)
            elif self.training:
                y = self._train_segments(x4, seg, red)
            else:
                Si = mf.sym_invsqrtm(self.running_mean.to(dtype))[d]
                y = self._scale_and_bias(mf.congruence(Si, x4), self.running_var.to(dtype)[d], dtype)
            return from_channels(y.to(odt), x)

    def _train_segments(self, x4: Tensor, seg: Segments, red: StatReducer | None) -> Tensor:
        """:meth:`SPDMomentumBatchNorm._train_group` for every domain of the batch at once.

        Per-domain Karcher means (:func:`manifoldnorm.functional.segment_mean_aim`), dispersions, degeneracy
        tests and the momentum updates of the training and test statistics are segment reductions over the batch
        (one ``red.sum`` each when synchronized), so the number of decompositions does not depend on the number
        of domains.
        """
        R, r, Rt, rt = self._segment_stats(seg, x4.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_mean):
            src = x4.detach() if self.detach_mean else x4
            G = mf.segment_mean_aim(src, seg, karcher_steps=self.karcher_steps, tol=0.0)
        eta = self.train_momentum
        R_eta = G if eta == 1.0 else mf.geodesic_aim(R, G, eta)
        Z = mf.congruence(seg.gather(mf.sym_invsqrtm(R_eta)), x4)
        E = mf.sym_eig(Z)  # one decomposition for the dispersion and the power
        v_b = seg.mean(torch.log(E.eigvals()).square().sum(-1))
        r_eta = (1.0 - eta) * r + eta * v_b
        degenerate = degenerate_segments(x4, seg, red)
        var = torch.where(degenerate, r, r_eta)
        y = self._bias(E.powm(seg.gather(self._factor(var, x4.dtype))), x4.dtype)
        with torch.no_grad():
            G = G.detach()
            Rt_new = mf.geodesic_aim(Rt, G, self.momentum)
            vt = seg.mean(_aim_sqdist(seg.gather(mf.sym_invsqrtm(Rt_new)), x4.detach()))
            t = self.momentum
            rt_new = torch.where(degenerate, rt, (1.0 - t) * rt + t * vt)
            self._set_segment_stats(seg, (R_eta.detach(), torch.where(degenerate, r, r_eta.detach()), Rt_new, rt_new))
        return y

    @torch.no_grad()
    def _refit_segments(self, x4: Tensor, seg: Segments) -> Tensor:
        """Exact Fréchet mean and dispersion of every domain of the batch (full Karcher flow, per-domain stop)."""
        G = mf.segment_mean_aim(x4, seg, karcher_steps=self.refit_karcher_steps)
        E = mf.sym_eig(mf.congruence(seg.gather(mf.sym_invsqrtm(G)), x4))
        v = seg.mean(torch.log(E.eigvals()).square().sum(-1))
        self._set_segment_stats(seg, (G, v, G, v))
        return self._bias(E.powm(seg.gather(self._factor(v, x4.dtype))), x4.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_domains={self.num_domains}"


register_norm("spdmbn", "spd")(SPDMomentumBatchNorm)
register_norm("spddsmbn", "spd")(DomainSPDBatchNorm)
