"""Learning-rate schedules that apply to every parameter group of an optimizer (composite ones included)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from manifoldnorm.optim._validate import check_int, check_real

__all__ = ["WarmupCosine", "warmup_cosine_factor"]


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    r"""Multiplier of the base learning rate at scheduler step ``step`` (0-based).

    .. math::

        f(t) = \begin{cases}
            \frac{t + 1}{w + 1} & t < w \\
            r + (1 - r)\,\tfrac12\bigl(1 + \cos\bigl(\pi \tfrac{t - w}{T - w}\bigr)\bigr) & w \le t \le T \\
            r & t > T
        \end{cases}

    with :math:`w` = ``warmup_steps``, :math:`T` = ``total_steps`` and :math:`r` = ``min_lr_ratio``: a linear
    warmup that never uses a zero learning rate, then half a cosine from the base rate down to :math:`r` times
    it, reached at step :math:`T`.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Factor:
    """Picklable ``step -> factor`` (saved in the scheduler's state dict, unlike a lambda)."""

    def __init__(self, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> None:
        self.total_steps, self.warmup_steps, self.min_lr_ratio = total_steps, warmup_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        return warmup_cosine_factor(step, self.total_steps, self.warmup_steps, self.min_lr_ratio)


class WarmupCosine(LambdaLR):
    """Linear warmup then cosine decay (:func:`warmup_cosine_factor`) of every group's learning rate.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Any optimizer, e.g. the :class:`~manifoldnorm.optim.CompositeOptimizer` (all sub-optimizers follow).
    total_steps : int
        Scheduler steps until the end of the decay (in the unit the scheduler is stepped: optimizer steps or
        epochs). In a Hydra config, ``total_steps: null`` lets the Lightning modules fill in the run's length.
    warmup_steps : int or float, default 0.05
        Warmup length: an int counts steps, a float in [0, 1) is a fraction of ``total_steps``.
    min_lr_ratio : float, default 0.0
        Final learning rate as a fraction of the initial one.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int | float = 0.05,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        total_steps = check_int(total_steps, "total_steps", "WarmupCosine", low=1)
        if isinstance(warmup_steps, float):
            if not 0.0 <= warmup_steps < 1.0:
                raise ValueError(f"WarmupCosine: a float warmup_steps is a fraction in [0, 1), got {warmup_steps}")
            warmup_steps = int(round(warmup_steps * total_steps))
        warmup_steps = check_int(warmup_steps, "warmup_steps", "WarmupCosine", low=0, high=total_steps)
        min_lr_ratio = float(check_real(min_lr_ratio, "min_lr_ratio", "WarmupCosine", 0.0, 1.0))
        self.total_steps, self.warmup_steps, self.min_lr_ratio = total_steps, warmup_steps, min_lr_ratio
        super().__init__(optimizer, _Factor(total_steps, warmup_steps, min_lr_ratio), last_epoch=last_epoch)
