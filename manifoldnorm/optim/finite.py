"""Finiteness of gradients: one fused test of the global gradient norm, for skipping a non-finite step.

Every optimizer of :mod:`manifoldnorm.optim` (and torch's and geoopt's) leaves a parameter whose ``grad`` is
``None`` untouched, with its optimizer state. So a plain PyTorch loop skips a non-finite step with::

    loss.backward()
    if not grads_finite(model.parameters()):
        drop_grads(model.parameters())  # or: optimizer.zero_grad(); the step below changes nothing
    optimizer.step()

(:class:`manifoldnorm.lit.NonFiniteGuard` does this in Lightning runs, counts the skips and stops a diverging run.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["grad_norm", "grads_finite", "drop_grads"]


def _grads(params: Iterable[Tensor]) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]


def grad_norm(params: Iterable[Tensor]) -> Tensor:
    """The 2-norm of all gradients of ``params`` together, as a 0-dim tensor (no host synchronization).

    One fused ``torch._foreach_norm`` per device and dtype (:func:`torch.nn.utils.get_total_norm`), the norm
    that gradient clipping computes. It is NaN if any gradient entry is NaN, inf if one is infinite or if the
    sum of squares overflows the gradients' dtype (float32: a norm above about 3.4e38). Parameters without a
    gradient are left out; with none at all the norm is 0.
    """
    grads = _grads(params)
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)


def grads_finite(params: Iterable[Tensor]) -> bool:
    """Whether the global gradient norm of ``params`` is finite (one host synchronization)."""
    return bool(torch.isfinite(grad_norm(params)).item())


def drop_grads(params: Iterable[Tensor]) -> None:
    """Set every gradient of ``params`` to ``None``: the next optimizer step leaves them and their state as is."""
    for p in params:
        p.grad = None
