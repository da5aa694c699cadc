"""Reference formulas (independent of the layers) and small utilities for the norm-layer tests."""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call

from manifoldnorm import functional as mf

F64 = torch.float64


def powm(X: torch.Tensor, p: float) -> torch.Tensor:
    lam, U = torch.linalg.eigh(X)
    return (U * lam.pow(p).unsqueeze(-2)) @ U.mT


def ref_mean(metric: str, X: torch.Tensor, theta: float = 1.0) -> torch.Tensor:
    """Fréchet mean over dim 0 under the θ-deformed metric (α, β do not move the mean)."""
    Xt = powm(X, theta)
    if metric == "aim":
        M = mf.mean_aim(Xt, dim=0, karcher_steps=200, tol=1e-14)
    elif metric == "lem":
        M = mf.mean_lem(Xt, dim=0)
    else:
        M = mf.mean_lcm(Xt, dim=0)
    return powm(M, 1.0 / theta)


def ref_sqdist(metric: str, A: torch.Tensor, B: torch.Tensor, theta: float = 1.0, alpha: float = 1.0,
               beta: float = 0.0) -> torch.Tensor:
    """Squared distance under (θ,α,β)-AIM, (α,β)-LEM or θ-LCM, written from the definitions."""
    if metric == "aim":
        At, Bt = powm(A, theta), powm(B, theta)
        L = torch.linalg.cholesky(At)
        Li = torch.linalg.inv(L)
        lam = torch.linalg.eigvalsh(Li @ Bt @ Li.mT)
        ll = lam.log()
        return (alpha * ll.square().sum(-1) + beta * ll.sum(-1).square()) / theta**2
    if metric == "lem":
        D = mf.sym_logm(A) - mf.sym_logm(B)
        return alpha * D.square().sum((-1, -2)) + beta * torch.diagonal(D, dim1=-2, dim2=-1).sum(-1).square()
    D = mf.cholesky_log(powm(A, theta)) - mf.cholesky_log(powm(B, theta))
    return D.square().sum((-1, -2)) / theta**2


def call_with(layer: torch.nn.Module, x: torch.Tensor, params: dict[str, torch.Tensor], **kw) -> torch.Tensor:
    """Forward of a fresh copy of ``layer`` (buffers untouched) with some parameters replaced."""
    fresh = copy.deepcopy(layer)
    return functional_call(fresh, params, (x,), kw)


def gradcheck_norm(layer: torch.nn.Module, X: torch.Tensor, params: tuple[str, ...] = ("weight", "shift"),
                   **kw) -> bool:
    """float64 gradcheck of ``layer`` w.r.t. its input and the named parameters (SPD ``weight`` symmetrised).

    Uses :func:`call_with`, so the layer's buffers are not touched by the repeated evaluations.
    """
    A = X.detach().clone().requires_grad_(True)
    P = [getattr(layer, name).detach().clone().requires_grad_(True) for name in params]

    def f(A: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        named = {n: (mf.sym(v) if n == "weight" else v) for n, v in zip(params, values, strict=True)}
        return call_with(layer, mf.sym(A), named, **kw)

    return torch.autograd.gradcheck(f, (A, *P), eps=1e-6, atol=1e-6, rtol=1e-5)


def input_grad_norm(layer: torch.nn.Module, X: torch.Tensor, seed: int = 0) -> tuple[float, torch.Tensor]:
    """``||dL/dX||_F`` for ``L = <G, layer(X)>`` with a fixed random direction ``G``."""
    X = X.clone().requires_grad_(True)
    Y = layer(X)
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(Y.shape, generator=g, dtype=Y.dtype)
    (Y * mf.sym(G)).sum().backward()
    return float(X.grad.norm()), Y.detach()


class PerDomainLoop:
    """Parity oracle of the domain-specific norms: the undomained layer run on each domain of the batch in turn.

    For a :class:`~manifoldnorm.nn.DomainLieBatchNorm` a :class:`~manifoldnorm.nn.LieBatchNorm`, for a
    :class:`~manifoldnorm.nn.DomainSPDBatchNorm` an :class:`~manifoldnorm.nn.SPDMomentumBatchNorm`, with the same
    options and parameter values (its own copies, so gradients can be compared), and each domain's statistics
    copied in before and out after its call: the per-domain Python loop (one small group of decompositions per
    domain) that the domain-specific layers replace by segment reductions. ``stats`` holds the stacked
    per-domain statistics; set ``base.train()``/``base.eval()``/``base.refitting`` as on the layer compared.
    """

    def __init__(self, layer: torch.nn.Module) -> None:
        from manifoldnorm.nn import DomainLieBatchNorm, DomainSPDBatchNorm, LieBatchNorm, SPDMomentumBatchNorm

        common = {"momentum": layer.momentum, "train_momentum": layer.train_momentum,
                  "karcher_steps": layer.karcher_steps, "eps": layer.eps, "channels": layer.channels,
                  "refit_karcher_steps": layer.refit_karcher_steps, "detach_mean": layer.detach_mean,
                  "validate": layer.validate, "compute_dtype": layer.compute_dtype, "dtype": layer.weight.dtype}
        if isinstance(layer, DomainLieBatchNorm):
            self.base = LieBatchNorm(layer.n, metric=layer.metric, theta=layer.theta, alpha=layer.alpha,
                                     beta=layer.beta, detach_var=layer.detach_var, **common)
        elif isinstance(layer, DomainSPDBatchNorm):
            self.base = SPDMomentumBatchNorm(layer.n, **common)
        else:
            raise TypeError(f"PerDomainLoop: not a domain-specific norm: {type(layer).__name__}")
        with torch.no_grad():
            self.base.weight.copy_(layer.weight)
            self.base.shift.copy_(layer.shift)
        self.base.train(layer.training)
        self.names = layer._stat_names
        self.stats = {k: getattr(layer, k).detach().clone() for k in self.names}

    def __call__(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        parts, order = [], []
        for dom in torch.unique(domain).tolist():
            idx = torch.nonzero(domain == dom, as_tuple=False).squeeze(1)
            with torch.no_grad():
                for k in self.names:
                    getattr(self.base, k).copy_(self.stats[k][dom])
            parts.append(self.base(x.index_select(0, idx)))
            with torch.no_grad():
                for k in self.names:
                    self.stats[k][dom].copy_(getattr(self.base, k))
            order.append(idx)
        perm = torch.cat(order)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.shape[0])
        return torch.cat(parts).index_select(0, inverse)
