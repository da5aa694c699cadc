"""The base class of every Riemannian norm layer (SPD and Lie group batch norms): :class:`RefittableNorm`.

It holds what the layers share beyond their geometry: the two momenta and their validation, the hook for
test-time refitting of the statistics (:mod:`manifoldnorm.nn.adapt`), and the statistics reducer that
:func:`manifoldnorm.distributed.convert_sync_norm` sets for data-parallel runs.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._batch_stats import StatReducer
from ._common import check_momentum

__all__ = ["RefittableNorm"]


class RefittableNorm(nn.Module):
    """Base of the norm layers whose statistics can be re-estimated on unlabeled data (test-time adaptation).

    While ``self.refitting`` is true, ``forward`` replaces the (per-domain) running statistics by the exact
    Fréchet mean and dispersion of the batch and normalizes with them; see
    :func:`manifoldnorm.nn.refit_domain_norms`. Subclasses hold ``momentum`` (running statistics) and
    ``train_momentum`` (statistics training normalizes with) and share their validation and
    :meth:`set_momentum`.

    Every batch average inside the statistics (mean iterations, dispersion) goes through
    :mod:`manifoldnorm.nn._batch_stats`: with ``stats_reducer`` left at ``None`` the local batch is averaged;
    :func:`manifoldnorm.distributed.convert_sync_norm` sets a reducer that averages over the batches of all
    processes of a data-parallel group.
    """

    refitting: bool = False
    domain_aware: bool = False
    #: how batch statistics are reduced: ``None`` (local batch) or a synchronizing
    #: :class:`~manifoldnorm.nn._batch_stats.StatReducer` (set by ``manifoldnorm.distributed.convert_sync_norm``)
    stats_reducer: StatReducer | None = None
    momentum: float
    train_momentum: float
    #: the space of the inputs and statistics: ``"spd"`` (SPD matrices) or ``"so3"`` (rotations)
    input_space: str = "spd"

    def distance(self, A: Tensor, B: Tensor) -> Tensor:
        """Geodesic distance between points of the statistics space, ``(..., n, n)`` -> ``(...)``, under the metric
        the layer measures its dispersion in (its variance is the mean squared distance to the batch mean).

        Used by diagnostics (:mod:`manifoldnorm.nn.diagnostics`); a subclass without a metric raises
        ``NotImplementedError``.
        """
        raise NotImplementedError(f"{type(self).__name__} defines no distance")

    def _check_train_momentum(self, value: float) -> float:
        """Validate a training momentum :math:`\\eta \\in (0, 1]`."""
        value = check_momentum(value, "train_momentum", type(self).__name__)
        if value == 0.0:
            raise ValueError(f"{type(self).__name__}: train_momentum must be > 0 (0 would ignore every batch)")
        return value

    def set_momentum(self, train: float | None = None, test: float | None = None) -> None:
        r"""Change the training momentum :math:`\eta` (``train``) and/or the running-statistics momentum (``test``).

        Used by momentum schedules (:func:`manifoldnorm.nn.set_norm_momentum`,
        :class:`manifoldnorm.lit.callbacks.MomentumSchedule`).
        """
        if train is not None:
            self.train_momentum = self._check_train_momentum(train)
        if test is not None:
            self.momentum = check_momentum(test, "momentum", type(self).__name__)
