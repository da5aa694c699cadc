r"""Plain-autograd reference paths of the SPD batch norms (tests and ``python -m benchmarks norms``).

Each function recomputes a layer's training-mode output from the batch statistics, written straight from the
papers' formulas with the ``*_ref`` spectral functions (``torch.linalg.eigh``'s own backward), explicit
inverses and no shared decompositions. They never touch a layer's buffers. The fast layers must agree with them
to round-off; the benchmark reports the relative error of output and input gradient next to each timing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from manifoldnorm import functional as mf

from ._batch_stats import degenerate_batch

__all__ = ["karcher_mean_ref", "liebn_reference", "spdbn_reference", "spdmbn_reference"]


def _pc(c: Tensor) -> Tensor:
    return c.unsqueeze(-1).unsqueeze(-1)


def karcher_mean_ref(X: Tensor, steps: int) -> Tensor:
    """``steps`` unit Karcher-flow steps from the arithmetic mean over dim 0 (plain autograd)."""
    G = X.mean(dim=0)
    for _ in range(steps):
        S, Si = mf.sym_sqrtm_ref(G), mf.sym_invsqrtm_ref(G)
        T = mf.sym_logm_ref(mf.sym(Si @ X @ Si)).mean(dim=0)
        G = mf.sym(S @ mf.sym_expm_ref(T) @ S)
    return G


def _chol_inverse(P: Tensor) -> Tensor:
    Li = torch.linalg.inv(torch.linalg.cholesky(P))
    return Li @ Li.mT


def liebn_reference(X: Tensor, metric: str, theta: float, alpha: float, beta: float, weight: Tensor,
                    shift: Tensor, eps: float, karcher_steps: int, detach_mean: bool, running_var: Tensor,
                    detach_var: bool = False) -> Tensor:
    r"""LieBN (Chen et al., ICLR 2024, Alg. 1) on ``(N, C, n, n)``: deform, centre, scale, bias, undeform.

    ``detach_var``: the variance is computed on the detached centred batch, as ``cal_geom_var`` of the ICLR'24
    code and the LieBN toolbox do.
    """
    pw = (lambda A, p: A) if theta == 1.0 else mf.sym_powm_ref
    if metric == "lem":
        phi, phi_inv = mf.sym_logm_ref, mf.sym_expm_ref
    elif metric == "lcm":
        def phi(A: Tensor) -> Tensor:
            return mf.cholesky_log_ref(pw(A, theta))

        def phi_inv(Z: Tensor) -> Tensor:
            C = torch.tril(Z, -1) + torch.diag_embed(torch.exp(torch.diagonal(Z, dim1=-2, dim2=-1)))
            return pw(mf.sym(C @ C.mT), 1.0 / theta)
    elif metric == "crim":
        def phi(A: Tensor) -> Tensor:
            return _chol_inverse(pw(A, theta))

        def phi_inv(Z: Tensor) -> Tensor:
            return pw(mf.sym(_chol_inverse(Z)), 1.0 / theta)
    else:
        def phi(A: Tensor) -> Tensor:
            return pw(A, theta)

        def phi_inv(Z: Tensor) -> Tensor:
            return pw(Z, 1.0 / theta)
    Z = phi(X)
    src = Z.detach() if detach_mean else Z
    if metric in ("aim", "crim"):
        M = karcher_mean_ref(src, karcher_steps)
        Li = torch.linalg.inv(torch.linalg.cholesky(M))
        Zc = mf.sym(Li @ Z @ Li.mT)
        logZ = mf.sym_logm_ref(Zc.detach() if detach_var else Zc)
        tr = torch.diagonal(logZ, dim1=-2, dim2=-1).sum(-1)
        d2 = (alpha * logZ.square().sum((-1, -2)) + beta * tr.square()) / theta**2
    else:
        M = src.mean(dim=0)
        Zc = Z - M
        Zv = Zc.detach() if detach_var else Zc
        tr = torch.diagonal(Zv, dim1=-2, dim2=-1).sum(-1)
        d2 = alpha * Zv.square().sum((-1, -2)) + beta * tr.square()
        if metric == "lcm":
            d2 = d2 / theta**2
    v = d2.mean(dim=0)
    degenerate = degenerate_batch(Z, X.shape[0], None)
    c = shift / torch.sqrt(torch.where(degenerate, running_var, v) + eps)
    if metric in ("aim", "crim"):
        Zs = mf.sym_powm_ref(Zc, c.expand(Zc.shape[:-2]))
        Lb = torch.linalg.cholesky(phi(weight))
        return phi_inv(mf.sym(Lb @ Zs @ Lb.mT))
    return phi_inv(_pc(c) * Zc + phi(weight))


def spdbn_reference(X: Tensor, weight: Tensor, karcher_steps: int) -> Tensor:
    r"""Brooks et al. 2019: :math:`B^{1/2} G^{-1/2} X G^{-1/2} B^{1/2}` with a detached Karcher mean ``G``."""
    G = karcher_mean_ref(X.detach(), karcher_steps)
    W = mf.sym_sqrtm_ref(weight) @ mf.sym_invsqrtm_ref(G)
    return mf.sym(W @ X @ W.mT)


def spdmbn_reference(X: Tensor, weight: Tensor, shift: Tensor, eps: float, karcher_steps: int,
                     running_var: Tensor) -> Tensor:
    r"""Kobler et al. 2022 with batch statistics (:math:`\eta = 1`): whiten, power :math:`s/\sqrt{v+\epsilon}`, bias."""
    G = karcher_mean_ref(X.detach(), karcher_steps)
    Gi = mf.sym_invsqrtm_ref(G)
    Zc = mf.sym(Gi @ X @ Gi)
    v = mf.sym_logm_ref(Zc).square().sum((-1, -2)).mean(dim=0)
    degenerate = degenerate_batch(X, X.shape[0], None)
    c = shift / torch.sqrt(torch.where(degenerate, running_var, v) + eps)
    S = mf.sym_sqrtm_ref(weight)
    return mf.sym(S @ mf.sym_powm_ref(Zc, c.expand(Zc.shape[:-2])) @ S)
