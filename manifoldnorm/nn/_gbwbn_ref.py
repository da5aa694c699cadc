r"""Plain-autograd reference of the GBWBN training step (tests and ``python -m benchmarks norms``).

Written straight from the formulas of Wang et al., CVPR 2025 with the ``*_ref`` spectral functions
(``torch.linalg.eigh``'s own backward), one decomposition per use and the literal exponential and logarithm maps
(no shortcut :math:`\mathrm{Log}_I\mathrm{Exp}_I = \mathrm{id}`). Gradients with respect to parameters at
repeated eigenvalues (the identity initialisation) are not defined by this path; input gradients are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from manifoldnorm import functional as mf

from ._batch_stats import degenerate_batch

__all__ = ["gbwbn_reference", "bw_barycenter_ref"]


def _eigen_operator(P: Tensor, V: Tensor, kernel) -> Tensor:  # noqa: ANN001
    lam, U = torch.linalg.eigh(P)
    F = kernel(lam.unsqueeze(-1) + lam.unsqueeze(-2))
    return U @ (F * (U.mT @ V @ U)) @ U.mT


def _trace(X: Tensor) -> Tensor:
    return torch.diagonal(X, dim1=-2, dim2=-1).sum(-1)


def bw_barycenter_ref(Z: Tensor, steps: int) -> Tensor:
    """``steps`` fixed-point iterations from the arithmetic mean over dim 0 (Álvarez-Esteban et al. 2016)."""
    G = Z.mean(dim=0)
    for _ in range(steps):
        S, Si = mf.sym_sqrtm_ref(G), mf.sym_invsqrtm_ref(G)
        H = mf.sym_sqrtm_ref(mf.sym(S @ Z @ S)).mean(dim=0)
        G = mf.sym(Si @ H @ H @ Si)
    return G


def _log_bw(P: Tensor, X: Tensor) -> Tensor:
    S, Si = mf.sym_sqrtm_ref(P), mf.sym_invsqrtm_ref(P)
    C = S @ mf.sym_sqrtm_ref(mf.sym(S @ X @ S)) @ Si
    return C + C.mT - 2.0 * P


def _exp_bw(P: Tensor, V: Tensor) -> Tensor:
    L = _eigen_operator(P, V, lambda s: 1.0 / s)
    return mf.sym(P + V + L @ P @ L)


def gbwbn_reference(X: Tensor, theta: float, weight: Tensor, metric_weight: Tensor, shift: Tensor, eps: float,
                    mean_steps: int, detach_mean: bool, running_var: Tensor) -> Tensor:
    r"""GBWBN on ``(N, C, n, n)``: deform, centre (transport :math:`G\to I`), scale at :math:`I`, bias."""
    def pw(A: Tensor, p: float) -> Tensor:
        return A if p == 1.0 else mf.sym_powm_ref(A, p)

    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    Mis, Ms = mf.sym_invsqrtm_ref(metric_weight), mf.sym_sqrtm_ref(metric_weight)
    Z = mf.sym(Mis @ pw(X, theta) @ Mis)
    W = mf.sym(Mis @ pw(weight, theta) @ Mis)
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_mean):
        G = bw_barycenter_ref(Z.detach() if detach_mean else Z, mean_steps)
    Gs = mf.sym_sqrtm_ref(G)
    d2 = _trace(Z) + _trace(G) - 2.0 * _trace(mf.sym_sqrtm_ref(mf.sym(Gs @ Z @ Gs)))
    v = d2.mean(dim=0).clamp_min(0.0) / theta**2
    degenerate = degenerate_batch(pw(X, theta), X.shape[0], None)
    c = (shift / torch.sqrt(torch.where(degenerate, running_var, v) + eps)).unsqueeze(-1).unsqueeze(-1)

    def exp_identity(V: Tensor) -> Tensor:
        return eye + V + 0.25 * V @ V

    def log_identity(P: Tensor) -> Tensor:
        return 2.0 * mf.sym_sqrtm_ref(mf.sym(P)) - 2.0 * eye

    T = _eigen_operator(G, _log_bw(G, Z), lambda s: torch.sqrt(2.0 / s))
    Z_centred = exp_identity(T)
    Z_scaled = exp_identity(c * log_identity(Z_centred))
    U = _eigen_operator(W, log_identity(Z_scaled), lambda s: torch.sqrt(0.5 * s))
    return pw(mf.sym(Ms @ _exp_bw(W, U) @ Ms), 1.0 / theta)
