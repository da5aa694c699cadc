r"""Fused training steps of LieBN on SPD matrices: one autograd node per layer call.

Chen, Song, Liu & Sebe, "A Lie Group Approach to Riemannian Batch Normalization", ICLR 2024, Alg. 1 on SPD
manifolds (Sec. 5.2; scaling Eq. 14), in the codomain of the deformation :math:`\phi` (see
:mod:`manifoldnorm.functional._lie_groups`). For a batch ``X`` ``(N, C, n, n)``, bias ``W`` ``(C, n, n)`` and
dispersion ``s`` ``(C,)`` each kernel computes, with the batch mean detached (the layers' default),

.. math::

    Z_i = \phi(X_i),\quad M = \mathrm{FM}\{Z_i\},\quad G = M \text{ or } \gamma_{T\to M}(\eta),\quad
    \bar Z_i = G^{-1}\odot Z_i,\quad v = \tfrac1N\textstyle\sum_i d^2(\bar Z_i, E),\\
    c = s/\sqrt{v_\eta + \epsilon},\ v_\eta = (1-\eta)\,t + \eta\,v,\quad
    Y_i = \phi^{-1}\big(\phi(W) \odot \mathrm{Exp}_E(c\,\mathrm{Log}_E \bar Z_i)\big),

and returns :math:`Y`, leaving the statistics the layer keeps in ``cfg.stats`` (:class:`StepStats`). A degenerate
batch (one matrix, or all deformed matrices equal to working precision:
:func:`~manifoldnorm.functional._batch.equal_to_precision`, the rule of
:func:`manifoldnorm.nn._batch_stats.degenerate_batch`) is scaled with the running variance ``r`` instead of
:math:`v_\eta` and carries no variance gradient.

The backward is written out: the Daleckii–Krein formula of :mod:`.spectral` (the same Loewner matrices, exact at
repeated eigenvalues) for the eigendecompositions, Murray's Cholesky backward
(:func:`~manifoldnorm.functional.spd_pullback.cholesky_grad`), and the chain rule through the variance and the
scaling factor. Every decomposition of the forward serves the backward; none is repeated, and products are
regrouped where that saves one (AIM: :math:`L_B Z^c L_B^\top = (L_BU)\Lambda^c(L_BU)^\top`). The kernels equal the
composition of the group operations (``LieBatchNorm`` with ``_fused = False``) and the plain-autograd reference
``manifoldnorm.nn._reference.liebn_reference`` to round-off.

Scope (the layer composes the group operations otherwise): statistics of the local batch (no ``stats_reducer``),
detached batch mean, and the metrics LEM (any :math:`\alpha, \beta`), LCM with :math:`\theta = 1` and AIM with
:math:`\theta = 1` (any :math:`\alpha, \beta`, ``karcher_steps``). Once differentiable: a second derivative is
refused with a pointer to the plain-autograd reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._autograd import anchor_inputs, once_differentiable
from ._batch import EQUAL_ULPS, Segments, equal_to_precision
from ._spectral_checks import _all_finite, _check_domain, _reconstruct, _reconstruct_exp
from .spd_pullback import cholesky_grad
from .spectral import _EXP, _INVSQRT, _LOG, _POW, _SQRT, _check_input, _loewner, _no_autocast, sym

__all__ = ["StepConfig", "StepStats", "lem_step", "lcm_step", "aim_step", "aim_segment_step", "spdmbn_step"]


@dataclass
class StepStats:
    """Statistics of one fused step (detached): the batch mean ``mean`` and the centre ``centre`` used (codomain,
    ``(C, n, n)``), the batch variance ``var``, the momentum variance ``var_eta`` and ``degenerate`` (``(C,)``)."""

    mean: Tensor
    centre: Tensor
    var: Tensor
    var_eta: Tensor
    degenerate: Tensor


@dataclass
class StepConfig:
    r"""Constants of a fused step: momentum ``eta`` with the training statistics ``T`` (codomain, read only when
    ``eta < 1``) and ``t``, the running variance ``r`` (degenerate batches), ``eps``, the metric weights and
    ``detach_var`` (no variance gradient). The kernel leaves its :class:`StepStats` in ``stats``.

    Per-domain statistics (AIM/SPDMBN kernel only): ``seg`` groups the samples into segments (domains,
    :class:`~manifoldnorm.functional._batch.Segments`, local batch); ``T``, ``t`` and ``r`` are then per segment
    ``(S, C, ...)``, the variance is a segment mean, ``degenerate`` ``(S, C)`` (given by the caller) marks the
    segments scaled with their running variance, and every sample is scaled with its own segment's factor."""

    eta: float
    T: Tensor
    t: Tensor
    r: Tensor
    eps: float
    alpha: float = 1.0
    beta: float = 0.0
    detach_var: bool = False
    stats: StepStats | None = None
    seg: Segments | None = None
    degenerate: Tensor | None = None


