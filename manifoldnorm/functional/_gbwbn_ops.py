r"""Fast building blocks of :class:`~manifoldnorm.nn.GBWBatchNorm` (Bures–Wasserstein batch normalization).

All inputs are ``(N, C, n, n)`` stacks :math:`X^\theta` together with the congruence factor :math:`M^{-1/2}`
(``(C, n, n)``) of the generalized BW metric, so the whitened matrices :math:`Z_i = M^{-1/2}X_i^\theta M^{-1/2}`
are never formed: every congruence by a per-channel matrix is folded into one.

Decompositions are shared where the math allows: :math:`G^{1/2}Z_iG^{1/2}` is formed directly in the eigenbasis of
the (constant) batch mean :math:`G`, and its square root gives the logarithm, the parallel transport to
:math:`I` and the squared distances at once (one batched ``eigh``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from manifoldnorm import functional as mf
from manifoldnorm.functional._batch import BatchSum, SplitBatchMean
from manifoldnorm.functional._bw_ops import exp_transport_op, pair_operator

__all__ = ["barycenter", "centre_constant", "centre_generic", "log_exp_identity", "bias", "trace"]


def trace(X: Tensor) -> Tensor:
    return torch.diagonal(X, dim1=-2, dim2=-1).sum(-1)


def _eye_like(X: Tensor) -> Tensor:
    return torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)


def barycenter(Xt: Tensor, Mih: Tensor, steps: int, tol: float, reduce: BatchSum | None = None) -> Tensor:
    r"""BW barycenter over dim 0 of :math:`Z_i = M^{-1/2}X^\theta_i M^{-1/2}` by the fixed-point iteration.

    Same iteration as :func:`manifoldnorm.functional.mean_bw` (from the arithmetic mean; ``tol=0``: exactly
    ``steps`` iterations), with the congruence :math:`G^{1/2}M^{-1/2}` applied to :math:`X^\theta` directly.
    Without autograd the sum :math:`\sum_i U_i \Lambda_i^{1/2} U_i^\top` is one matrix product.
    ``reduce``: ``Xt`` is one part of a batch split into parts and ``reduce`` sums over them (see
    :func:`manifoldnorm.functional.mean_aim`): the arithmetic mean (with the count) and the sum
    :math:`\sum_i (G^{1/2}Z_iG^{1/2})^{1/2}` of every iteration are reduced, one ``reduce`` each.
    """
    if reduce is None:
        G = mf.congruence(Mih, Xt.mean(dim=0))
    else:
        average = SplitBatchMean(torch.ones(Xt.shape[0], dtype=Xt.dtype, device=Xt.device), 0, reduce)
        G = mf.congruence(Mih, average(Xt))
    grad = torch.is_grad_enabled() and (Xt.requires_grad or Mih.requires_grad)
    for _ in range(steps):
        S, Si = mf.sym_sqrtm_invsqrtm(G)
        C = mf.congruence(S @ Mih, Xt)
        if reduce is not None:
            H = average(mf.sym_sqrtm(C))
        elif grad:
            H = mf.sym_sqrtm(C).mean(dim=0)
        else:
            lam, U = torch.linalg.eigh(C)
            US = U * torch.sqrt(lam.clamp_min(0.0)).unsqueeze(-2)
            N = C.shape[0]
            H = torch.einsum("bcij,bckj->cik", US, U) / N
        G_new = mf.sym(Si @ H @ H @ Si)
        if tol > 0:
            with torch.no_grad():
                change = float((torch.linalg.matrix_norm(G_new - G) / torch.linalg.matrix_norm(G)).max())
            G = G_new
            if change <= tol:
                break
        else:
            G = G_new
    return G


def centre_constant(Xt: Tensor, Mih: Tensor, trZ: Tensor, G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Parallel transport to :math:`I` of :math:`\mathrm{Log}_G Z_i` for a constant mean ``G`` (no gradient).

    In the eigenbasis :math:`G = U\mathrm{diag}(g)U^\top`, with :math:`\tilde S_i = (\tilde C_i)^{1/2}`,
    :math:`\tilde C_i = g^{1/2}U^\top Z_i U g^{1/2}` (the rotated :math:`G^{1/2}Z_iG^{1/2}`):

    .. math::

        \mathrm{Log}_G Z_i = G(T_i - I) + (T_i - I)G,\quad T_i = G^{-1/2}(G^{1/2}Z_iG^{1/2})^{1/2}G^{-1/2},\\
        \tilde V_i = \Gamma_{G\to I}\mathrm{Log}_G Z_i = \sqrt{2(g_a+g_b)/(g_a g_b)} \circ \tilde S_i
        - 2\,\mathrm{diag}(\sqrt g),\qquad d^2(Z_i, G) = \mathrm{tr}Z_i + \mathrm{tr}G - 2\,\mathrm{tr}\tilde S_i.

    Returns the tangent vectors at :math:`I` **in the basis** ``U`` (``(N, C, n, n)``), the basis ``U``
    (``(C, n, n)``) and the squared distances ``(N, C)``.
    """
    g, U = torch.linalg.eigh(G)
    rg = torch.sqrt(g)
    P = rg.unsqueeze(-1) * (U.transpose(-1, -2) @ Mih)
    S = mf.sym_sqrtm(mf.congruence(P, Xt))
    K = torch.sqrt(2.0 * (g.unsqueeze(-1) + g.unsqueeze(-2))) / (rg.unsqueeze(-1) * rg.unsqueeze(-2))
    V = K * S - torch.diag_embed(2.0 * rg)
    d2 = trZ + trace(G) - 2.0 * trace(S)
    return V, U, d2


