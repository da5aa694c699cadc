"""Plain-autograd references of the spectral functions of :mod:`.spectral`: differentiated through
``torch.linalg.eigh``'s own backward (twice differentiable while the eigenvalues are distinct; NaN at repeated
eigenvalues). The tests compare the stable functions with them."""

from __future__ import annotations

import torch
from torch import Tensor

from ._spectral_checks import _reconstruct
from ._spectral_specs import ScalarFn

__all__ = ["sym_funcm_ref", "sym_logm_ref", "sym_expm_ref", "sym_sqrtm_ref", "sym_invsqrtm_ref", "sym_powm_ref",
           "sym_reeig_ref"]


def sym_funcm_ref(X: Tensor, f: ScalarFn) -> Tensor:
    """Reference :func:`sym_funcm` differentiated by ``torch.linalg.eigh``'s autograd (for tests only)."""
    lam, U = torch.linalg.eigh(X)
    return _reconstruct(U, f(lam))


def sym_logm_ref(X: Tensor) -> Tensor:
    """Plain-autograd reference of :func:`sym_logm`."""
    return sym_funcm_ref(X, torch.log)


def sym_expm_ref(X: Tensor) -> Tensor:
    """Plain-autograd reference of :func:`sym_expm`."""
    return sym_funcm_ref(X, torch.exp)


def sym_sqrtm_ref(X: Tensor) -> Tensor:
    """Plain-autograd reference of :func:`sym_sqrtm`."""
    return sym_funcm_ref(X, torch.sqrt)


def sym_invsqrtm_ref(X: Tensor) -> Tensor:
    """Plain-autograd reference of :func:`sym_invsqrtm`."""
    return sym_funcm_ref(X, torch.rsqrt)


def sym_powm_ref(X: Tensor, p: Tensor | float) -> Tensor:
    """Plain-autograd reference of :func:`sym_powm`."""
    lam, U = torch.linalg.eigh(X)
    pt = torch.as_tensor(p, dtype=X.dtype, device=X.device)
    pe = pt.unsqueeze(-1) if pt.dim() > 0 else pt
    return _reconstruct(U, torch.pow(lam, pe))


def sym_reeig_ref(X: Tensor, threshold: float = 1e-4) -> Tensor:
    """Plain-autograd reference of :func:`sym_reeig`."""
    return sym_funcm_ref(X, lambda l: torch.clamp(l, min=threshold))