_ADVICE = ("For second derivatives use LieBatchNorm.forward_ref (the plain-autograd reference, "
           "manifoldnorm.nn._reference.liebn_reference), or keep create_graph=False.")
_NAME = "LieBatchNorm (its fused training step)"


def _pc(c: Tensor) -> Tensor:
    """Broadcast ``(C,)`` or ``(N, C)`` over ``(..., C, n, n)``."""
    return c.unsqueeze(-1).unsqueeze(-1)


def _degenerate(hi: Tensor, neg_lo: Tensor, count: int) -> Tensor:
    """Degenerate channels from the entry-wise batch maximum and negated minimum (one matrix: all)."""
    if count <= 1:
        return torch.ones(hi.shape[:-2], dtype=torch.bool, device=hi.device)
    return equal_to_precision(hi, neg_lo)


def _spread_rules_out_degenerate(sq: Tensor, M: Tensor) -> bool:
    r"""A cheap sufficient test that no channel of a batch ``Z`` with mean ``M`` ``(C, n, n)`` is degenerate, from
    :math:`\|Z_i - M\|_F^2` ``sq`` ``(N, C)``; when it fails the exact entry-wise test decides.

    A degenerate channel has every entry spread :math:`\le u\,\epsilon\,s` (:math:`u` = ``EQUAL_ULPS``,
    :math:`s` its largest entry), so :math:`\|Z_i - M\|_F \le n\,(u + N)\,\epsilon\,s` (the computed mean may
    stray :math:`N\epsilon s` from the entries) with :math:`s \le \|M\|_F + \max_i\|Z_i - M\|_F`; a spread beyond
    16 times that bound in every channel rules it out."""
    N, n = sq.shape[0], M.shape[-1]
    if N <= 1:
        return False
    top = sq.amax(dim=0).sqrt()
    bound = (16.0 * n * (EQUAL_ULPS + N) * torch.finfo(M.dtype).eps) * (torch.linalg.matrix_norm(M) + top)
    return bool((top > bound).all())


def _factor(ctx, cfg: StepConfig, M: Tensor, centre: Tensor, v: Tensor, degenerate: Tensor,
            shift: Tensor) -> Tensor:
    """The scaling factor ``c = s / sqrt(var + eps)``; records the statistics in ``cfg`` and what the backward
    needs in ``ctx``."""
    eta = cfg.eta
    v_eta = v if eta == 1.0 else (1.0 - eta) * cfg.t + eta * v
    var = torch.where(degenerate, cfg.r, v_eta)
    c = shift / torch.sqrt(var + cfg.eps)
    cfg.stats = StepStats(M, centre, v, v_eta, degenerate)
    ctx.c, ctx.var, ctx.degenerate, ctx.eps, ctx.eta = c, var, degenerate, cfg.eps, eta
    ctx.detach_var, ctx.alpha, ctx.beta = cfg.detach_var, cfg.alpha, cfg.beta
    ctx.seg = cfg.seg
    return c


def _var_grad(ctx, gc: Tensor) -> Tensor | None:
    r"""Gradient of the batch variance :math:`v` from the factor's gradient ``gc`` ``(C,)`` (``None``: none flows)."""
    if ctx.detach_var:
        return None
    gvar = (-0.5 * gc) * ctx.c / (ctx.var + ctx.eps)  # d c / d var = -c / (2 (var + eps))
    gv = torch.where(ctx.degenerate, torch.zeros_like(gvar), gvar)
    return gv if ctx.eta == 1.0 else ctx.eta * gv


def _check_grad(dX: Tensor, G: Tensor, lam: Tensor, name: str) -> None:
    """Refuse a non-finite gradient from a finite incoming one (as the spectral functions' backward)."""
    if not _all_finite(dX) and _all_finite(G):
        raise ValueError(f"{name}: the gradient is not finite in {lam.dtype} although the incoming gradient is "
                         f"(input eigenvalues in [{float(lam.min()):.3g}, {float(lam.max()):.3g}]): the spectrum is "
                         "too close to singular, or too wide, for this precision. Compute in float64 "
                         "(compute_dtype=torch.float64) or regularize the input (add eps * I, or sym_reeig).")


