r"""LieBN: Riemannian batch normalization on SPD matrices through a Lie group structure."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from manifoldnorm import functional as mf
from manifoldnorm.functional._lie_groups import LIE_METRICS, make_group
from manifoldnorm.functional._liebn_ops import StepConfig, StepStats, aim_step, lcm_step, lem_step

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
from ._reference import liebn_reference
from .base import RefittableNorm
from .registry import register_norm

__all__ = ["LieBatchNorm"]


def _version(t: Tensor) -> int | None:
    """The in-place version counter of ``t``; ``None`` for an inference tensor (which has none: the codomain copy
    of such a buffer is recomputed at every use)."""
    return None if t.is_inference() else t._version


class LieBatchNorm(RefittableNorm):
    r"""Lie group batch normalization of SPD matrices under the (θ,α,β)-AIM, (α,β)-LEM, θ-LCM or θ-CRIM metric.

    Chen, Song, Liu & Sebe, "A Lie Group Approach to Riemannian Batch Normalization", ICLR 2024, Alg. 1 as
    instantiated on SPD manifolds in Sec. 5.2 (scaling: Eq. 14). With :math:`\phi` the metric's deformation,
    :math:`\odot` its group operation and :math:`E` the identity (all in the codomain of :math:`\phi`, see
    :mod:`manifoldnorm.functional._lie_groups`), a training step on a batch :math:`\{X_i\}_{i=1}^N` is

    .. math::

        M &= \mathrm{FM}\{\phi(X_i)\},\qquad v^2 = \tfrac1N \textstyle\sum_i d^2(M^{-1}\odot\phi(X_i), E),\\
        Y_i &= \phi^{-1}\Big(\phi(B) \odot \mathrm{Exp}_E\big(\tfrac{s}{\sqrt{v^2+\epsilon}}\,
               \mathrm{Log}_E(M^{-1}\odot\phi(X_i))\big)\Big),

    with the learnable SPD bias :math:`B` (``weight``, init :math:`I`) and dispersion :math:`s` (``shift``, init
    1). The outputs have Fréchet mean :math:`B` and dispersion :math:`s^2 v^2/(v^2+\epsilon)` (the paper's
    guarantee on the statistics). Running statistics: :math:`R \leftarrow \gamma_{R \to M}(\text{momentum})`
    along the metric's geodesic, :math:`r \leftarrow (1-\text{momentum})\,r + \text{momentum}\,v^2`;
    evaluation uses :math:`(R, r)`.

    With ``train_momentum`` :math:`\eta < 1` training normalizes with momentum statistics instead of the batch
    statistics (Kobler et al., NeurIPS 2022, applied to LieBN as in the LieBN EEG code):
    :math:`M_\eta = \gamma_{T \to M}(\eta)`, :math:`v_\eta = (1-\eta)\,t + \eta\,\frac1N\sum_i
    d^2(M_\eta^{-1}\odot\phi(X_i), E)`, then :math:`T \leftarrow M_\eta`, :math:`t \leftarrow v_\eta` (buffers
    ``train_mean``, ``train_var``). :meth:`set_momentum` changes both momenta (momentum schedules).

    Parameters
    ----------
    n : int
        Matrix size; inputs are ``(N, n, n)`` or ``(N, C, n, n)`` with statistics per channel over ``N``.
    metric : {'aim', 'lem', 'lcm', 'crim'}
        ``'crim'``: the Cholesky right-invariant metric of the LieBN toolbox (see
        :mod:`manifoldnorm.functional._lie_groups`): AIM-LieBN in the coordinates :math:`\iota(X^\theta)`,
        :math:`\iota(P) = L_P^{-1}L_P^{-\top}`.
    theta : float
        Power deformation :math:`\theta \neq 0` (AIM, LCM, CRIM; must stay 1 for LEM, where it has no effect).
    alpha, beta : float
        (α,β) weights of the O(n)-invariant inner product, :math:`\alpha>0`, :math:`\beta>-\alpha/n`
        (AIM, CRIM and LEM; must stay (1, 0) for LCM).
    momentum : float
        Momentum in [0, 1] of the running statistics used in evaluation.
    train_momentum : float
        :math:`\eta \in (0, 1]`: weight of the batch in the statistics training normalizes with (1: batch
        statistics, the paper).
    karcher_steps : int
        Karcher-flow iterations for the AIM batch mean (from the arithmetic mean; 1 in the paper).
    eps : float
        :math:`\epsilon` of the scaling factor.
    channels : int
        Number of channels ``C``; parameters and buffers are ``(C, n, n)`` and ``(C,)``.
    detach_mean : bool
        Treat the batch mean :math:`M` as a constant for autograd (default, as the paper's toolbox).
    detach_var : bool
        Compute the batch variance :math:`v^2` (and with ``train_momentum`` < 1 :math:`v_\eta`) on the detached
        centred batch, so no gradient flows through it into the input, as the ICLR'24 code and the LieBN toolbox
        do. Default ``False``: the variance is differentiated (see Deviations). Outputs, running statistics and
        parameter gradients do not depend on it.
    validate : bool
        Check symmetry and positive definiteness of the input (one Cholesky per matrix); shape and NaN/Inf
        are always checked.
    refit_karcher_steps : int
        Maximum Karcher iterations when refitting the statistics on unlabeled data
        (:func:`~manifoldnorm.nn.refit_domain_norms`; early stop at float precision).
    compute_dtype : None, torch.float32 or torch.float64
        Dtype of the computation (``None``: promoted dtype of input and parameters, at least float32). The
        output has the promoted dtype of input and parameters, except that float16/bfloat16 inputs get their
        own dtype back. ``torch.autocast`` is switched off inside.

    Shapes
    ------
    ``(N, n, n)`` or ``(N, C, n, n)`` -> same shape, in the promoted dtype of input and parameters (float16 and
    bfloat16 inputs: their own dtype, computed in float32 or more).

    Notes
    -----
    Degenerate batches: a channel whose batch is degenerate -- one matrix, or all matrices equal to working
    precision (every entry of the deformed matrices within ``EQUAL_ULPS`` = 8 units of the compute dtype's
    precision of the largest entry, see :func:`manifoldnorm.nn._batch_stats.degenerate_batch`) -- carries no
    dispersion; it is scaled with the running variance :math:`r`, which is then left unchanged (the training
    variance too). This keeps :math:`\|\partial L/\partial X\|` at the size of a normal batch instead of the
    :math:`1/\sqrt\epsilon` blow-up of the reference code. The running mean is still updated. Every other
    batch, however small its dispersion (e.g. :math:`v^2 = 10^{-8} \ll \epsilon`), is normalized by the formula
    above and gets the output dispersion :math:`s^2 v^2/(v^2+\epsilon)`. With a synchronized layer the test
    covers the batch of all processes (one extra ``max`` all-reduce per channel group).

    Statistics storage: the running and training means are kept twice, as SPD matrices (``running_mean``,
    ``train_mean``: the Fréchet means themselves, what evaluation, users and older checkpoints read and write)
    and in the codomain of :math:`\phi` (``running_mean_phi``, ``train_mean_phi``: log-Cholesky coordinates
    under LCM, matrix logarithms under LEM, :math:`X^\theta` under AIM, :math:`\iota(X^\theta)` under CRIM),
    where a training step updates them: :math:`\phi(R) \leftarrow \gamma_{\phi(R)\to M}(\text{momentum})`
    needs no deformation of :math:`R`, and the step writes the SPD buffers with one :math:`\phi^{-1}` of both
    means (LCM: a product, no decomposition). The SPD buffers stay the statistics: the codomain copies are used
    only while both buffers are unchanged since the layer made them consistent (tensor identity and version
    counter); any write from outside (``copy_``, ``load_state_dict``, ``.to()``, a grown domain slot, a
    DDP buffer broadcast) makes the next step deform the SPD buffers again. The codomain copies are in the state
    dict, so a resumed run continues bit for bit; a state dict without them (written before them) loads strictly
    and gets them from the SPD means, as does one whose copies are not the image of its SPD means under this
    layer's :math:`\phi` (another metric's state dict, to :math:`\sqrt{\epsilon_{\mathrm{dtype}}}`).

    Training steps on local statistics with the detached mean (the default) under LEM, LCM at :math:`\theta = 1`
    and AIM at :math:`\theta = 1` run as one autograd node with a written-out backward
    (:mod:`manifoldnorm.functional._liebn_ops`; the same math, equal to the composed group operations to
    round-off); the other configurations (synchronized statistics, ``detach_mean=False``, :math:`\theta \ne 1`,
    CRIM) compose the group operations.

    Deviations
    ----------
    * The batch mean is detached by default, as in the ICLR'24 code (``cal_geom_mean`` on ``X.detach()``) and the
      2025 toolbox (``is_detach=True``); ``detach_mean=False`` differentiates through the unrolled Karcher
      iterations.
    * The batch variance :math:`v^2` is differentiated by default: the gradient flows through the dispersion
      into the inputs. The ICLR'24 code (``cal_geom_var`` on ``X_centered.detach()``) and the LieBN toolbox
      (``is_detach=True``) compute it on the detached centred batch, so their input gradients differ from ours
      for that reason alone (outputs, running statistics and parameter gradients are the same). Measured in
      float64 at n = 8, N = 16 (random SPD batches of condition 10, random symmetric upstream gradient, seeds
      0-4), :math:`\|\nabla_X^{\text{default}} - \nabla_X^{\text{detached}}\|_F / \|\nabla_X^{\text{detached}}\|_F`
      is 1.0-15.9 % (AIM), 1.1-15.7 % (LEM), 0.7-13.6 % (LCM), 0.6-12.7 % (CRIM); the size depends on the batch
      and on how the upstream gradient aligns with the scaling direction (``pytest
      tests/nn/test_liebn.py -k detach_var_input_gradient_difference`` measures it). ``detach_var=True``
      reproduces the reference behaviour exactly.
    * The Karcher flow runs exactly ``karcher_steps`` steps; the toolbox's early stop tests
      :math:`\|\bar T\|_F \le 0.1` *before* its first update and may return the arithmetic mean.
    * The exponent of the AIM scaling :math:`X^{s/\sqrt{v^2+\epsilon}}` is differentiated, so ``shift`` learns
      under every metric (the toolbox drops this gradient for AIM).
    * The AIM variance is computed from the eigenvalues of the centred matrices (exact given :math:`M`), not
      re-derived from the Karcher tangent vectors; the same decomposition serves the scaling :math:`Z^c`.
    * ``running_mean`` is stored as an SPD matrix (the running Fréchet mean itself; the toolbox keeps the LEM and
      LCM running means in the codomain only), next to its image under :math:`\phi` (``running_mean_phi``, see
      Statistics storage); all running statistics are registered buffers.
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
        train_momentum: float = 1.0,
        karcher_steps: int = 1,
        eps: float = 1e-5,
        channels: int = 1,
        detach_mean: bool = True,
        detach_var: bool = False,
        validate: bool = True,
        refit_karcher_steps: int = 50,
        compute_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype = torch.float64,
        device=None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.n = check_positive_int(n, "n", owner)
        self.channels = check_positive_int(channels, "channels", owner)
        self.metric = mf.check_metric(metric, LIE_METRICS)
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
        self.train_momentum = self._check_train_momentum(train_momentum)
        self.karcher_steps = check_positive_int(karcher_steps, "karcher_steps", owner)
        self.refit_karcher_steps = check_positive_int(refit_karcher_steps, "refit_karcher_steps", owner)
        self.eps = float(eps)
        self.detach_mean = bool(detach_mean)
        if not isinstance(detach_var, bool):
            raise TypeError(f"{owner}: detach_var must be a bool (true or false), got {detach_var!r} "
                            f"of type {type(detach_var).__name__}")
        self.detach_var = detach_var
        self.validate = bool(validate)
        self.compute_dtype = check_compute_dtype(compute_dtype, owner)
        self.refitting = False
        self.group = make_group(self.metric, theta, alpha, beta)

        self.weight = spd_identity_parameter(self.channels, self.n, dtype, device)
        self.shift = nn.Parameter(torch.ones(self.channels, dtype=dtype, device=device))
        for name, value in zip(self._stat_names, self._fresh_stats(self._stats_lead(), dtype, device), strict=True):
            self.register_buffer(name, value)
        self._phi_stamps: dict[str, tuple] = {}
        with torch.no_grad():
            for k in self._phi_means:
                self.register_buffer(k + "_phi", self.group.deform(getattr(self, k)).clone())
                self._stamp_phi(k)

    # statistics storage ------------------------------------------------------------------------------------------
    _stat_names: tuple[str, ...] = ("running_mean", "running_var", "train_mean", "train_var")
    #: the mean statistics, kept twice: as SPD matrices (``running_mean``, ``train_mean``) and in the codomain of
    #: the deformation (``running_mean_phi``, ``train_mean_phi``), where training updates them
    _phi_means: tuple[str, ...] = ("running_mean", "train_mean")
    #: use the fused training kernels of :mod:`manifoldnorm.functional._liebn_ops` where they apply (a switch for
    #: the tests, which compare them with the composed group operations)
    _fused: bool = True

    def _stats_lead(self) -> tuple[int, ...]:
        return ()

    def _fresh_stats(self, lead: tuple[int, ...], dtype: torch.dtype, device) -> tuple[Tensor, ...]:
        eye = torch.eye(self.n, dtype=dtype, device=device).expand(*lead, self.channels, self.n, self.n).clone()
        one = torch.ones(*lead, self.channels, dtype=dtype, device=device)
        return eye, one, eye.clone(), one.clone()

    def _get_stats(self, d: int | None, dtype: torch.dtype) -> tuple[Tensor, ...]:
        return tuple((getattr(self, k) if d is None else getattr(self, k)[d]).to(dtype) for k in self._stat_names)

    @torch.no_grad()
    def _set_stats(self, d: int | None, values: tuple[Tensor, ...]) -> None:
        for k, v in zip(self._stat_names, values, strict=True):
            (getattr(self, k) if d is None else getattr(self, k)[d]).copy_(v)


    # codomain copies of the means -----------------------------------------------------------------------------
    def _stamp_phi(self, k: str) -> None:
        """Record that ``<k>_phi`` is the image of ``k`` under the deformation (as the buffers are now)."""
        S, P = self._buffers[k], self._buffers[k + "_phi"]
        self._phi_stamps[k] = (S, _version(S), P, _version(P))

    def _phi_valid(self, k: str) -> bool:
        """Are the SPD buffer ``k`` and its codomain copy unchanged since they were last made consistent?"""
        stamp = self._phi_stamps.get(k)
        S, P = self._buffers[k], self._buffers[k + "_phi"]
        return (stamp is not None and stamp[0] is S and stamp[2] is P and stamp[1] is not None
                and stamp[3] is not None and stamp[1] == _version(S) and stamp[3] == _version(P)
                and P.shape == S.shape)

    @torch.no_grad()
    def _refresh_phi(self, k: str, dtype: torch.dtype | None = None) -> None:
        """Recompute the codomain copy of ``k`` from the SPD buffer (after the SPD buffer was written from outside:
        ``copy_``, ``load_state_dict`` without codomain keys, ``.to()``, a domain slot grown)."""
        S, P = self._buffers[k], self._buffers[k + "_phi"]
        phi = self.group.deform(S.to(dtype or S.dtype))
        if P.shape == S.shape and P.dtype == S.dtype and P.device == S.device:
            P.copy_(phi)
        else:
            self._buffers[k + "_phi"] = phi.to(S.dtype).clone()
        self._stamp_phi(k)

    def _phi_of(self, k: str, dtype: torch.dtype) -> Tensor:
        """Codomain copy of the mean statistic ``k`` (all slots) in ``dtype``; no decomposition while valid."""
        if not self._phi_valid(k):
            self._refresh_phi(k, dtype)
        return self._buffers[k + "_phi"].to(dtype)

    def _get_phi_stats(self, d: int | None, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(R, r, T, t)`` of slot ``d`` in ``dtype`` with the means ``R``, ``T`` in the codomain of the
        deformation (:meth:`_get_stats` gives them as SPD matrices)."""
        R, T = self._phi_of("running_mean", dtype), self._phi_of("train_mean", dtype)
        r, t = self.running_var.to(dtype), self.train_var.to(dtype)
        return (R, r, T, t) if d is None else (R[d], r[d], T[d], t[d])

    @torch.no_grad()
    def _set_phi_stats(self, d: int | None, values: tuple[Tensor, Tensor, Tensor, Tensor]) -> None:
        r"""Write ``(R, r, T, t)`` of slot ``d`` given with codomain means: the codomain copies and the SPD buffers
        (one :math:`\phi^{-1}` of both means)."""
        R, r, T, t = values
        for k in self._phi_means:  # other slots must be consistent before one slot is written
            if d is not None and not self._phi_valid(k):
                self._refresh_phi(k)
        spd = self.group.undeform_stats(torch.stack([R, T]))
        for k, phi, value in (("running_mean", R, spd[0]), ("train_mean", T, spd[1])):
            S, P = self._buffers[k], self._buffers[k + "_phi"]
            (S if d is None else S[d]).copy_(value)
            (P if d is None else P[d]).copy_(phi)
            self._stamp_phi(k)
        for k, value in (("running_var", r), ("train_var", t)):
            (getattr(self, k) if d is None else getattr(self, k)[d]).copy_(value)

    @torch.no_grad()
    def _check_loaded_phi(self, k: str) -> None:
        """Keep a loaded codomain copy only if it is the image of the loaded SPD buffer under this layer's
        deformation (to ``sqrt(eps)`` relative; e.g. not a checkpoint of another metric); else recompute it."""
        S, P = self._buffers[k], self._buffers[k + "_phi"]
        phi = self.group.deform(S)
        tol = torch.finfo(S.dtype).eps ** 0.5
        if P.shape == phi.shape and bool(torch.all(torch.linalg.matrix_norm(P - phi)
                                                   <= tol * (1.0 + torch.linalg.matrix_norm(phi)))):
            self._stamp_phi(k)
        else:
            self._refresh_phi(k)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # noqa: ANN001
        for k in self._phi_means:  # SPD means written from outside (a grown domain slot, copy_): copies follow
            if not self._phi_valid(k):
                self._refresh_phi(k)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # noqa: ANN001
                              unexpected_keys, error_msgs) -> None:
        for k in self._phi_means:  # a domain-aware subclass may have resized the SPD buffers to the stored size
            S, P = self._buffers[k], self._buffers[k + "_phi"]
            if P.shape != S.shape:
                self._buffers[k + "_phi"] = torch.zeros_like(S)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for k in self._phi_means:
            key = prefix + k + "_phi"
            if key in missing_keys:  # a checkpoint with SPD means only (written before the codomain copies)
                missing_keys.remove(key)
            if self._buffers[k].shape != self._buffers[k + "_phi"].shape:
                continue  # the load failed for this buffer; load_state_dict reports it
            if key in state_dict:
                self._check_loaded_phi(k)
            else:
                self._refresh_phi(k)

    def reset_running_stats(self) -> None:
        """Running and training statistics back to (identity, 1)."""
        ref = self.running_mean
        self._set_stats(None, self._fresh_stats(tuple(ref.shape[:-3]), ref.dtype, ref.device))
        for k in self._phi_means:
            self._refresh_phi(k)

    def reset_parameters(self) -> None:
        """Bias back to the identity, dispersion back to one; running statistics reset too."""
        self.reset_running_stats()
        with torch.no_grad():
            self.weight.copy_(torch.eye(self.n, dtype=self.weight.dtype).expand_as(self.weight))
            self.shift.fill_(1.0)

    # forward -----------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        """Normalize ``x`` (``domain`` is accepted and ignored: this layer is not domain-aware)."""
        red = active_reducer(self)
        x4 = to_channels(x, self.n, self.channels, type(self).__name__, self.validate, allow_empty=red is not None)
        with autocast_off(x4):
            cdt, odt = resolve_dtype(x4, self.weight, self.compute_dtype)
            if self.training and not self.refitting and self._fusable(red):
                y = self._train_fused(x4.to(cdt))
                return from_channels(y.to(odt), x)
            Z = self.group.deform(x4.to(cdt))
            B = self.group.deform(self.weight.to(cdt))
            if self.refitting:
                y = self._refit_group(Z, None, B, red)
            elif self.training:
                y = self._train_group(Z, None, B, red)
            else:
                R, r = self._get_phi_stats(None, cdt)[:2]
                Zs = self.group.scale(self.group.center(Z, R), self._factor(r, cdt))
                y = self.group.undeform(self.group.translate(B, Zs))
        return from_channels(y.to(odt), x)

    def _fusable(self, red: StatReducer | None) -> bool:
        """Does a fused kernel compute this training step (local statistics, detached mean, LEM, LCM/AIM at θ=1)?"""
        return (self._fused and red is None and self.detach_mean
                and (self.metric == "lem" or (self.metric in ("lcm", "aim") and self.theta == 1.0)))

    def _train_fused(self, X: Tensor) -> Tensor:
        """Training step of one fused autograd node (:mod:`manifoldnorm.functional._liebn_ops`); same math as
        :meth:`_train_group`."""
        g, dt = self.group, X.dtype
        R, r, T, t = self._get_phi_stats(None, dt)
        cfg = StepConfig(self.train_momentum, T, t, r, self.eps, self.alpha, self.beta, self.detach_var)
        W, s = self.weight.to(dt), self.shift.to(dt)
        if self.metric == "lem":
            y = lem_step(X, W, s, cfg)
        elif self.metric == "lcm":
            y = lcm_step(X, W, s, cfg)
        else:
            with torch.no_grad():
                M = g.mean(X.detach(), self.karcher_steps)
                centre = M if self.train_momentum == 1.0 else g.geodesic(T, M, self.train_momentum)
            y = aim_step(X, W, s, M, centre, cfg)
        assert cfg.stats is not None
        self._update_stats(None, R, r, t, cfg.stats)
        return y

    @torch.no_grad()
    def _update_stats(self, d: int | None, R: Tensor, r: Tensor, t: Tensor, st: StepStats) -> None:
        r"""Running statistics after a training step: :math:`R \leftarrow \gamma_{R\to M}(\text{momentum})`,
        :math:`r \leftarrow (1-\text{momentum})\,r + \text{momentum}\,v`, training statistics
        :math:`(M_\eta, v_\eta)`; a degenerate batch leaves both variances unchanged."""
        m = self.momentum
        R_new = self.group.geodesic(R, st.mean, m)
        r_new = torch.where(st.degenerate, r, (1.0 - m) * r + m * st.var)
        t_new = torch.where(st.degenerate, t, st.var_eta)
        self._set_phi_stats(d, (R_new, r_new, st.centre, t_new))

    def distance(self, A: Tensor, B: Tensor) -> Tensor:
        r"""Distance under the layer's deformed metric, :math:`d(\phi(A)^{-1} \odot \phi(B), E)`, the one its
        variance is measured in (θ, α, β included; at θ=1, α=1, β=0 the plain ``distance_aim``, ``distance_lem``
        or ``distance_lcm``)."""
        g = self.group
        return g.sqdist_identity(g.center(g.deform(B), g.deform(A))).clamp_min(0.0).sqrt()

    def _factor(self, var: Tensor, dtype: torch.dtype) -> Tensor:
        return self.shift.to(dtype) / torch.sqrt(var + self.eps)

    def _batch_mean(self, Z: Tensor, red: StatReducer | None = None) -> Tensor:
        if self.detach_mean:
            with torch.no_grad():
                return self.group.mean(Z.detach(), self.karcher_steps, reduce=reduce_fn(red))
        return self.group.mean(Z, self.karcher_steps, reduce=reduce_fn(red))

    def _train_group(self, Z: Tensor, d: int | None, B: Tensor | None = None,
                     red: StatReducer | None = None) -> Tensor:
        """Centre and scale one group ``(N, C, n, n)`` of deformed inputs; update the statistics of slot ``d``.

        Returns the centred and scaled codomain elements, or with ``B`` (the deformed bias) the layer output.
        With a reducer ``red`` the statistics are those of the group's union over all parts of the batch.
        """
        g = self.group
        R, r, T, t = self._get_phi_stats(d, Z.dtype)
        M = self._batch_mean(Z, red)
        eta = self.train_momentum
        centre = M if eta == 1.0 else g.geodesic(T, M.detach(), eta)
        d2, scaler = g.dispersion(g.center(Z, centre))
        if self.detach_var:  # the variance of the detached centred batch: a constant for autograd
            d2 = d2.detach()
        v, count = batch_mean_count(d2, red)
        v_eta = v if eta == 1.0 else (1.0 - eta) * t + eta * v
        degenerate = degenerate_batch(Z, count, red)
        out = scaler(self._factor(torch.where(degenerate, r, v_eta), Z.dtype), B)
        self._update_stats(d, R, r, t, StepStats(M.detach(), centre.detach(), v.detach(), v_eta.detach(), degenerate))
        return out

    @torch.no_grad()
    def _refit_group(self, Z: Tensor, d: int | None, B: Tensor | None = None,
                     red: StatReducer | None = None) -> Tensor:
        """Exact Fréchet mean and dispersion of one group (full Karcher flow) become its statistics."""
        g = self.group
        M = g.mean(Z, self.refit_karcher_steps, tol=None, reduce=reduce_fn(red))
        d2, scaler = g.dispersion(g.center(Z, M))
        v = batch_mean(d2, red)
        self._set_phi_stats(d, (M, v, M, v))
        return scaler(self._factor(v, Z.dtype), B)

    def _bias(self, Zs: Tensor, dtype: torch.dtype) -> Tensor:
        r""":math:`\phi^{-1}(\phi(B) \odot \hat Z)` for centred and scaled codomain elements ``Zs``."""
        g = self.group
        return g.undeform(g.translate(g.deform(self.weight.to(dtype)), Zs))

    def forward_ref(self, x: Tensor) -> Tensor:
        """Training-mode output from batch statistics by an independent plain-autograd path (tests, benchmark)."""
        x4 = to_channels(x, self.n, self.channels, type(self).__name__, validate=False)
        cdt, odt = resolve_dtype(x4, self.weight, self.compute_dtype)
        y = liebn_reference(x4.to(cdt), self.metric, self.theta, self.alpha, self.beta, self.weight.to(cdt),
                            self.shift.to(cdt), self.eps, self.karcher_steps, self.detach_mean,
                            self.running_var.to(cdt), detach_var=self.detach_var)
        return from_channels(y.to(odt), x)

    def extra_repr(self) -> str:
        return (f"{self.n}, metric={self.metric!r}, theta={self.theta:g}, alpha={self.alpha:g}, "
                f"beta={self.beta:g}, momentum={self.momentum:g}, train_momentum={self.train_momentum:g}, "
                f"karcher_steps={self.karcher_steps}, eps={self.eps:g}, channels={self.channels}")


register_norm("liebn_aim", "lie")(functools.partial(LieBatchNorm, metric="aim"))
register_norm("liebn_lem", "lie")(functools.partial(LieBatchNorm, metric="lem"))
register_norm("liebn_lcm", "lie")(functools.partial(LieBatchNorm, metric="lcm"))
register_norm("liebn_crim", "lie")(functools.partial(LieBatchNorm, metric="crim"))