def centre_generic(Xt: Tensor, Mih: Tensor, trZ: Tensor, G: Tensor) -> tuple[Tensor, None, Tensor]:
    r"""As :func:`centre_constant` for a mean ``G`` that carries a gradient; result in the standard basis.

    :math:`\Gamma_{G\to I}\mathrm{Log}_G Z = \Phi_G[T - I]` with the eigenbasis operator
    :math:`\Phi_G[V]_{ab} = \sqrt{2(g_a+g_b)}\,V_{ab}` (exact gradients at repeated eigenvalues of ``G``).
    """
    S, Si = mf.sym_sqrtm_invsqrtm(G)
    R = mf.sym_sqrtm(mf.congruence(S @ Mih, Xt))
    Tm = mf.congruence(Si, R) - _eye_like(G)
    V = pair_operator(G, Tm, math.sqrt(2.0), 0.5)
    d2 = trZ + trace(G) - 2.0 * trace(R)
    return V, None, d2


def log_exp_identity(V: Tensor) -> Tensor:
    r""":math:`\mathrm{Log}_I(\mathrm{Exp}_I V) = 2\,|I + V/2| - 2I` (:math:`\mathrm{Exp}_I V = (I + V/2)^2`).

    Equal to ``V`` when :math:`I + V/2 \succ 0` (checked by a batched Cholesky); only the matrices that fail the
    check go through an eigendecomposition (the absolute value :math:`U|\Lambda|U^\top`).
    """
    A = _eye_like(V) + 0.5 * V
    ok = torch.linalg.cholesky_ex(A.detach()).info == 0
    if bool(ok.all()):
        return V
    bad = torch.nonzero(~ok, as_tuple=True)
    fixed = 2.0 * mf.sym_funcm(A[bad], torch.abs, torch.sign) - 2.0 * _eye_like(V)
    return V.index_put(bad, fixed)


def bias(V: Tensor, U: Tensor | None, W: Tensor, Mh: Tensor) -> Tensor:
    r""":math:`M^{1/2}\,\mathrm{Exp}_W(\Gamma_{I\to W} V)\,M^{1/2}` for tangent vectors ``V`` at :math:`I`.

    With :math:`L = \mathcal L_W[\Gamma_{I\to W}V]`, i.e. :math:`L_{ab} = \tilde V_{ab}/\sqrt{2(w_a+w_b)}` in
    :math:`W`'s eigenbasis, :math:`\mathrm{Exp}_W(\Gamma_{I\to W}V) = (I+L)W(I+L)`. ``V`` is given in the basis
    ``U`` (``None``: standard basis); the map is equivariant, so :math:`W` and :math:`M^{1/2}` are rotated
    instead of the batch.
    """
    if U is not None:
        W = mf.congruence(U.transpose(-1, -2), W)
        Mh = Mh @ U
    return exp_transport_op(W, V, Mh)