def _dk(U: Tensor, lam: Tensor, flam: Tensor, spec, G: Tensor, p: Tensor, symmetric: bool = False) -> Tensor:
    r"""Daleckii–Krein backward :math:`U[\mathcal L \circ (U^\top \mathrm{sym}(G) U)]U^\top` (as ``_SymEig``);
    ``symmetric``: ``G`` is symmetric (to round-off), :math:`\mathrm{sym}(G) = G` is not formed."""
    Ut = U.transpose(-1, -2)
    if symmetric:
        dX = U @ _loewner(lam, flam, spec, p).mul_(Ut @ G @ U) @ Ut
    else:
        dX = U @ _loewner(lam, flam, spec, p, scale=0.5).mul_(Ut @ (G + G.transpose(-1, -2)) @ U) @ Ut
    _check_grad(dX, G, lam, spec.name)
    return dX


# ---- LEM: phi = log, group operation +, d^2(Z, E) = alpha |Z|_F^2 + beta tr(Z)^2 ----------------------------


class _LEMStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X: Tensor, W: Tensor, shift: Tensor, cfg: StepConfig) -> Tensor:  # type: ignore[override]
        anchor_inputs(ctx, X, W, shift)
        lam, U = torch.linalg.eigh(X)
        _check_domain(lam, (_LOG,), X.dtype)
        log_lam = torch.log(lam)
        Z = _reconstruct(U, log_lam)
        mu, V = torch.linalg.eigh(W)
        _check_domain(mu, (_LOG,), W.dtype)
        log_mu = torch.log(mu)
        B = _reconstruct(V, log_mu)
        M = Z.mean(dim=0)
        centre = M if cfg.eta == 1.0 else cfg.T + cfg.eta * (M - cfg.T)
        Zc = Z - centre
        sq = torch.linalg.vector_norm(Zc, dim=(-2, -1)).square()
        d2 = sq if cfg.alpha == 1.0 else cfg.alpha * sq
        if cfg.beta != 0.0:
            d2 = d2 + cfg.beta * torch.diagonal(Zc, dim1=-2, dim2=-1).sum(-1).square()
        if cfg.eta == 1.0 and _spread_rules_out_degenerate(sq, M):
            degenerate = torch.zeros(M.shape[:-2], dtype=torch.bool, device=M.device)
        else:
            degenerate = _degenerate(Z.amax(dim=0), Z.amin(dim=0).neg_(), Z.shape[0])
        c = _factor(ctx, cfg, M, centre, d2.mean(dim=0), degenerate, shift)
        A = torch.addcmul(B, _pc(c), Zc)
        nu, Q = torch.linalg.eigh(A)
        ctx.save_for_backward(lam, U, log_lam, mu, V, log_mu, Zc, nu, Q, torch.exp(nu))
        return _reconstruct_exp(Q, nu)

    @staticmethod
    @once_differentiable(_NAME, _ADVICE)
    def backward(ctx, gY: Tensor):  # type: ignore[override]
        lam, U, log_lam, mu, V, log_mu, Zc, nu, Q, e_nu = ctx.saved_tensors
        with _no_autocast(gY):
            p = torch.zeros((), dtype=lam.dtype, device=lam.device)
            gA = _dk(Q, nu, e_nu, _EXP, gY, p)
            gc = torch.linalg.vecdot(gA.flatten(-2), Zc.flatten(-2)).sum(dim=0)
            gX = gW = None
            if ctx.needs_input_grad[1]:
                gW = _dk(V, mu, log_mu, _LOG, gA.sum(dim=0), p, symmetric=True)
            if ctx.needs_input_grad[0]:
                gZ = gA.mul_(_pc(ctx.c))
                gv = _var_grad(ctx, gc)
                if gv is not None:  # d v / d Zc_i = (2 alpha Zc_i + 2 beta tr(Zc_i) I) / N
                    gd2 = (2.0 / Zc.shape[0]) * gv
                    gZ.addcmul_(Zc, _pc(ctx.alpha * gd2))
                    if ctx.beta != 0.0:
                        tr = torch.diagonal(Zc, dim1=-2, dim2=-1).sum(-1, keepdim=True)
                        gZ.diagonal(dim1=-2, dim2=-1).add_(tr * (ctx.beta * gd2).unsqueeze(-1))
                gX = _dk(U, lam, log_lam, _LOG, gZ, p, symmetric=True)  # gA and Zc are symmetric
            gs = gc / torch.sqrt(ctx.var + ctx.eps) if ctx.needs_input_grad[2] else None
        return gX, gW, gs, None


