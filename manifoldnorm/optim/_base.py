"""The step loop the library's optimizers share: closure, parameters with a gradient, one update per parameter."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from manifoldnorm.optim._newton_schulz import as_matrix
from manifoldnorm.optim._validate import check_no_manifold_params, check_options

__all__ = ["StepOptimizer", "MatrixOptimizer"]


class StepOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose step updates each parameter with a gradient by :meth:`_update`.

    ``step`` evaluates the closure (gradients enabled), skips parameters without a gradient, rejects sparse
    gradients (and what :meth:`_check` rejects), and calls ``_update(p, group)`` under ``torch.no_grad``.
    Every parameter group (the constructor's defaults included) is checked when it is added, so a bad group
    fails at construction (or in ``add_param_group``, leaving the optimizer as it was), not at the first step: no
    ``geoopt.ManifoldParameter`` (these optimizers are Euclidean;
    :func:`~manifoldnorm.optim._validate.check_no_manifold_params`), only parameters the optimizer can update
    (:meth:`_check_params`), valid options (:func:`~manifoldnorm.optim._validate.check_options`).
    """

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if isinstance(params, Iterator):  # read once: keep the list for torch (as its add_param_group does)
            param_group["params"] = params = list(params)
        check_no_manifold_params([param_group], type(self).__name__)
        self._check_params([params] if isinstance(params, Tensor) else list(params))
        options = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        check_options(options, owner=type(self).__name__)
        super().add_param_group(param_group)

    def _check_params(self, params: list[Tensor]) -> None:
        """Refuse parameters of a new group that this optimizer cannot update (nothing is refused here)."""

    def _check(self, p: Tensor) -> None:
        if p.grad.is_sparse:
            raise TypeError(f"{type(self).__name__} does not support sparse gradients")

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the loss (gradients enabled)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._check(p)
                self._update(p, group)
        return loss


class MatrixOptimizer(StepOptimizer):
    """Shared validation: every parameter is a real matrix (ndim >= 2), in every group added later too."""

    def _check_params(self, params: list[Tensor]) -> None:
        for p in params:
            as_matrix(p, type(self).__name__)
            if torch.is_complex(p):
                raise TypeError(f"{type(self).__name__} does not support complex parameters")
