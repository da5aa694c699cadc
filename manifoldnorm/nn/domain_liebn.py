r"""Domain-specific LieBN: Lie group batch normalization with one set of running statistics per domain."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import DomainStatsMixin, as_domain_ids, check_positive_int, compute_dtype, from_channels, to_channels
from .liebn import LieBatchNorm
from .momentum_bn import RefittableNorm

__all__ = ["DomainLieBatchNorm"]


class DomainLieBatchNorm(DomainStatsMixin, LieBatchNorm, RefittableNorm):
    r"""LieBN of SPD matrices with per-domain running statistics and a shared bias and dispersion.

    The normalization of :class:`~manifoldnorm.nn.LieBatchNorm` (Chen, Song, Liu & Sebe, "A Lie Group Approach
    to Riemannian Batch Normalization", ICLR 2024, Alg. 1 on SPD manifolds, Sec. 5.2, scaling Eq. 14) under the
    (θ,α,β)-AIM, (α,β)-LEM or θ-LCM metric, made domain-specific as in the SPDDSMBN of Kobler, Hirayama, Zhao &
    Kawanabe ("SPD domain-specific batch normalization to crack interpretable unsupervised domain adaptation in
    EEG", NeurIPS 2022). With :math:`\phi` the metric's deformation, :math:`\odot` its group operation and
    :math:`E` the identity (see :mod:`manifoldnorm.nn._lie_groups`), a training step on a batch whose samples
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
    num_domains : int
        Initial number of domain slots: ``running_mean`` is ``(D, C, n, n)`` (SPD), ``running_var`` ``(D, C)``.
        A domain id ``>= D`` grows the buffers (new slots start at (identity, 1)); ``load_state_dict`` adopts the
        stored size. Fix it up front under DistributedDataParallel, which requires constant buffer shapes.
    metric, theta, alpha, beta, momentum, karcher_steps, eps, channels, detach_mean, validate, dtype, device
        As :class:`~manifoldnorm.nn.LieBatchNorm`.
    refit_karcher_steps : int
        Maximum Karcher-flow iterations of the AIM mean when refitting (early stop at float precision).

    Shapes
    ------
    ``(N, n, n)`` or ``(N, C, n, n)`` -> same shape. ``forward(x, domain)``: ``domain`` is a LongTensor ``(N,)``
    of ids (or an int); ``None`` means domain 0.

    Notes
    -----
    Training loops over the distinct domains of the batch (not over samples) to compute the statistics; the
    scaling, bias and evaluation are batched. A domain with a single sample in the batch, or with dispersion
    below ``eps``, is scaled with its running variance, which is then left unchanged (as in
    :class:`~manifoldnorm.nn.LieBatchNorm`).

    Deviations
    ----------
    * Neither paper has this layer: Chen et al. keep one set of statistics, Kobler et al. use per-domain
      statistics with the AIM momentum batch norm. Combining LieBN with per-domain statistics is our own.
    * No separate test statistics (Kobler's :math:`R_t, r_t`): evaluation uses the LieBN running statistics.
    * Everything listed under :class:`~manifoldnorm.nn.LieBatchNorm` applies; statistics live in stacked
      buffers instead of one module per domain.
    """

    domain_aware = True
    _stat_names = ("running_mean", "running_var")

    def __init__(
        self,
        n: int,
        num_domains: int = 1,
        metric: str = "aim",
        theta: float = 1.0,
        alpha: float = 1.0,
        beta: float = 0.0,
        momentum: float = 0.1,
        karcher_steps: int = 1,
        eps: float = 1e-5,
        channels: int = 1,
        refit_karcher_steps: int = 50,
        detach_mean: bool = True,
        validate: bool = True,
        dtype: torch.dtype = torch.float64,
        device=None,
    ) -> None:
        owner = type(self).__name__
        num_domains = check_positive_int(num_domains, "num_domains", owner)
        super().__init__(n, metric=metric, theta=theta, alpha=alpha, beta=beta, momentum=momentum,
                         karcher_steps=karcher_steps, eps=eps, channels=channels, detach_mean=detach_mean,
                         validate=validate, dtype=dtype, device=device)
        self.refit_karcher_steps = check_positive_int(refit_karcher_steps, "refit_karcher_steps", owner)
        self.refitting = False
        for name, value in zip(self._stat_names, self._fresh_stats((num_domains,), dtype, device), strict=True):
            setattr(self, name, value)  # replaces the single-domain buffers of LieBatchNorm

    def _fresh_stats(self, lead: tuple[int, ...], dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.n, dtype=dtype, device=device).expand(*lead, self.channels, self.n, self.n).clone()
        return eye, torch.ones(*lead, self.channels, dtype=dtype, device=device)

    def _refit_group(self, Z: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """Exact Fréchet mean and dispersion of one group; same return layout as ``_train_group``."""
        g = self.group
        M = g.mean(Z, self.refit_karcher_steps, tol=None)
        Zc = g.center(Z, M)
        v2 = g.sqdist_identity(Zc).mean(dim=0)
        return Zc, v2, (g.undeform(M), v2)

    def forward(self, x: Tensor, domain: Tensor | int | None = None) -> Tensor:
        """Normalize ``x`` with the statistics of each sample's domain; ``domain``: ``(N,)`` ids."""
        owner = type(self).__name__
        x4 = to_channels(x, self.n, self.channels, owner, self.validate)
        dtype = compute_dtype(x4, self.weight)
        d = as_domain_ids(domain, x4.shape[0], x4.device, owner)
        self._grow(int(d.max()) + 1)
        g = self.group
        Z = g.deform(x4.to(dtype))
        if not (self.training or self.refitting):
            Zc = g.center(Z, g.deform(self.running_mean.to(dtype))[d])
            return from_channels(self._scale_and_bias(Zc, self.running_var.to(dtype)[d], dtype), x)
        groups = self._domain_groups(d)
        centred, variances = [], []
        for dom, idx in groups:
            Zs = Z.index_select(0, idx)
            if self.refitting:
                with torch.no_grad():
                    Zc, var, new = self._refit_group(Zs)
            else:
                R, r = self.running_mean[dom].to(dtype), self.running_var[dom].to(dtype)
                Zc, var, new = self._train_group(Zs, R, r)
            with torch.no_grad():
                self.running_mean[dom].copy_(new[0])
                self.running_var[dom].copy_(new[1])
            centred.append(Zc)
            variances.append(var.expand(Zs.shape[0], -1))
        Zc = self._ungroup(centred, groups)
        var = self._ungroup(variances, groups)
        return from_channels(self._scale_and_bias(Zc, var, dtype), x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_domains={self.num_domains}"