def lem_step(X: Tensor, W: Tensor, shift: Tensor, cfg: StepConfig) -> Tensor:
    """LieBN-LEM training step on ``(N, C, n, n)`` (see the module docstring); statistics in ``cfg.stats``."""
    _check_input(X, "sym_logm")
    _check_input(W, "sym_logm")
    return _LEMStep.apply(X, W, shift, cfg)


# ---- LCM (theta = 1): phi = psi (log-Cholesky), group operation +, d^2(Z, E) = |Z|_F^2 --------------------------
# Computed on the transposes (upper triangular, row-major): torch.linalg.cholesky returns L column-major, so L^T
# is a row-major view, and reductions over the batch, the scaling and the products run in memory order.


class _LCMStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X: Tensor, W: Tensor, shift: Tensor, cfg: StepConfig) -> Tensor:  # type: ignore[override]
        anchor_inputs(ctx, X, W, shift)
        L = torch.linalg.cholesky(X)
        Lt = L.mT  # psi(X)^T off the diagonal
        log_d = torch.log(torch.diagonal(L, dim1=-2, dim2=-1))  # the diagonal of psi(X)
        Mt = Lt.mean(dim=0)
        Mt.diagonal(dim1=-2, dim2=-1).copy_(log_d.mean(dim=0))
        Gt = Mt if cfg.eta == 1.0 else cfg.T.mT + cfg.eta * (Mt - cfg.T.mT)
        Zct = Lt - Gt
        Zct.diagonal(dim1=-2, dim2=-1).copy_(log_d - Gt.diagonal(dim1=-2, dim2=-1))
        sq = torch.linalg.vector_norm(Zct, dim=(-2, -1)).square()
        v = sq.mean(dim=0)
        if cfg.eta == 1.0 and _spread_rules_out_degenerate(sq, Mt):
            degenerate = torch.zeros(Mt.shape[:-2], dtype=torch.bool, device=Mt.device)
        else:
            hi, lo = Lt.amax(dim=0), Lt.amin(dim=0)  # entry-wise extremes of psi(X)^T
            hi.diagonal(dim1=-2, dim2=-1).copy_(log_d.amax(dim=0))
            lo.diagonal(dim1=-2, dim2=-1).copy_(log_d.amin(dim=0))
            degenerate = _degenerate(hi, lo.neg_(), X.shape[0])
        c = _factor(ctx, cfg, Mt.mT, Gt.mT, v, degenerate, shift)
        LB = torch.linalg.cholesky(W)
        Ct = LB.mT.clone()
        Ct.diagonal(dim1=-2, dim2=-1).log_()  # psi(W)^T
        Ct = torch.addcmul(Ct, _pc(c), Zct)
        Ct.diagonal(dim1=-2, dim2=-1).exp_()  # C^T, C = psi^{-1} factor of the output
        ctx.save_for_backward(L, LB, Zct, Ct)
        return Ct.mT @ Ct

    @staticmethod
    @once_differentiable(_NAME, _ADVICE)
    def backward(ctx, gY: Tensor):  # type: ignore[override]
        L, LB, Zct, Ct = ctx.saved_tensors
        gCt = (Ct @ (gY + gY.mT)).triu_()  # (gY + gY^T) C, transposed, upper part
        gCt.diagonal(dim1=-2, dim2=-1).mul_(Ct.diagonal(dim1=-2, dim2=-1))  # through exp of the diagonal
        gc = torch.linalg.vecdot(gCt.flatten(-2), Zct.flatten(-2)).sum(dim=0)
        gX = gW = None
        if ctx.needs_input_grad[1]:
            gB = gCt.sum(dim=0).mT
            gB.diagonal(dim1=-2, dim2=-1).div_(LB.diagonal(dim1=-2, dim2=-1))
            gW = cholesky_grad(gB, LB)
        if ctx.needs_input_grad[0]:
            gZt = gCt.mul_(_pc(0.5 * ctx.c))  # the 1/2 of the Cholesky backward folded in (exact)
            gv = _var_grad(ctx, gc)
            if gv is not None:  # d v / d Zc_i = 2 Zc_i / N, halved as above
                gZt.addcmul_(Zct, _pc(gv / Zct.shape[0]))
            gZt.diagonal(dim1=-2, dim2=-1).div_(torch.diagonal(L, dim1=-2, dim2=-1))
            gX = cholesky_grad(gZt.mT, L, halved=True)
        gs = gc / torch.sqrt(ctx.var + ctx.eps) if ctx.needs_input_grad[2] else None
        return gX, gW, gs, None


