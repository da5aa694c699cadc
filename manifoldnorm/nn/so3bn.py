r"""LieBN on the rotation group SO(3): Riemannian batch normalization of 3x3 rotation matrices."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import geoopt
import torch
from torch import Tensor, nn

from manifoldnorm.functional.so3 import (
    check_rotation,
    distance_so3,
    geodesic_so3,
    left_mul,
    mean_so3,
    so3_exp,
    so3_exp_ref,
    so3_log,
    so3_log_ref,
)
from manifoldnorm.manifolds import SpecialOrthogonal

from ._batch_stats import StatReducer, active_reducer, batch_mean, batch_mean_count, degenerate_batch, reduce_fn
from ._common import autocast_off, check_compute_dtype, check_momentum, check_positive_int, resolve_dtype
from .base import RefittableNorm
from .registry import register_norm

__all__ = ["SO3BatchNorm"]

_STATS = ("running_mean", "running_var", "train_mean", "train_var")


def _int_tuple(value: int | Sequence[int], name: str, owner: str, minimum: int) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    try:
        out = tuple(value)
    except TypeError as err:
        raise TypeError(f"{owner}: {name} must be a tuple of ints, got {type(value).__name__}") from err
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in out):
        raise ValueError(f"{owner}: {name} must hold ints >= {minimum}, got {out}")
    return out


class SO3BatchNorm(RefittableNorm):
    r"""Lie group batch normalization of rotation matrices (LieBN on SO(3)).

    Chen, Song, Liu & Sebe, "A Lie Group Approach to Riemannian Batch Normalization", ICLR 2024, Alg. 1 on the
    Lie group SO(3) with its bi-invariant metric (the rotation-matrix instance the paper evaluates with
    LieNet). A training step on a batch :math:`\{R_i\}_{i=1}^N` of rotations (one set of statistics per
    feature) is

    .. math::

        M &= \mathrm{FM}\{R_i\}\ \text{(Karcher mean)},\qquad \bar R_i = M^\top R_i,\qquad
        v^2 = \tfrac1N \textstyle\sum_i \|\log \bar R_i\|_2^2,\\
        Y_i &= B \exp\Big(\frac{s}{\sqrt{v^2+\epsilon}}\,\log \bar R_i\Big),

    with :math:`\log` the axis-angle logarithm (so :math:`\|\log \bar R\|_2` is the geodesic angle, see
    :mod:`manifoldnorm.functional.so3`), the learnable rotation bias :math:`B` (``weight``, a
    :class:`geoopt.ManifoldParameter` on :class:`~manifoldnorm.manifolds.SpecialOrthogonal`, init :math:`I`)
    and dispersion :math:`s` (``shift``, init 1). Centering is the left translation by :math:`M^{-1} = M^\top`.
    With the exact batch mean (enough ``karcher_steps``) the outputs have Karcher mean :math:`B` and dispersion
    :math:`s^2 v^2/(v^2+\epsilon)`, as long as the scaled angles :math:`s\theta_i/\sqrt{v^2+\epsilon}` stay
    below :math:`\pi` (beyond, the exponential wraps around).

    Running statistics (evaluation): :math:`R \leftarrow R \exp(\gamma \log(R^\top M))` (geodesic, ``momentum``
    :math:`\gamma`) and :math:`r \leftarrow (1-\gamma) r + \gamma v^2`. With ``train_momentum`` :math:`\eta < 1`
    training normalizes with Kobler's momentum statistics instead: :math:`R_\eta = \gamma_{T \to M}(\eta)`,
    :math:`v^2` measured around :math:`R_\eta` (also in the update of :math:`r`),
    :math:`t_\eta = (1-\eta)t + \eta v^2`, and :math:`(T, t) \leftarrow (R_\eta, t_\eta)`.

    Parameters
    ----------
    num_features : int, optional
        Number of features, i.e. rotations per sample (``shape=(num_features,)``), **not** the matrix size
        (always 3): ``create_norm_layer("liebn_so3", J)`` takes ``(N, J, 3, 3)``. ``None`` or 1 mean no feature
        dimension (input ``(N, 3, 3)``). With an explicit ``shape`` it must be ``None`` or ``prod(shape)``.
    shape : tuple of int
        Feature dimensions ``F`` (e.g. ``(joints,)`` or ``(frames, joints)``); one mean, variance, bias and
        dispersion per feature. Parameters: ``weight`` ``(*F, 3, 3)``, ``shift`` ``F``; buffers
        ``running_mean``/``train_mean`` ``(*F, 3, 3)`` and ``running_var``/``train_var`` ``F``.
    batch_dims : tuple of int
        Input dimensions pooled into the batch statistics (default ``(0,)``). The input has
        ``len(batch_dims) + len(shape) + 2`` dimensions; the non-batch ones, in order, must equal ``shape``.
        ``batch_dims=(0, 1)`` with input ``(N, T, J, 3, 3)`` and ``shape=(J,)`` pools samples and frames (the
        LieBN toolbox default ``batchdim=[0, 1]``).
    momentum : float
        Running-statistics (evaluation) momentum :math:`\gamma \in [0, 1]`.
    train_momentum : float
        :math:`\eta \in (0, 1]`; 1 (default) normalizes with the batch statistics (paper).
    eps : float
        :math:`\epsilon` of the scaling factor.
    karcher_steps : int
        Karcher iterations for the batch mean in training (from the chordal L2 mean).
    refit_karcher_steps : int
        Maximum Karcher iterations when refitting statistics (early stop at float precision).
    detach_mean : bool
        Treat the batch mean as a constant for autograd (default, as the toolbox).
    validate : bool
        Check that the input holds rotations (orthogonality, determinant +1); shape and NaN/Inf are always
        checked.
    compute_dtype : None, torch.float32, torch.float64 or their names
        Dtype of the computation (default: the promoted dtype of input and parameters, at least float32). The
        output has the promoted dtype of input and parameters (float16/bfloat16 inputs: their own dtype).
    dtype, device
        Of the parameters and buffers.

    Shapes
    ------
    Input ``(*batch, *F, 3, 3)`` rotations (batch dims at the positions ``batch_dims``) -> same shape.

    Notes
    -----
    Degenerate batches: features whose batch is degenerate (one rotation, or all rotations equal to working
    precision, see :class:`~manifoldnorm.nn.LieBatchNorm`) are scaled with the running variance, which is then
    left unchanged; the running mean is still updated. Every other batch is normalized by the formula above,
    however small its dispersion.
    ``forward_ref`` recomputes the training output with the textbook formulas (matrix exponential,
    :math:`\arccos` logarithm); it is undefined when a sample coincides with the batch mean.

    Deviations
    ----------
    * The Karcher flow starts from the chordal L2 mean (projection of the arithmetic mean onto SO(3)) rather
      than the first sample, and runs exactly ``karcher_steps`` steps in training.
    * The logarithm is evaluated in closed form with Taylor/symmetric-part branches near 0 and π (exact
      gradients at the identity) instead of a quaternion conversion.
    * The bias lives on SO(3) as a geoopt parameter whose retraction is the exponential map (the toolbox uses
      a QR retraction).
    * Degenerate batches reuse the running variance (see Notes); the paper has no such rule.
    """

    input_space = "so3"

    def __init__(
        self,
        num_features: int | None = None,
        *,
        shape: Sequence[int] = (),
        batch_dims: Sequence[int] = (0,),
        momentum: float = 0.1,
        train_momentum: float = 1.0,
        eps: float = 1e-5,
        karcher_steps: int = 1,
        refit_karcher_steps: int = 50,
        detach_mean: bool = True,
        validate: bool = True,
        compute_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype = torch.float64,
        device=None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        feat = _int_tuple(shape, "shape", owner, 1)
        if num_features is not None:
            check_positive_int(num_features, "num_features", owner)
        if feat:
            if num_features is not None and num_features != math.prod(feat):
                raise ValueError(f"{owner}: num_features={num_features} contradicts shape={feat} "
                                 f"(expected None or {math.prod(feat)})")
        elif num_features is not None and num_features > 1:
            feat = (num_features,)
        self.shape = feat
        self.num_features = num_features
        bdims = _int_tuple(batch_dims, "batch_dims", owner, 0)
        if not bdims or len(set(bdims)) != len(bdims):
            raise ValueError(f"{owner}: batch_dims must be distinct non-negative ints, got {bdims}")
        if max(bdims) >= len(bdims) + len(feat):
            raise ValueError(f"{owner}: batch_dims={bdims} do not fit an input with {len(bdims)} batch and "
                             f"{len(feat)} feature dimension(s)")
        self.batch_dims = tuple(sorted(bdims))
        if not float(eps) > 0.0:
            raise ValueError(f"{owner}: eps must be > 0, got {eps}")
        self.eps = float(eps)
        self.momentum = check_momentum(momentum, "momentum", owner)
        self.train_momentum = self._check_train_momentum(train_momentum)
        self.karcher_steps = check_positive_int(karcher_steps, "karcher_steps", owner)
        self.refit_karcher_steps = check_positive_int(refit_karcher_steps, "refit_karcher_steps", owner)
        self.detach_mean = bool(detach_mean)
        self.validate = bool(validate)
        self.compute_dtype = check_compute_dtype(compute_dtype, owner)
        self.refitting = False

        eye = torch.eye(3, dtype=dtype, device=device).expand(*feat, 3, 3).clone()
        self.weight = geoopt.ManifoldParameter(eye, manifold=SpecialOrthogonal())
        self.shift = nn.Parameter(torch.ones(feat, dtype=dtype, device=device))
        for name, value in zip(_STATS, self._fresh_stats(dtype, device), strict=True):
            self.register_buffer(name, value)

    # statistics --------------------------------------------------------------------------------------------------
    def _fresh_stats(self, dtype: torch.dtype, device) -> tuple[Tensor, ...]:
        eye = torch.eye(3, dtype=dtype, device=device).expand(*self.shape, 3, 3).clone()
        one = torch.ones(self.shape, dtype=dtype, device=device)
        return eye, one, eye.clone(), one.clone()

    def _get_stats(self, dtype: torch.dtype) -> tuple[Tensor, ...]:
        return tuple(getattr(self, k).to(dtype) for k in _STATS)

    @torch.no_grad()
    def _set_stats(self, values: tuple[Tensor, ...]) -> None:
        for k, v in zip(_STATS, values, strict=True):
            getattr(self, k).copy_(v)


    def reset_running_stats(self) -> None:
        """Running and training statistics back to (identity, 1)."""
        ref = self.running_mean
        self._set_stats(self._fresh_stats(ref.dtype, ref.device))

    def reset_parameters(self) -> None:
        """Bias back to the identity, dispersion back to one; statistics reset too."""
        self.reset_running_stats()
        with torch.no_grad():
            self.weight.copy_(torch.eye(3, dtype=self.weight.dtype).expand_as(self.weight))
            self.shift.fill_(1.0)

    # layout ------------------------------------------------------------------------------------------------------
    def _flatten(self, x: Tensor, validate: bool,
                 allow_empty: bool = False) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """Check ``x`` and view it as ``(B, *F, 3, 3)``; return it with the function restoring the layout."""
        owner = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{owner}: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{owner}: expected a floating-point tensor, got dtype {x.dtype}")
        nb, F = len(self.batch_dims), self.shape
        lead = x.shape[:-2]
        feat_dims = [i for i in range(nb + len(F)) if i not in self.batch_dims]
        if (x.dim() != nb + len(F) + 2 or x.shape[-2:] != (3, 3)
                or tuple(lead[i] for i in feat_dims) != F):
            layout = ["B"] * (nb + len(F))
            for i, f in zip(feat_dims, F, strict=True):
                layout[i] = str(f)
            hint = (f"; num_features/shape count rotations per sample (here {F}), not the matrix size (always 3): "
                    f"for (N, 3, 3) input build it with num_features=None" if F else "")
            raise ValueError(f"{owner}: expected rotations of shape ({', '.join(layout)}, 3, 3) with batch "
                             f"dims {self.batch_dims} and feature shape {F}, got {tuple(x.shape)}{hint}")
        if x.numel() == 0 and not allow_empty:
            raise ValueError(f"{owner}: got an empty batch")
        with torch.no_grad():
            if validate and x.dtype in (torch.float16, torch.bfloat16):  # no half-precision det kernels
                atol = max(1e-6, 3.0 * float(torch.finfo(x.dtype).eps) ** 0.5)  # check_rotation's default, x's dtype
                check_rotation(x.float(), f"{owner} input", atol=atol)
            elif validate:
                check_rotation(x, f"{owner} input")
            elif not bool(torch.isfinite(x).all()):
                raise ValueError(f"{owner} input: contains NaN or Inf entries")
        xb = x.movedim(self.batch_dims, tuple(range(nb)))
        moved = xb.shape
        xb = xb.reshape(-1, *F, 3, 3)

        def restore(y: Tensor) -> Tensor:
            return y.reshape(moved).movedim(tuple(range(nb)), self.batch_dims)

        return xb, restore

    # forward -----------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        """Normalize ``x`` (``domain`` is accepted and ignored: this layer is not domain-aware)."""
        red = active_reducer(self)
        xb, restore = self._flatten(x, self.validate, allow_empty=red is not None)
        with autocast_off(xb):
            cdt, odt = resolve_dtype(xb, self.weight, self.compute_dtype)
            X = xb.to(cdt)
            if self.refitting:
                L, var = self._refit(X, red)
            elif self.training:
                L, var = self._train(X, red)
            else:
                R, r = self._get_stats(cdt)[:2]
                L, var = so3_log(left_mul(R.mT, X)), r
            y = self._scale_and_bias(L, var, cdt)
        return restore(y.to(odt))

    def distance(self, A: Tensor, B: Tensor) -> Tensor:
        """Geodesic angle :func:`~manifoldnorm.functional.distance_so3` (its square is what the variance averages)."""
        return distance_so3(A, B)

    def _scale_and_bias(self, L: Tensor, var: Tensor, dtype: torch.dtype) -> Tensor:
        r""":math:`B \exp(s/\sqrt{v^2+\epsilon}\, L)` for centred axis-angle vectors ``L`` ``(B, *F, 3)``."""
        c = self.shift.to(dtype) / torch.sqrt(var + self.eps)
        return left_mul(self.weight.to(dtype), so3_exp(c.unsqueeze(-1) * L))

    def _batch_mean(self, X: Tensor, red: StatReducer | None = None) -> Tensor:
        if self.detach_mean:
            with torch.no_grad():
                return mean_so3(X.detach(), dim=0, steps=self.karcher_steps, tol=0.0, reduce=reduce_fn(red))
        return mean_so3(X, dim=0, steps=self.karcher_steps, tol=0.0, reduce=reduce_fn(red))

    def _train(self, X: Tensor, red: StatReducer | None = None) -> tuple[Tensor, Tensor]:
        """Centre one batch ``(B, *F, 3, 3)`` with its (momentum) statistics and update the buffers."""
        R, r, T, t = self._get_stats(X.dtype)
        M = self._batch_mean(X, red)
        eta = self.train_momentum
        centre = M if eta == 1.0 else geodesic_so3(T, M.detach(), eta)
        L = so3_log(left_mul(centre.mT, X))
        v, count = batch_mean_count(L.square().sum(-1), red)
        v_eta = v if eta == 1.0 else (1.0 - eta) * t + eta * v
        degenerate = degenerate_batch(X, count, red)
        var = torch.where(degenerate, r, v_eta)
        with torch.no_grad():
            m = self.momentum
            R_new = geodesic_so3(R, M.detach(), m)
            r_new = torch.where(degenerate, r, (1.0 - m) * r + m * v.detach())
            t_new = torch.where(degenerate, t, v_eta.detach())
            self._set_stats((R_new, r_new, centre.detach(), t_new))
        return L, var

    @torch.no_grad()
    def _refit(self, X: Tensor, red: StatReducer | None = None) -> tuple[Tensor, Tensor]:
        """Exact Karcher mean and dispersion of the batch become all statistics."""
        M = mean_so3(X, dim=0, steps=self.refit_karcher_steps, tol=None, reduce=reduce_fn(red))
        L = so3_log(left_mul(M.mT, X))
        v = batch_mean(L.square().sum(-1), red)
        self._set_stats((M, v, M.clone(), v.clone()))
        return L, v

    def forward_ref(self, x: Tensor) -> Tensor:
        """Training-mode output from batch statistics by an independent plain-autograd path (tests, benchmark).

        Matrix exponential (:func:`torch.linalg.matrix_exp`) and the :math:`\\arccos` logarithm, the Karcher
        iteration written out from the same (chordal) starting point, computed by plain :func:`torch.linalg.svd`
        autograd; buffers are read, never written.
        """
        xb, restore = self._flatten(x, validate=False)
        with autocast_off(xb):
            y = self._reference(xb)
        return restore(y)

    def _reference(self, xb: Tensor) -> Tensor:
        cdt, odt = resolve_dtype(xb, self.weight, self.compute_dtype)
        X = xb.to(cdt)
        src = X.detach() if self.detach_mean else X
        U, _, Vh = torch.linalg.svd(src.mean(dim=0))
        D = torch.ones(U.shape[:-1], dtype=cdt, device=U.device)
        D[..., -1] = torch.linalg.det(U @ Vh).detach()
        M = (U * D.unsqueeze(-2)) @ Vh
        for _ in range(self.karcher_steps):
            M = M @ so3_exp_ref(so3_log_ref(M.mT @ src).mean(dim=0))
        L = so3_log_ref(M.mT @ X)
        v = L.square().sum(-1).mean(dim=0)
        r = self.running_var.to(cdt)
        degenerate = degenerate_batch(X, X.shape[0], None)
        c = self.shift.to(cdt) / torch.sqrt(torch.where(degenerate, r, v) + self.eps)
        y = self.weight.to(cdt) @ so3_exp_ref(c.unsqueeze(-1) * L)
        return y.to(odt)

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, batch_dims={self.batch_dims}, momentum={self.momentum:g}, "
                f"train_momentum={self.train_momentum:g}, eps={self.eps:g}, karcher_steps={self.karcher_steps}")


# the size argument of create_norm_layer("liebn_so3", num_features) counts rotations per sample (a feature
# dimension), not the matrix size, which is always 3: create_norm_layer("liebn_so3", None) for (N, 3, 3) inputs
register_norm("liebn_so3", "lie", inputs=("so3",))(SO3BatchNorm)
