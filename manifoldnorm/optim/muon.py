"""Muon and NorMuon: momentum orthogonalized by Newton–Schulz, optionally with neuron-wise normalization.

Both optimizers update matrices only (Linear weights ``(out, in)``; conv weights are treated as
``(out, in·kh·kw)`` throughout and reshaped back at the end). Biases, gains and other vectors belong to AdamW.
Under DDP the Newton–Schulz iterations are split over the ranks by whole matrices
(:class:`~manifoldnorm.optim._sharding.ShardedMatrixOptimizer`, ``docs/distributed_optimizers.md``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from manifoldnorm.optim._newton_schulz import (
    NS_COEFFICIENTS,
    NS_DTYPE,
    _newton_schulz,
    adjust_lr,
    as_matrix,
    check_adjust_mode,
    check_newton_schulz_args,
    newton_schulz,
    resolve_dtype,
)
from manifoldnorm.optim._sharding import ShardedMatrixOptimizer
from manifoldnorm.optim._validate import check_options
from manifoldnorm.optim.registry import register_optimizer

__all__ = ["Muon", "NorMuon", "muon_update", "normuon_update", "adjust_lr", "newton_schulz"]


def _blend(grad: Tensor, momentum_buffer: Tensor, beta: float, nesterov: bool) -> Tensor:
    """The direction to orthogonalize, as the ``(out, -1)`` matrix: Nesterov blend or the momentum itself."""
    return as_matrix(grad.lerp(momentum_buffer, beta) if nesterov else momentum_buffer)


def _momentum_direction(grad: Tensor, momentum_buffer: Tensor, beta: float, nesterov: bool) -> Tensor:
    """EMA momentum (in place on the buffer), then :func:`_blend`."""
    momentum_buffer.lerp_(grad, 1 - beta)
    return _blend(grad, momentum_buffer, beta, nesterov)


def _orthogonalize(
    u: Tensor, ns_steps: int, ns_coefficients: Sequence[float], ns_eps: float, ns_dtype: torch.dtype | None,
    owned: bool = False,
) -> Tensor:
    """Newton–Schulz of the matrix ``u`` in ``ns_dtype`` (``None``: its own dtype); ``owned``: ``u`` is a temporary
    that may be normalized in place. The result of a tall matrix is a transposed (non-contiguous) view, as in
    ``torch.optim.Muon``; consumers that reduce over it fix the layout first (:func:`_normuon_finish`)."""
    X = u if ns_dtype is None or u.dtype == ns_dtype else u.to(ns_dtype)
    return _newton_schulz(X, ns_steps, ns_coefficients, ns_eps, owned=owned or X is not u)


def _row_major(O: Tensor, dtype: torch.dtype) -> Tensor:
    """``O`` in ``dtype`` and contiguous, with at most one copy (``Tensor.to`` keeps the strides when the dtype is
    unchanged, whatever ``memory_format`` says)."""
    return O.contiguous() if O.dtype == dtype else O.to(dtype, memory_format=torch.contiguous_format)


def _normuon_finish(
    O: Tensor, second_moment: Tensor, beta2: float, eps: float, mode: str, shape: torch.Size, dtype: torch.dtype,
) -> Tensor:
    """NorMuon after Newton–Schulz: second-moment EMA (in place), row normalization, norm restore and scaling.

    ``O`` is a temporary of the caller's (the Newton–Schulz output or an all-gathered result) and is consumed: when
    it is already contiguous in at least float32 the normalization runs in place on it (fewer large allocations).
    """
    m, n = O.shape
    # one copy to at least float32 in row-major layout: the row reductions below then see the same layout (and give
    # the same bits) whether O was computed here (a tall O is a transposed view) or all-gathered (contiguous)
    O = _row_major(O, torch.promote_types(O.dtype, torch.float32))
    # one pass over O for every statistic: the row sums of squares give the second moment, ||O|| and, with the
    # row divisors d, ||O / d|| = sqrt(sum_i row_sq_i / d_i^2); a second pass scales each row once
    row_sq = torch.linalg.vecdot(O, O)
    mean_sq = row_sq / n
    second_moment.lerp_(mean_sq if mean_sq.dtype == second_moment.dtype else mean_sq.to(second_moment.dtype),
                        1 - beta2)
    v = second_moment if second_moment.dtype == O.dtype else second_moment.to(O.dtype)
    inv_d = v.sqrt().add_(eps).reciprocal_()
    norm_hat = (row_sq * inv_d.square()).sum().sqrt()
    if mode == "original":
        target = row_sq.sum().sqrt()
        if m > n:  # the factor is 1 otherwise (a multiplication by 1 changes no bit; skipped: small-matrix overhead)
            target = target * math.sqrt(m / n)
    else:
        target = torch.full_like(norm_hat, 0.2 * math.sqrt(m * n))
    if O.device.type == "cpu":  # reading the norm costs no device synchronisation here
        scale = target / norm_hat if norm_hat > 0 else torch.zeros_like(norm_hat)
    else:
        scale = torch.where(norm_hat > 0, target / norm_hat, 0.0)  # 0/0 is computed but never selected
    O_hat = O.mul_((inv_d * scale).unsqueeze(-1))  # O itself is not needed any more
    if O_hat.shape != shape:
        O_hat = O_hat.reshape(shape)
    return O_hat if O_hat.dtype == dtype else O_hat.to(dtype)


def muon_update(
    grad: Tensor,
    momentum_buffer: Tensor,
    *,
    beta: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coefficients: Sequence[float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    ns_dtype: torch.dtype | str | None = NS_DTYPE,
) -> Tensor:
    r"""Muon's orthogonalized direction for one weight (Jordan et al., 2024; ``torch.optim.Muon``).

    .. math::

        M_t = \beta M_{t-1} + (1-\beta) G_t, \qquad
        U_t = \begin{cases} (1-\beta) G_t + \beta M_t & \text{nesterov} \\ M_t & \text{otherwise}\end{cases},
        \qquad O_t = \mathrm{NS}_5(U_t)

    The optimizer then steps :math:`W \leftarrow W(1 - \eta\lambda) - \mathrm{adjust\_lr}(\eta)\, O_t`.

    Parameters
    ----------
    grad : Tensor, shape (out, in) or (out, in, kh, kw, ...)
        Gradient; read only. Conv gradients are orthogonalized as the matrix ``(out, in·kh·kw)``.
    momentum_buffer : Tensor, same shape as ``grad``
        :math:`M_{t-1}`, overwritten in place with :math:`M_t`.
    beta : float
        Momentum coefficient :math:`\beta`.
    nesterov : bool
        Use the Nesterov blend :math:`U_t` above instead of :math:`M_t`.
    ns_steps, ns_coefficients, eps
        Passed to :func:`newton_schulz`.
    ns_dtype : torch.dtype, its name, or None; default ``"bfloat16"``
        Precision of the Newton–Schulz iteration. bfloat16 (as ``torch.optim.Muon`` and the references) reproduces
        ``torch.optim.Muon`` bit for bit; ``None`` iterates in the dtype of ``grad`` (full precision).

    Returns
    -------
    Tensor
        :math:`O_t` with the shape and dtype of ``grad`` (no learning rate or shape scaling applied).

    Notes
    -----
    Deviations: the momentum is the EMA of the reference code, not the accumulation :math:`M_t = \mu M_{t-1} + G_t`
    written in the Muon blog post and in ``torch.optim.Muon``'s docstring (equal after Newton–Schulz up to
    :math:`\varepsilon`). Conv weights are flattened to ``(out, in·kh·kw)`` (``torch.optim.Muon`` rejects them).
    """
    check_newton_schulz_args(as_matrix(grad), ns_steps, ns_coefficients)
    O = _orthogonalize(_momentum_direction(grad, momentum_buffer, beta, nesterov), ns_steps, ns_coefficients, eps,
                       resolve_dtype(ns_dtype), owned=nesterov)
    return _row_major(O, grad.dtype).reshape(grad.shape)


def normuon_update(
    grad: Tensor,
    momentum_buffer: Tensor,
    second_moment: Tensor,
    *,
    beta: float = 0.95,
    beta2: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coefficients: Sequence[float] = NS_COEFFICIENTS,
    eps: float = 1e-8,
    ns_eps: float = 1e-7,
    ns_dtype: torch.dtype | str | None = NS_DTYPE,
    adjust_lr_fn: str | None = "original",
) -> Tensor:
    r"""NorMuon's direction for one weight: Muon's :math:`O_t`, then neuron-wise (row) normalization.

    Li, Liu, Liang, Chen, Zhao (2025), "NorMuon: Making Muon more efficient and scalable", Algorithm 1. With
    :math:`O_t` from :func:`muon_update` viewed as an ``(m, n)`` matrix, row :math:`i` = output neuron :math:`i`:

    .. math::

        v_t = \beta_2 v_{t-1} + (1-\beta_2)\,\tfrac{1}{n}\textstyle\sum_j (O_t)_{ij}^2, \qquad
        \hat O_t = \operatorname{diag}(\sqrt{v_t} + \epsilon)^{-1} O_t,

    then :math:`\hat O_t` is rescaled to a Frobenius norm set by ``adjust_lr_fn``:

    * ``"original"`` (default, the authors' code): :math:`U_t = \hat O_t \cdot
      \frac{\lVert O_t\rVert_F}{\lVert \hat O_t\rVert_F} \sqrt{\max(1, m/n)}` -- Muon's norm and shape scaling,
      so learning rates are in Muon units and carry over from Muon;
    * ``"match_rms_adamw"`` (the paper's step size): :math:`U_t = \hat O_t \cdot
      \frac{0.2\sqrt{mn}}{\lVert \hat O_t\rVert_F}`, an update of RMS exactly 0.2, so AdamW learning rates carry over.

    If :math:`\hat O_t = 0` (all-zero gradients and momentum) the result is zero, not 0/0.

    Parameters
    ----------
    grad, momentum_buffer, beta, nesterov, ns_steps, ns_coefficients, ns_dtype
        As in :func:`muon_update` (``ns_eps`` is its ``eps``); the momentum buffer is updated in place.
    second_moment : Tensor, shape (out,)
        :math:`v_{t-1}`, overwritten in place with :math:`v_t`. Its dtype is kept (the optimizer uses float32);
        the normalization computes in at least float32.
    beta2 : float
        Decay :math:`\beta_2` of the second moment.
    eps : float
        :math:`\epsilon` added to :math:`\sqrt{v_t}`.
    adjust_lr_fn : {"original", "match_rms_adamw"} or None
        Scaling of the result (``None`` = ``"original"``).

    Returns
    -------
    Tensor
        :math:`U_t` with the shape and dtype of ``grad``; the optimizer steps :math:`W \leftarrow W(1-\eta\lambda)
        - \eta U_t`.

    Notes
    -----
    Deviations: the paper's Algorithm 1 uses the plain momentum :math:`M_t`; the default here (as the authors'
    code and Muon) is the Nesterov blend (``nesterov=False`` gives the paper's form). No bias correction of
    :math:`v_t` (as paper and code; it would cancel in the norm restore except through :math:`\epsilon`).
    :math:`\epsilon` = 1e-8 outside the square root as in the paper's formula (the authors' code adds 1e-10).
    Conv weights are normalized per output neuron of the flattened ``(out, in·kh·kw)`` matrix, with the shape
    scaling of that matrix (the authors' code normalizes 4-D updates along ``kw`` only).
    """
    mode = check_adjust_mode(adjust_lr_fn)
    if grad.dim() >= 2 and second_moment.shape != grad.shape[:1]:
        raise ValueError(f"second_moment must have shape ({grad.shape[0]},) for a gradient of shape "
                         f"{tuple(grad.shape)}, got {tuple(second_moment.shape)}")
    check_newton_schulz_args(as_matrix(grad), ns_steps, ns_coefficients)
    O = _orthogonalize(_momentum_direction(grad, momentum_buffer, beta, nesterov), ns_steps, ns_coefficients,
                       ns_eps, resolve_dtype(ns_dtype), owned=nesterov)
    return _normuon_finish(O, second_moment, beta2, eps, mode, grad.shape, grad.dtype)


class _NewtonSchulzOptimizer(ShardedMatrixOptimizer):
    """Muon's momentum and Newton–Schulz as the three phases of :class:`ShardedMatrixOptimizer`."""

    _ns_eps_key = "eps"

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _prepare(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            self._init_state(p, state)
        state["momentum_buffer"].lerp_(p.grad, 1 - group["momentum"])

    def _transform(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        nesterov = group["nesterov"]
        u = _blend(p.grad, self.state[p]["momentum_buffer"], group["momentum"], nesterov)
        return _orthogonalize(u, group["ns_steps"], group["ns_coefficients"], group[self._ns_eps_key],
                              group["ns_dtype"], owned=nesterov)

    def _transform_spec(self, p: Tensor, group: dict[str, Any]) -> tuple[tuple[int, int], torch.dtype]:
        return (p.shape[0], math.prod(p.shape[1:])), group["ns_dtype"] or p.grad.dtype


class Muon(_NewtonSchulzOptimizer):
    r"""Muon: SGD with EMA/Nesterov momentum orthogonalized by Newton–Schulz (Jordan et al., 2024).

    Per matrix :math:`W` of shape ``(m, n)`` (conv weights as ``(m, in·kh·kw)``), with :math:`O_t` from
    :func:`muon_update`:

    .. math::

        W_t = W_{t-1}(1 - \eta\lambda) - \mathrm{adjust\_lr}(\eta, m, n)\, O_t

    The defaults are ``torch.optim.Muon``'s (torch 2.13): ``lr=1e-3``, ``weight_decay=0.1``, ``momentum=0.95``,
    ``nesterov=True``, ``ns_coefficients=(3.4445, -4.775, 2.0315)``, ``eps=1e-7``, ``ns_steps=5``,
    ``adjust_lr_fn=None``, and Newton–Schulz in bfloat16. On float32 2-D parameters every step equals
    ``torch.optim.Muon``'s bit for bit (tested with the defaults, with and without weight decay and Nesterov, and
    with both lr adjustments), on bfloat16 ones too with Nesterov; what each accepts and their side effects differ
    as listed under Notes.

    Parameters
    ----------
    params : iterable
        Matrices (ndim >= 2) or parameter groups; vectors raise a ValueError (send them to AdamW).
    lr : float, default 1e-3
        :math:`\eta`, before the shape adjustment.
    weight_decay : float, default 0.1
        Decoupled weight decay :math:`\lambda`, multiplied by the *unadjusted* :math:`\eta`.
    momentum : float, default 0.95
        EMA coefficient :math:`\beta` of the momentum.
    nesterov : bool, default True
        Orthogonalize the Nesterov blend instead of the momentum.
    ns_coefficients : tuple of three floats, default (3.4445, -4.775, 2.0315)
        Newton–Schulz polynomial, see :func:`newton_schulz`.
    eps : float, default 1e-7
        Lower bound of the Frobenius norm in the Newton–Schulz normalization.
    ns_steps : int, default 5
        Newton–Schulz steps.
    adjust_lr_fn : {None, "original", "match_rms_adamw"}
        Shape adjustment of the learning rate, see :func:`adjust_lr` (``None`` = ``"original"``).
    ns_dtype : torch.dtype, str or None, default "bfloat16"
        Precision of Newton–Schulz: bfloat16 as ``torch.optim.Muon`` (which has no other choice) and the reference
        code; ``None`` iterates in the parameter's dtype, ``"float32"``/``"float64"`` in that precision. Cost of
        float32 (``python -m benchmarks optim --step-only``) depends on the hardware: on a CPU with bfloat16 matrix
        units about 1.9x the bfloat16 step on 256x256..256x1024 matrices (0.9x on 96-wide ones); on a CPU without
        bfloat16 instructions (no ``avx512_bf16``/``amx_bf16``, where bfloat16 products are emulated) about 0.3x,
        so there ``"float32"`` is the fast choice.
    distributed : bool, default True
        Under an initialised ``torch.distributed`` group of more than one rank (DDP), run each matrix's
        Newton–Schulz on one rank and all-gather the results: bit-identical to the single-process step, every rank
        keeps the full state. All ranks must step the same parameters (checked: RuntimeError). Without a process
        group, or with ``False``, all work is local. See :class:`~manifoldnorm.optim._sharding.ShardedMatrixOptimizer`.
    process_group : ProcessGroup, optional
        Group of the exchange (default group if None); an attribute, never part of ``state_dict()``.

    Notes
    -----
    Deviations from ``torch.optim.Muon``: conv (ndim > 2) weights are accepted and flattened; ``p.grad`` is never
    written, and the momentum buffer is never normalized in place (torch 2.13 does that with ``nesterov=False`` on
    bfloat16 parameters, so bfloat16 runs without Nesterov differ from torch's there); Newton–Schulz precision is
    selectable (default bfloat16 as torch); the checks differ (``momentum`` in [0, 1) and any ``ns_steps >= 1``
    here; torch takes any ``momentum >= 0`` and refuses ``ns_steps >= 100``); under DDP the Newton–Schulz work is
    split over the ranks.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        ns_dtype: torch.dtype | str | None = NS_DTYPE,
        distributed: bool = True,
        process_group: Any = None,
    ) -> None:
        check_options(dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                           ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                           ns_dtype=ns_dtype, distributed=distributed), owner="Muon")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn, ns_dtype=resolve_dtype(ns_dtype))
        super().__init__(params, defaults)
        self._init_sharding(distributed, process_group)

    def _finish(self, p: Tensor, group: dict[str, Any], O: Tensor) -> None:
        lr, wd = float(group["lr"]), group["weight_decay"]
        if wd != 0:  # a multiplication by 1 would change no bit
            p.mul_(1 - lr * wd)
        if O.dtype != p.dtype and torch.promote_types(O.dtype, p.dtype) != p.dtype:
            O = O.to(p.dtype)  # e.g. float32 O on a bfloat16 weight: rounded before the update, as always
        # a bfloat16 O is added to a wider weight as it is (exact widening inside add_, as torch.optim.Muon)
        p.add_(O if O.dim() == p.dim() else O.reshape(p.shape), alpha=-adjust_lr(lr, p.shape, group["adjust_lr_fn"]))


class NorMuon(_NewtonSchulzOptimizer):
    r"""NorMuon: Muon with a neuron-wise (row) second-moment normalization (Li et al., 2025, Algorithm 1).

    Per matrix, with :math:`U_t` from :func:`normuon_update`:

    .. math::

        W_t = W_{t-1}(1 - \eta\lambda) - \eta\, U_t

    State per matrix: the momentum (parameter dtype) and :math:`v \in \mathbb{R}^{\text{out}}` in float32 whatever
    the parameter dtype (kept float32 through ``load_state_dict``).

    Parameters
    ----------
    params : iterable
        Matrices (ndim >= 2) or parameter groups; vectors raise a ValueError (send them to AdamW).
    lr : float, default 0.02
        :math:`\eta`; in Muon units with ``adjust_lr_fn="original"``, in AdamW units with ``"match_rms_adamw"``.
    weight_decay : float, default 0.0
        Decoupled weight decay :math:`\lambda` (multiplied by :math:`\eta`).
    momentum : float, default 0.95
        :math:`\beta_1`, EMA coefficient of the momentum.
    beta2 : float, default 0.95
        :math:`\beta_2`, EMA coefficient of the row second moment.
    nesterov : bool, default True
        Orthogonalize the Nesterov blend (authors' code) instead of the momentum (paper's Algorithm 1).
    ns_coefficients, ns_steps, ns_eps, ns_dtype
        Newton–Schulz settings as in :class:`Muon` (``ns_eps`` is Muon's ``eps``); Newton–Schulz runs in bfloat16 by
        default, as the authors' code (``ns_dtype=None``: in the parameter's dtype).
    eps : float, default 1e-8
        :math:`\epsilon` added to :math:`\sqrt{v}`.
    adjust_lr_fn : {"original", "match_rms_adamw"} or None, default "original"
        ``"original"``: restore Muon's Frobenius norm and shape scaling (authors' code; Muon hyperparameters carry
        over). ``"match_rms_adamw"``: update RMS 0.2 (the paper's step size; AdamW hyperparameters carry over).

    distributed : bool, default True
        Under an initialised ``torch.distributed`` group of more than one rank (DDP), run each matrix's
        Newton–Schulz on one rank and all-gather the results: bit-identical to the single-process step, every rank
        keeps the full state. All ranks must step the same parameters (checked: RuntimeError). Without a process
        group, or with ``False``, all work is local. See :class:`~manifoldnorm.optim._sharding.ShardedMatrixOptimizer`.
    process_group : ProcessGroup, optional
        Group of the exchange (default group if None); an attribute, never part of ``state_dict()``.

    Notes
    -----
    Deviations: see :func:`normuon_update`. Defaults (``lr=0.02``, ``weight_decay=0``) are the authors' code's.
    Under DDP the Newton–Schulz work is split over the ranks; the second moments are updated on every rank.
    """

    _ns_eps_key = "ns_eps"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        beta2: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-8,
        ns_eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = "original",
        ns_dtype: torch.dtype | str | None = NS_DTYPE,
        distributed: bool = True,
        process_group: Any = None,
    ) -> None:
        check_options(dict(lr=lr, weight_decay=weight_decay, momentum=momentum, beta2=beta2, nesterov=nesterov,
                           ns_coefficients=ns_coefficients, eps=eps, ns_eps=ns_eps, ns_steps=ns_steps,
                           adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, distributed=distributed), owner="NorMuon")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, beta2=beta2, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_eps=ns_eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn, ns_dtype=resolve_dtype(ns_dtype))
        super().__init__(params, defaults)
        self._init_sharding(distributed, process_group)

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        super()._init_state(p, state)
        state["second_moment"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)

    def _finish(self, p: Tensor, group: dict[str, Any], O: Tensor) -> None:
        lr, wd = float(group["lr"]), group["weight_decay"]
        U = _normuon_finish(O, self.state[p]["second_moment"], group["beta2"], group["eps"],
                            check_adjust_mode(group["adjust_lr_fn"]), p.grad.shape, p.grad.dtype)
        if wd != 0:  # a multiplication by 1 would change no bit
            p.mul_(1 - lr * wd)
        p.add_(U, alpha=-lr)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict; the second moments stay float32 (the base class would cast them to the param dtype)."""
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        id_to_param = dict(zip(saved_ids, params, strict=False))  # lengths: checked by the base class
        moments = {id_to_param[k]: s["second_moment"] for k, s in state_dict["state"].items()
                   if k in id_to_param and "second_moment" in s}
        super().load_state_dict(state_dict)
        for p, v in moments.items():
            self.state[p]["second_moment"] = v.to(device=p.device, dtype=torch.float32, copy=True)


register_optimizer("muon", Muon, "euclidean")
register_optimizer("normuon", NorMuon, "euclidean")