def lcm_step(X: Tensor, W: Tensor, shift: Tensor, cfg: StepConfig) -> Tensor:
    """LieBN-LCM (θ = 1) training step on ``(N, C, n, n)``; statistics in ``cfg.stats``."""
    return _LCMStep.apply(X, W, shift, cfg)


# ---- AIM (theta = 1) and SPDMBN: whiten, power, bias ---------------------------------------------------------------
# LieBN-AIM: Y = L_B (L^{-1} X L^{-T})^c L_B^T with L = chol(centre), L_B = chol(W), d^2 = alpha |log Z|^2 +
# beta log^2 det Z. Kobler's SPDMBN: Y = W^{1/2} (R^{-1/2} X R^{-1/2})^c W^{1/2}, d^2 = |log Z|^2. Both:
# Y = F (K X K^T)^c F^T for a constant whitening K and a factor F of the bias W.


class _WhitenPowerBias(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X: Tensor, W: Tensor, shift: Tensor, K: Tensor, M: Tensor,  # type: ignore[override]
                centre: Tensor, cfg: StepConfig, bias: str) -> Tensor:
        anchor_inputs(ctx, X, W, shift)
        Zc = sym(K @ X @ K.transpose(-1, -2))  # centring
        lam, U = torch.linalg.eigh(Zc)
        _check_domain(lam, (_POW,), Zc.dtype)
        log_lam = torch.log(lam)
        d2 = cfg.alpha * log_lam.square().sum(-1)
        if cfg.beta != 0.0:
            d2 = d2 + cfg.beta * log_lam.sum(-1).square()
        seg = cfg.seg
        if seg is None:
            degenerate = _degenerate(X.amax(dim=0), X.amin(dim=0).neg_(), X.shape[0])
            c = _factor(ctx, cfg, M, centre, d2.mean(dim=0), degenerate, shift)
            p = c.expand(Zc.shape[:-2])
        else:  # per segment: factors (S, C), gathered to the samples
            assert cfg.degenerate is not None
            c = _factor(ctx, cfg, M, centre, seg.mean(d2), cfg.degenerate, shift)
            p = seg.gather(c)
        lam_c = torch.pow(lam, p.unsqueeze(-1))
        if bias == "cholesky":
            F = torch.linalg.cholesky(W)
            wfac: tuple[Tensor, ...] = (F,)
        else:  # symmetric square root (as sym_sqrtm)
            mu, Q = torch.linalg.eigh(W)
            _check_domain(mu, (_SQRT,), W.dtype)
            s_mu = torch.sqrt(mu)
            F = _reconstruct(Q, s_mu)
            wfac = (mu, Q, s_mu)
        V = F @ U  # biasing F Zc^c F^T = V diag(lam^c) V^T
        ctx.bias = bias
        ctx.save_for_backward(K, lam, U, log_lam, lam_c, p, V, *wfac)
        return sym((V * lam_c.unsqueeze(-2)) @ V.transpose(-1, -2))

    @staticmethod
    @once_differentiable(_NAME, _ADVICE)
    def backward(ctx, gY: Tensor):  # type: ignore[override]
        K, lam, U, log_lam, lam_c, p, V, *wfac = ctx.saved_tensors
        with _no_autocast(gY):
            GV = sym(gY) @ V
            Gt = (V.transpose(-1, -2) @ GV).mul_(2.0)  # U^T (gZs + gZs^T) U with gZs = F^T sym(gY) F
            # exponent gradient of Zc^c (as sym_powm): sum_k (U^T sym(gZs) U)_kk lam_k^c log lam_k
            gci = 0.5 * (torch.diagonal(Gt, dim1=-2, dim2=-1) * lam_c * log_lam).sum(-1)  # per sample (N, C)
            seg = ctx.seg
            gc = gci.sum(dim=0) if seg is None else seg.sum(gci)  # per factor: (C,) or (S, C)
            gX = gW = None
            if ctx.needs_input_grad[1]:  # grad of F: 2 sym(gY) F Zc^c = 2 (GV diag(lam^c)) U^T
                half = ((GV * lam_c.unsqueeze(-2)) @ U.transpose(-1, -2)).sum(dim=0)
                if ctx.bias == "cholesky":
                    gW = cholesky_grad(half, wfac[0], halved=True)
                else:
                    mu, Q, s_mu = wfac
                    gW = _dk(Q, mu, s_mu, _SQRT, 2.0 * half, torch.zeros((), dtype=mu.dtype, device=mu.device))
            if ctx.needs_input_grad[0]:
                inner = _loewner(lam, lam_c, _POW, p, scale=0.5).mul_(Gt)
                gv = _var_grad(ctx, gc)
                if gv is not None:  # the variance through the eigenvalues: U diag(d v / d lam) U^T
                    dlog = 2.0 * ctx.alpha * log_lam
                    if ctx.beta != 0.0:
                        dlog = dlog + 2.0 * ctx.beta * log_lam.sum(-1, keepdim=True)
                    # d v / d d2_i = 1 / (samples of the batch, or of the sample's segment)
                    gvi = gv / lam.shape[0] if seg is None else seg.gather(gv / seg.counts.to(gv.dtype).unsqueeze(-1))
                    inner.diagonal(dim1=-2, dim2=-1).add_(dlog * gvi.unsqueeze(-1) / lam)
                P = K.transpose(-1, -2) @ U  # d X = K^T (U inner U^T) K
                gX = P @ inner @ P.transpose(-1, -2)
                _check_grad(gX, gY, lam, "sym_powm")
            gs = None
            if ctx.needs_input_grad[2]:
                gs = gc / torch.sqrt(ctx.var + ctx.eps)
                if seg is not None:
                    gs = gs.sum(dim=0)
        return gX, gW, gs, None, None, None, None, None


