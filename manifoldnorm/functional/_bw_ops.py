r"""Linear operators diagonal in the eigenbasis of an SPD matrix, with a backward exact at repeated eigenvalues.

The Bures–Wasserstein (BW) geometry needs maps :math:`V \mapsto \Phi_F(P)[V] = U\,[F \circ (U^\top V U)]\,U^\top`
for :math:`P = U\,\mathrm{diag}(\lambda)\,U^\top` and a symmetric kernel :math:`F_{ij} = F(\lambda_i, \lambda_j)`:
the Lyapunov solve :math:`P L + L P = V` (:math:`F = 1/(a+b)`), and the parallel transports along the geodesic
between :math:`P` and :math:`I` (:math:`F = \sqrt{(a+b)/2}` and its inverse). Here
:math:`F(a, b) = \alpha\,(a+b)^p`.

Backward in :math:`P` (derivation by perturbing the eigendecomposition; every eigenvector-derivative term pairs
with a difference of :math:`F` and becomes a divided difference, so no :math:`1/(\lambda_i-\lambda_j)` is left):
with :math:`\hat G = U^\top \mathrm{sym}(\partial L/\partial\Phi)\,U` and :math:`\tilde V = U^\top V U`,

.. math::

    \frac{\partial L}{\partial P} = U (R + R^\top) U^\top,\qquad
    R_{ik} = \sum_j \hat G_{ij}\,\tilde V_{kj}\, F^{[1]}_{ikj},\qquad
    F^{[1]}_{ikj} = \frac{F(\lambda_k, \lambda_j) - F(\lambda_i, \lambda_j)}{\lambda_k - \lambda_i},

with the limit :math:`\partial_1 F(\lambda_i, \lambda_j)` at :math:`\lambda_k = \lambda_i`, evaluated in the
cancellation-free closed form of the divided difference of a power. This is exact at :math:`P = I` (all
eigenvalues equal), where ``torch.linalg.eigh``'s backward divides by zero. It costs :math:`O(n^3)` memory per
matrix :math:`P`, after summing the batch dimensions along which :math:`P` is broadcast.

:func:`exp_transport_op` fuses :math:`A\,\mathrm{Exp}_W(\Gamma_{I\to W}V)\,A^\top` (the biasing step of a
BW batch norm) into one eigendecomposition of :math:`W`, with the same exact backward in :math:`W`.

The Lyapunov solve has the cheaper implicit backward :math:`Q = \mathcal L_P^{-1}[\mathrm{sym}\,G]`,
:math:`\partial/\partial V = Q`, :math:`\partial/\partial P = -(QL + LQ)` (differentiate :math:`PL + LP = V`).

All three backwards treat the eigendecomposition as a constant: they are once differentiable, and a second
derivative through them raises ``NotImplementedError`` (see :mod:`manifoldnorm.functional._autograd`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import anchor_inputs, once_differentiable
from .spectral import _dd_pow, sym

__all__ = ["pair_operator", "lyapunov_solve_op", "exp_transport_op"]

_BW_ADVICE = (
    "For second derivatives write the operator with plain autograd through torch.linalg.eigh (as the BW "
    "references in manifoldnorm.nn._gbwbn_ref do; exact while the eigenvalues are distinct), or keep "
    "create_graph=False."
)


def _rot_in(U: Tensor, V: Tensor) -> Tensor:
    return U.transpose(-1, -2) @ V @ U


def _rot_out(U: Tensor, V: Tensor) -> Tensor:
    return U @ V @ U.transpose(-1, -2)


def _sum_to(g: Tensor, shape: torch.Size) -> Tensor:
    return g.sum_to_size(shape) if g.shape != shape else g


def _kernel(lam: Tensor, alpha: float, p: float) -> Tensor:
    s = lam.unsqueeze(-1) + lam.unsqueeze(-2)
    return alpha * torch.pow(s, p)


def _divided_difference(lam: Tensor, alpha: float, p: float) -> Tensor:
    r""":math:`F^{[1]}_{ikj}` of :math:`F(a, b) = \alpha (a+b)^p`, shape ``(..., n, n, n)`` indexed ``[i, k, j]``."""
    x = lam.unsqueeze(-1).unsqueeze(-1) + lam.unsqueeze(-2).unsqueeze(-3)  # [i, 1, j]: lam_i + lam_j
    y = lam.unsqueeze(-2).unsqueeze(-1) + lam.unsqueeze(-2).unsqueeze(-3)  # [1, k, j]: lam_k + lam_j
    if p == 0.5:
        return alpha / (torch.sqrt(x) + torch.sqrt(y))
    if p == -0.5:
        rx, ry = torch.sqrt(x), torch.sqrt(y)
        return -alpha / (rx * ry * (rx + ry))
    if p == -1.0:
        return -alpha / (x * y)
    return alpha * _dd_pow(y, x, torch.tensor(p, dtype=lam.dtype, device=lam.device))


def _fold_batch(A: Tensor, lead: torch.Size) -> Tensor:
    """View ``A`` ``(*batch, n, n)`` as ``(s, *kept, n, n)``: the batch dims along which a parameter of batch shape
    ``lead`` was broadcast are moved to the front and merged (a view when they lead already)."""
    batch = A.shape[:-2]
    nb = len(batch)
    pad = (1,) * (nb - len(lead)) + tuple(lead)
    summed = [d for d in range(nb) if pad[d] == 1 and batch[d] != 1]
    keep = [d for d in range(nb) if d not in summed]
    if summed != list(range(len(summed))):
        A = A.permute(summed + keep + [nb, nb + 1])
    return A.reshape(-1, *[batch[d] for d in keep], *A.shape[-2:])


def _sum_matmul(A: Tensor, B: Tensor, lead: torch.Size) -> Tensor:
    r""":math:`\sum_{\text{batch}} A B` reduced to the parameter batch shape ``lead``: ``(*lead, n, n)``."""
    if A.shape != B.shape:
        A, B = torch.broadcast_tensors(A, B)
    out = torch.einsum("s...ij,s...jk->...ik", _fold_batch(A, lead), _fold_batch(B, lead))
    return out.reshape(*lead, *A.shape[-2:])


def _pair_outer_sum(A: Tensor, B: Tensor, lead: torch.Size) -> Tensor:
    r""":math:`\sum_{\text{batch}} A_{ij} B_{kj}` as ``(*lead, n, n, n)`` ``[i, k, j]`` (no ``(batch, n, n, n)``
    intermediate)."""
    if A.shape != B.shape:
        A, B = torch.broadcast_tensors(A, B)
    n = A.shape[-1]
    out = torch.einsum("s...ij,s...kj->...ikj", _fold_batch(A, lead), _fold_batch(B, lead))
    return out.reshape(*lead, n, n, n)


class _PairOperator(torch.autograd.Function):
    @staticmethod
    def forward(ctx, P: Tensor, V: Tensor, alpha: float, p: float):  # type: ignore[override]
        anchor_inputs(ctx, P, V)
        lam, U = torch.linalg.eigh(P)
        F = _kernel(lam, alpha, p)
        Vt = _rot_in(U, V)
        ctx.alpha, ctx.p = alpha, p
        ctx.shapes = (P.shape, V.shape)
        ctx.save_for_backward(lam, U, F, Vt)
        return _rot_out(U, F * Vt)

    @staticmethod
    @once_differentiable("the BW parallel transport (transport_bw_to_identity / transport_bw_from_identity)",
                         _BW_ADVICE)
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        lam, U, F, Vt = ctx.saved_tensors
        p_shape, v_shape = ctx.shapes
        Gt = _rot_in(U, sym(grad))
        dP = dV = None
        if ctx.needs_input_grad[1]:
            dV = _sum_to(_rot_out(U, F * Gt), v_shape)
        if ctx.needs_input_grad[0]:
            outer = _pair_outer_sum(Gt, Vt, lam.shape[:-1])
            R = (outer * _divided_difference(lam, ctx.alpha, ctx.p)).sum(-1)
            dP = _sum_to(_rot_out(U, R + R.transpose(-1, -2)), p_shape)
        return dP, dV, None, None


def pair_operator(P: Tensor, V: Tensor, alpha: float, p: float) -> Tensor:
    r""":math:`U[F \circ (U^\top V U)]U^\top` with :math:`F_{ij} = \alpha(\lambda_i+\lambda_j)^p`, ``(..., n, n)``.

    ``P`` (SPD) and ``V`` (symmetric) broadcast against each other; one ``eigh`` of ``P``.
    """
    return _PairOperator.apply(P, V, float(alpha), float(p))


class _Lyapunov(torch.autograd.Function):
    @staticmethod
    def forward(ctx, P: Tensor, V: Tensor):  # type: ignore[override]
        anchor_inputs(ctx, P, V)
        lam, U = torch.linalg.eigh(P)
        K = 1.0 / (lam.unsqueeze(-1) + lam.unsqueeze(-2))
        L = _rot_out(U, K * _rot_in(U, V))
        ctx.shapes = (P.shape, V.shape)
        ctx.save_for_backward(U, K, L)
        return L

    @staticmethod
    @once_differentiable("lyapunov_solve (and expmap_bw, which uses it)", _BW_ADVICE)
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        U, K, L = ctx.saved_tensors
        p_shape, v_shape = ctx.shapes
        Q = _rot_out(U, K * _rot_in(U, sym(grad)))
        dV = _sum_to(Q, v_shape) if ctx.needs_input_grad[1] else None
        dP = _sum_to(-(Q @ L + L @ Q), p_shape) if ctx.needs_input_grad[0] else None
        return dP, dV


def lyapunov_solve_op(P: Tensor, V: Tensor) -> Tensor:
    r"""Solution :math:`L` of :math:`PL + LP = V` for SPD ``P`` and symmetric ``V`` (broadcast), ``(..., n, n)``."""
    return _Lyapunov.apply(P, V)


_RSQRT_HALF = 0.5**0.5


class _ExpTransport(torch.autograd.Function):
    @staticmethod
    def forward(ctx, W: Tensor, V: Tensor, A: Tensor):  # type: ignore[override]
        anchor_inputs(ctx, W, V, A)
        w, U = torch.linalg.eigh(W)
        F = _kernel(w, _RSQRT_HALF, -0.5)
        Vt = _rot_in(U, V)
        H = F * Vt + torch.eye(W.shape[-1], dtype=W.dtype, device=W.device)
        K = H @ (w.unsqueeze(-1) * H)
        At = A @ U
        ctx.shapes = (W.shape, V.shape, A.shape)
        ctx.save_for_backward(w, U, F, Vt, H, K, At)
        return sym(At @ K @ At.transpose(-1, -2))

    @staticmethod
    @once_differentiable("exp_transport_op (the GBWBN biasing step)", _BW_ADVICE)
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        w, U, F, Vt, H, K, At = ctx.saved_tensors
        w_shape, v_shape, a_shape = ctx.shapes
        YA = sym(grad) @ At
        dA = dW = dV = None
        if ctx.needs_input_grad[2]:
            dA = _sum_to(2.0 * _sum_matmul(YA, K, w.shape[:-1]) @ U.transpose(-1, -2), a_shape)
        Kb = At.transpose(-1, -2) @ YA  # dL/dK in W's eigenbasis, K = (I+L) W (I+L)
        M1 = Kb @ (H * w.unsqueeze(-2))
        Lb = M1 + M1.transpose(-1, -2)  # dL/dL
        if ctx.needs_input_grad[1]:
            dV = _sum_to(_rot_out(U, F * Lb), v_shape)
        if ctx.needs_input_grad[0]:
            direct = _sum_to(H @ Kb @ H, w.shape[:-1] + w.shape[-1:] * 2)
            outer = _pair_outer_sum(Lb, Vt, w.shape[:-1])
            R = (outer * _divided_difference(w, _RSQRT_HALF, -0.5)).sum(-1)
            dW = _sum_to(_rot_out(U, direct + R + R.transpose(-1, -2)), w_shape)
        return dW, dV, dA


def exp_transport_op(W: Tensor, V: Tensor, A: Tensor) -> Tensor:
    r""":math:`A\,(I+L)W(I+L)\,A^\top` with :math:`L = \mathcal L_W[\Gamma_{I\to W}V]`, ``(..., n, n)``.

    :math:`(I+L)W(I+L) = \mathrm{Exp}_W(\Gamma_{I\to W}V)`; in :math:`W`'s eigenbasis
    :math:`L_{ab} = \tilde V_{ab}/\sqrt{2(w_a+w_b)}`. ``W`` (SPD) and ``A`` (any square matrix) broadcast
    against the symmetric ``V``; one ``eigh`` of ``W``.
    """
    return _ExpTransport.apply(W, V, A)
