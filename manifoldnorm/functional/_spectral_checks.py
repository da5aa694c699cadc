r"""What the spectral functions refuse or return instead of a silent NaN (see :mod:`.spectral`).

The reconstruction :math:`U f(\Lambda) U^\top`, with ``sym_expm``'s overflow to ±inf entries; the eigenvalue
domain check (one reduction and one host synchronisation next to the ``eigh``); the float64 advice of their
messages; the cheap finiteness test of a backward's result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def _reconstruct(U: Tensor, vals: Tensor) -> Tensor:
    return (U * vals.unsqueeze(-2)) @ U.transpose(-1, -2)


def _reconstruct_exp(U: Tensor, lam: Tensor) -> Tensor:
    r""":math:`U e^{\Lambda} U^\top`, overflowing to ±inf entries instead of NaN (``inf - inf``, ``0 * inf``).

    The eigenvalues above the overflow threshold contribute :math:`e^{top}\,U_o e^{\Lambda_o - top} U_o^\top`
    (``top`` the largest): its non-zero entries become ±inf with their sign, the others keep the finite part
    :math:`U_f e^{\Lambda_f} U_f^\top`. Without such eigenvalues the result is bit-identical to the plain
    reconstruction (one more product of a zero spectrum).
    """
    top = lam[..., -1:]  # eigh sorts ascending
    limit = math.log(torch.finfo(lam.dtype).max) - math.log(max(lam.shape[-1], 1)) - 1.0
    high = lam > limit
    if lam.numel() == 0 or not bool(high.any()):  # the common case: the plain reconstruction (bit-identical)
        return _reconstruct(U, torch.exp(lam))
    zero = torch.zeros_like(lam)
    out = _reconstruct(U, torch.where(high, zero, torch.exp(lam)))
    over = _reconstruct(U, torch.where(high, torch.exp(lam - top), zero))
    return torch.where(over == 0, out, out + over * torch.exp(top).unsqueeze(-1))


def _advice(dtype: torch.dtype, fix: str) -> str:
    """``fix`` as a sentence, preceded by the advice to compute in float64 for lower precisions."""
    if dtype == torch.float64:
        return f"{fix[0].upper()}{fix[1:]}."
    return (f"In {dtype} the matrices may be singular to working precision: compute in float64 "
            f"(compute_dtype=torch.float64 on a layer, or pass X.double()), or {fix}.")


def _check_domain(lam: Tensor, specs: Sequence[Any], dtype: torch.dtype) -> None:
    """Refuse eigenvalues outside the domain of the functions (one reduction and one host sync).

    ``specs``: the spectral functions' descriptions (``.domain``: ``"pos"``, ``"nonneg"`` or ``None``; ``.name``).
    """
    domains = {spec.domain for spec in specs} - {None}
    if not domains:
        return
    if lam.numel() == 0:
        return
    strict = "pos" in domains
    lo = lam[..., 0]
    bad = ~(lo > 0) if strict else ~(lo >= 0)  # NaN counts as bad
    if not bool(bad.any()):
        return
    name = next(spec.name for spec in specs if spec.domain is not None)
    count, total = int(bad.sum()), bad.numel()
    if bool(torch.isnan(lam).any()):
        raise ValueError(f"{name}: the input holds NaN/Inf entries (its eigenvalues are NaN); check the data or "
                         "the layer before (manifoldnorm.functional.check_finite)")
    what = "non-positive" if strict else "negative"
    hi = float(lam[..., -1].max())
    raise ValueError(
        f"{name}: {count} of {total} matri{'x has' if total == 1 else 'ces have'} a {what} eigenvalue "
        f"(smallest {float(lo.min()):.3g}, largest {hi:.3g}); the function is undefined there (the result would "
        "be NaN). " + _advice(dtype, "make them positive definite (add eps * I, a shrinkage estimator, or sym_reeig)")
    )


def _all_finite(t: Tensor) -> bool:
    """One reduction in the common case: a finite sum has finite terms; a non-finite one is checked exactly."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