def aim_step(X: Tensor, W: Tensor, shift: Tensor, M: Tensor, centre: Tensor, cfg: StepConfig) -> Tensor:
    r"""LieBN-AIM (θ = 1) training step on ``(N, C, n, n)`` given the (detached) batch mean ``M`` and the centre
    (``M``, or the momentum mean): centring :math:`L^{-1}XL^{-\top}`, :math:`L = \mathrm{chol}(G)`, biasing by
    :math:`\mathrm{chol}(W)`; statistics in ``cfg.stats``."""
    _check_input(X, "sym_eig")
    with torch.no_grad():
        L = torch.linalg.cholesky(centre)
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
        Li = torch.linalg.solve_triangular(L, eye, upper=False)
    return _WhitenPowerBias.apply(X, W, shift, Li, M, centre, cfg, "cholesky")


def aim_segment_step(X: Tensor, W: Tensor, shift: Tensor, M: Tensor, centre: Tensor, cfg: StepConfig) -> Tensor:
    r"""LieBN-AIM (θ = 1) training step with per-domain statistics: :func:`aim_step` where each sample is
    whitened by the Cholesky factor of its own segment's centre (``centre`` ``(S, C, n, n)``: one Cholesky per
    segment, gathered to the samples) and scaled with its segment's factor (``cfg.seg``, ``cfg.degenerate``)."""
    _check_input(X, "sym_eig")
    assert cfg.seg is not None and cfg.degenerate is not None
    with torch.no_grad():
        L = torch.linalg.cholesky(centre)
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
        Li = cfg.seg.gather(torch.linalg.solve_triangular(L, eye, upper=False))
    return _WhitenPowerBias.apply(X, W, shift, Li, M, centre, cfg, "cholesky")


def spdmbn_step(X: Tensor, W: Tensor, shift: Tensor, M: Tensor, centre: Tensor, cfg: StepConfig) -> Tensor:
    r"""SPDMBN training step (Kobler et al., NeurIPS 2022) on ``(N, C, n, n)``: :math:`W^{1/2}(R_\eta^{-1/2} X
    R_\eta^{-1/2})^{c}W^{1/2}` with :math:`c = s/\sqrt{r_\eta + \epsilon}`, the batch mean ``M`` (detached) and
    the momentum mean ``centre`` :math:`= R_\eta`; ``cfg.t`` and ``cfg.r`` are the training variance :math:`r`."""
    _check_input(X, "sym_eig")
    with torch.no_grad():
        lam, U = torch.linalg.eigh(centre)
        _check_domain(lam, (_INVSQRT,), centre.dtype)
        K = _reconstruct(U, torch.rsqrt(lam))  # as sym_invsqrtm
    return _WhitenPowerBias.apply(X, W, shift, K, M, centre, cfg, "sqrtm")
