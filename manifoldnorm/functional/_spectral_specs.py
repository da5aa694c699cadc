"""The eigenvalue functions of :mod:`.spectral`: each ``f(λ, p)`` with its derivatives and its divided difference
:math:`(f(a) - f(b))/(a - b)` in a closed form free of cancellation (equal to :math:`f'(a)` at ``a == b``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

ScalarFn = Callable[[Tensor], Tensor]
PowFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class _Spec:
    """An eigenvalue function ``f(lam, p)``, its derivative in ``lam`` and (optionally) in ``p``."""

    f: PowFn
    df: PowFn
    dfdp: PowFn | None = None
    #: stable divided difference ``(f(a) - f(b)) / (a - b)`` (equal to ``f'(a)`` at ``a == b``), if known
    dd: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None
    #: near ties are judged by the gap relative to |λ| (scale-invariant functions: log, powers) or relative to
    #: max(|λ|, 1) (exp and user functions, whose quotient loses accuracy with the absolute gap)
    relative_gap: bool = False
    #: public name, for messages
    name: str = "sym_funcm"
    #: eigenvalues the function is defined on: "pos" (λ > 0), "nonneg" (λ >= 0) or None (all reals)
    domain: str | None = None
    #: exp: reconstruct the overflowing eigenvalues apart (:func:`_reconstruct_exp`): ±inf entries, never NaN
    overflows: bool = False



def _ratio(num: Tensor, h: Tensor, limit: Tensor | float) -> Tensor:
    """``num / h`` with the value ``limit`` where ``h == 0`` (num is then 0 too)."""
    zero = h == 0
    return torch.where(zero, limit, num / torch.where(zero, torch.ones_like(h), h))


def _dd_log(a: Tensor, b: Tensor, p: Tensor) -> Tensor:
    h = (a - b) / b  # (log a - log b)/(a - b) = log1p(h) / (h b)
    return _ratio(torch.log1p(h), h, 1.0) / b


def _dd_exp(a: Tensor, b: Tensor, p: Tensor) -> Tensor:
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    h = hi - lo  # (e^hi - e^lo)/(hi - lo) = e^lo expm1(h) / h
    return torch.exp(lo) * _ratio(torch.expm1(h), h, 1.0)


def _dd_pow(a: Tensor, b: Tensor, p: Tensor) -> Tensor:
    h = (a - b) / b  # (a^p - b^p)/(a - b) = b^(p-1) expm1(p log1p(h)) / h
    return torch.pow(b, p - 1.0) * _ratio(torch.expm1(p * torch.log1p(h)), h, p)


_LOG = _Spec(lambda l, p: torch.log(l), lambda l, p: 1.0 / l, dd=_dd_log, relative_gap=True, name="sym_logm",
             domain="pos")
_EXP = _Spec(lambda l, p: torch.exp(l), lambda l, p: torch.exp(l), dd=_dd_exp, name="sym_expm", overflows=True)
_SQRT = _Spec(
    lambda l, p: torch.sqrt(l), lambda l, p: 0.5 / torch.sqrt(l),
    dd=lambda a, b, p: 1.0 / (torch.sqrt(a) + torch.sqrt(b)),
    relative_gap=True, name="sym_sqrtm", domain="nonneg",
)
_INVSQRT = _Spec(
    lambda l, p: torch.rsqrt(l), lambda l, p: -0.5 * torch.rsqrt(l) / l,
    dd=lambda a, b, p: -1.0 / (torch.sqrt(a * b) * (torch.sqrt(a) + torch.sqrt(b))),
    relative_gap=True, name="sym_invsqrtm", domain="pos",
)
_INV = _Spec(lambda l, p: 1.0 / l, lambda l, p: -1.0 / (l * l), dd=lambda a, b, p: -1.0 / (a * b), relative_gap=True,
             name="sym_invm", domain="pos")
_POW = _Spec(
    lambda l, p: torch.pow(l, p),
    lambda l, p: p * torch.pow(l, p - 1.0),
    lambda l, p: torch.pow(l, p) * torch.log(l),
    dd=_dd_pow,
    relative_gap=True, name="sym_powm", domain="pos",
)


def _reeig_spec(threshold: float) -> _Spec:
    return _Spec(
        lambda l, p: torch.clamp(l, min=threshold),
        lambda l, p: (l > threshold).to(l.dtype),
        name="sym_reeig",
    )


def _reeig_log_spec(threshold: float) -> _Spec:
    r""":math:`f(\lambda) = \log\max(\lambda, \epsilon)`: ReEig followed by the matrix logarithm."""

    def f(lam: Tensor, p: Tensor) -> Tensor:
        return torch.log(torch.clamp(lam, min=threshold))

    def df(lam: Tensor, p: Tensor) -> Tensor:
        above = lam > threshold
        return torch.where(above, 1.0 / torch.where(above, lam, torch.ones_like(lam)), torch.zeros_like(lam))

    def dd(a: Tensor, b: Tensor, p: Tensor) -> Tensor:
        # both above: the log's cancellation-free quotient; both at the floor: 0 (f is constant there); one on
        # each side: a plain quotient (the pair straddles the threshold, so a != b)
        ua, ub = a > threshold, b > threshold
        one = torch.ones_like(a)
        both = _dd_log(torch.where(ua & ub, a, one), torch.where(ua & ub, b, one), p)
        diff = a - b
        mixed = (f(a, p) - f(b, p)) / torch.where(ua ^ ub, diff, one)
        return torch.where(ua & ub, both, torch.where(ua ^ ub, mixed, torch.zeros_like(a)))

    return _Spec(f, df, dd=dd, relative_gap=True, name="sym_reeig_logm")
