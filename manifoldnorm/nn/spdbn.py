r"""Riemannian batch centering of SPD matrices (SPDNetBN, Brooks et al. 2019)."""

from __future__ import annotations

import torch
from torch import Tensor

from manifoldnorm import functional as mf

from ._batch_stats import active_reducer, reduce_fn
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
from ._reference import spdbn_reference
from .base import RefittableNorm
from .registry import register_norm

__all__ = ["SPDBatchNorm"]


class SPDBatchNorm(RefittableNorm):
    r"""Riemannian batch normalization of SPD matrices by Karcher-mean centering and an SPD bias.

    Brooks, Schwander, Barbaresco, Schneider & Cord, "Riemannian batch normalization for SPD neural networks",
    NeurIPS 2019, Alg. 1:

    .. math::

        G = \mathrm{FM}_{\mathrm{AIM}}\{X_i\},\qquad
        Y_i = B^{1/2}\, G^{-1/2} X_i\, G^{-1/2}\, B^{1/2},\qquad
        R \leftarrow R^{1/2}\big(R^{-1/2} G R^{-1/2}\big)^{\text{momentum}} R^{1/2},

    i.e. parallel transport of the batch from :math:`G` to :math:`I` and from :math:`I` to the learnable SPD
    bias :math:`B` (``weight``, init :math:`I`). Evaluation uses the running mean :math:`R` in place of
    :math:`G`. There is no variance normalisation.

    Parameters
    ----------
    n : int
        Matrix size; input ``(N, n, n)`` or ``(N, C, n, n)`` with one mean per channel over ``N``.
    momentum : float
        Running-mean momentum in [0, 1] (0.1 in the paper); evaluation uses the running mean.
    train_momentum : float
        :math:`\eta \in (0, 1]`: training centres with :math:`\gamma_{T \to G}(\eta)` (buffer ``train_mean``);
        1 (default, the paper) centres with the batch mean.
    karcher_steps : int
        Karcher-flow iterations from the arithmetic mean (1 in the paper).
    channels : int
        Number of channels ``C`` (``weight`` and ``running_mean`` are ``(C, n, n)``).
    detach_mean : bool
        Treat :math:`G` as a constant for autograd (default, as the paper computes it under ``no_grad``).
    validate : bool
        Check symmetry / positive definiteness of the input (one Cholesky per matrix).
    refit_karcher_steps : int
        Karcher iterations when refitting the running mean on unlabeled data (test-time adaptation).
    compute_dtype : None, torch.float32 or torch.float64
        Computation dtype (see :class:`~manifoldnorm.nn.LieBatchNorm`); autocast is switched off inside.

    Deviations
    ----------
    * Statistics are per channel; the reference pools all ``N*C`` matrices into one mean.
    * ``running_mean`` is a registered buffer (the reference keeps a plain attribute, lost by ``state_dict``).
    * ``detach_mean=False`` additionally differentiates through the Karcher iterations.
    """

    def __init__(self, n: int, momentum: float = 0.1, train_momentum: float = 1.0, karcher_steps: int = 1,
                 channels: int = 1, detach_mean: bool = True, validate: bool = True, refit_karcher_steps: int = 50,
                 compute_dtype: torch.dtype | str | None = None, dtype: torch.dtype = torch.float64,
                 device=None) -> None:
        super().__init__()
        owner = "SPDBatchNorm"
        self.n = check_positive_int(n, "n", owner)
        self.channels = check_positive_int(channels, "channels", owner)
        self.momentum = check_momentum(momentum, "momentum", owner)
        self.train_momentum = self._check_train_momentum(train_momentum)
        self.karcher_steps = check_positive_int(karcher_steps, "karcher_steps", owner)
        self.refit_karcher_steps = check_positive_int(refit_karcher_steps, "refit_karcher_steps", owner)
        self.detach_mean, self.validate = bool(detach_mean), bool(validate)
        self.compute_dtype = check_compute_dtype(compute_dtype, owner)
        self.refitting = False
        self.weight = spd_identity_parameter(self.channels, self.n, dtype, device)
        eye = torch.eye(self.n, dtype=dtype, device=device).expand(self.channels, self.n, self.n)
        self.register_buffer("running_mean", eye.clone())
        self.register_buffer("train_mean", eye.clone())


    def reset_running_stats(self) -> None:
        """Running and training means back to the identity."""
        with torch.no_grad():
            for buf in (self.running_mean, self.train_mean):
                buf.copy_(torch.eye(self.n, dtype=buf.dtype).expand_as(buf))

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        """Center and bias ``x`` (``domain`` is accepted and ignored)."""
        red = active_reducer(self)
        x4 = to_channels(x, self.n, self.channels, type(self).__name__, self.validate, allow_empty=red is not None)
        with autocast_off(x4):
            dtype, odt = resolve_dtype(x4, self.weight, self.compute_dtype)
            x4 = x4.to(dtype)
            if self.refitting:
                with torch.no_grad():
                    G = mf.mean_aim(x4, dim=0, karcher_steps=self.refit_karcher_steps, reduce=reduce_fn(red))
                    self.running_mean.copy_(G)
                    self.train_mean.copy_(G)
            elif self.training:
                with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_mean):
                    src = x4.detach() if self.detach_mean else x4
                    G = mf.mean_aim(src, dim=0, karcher_steps=self.karcher_steps, tol=0.0, reduce=reduce_fn(red))
                with torch.no_grad():
                    R = self.running_mean.to(dtype)
                    self.running_mean.copy_(mf.geodesic_aim(R, G.detach(), self.momentum))
                if self.train_momentum != 1.0:
                    G = mf.geodesic_aim(self.train_mean.to(dtype), G.detach(), self.train_momentum)
                with torch.no_grad():
                    self.train_mean.copy_(G.detach())
            else:
                G = self.running_mean.to(dtype)
            W = mf.sym_sqrtm(self.weight.to(dtype)) @ mf.sym_invsqrtm(G)
            y = mf.congruence(W, x4)
        return from_channels(y.to(odt), x)

    def distance(self, A: Tensor, B: Tensor) -> Tensor:
        """Affine-invariant distance (:func:`~manifoldnorm.functional.distance_aim`), the geometry of the mean."""
        return mf.distance_aim(A, B)

    def forward_ref(self, x: Tensor) -> Tensor:
        """Training-mode output (batch mean) by an independent plain-autograd path (tests, benchmark)."""
        x4 = to_channels(x, self.n, self.channels, type(self).__name__, validate=False)
        dtype, odt = resolve_dtype(x4, self.weight, self.compute_dtype)
        y = spdbn_reference(x4.to(dtype), self.weight.to(dtype), self.karcher_steps)
        return from_channels(y.to(odt), x)

    def extra_repr(self) -> str:
        return (f"{self.n}, momentum={self.momentum:g}, train_momentum={self.train_momentum:g}, "
                f"karcher_steps={self.karcher_steps}, channels={self.channels}")


register_norm("spdbn", "spd")(SPDBatchNorm)
