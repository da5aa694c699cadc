"""Helpers for reductions over a batch dimension of ``(..., n, n)`` stacks."""

from __future__ import annotations

import torch
from torch import Tensor


def batch_dim(X: Tensor, dim: int) -> int:
    """Normalise ``dim`` to a non-negative index of a batch (non-matrix) dimension of ``X``."""
    nb = X.dim() - 2
    if nb < 1:
        raise ValueError(f"a mean needs a batch of matrices (..., N, ..., n, n); got shape {tuple(X.shape)}")
    d = dim + nb if dim < 0 else dim
    if not 0 <= d < nb:
        raise ValueError(f"dim={dim} is not a batch dimension of a tensor of shape {tuple(X.shape)}")
    return d


def normalized_weights(X: Tensor, dim: int, weights: Tensor | None) -> Tensor:
    """Weights of shape broadcastable to ``X.shape[:-2]``, non-negative and summing to one along ``dim``.

    Returned with two trailing singleton dims so they multiply ``(..., n, n)`` stacks directly.
    """
    size = X.shape[dim]
    if weights is None:
        w = torch.full((size,), 1.0 / size, dtype=X.dtype, device=X.device)
    else:
        w = torch.as_tensor(weights, dtype=X.dtype, device=X.device)
        if w.dim() == 1:
            if w.shape[0] != size:
                raise ValueError(f"weights has {w.shape[0]} entries but dimension {dim} has size {size}")
        if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise ValueError("weights must be finite and non-negative")
        total = w.sum(dim=0 if w.dim() == 1 else dim, keepdim=True)
        if bool((total <= 0).any()):
            raise ValueError("weights must not all be zero")
        w = w / total
    if w.dim() == 1:
        shape = [1] * (X.dim() - 2)
        shape[dim] = size
        w = w.reshape(shape)
    return w.unsqueeze(-1).unsqueeze(-1)


def weighted_sum(T: Tensor, dim: int, w: Tensor) -> Tensor:
    """``sum_i w_i T_i`` along ``dim`` (weights from :func:`normalized_weights`)."""
    return (w * T).sum(dim=dim)


def default_tol(dtype: torch.dtype) -> float:
    """Default Karcher-flow tolerance on the Frobenius norm of the mean tangent vector."""
    return max(1e-10, 50.0 * float(torch.finfo(dtype).eps))
