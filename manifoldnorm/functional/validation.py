"""Input checks with messages a user can act on (shape, finiteness, symmetry, positive definiteness).

:func:`strict_inputs` switches on, for a region of code, the symmetry check of every input to the spectral
functions (:mod:`manifoldnorm.functional.spectral`), which otherwise read the lower triangle only, as
``torch.linalg.eigh`` does (off by default: one extra pass and one host synchronisation per call).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = [
    "check_square", "check_finite", "check_symmetric", "check_spd", "symmetry_rtol", "strict_inputs",
    "strict_inputs_enabled",
]

_STRICT: contextvars.ContextVar[bool] = contextvars.ContextVar("manifoldnorm_strict_inputs", default=False)


@contextlib.contextmanager
def strict_inputs(enabled: bool = True) -> Iterator[None]:
    """Within the ``with`` block, spectral functions refuse non-symmetric (or non-finite) inputs.

    ``torch.linalg.eigh``, and so every spectral function of this package (``sym_logm``, ``sym_expm``, ...,
    the AIM/LEM/BW metrics built on them), reads only the lower triangle of its input: an asymmetric matrix is
    silently taken as its lower triangle mirrored. Inside ``with strict_inputs():`` each call first runs
    :func:`check_symmetric` (relative asymmetry above ``sqrt(eps)`` raises a ValueError naming the function).
    Thread- and task-local (a ``contextvars.ContextVar``); ``strict_inputs(False)`` switches it off again inside.
    """
    token = _STRICT.set(bool(enabled))
    try:
        yield
    finally:
        _STRICT.reset(token)


def strict_inputs_enabled() -> bool:
    """Whether :func:`strict_inputs` is active in the current context."""
    return _STRICT.get()


def symmetry_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance on ``max|X - X^T| / max|X|`` accepted as symmetric: ``sqrt(eps(dtype))``."""
    return float(torch.finfo(dtype).eps) ** 0.5


def _first_bad(mask: Tensor, limit: int = 3) -> str:
    idx = torch.nonzero(mask, as_tuple=False)[:limit].tolist()
    return ", ".join(str(tuple(i)) for i in idx)


def check_square(X: Tensor, name: str = "input") -> Tensor:
    """Raise unless ``X`` is a floating-point tensor of shape ``(..., n, n)``; returns ``X``."""
    if not isinstance(X, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (..., n, n), got {type(X).__name__}")
    if not X.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {X.dtype}")
    if X.dim() < 2 or X.shape[-1] != X.shape[-2]:
        raise ValueError(f"{name}: expected square matrices of shape (..., n, n), got shape {tuple(X.shape)}")
    return X


def check_finite(X: Tensor, name: str = "input") -> Tensor:
    """Raise a ValueError naming the first offending entries if ``X`` holds NaN or Inf."""
    # one reading pass, no boolean mask: a NaN/Inf entry makes the sum non-finite; a non-finite sum of finite
    # entries (overflow) falls through to the exact test
    if X.numel() == 0 or bool(torch.isfinite(X.detach().sum())):
        return X
    bad = ~torch.isfinite(X)
    if bool(bad.any()):
        n_nan = int(torch.isnan(X).sum())
        n_inf = int(bad.sum()) - n_nan
        raise ValueError(
            f"{name}: contains {n_nan} NaN and {n_inf} Inf entries (first at index {_first_bad(bad, 1)})"
        )
    return X


def check_symmetric(X: Tensor, name: str = "input", rtol: float | None = None) -> Tensor:
    """Raise unless every matrix of ``X`` is symmetric up to ``rtol`` relative to its largest entry."""
    check_square(X, name)
    check_finite(X, name)
    rtol = symmetry_rtol(X.dtype) if rtol is None else rtol
    asym = (X - X.transpose(-1, -2)).abs().amax(dim=(-1, -2))
    scale = X.abs().amax(dim=(-1, -2)).clamp_min(torch.finfo(X.dtype).tiny)
    bad = asym > rtol * scale
    if bool(bad.any()):
        worst = float((asym / scale).max())
        where = f" (batch index {_first_bad(bad)})" if X.dim() > 2 else ""
        raise ValueError(
            f"{name}: matrices must be symmetric; relative asymmetry {worst:.3g} exceeds {rtol:.3g}{where}. "
            "Symmetrize with 0.5 * (X + X.mT) if the asymmetry is round-off."
        )
    return X


def check_spd(X: Tensor, name: str = "input", rtol: float | None = None) -> Tensor:
    """Raise a ValueError unless ``X`` holds symmetric positive-definite matrices ``(..., n, n)``.

    Checks, in order: tensor type and shape, NaN/Inf, symmetry (relative tolerance ``sqrt(eps)``), and positive
    definiteness by a Cholesky factorization (``torch.linalg.cholesky_ex``; one pass, no eigendecomposition).
    Returns ``X`` unchanged so the call can be chained.
    """
    check_symmetric(X, name, rtol)
    _, info = torch.linalg.cholesky_ex(X)
    bad = info != 0
    if bool(bad.any()):
        n_bad = int(bad.sum())
        lam_min = float(torch.linalg.eigvalsh(X[bad] if X.dim() > 2 else X).min())
        where = f" at batch index {_first_bad(bad)}" if X.dim() > 2 else ""
        raise ValueError(
            f"{name}: {n_bad} matri{'x is' if n_bad == 1 else 'ces are'} not positive definite{where} "
            f"(smallest eigenvalue {lam_min:.3g}). Regularize (e.g. add eps * I, use a shrinkage covariance "
            "estimator) or rectify the spectrum with sym_reeig."
        )
    return X
