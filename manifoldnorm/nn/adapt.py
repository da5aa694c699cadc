"""Test-time adaptation: re-estimate the statistics of refittable norm layers on unlabeled target data."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .base import RefittableNorm

__all__ = ["refit_mode", "refit_domain_norms", "refittable_norms"]


def refittable_norms(model: nn.Module, domain_aware_only: bool = False) -> list[RefittableNorm]:
    """All submodules of ``model`` whose statistics can be refitted (optionally only domain-aware ones)."""
    return [m for m in model.modules()
            if isinstance(m, RefittableNorm) and (m.domain_aware or not domain_aware_only)]


@contextmanager
def refit_mode(model: nn.Module, domain_aware_only: bool = False) -> Iterator[list[RefittableNorm]]:
    """Context in which every forward of ``model`` refits its refittable norms on the batch it sees.

    The model is put in evaluation mode (dropout off, other norms use their running statistics); each
    refittable norm replaces the statistics of the domains present in the batch by their exact Fréchet mean
    and dispersion (full Karcher flow) and normalizes with them. Training flags are restored on exit.
    Yields the list of affected layers.
    """
    layers = refittable_norms(model, domain_aware_only)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for layer in layers:
        layer.refitting = True
    try:
        yield layers
    finally:
        for layer in layers:
            layer.refitting = False
        for m, mode in modes.items():
            m.training = mode


def refit_domain_norms(model: nn.Module, x: Tensor, domain: Tensor | int | None, *,
                       domain_aware_only: bool = False, strict: bool = True, **forward_kwargs: Any) -> Tensor:
    """Refit the running statistics of the refittable norms of ``model`` on unlabeled data ``x``.

    Kobler et al., NeurIPS 2022 (unsupervised domain adaptation by refitting the domain-specific
    statistics on the target domain). One forward pass ``model(x, domain=domain)`` in :func:`refit_mode`: each
    :class:`~manifoldnorm.nn.DomainSPDBatchNorm` or :class:`~manifoldnorm.nn.DomainLieBatchNorm` re-estimates
    the statistics of every domain id in ``domain`` from the inputs it receives (layers further down see inputs
    already normalized with the refitted statistics above them). A non-domain-aware
    :class:`~manifoldnorm.nn.SPDMomentumBatchNorm` replaces its single set of statistics unless
    ``domain_aware_only=True``.

    Parameters
    ----------
    model : nn.Module
        Called as ``model(x, domain=domain, **forward_kwargs)``.
    x : Tensor
        All (unlabeled) samples of the target domain(s), in one batch.
    domain : LongTensor ``(N,)``, int or None
    domain_aware_only : bool
        Leave single-domain layers untouched.
    strict : bool
        Raise a ValueError if the model has no layer to refit.

    Returns
    -------
    Tensor
        The model output on ``x`` after refitting (computed with the refitted statistics).
    """
    if strict and not refittable_norms(model, domain_aware_only):
        raise ValueError("refit_domain_norms: the model has no refittable norm layer (DomainSPDBatchNorm / "
                         "DomainLieBatchNorm / SPDMomentumBatchNorm, e.g. norm_layer='spddsmbn')")
    with refit_mode(model, domain_aware_only), torch.no_grad():
        return model(x, domain=domain, **forward_kwargs)
