r"""Batch-size-aware momentum schedule of SPD momentum batch normalization (Kobler et al., NeurIPS 2022).

A pure function of the epoch, :func:`kobler_momentum`, and :func:`set_norm_momentum`, which hands the momenta to
every norm layer of a model through the layers' ``set_momentum(train=..., test=...)`` method. The Lightning
callback :class:`manifoldnorm.lit.callbacks.MomentumSchedule` applies the schedule once per epoch.
"""

from __future__ import annotations

import math
from numbers import Real

from torch import nn

__all__ = ["kobler_momentum", "set_norm_momentum", "DEFAULT_BASE_BATCH_SIZE", "DEFAULT_TAU0"]

DEFAULT_BASE_BATCH_SIZE: int = 64
DEFAULT_TAU0: float = 0.85


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"kobler_momentum: {name} must be an int >= 1, got {value!r}")
    return value


def _positive_real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not value > 0:
        raise ValueError(f"kobler_momentum: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def kobler_momentum(epoch: int, epochs: int, batch_size: float,
                    base_batch_size: float = DEFAULT_BASE_BATCH_SIZE,
                    tau0: float = DEFAULT_TAU0) -> tuple[float, float]:
    r"""Training and test momentum of epoch ``epoch`` under Kobler's batch-size-aware schedule.

    Kobler, Hirayama, Zhao & Kawanabe, "SPD domain-specific batch normalization to crack interpretable
    unsupervised domain adaptation in EEG", NeurIPS 2022 (SPD momentum batch norm, training schedule of the
    released TSMNet code), which adapts the dynamic momentum of Yong et al., "Momentum batch normalization for
    deep learning with small batch size", ECCV 2020. With :math:`q = b/b_0` (``batch_size / base_batch_size``)
    and the ramp weight :math:`w_k = \max(K-k, 0)/(K-1)` of the 1-based epoch :math:`k`:

    .. math::

        \eta_k &= 1 - \big(\rho^{K w_k} - \rho^{K}\big) = 1 + q - q^{\,w_k},
        \qquad \rho = q^{1/K},\\
        \tau_k &= \tau_0^{\,q(1 - w_k) + w_k},\qquad \eta^{\mathrm{test}}_k = 1 - \tau_k .

    :math:`\eta_k` falls monotonically from :math:`\eta_1 = 1` (pure batch statistics) to
    :math:`\eta_K = q` and stays there; :math:`\eta^{\mathrm{test}}_k` falls from :math:`1-\tau_0` to
    :math:`1-\tau_0^{q}` (e.g. 0.15 to 0.032 for :math:`\tau_0 = 0.85`, :math:`q = 0.2`).

    Both momenta use the torch convention: the weight of the *new* batch in the exponential moving average,
    :math:`R \leftarrow \gamma_{R \to G}(\eta)`, :math:`r \leftarrow (1-\eta) r + \eta v`.

    Parameters
    ----------
    epoch : int
        1-based epoch :math:`k \ge 1` (Lightning's ``trainer.current_epoch + 1``).
    epochs : int
        Length :math:`K \ge 1` of the ramp (the paper: total epochs minus 10).
    batch_size : float
        Samples per batch that one set of statistics sees, :math:`b > 0` (for domain-specific layers, the
        samples per domain in a batch; the paper: 50 per batch / 5 domains = 10).
    base_batch_size : float
        Reference batch size :math:`b_0 \ge b` at which pure batch statistics are used (the paper: 50).
    tau0 : float
        :math:`\tau_0 \in (0, 1)` (the paper's experiments: 0.85).

    Returns
    -------
    (train_momentum, test_momentum) : tuple of float
        :math:`(\eta_k, 1 - \tau_k)`, both in :math:`(0, 1]`.

    Raises
    ------
    ValueError
        For a non-positive or non-integer ``epoch``/``epochs``, ``batch_size > base_batch_size``, or
        ``tau0`` outside :math:`(0, 1)`.

    Notes
    -----
    With :math:`K = 1` the ramp is a step: epoch 1 uses :math:`(1, 1-\tau_0)`, later epochs the final values.

    Deviations
    ----------
    * Test momentum. The released code computes :math:`1-\tau_k` and then hands :math:`1-(1-\tau_k)=\tau_k`
      (about 0.85 to 0.97) to the layers as the new-batch weight of the test statistics, whereas its start-of-
      training default is :math:`1-\tau_0^{q}` (about 0.03) and Yong et al.'s :math:`\tau` is the weight of the
      *old* statistics. We take :math:`1-\tau_k`, the reading consistent with both; the reference behaviour is
      ``1 - test_momentum``. (Only evaluation with buffered statistics is affected; refitted test statistics are
      not.)
    * Defaults: ``base_batch_size=64`` is the reference class default (the paper's runs use the full batch size,
      50); ``tau0=0.85`` is the value of the paper's runs (the reference class default is 0.9).
    * ``epoch`` is 1-based as in the reference (skorch counts from 1); values beyond :math:`K` keep the final
      momenta, as there.
    """
    k = _positive_int(epoch, "epoch")
    big_k = _positive_int(epochs, "epochs")
    b = _positive_real(batch_size, "batch_size")
    b0 = _positive_real(base_batch_size, "base_batch_size")
    if b > b0:
        raise ValueError(f"kobler_momentum: batch_size ({b:g}) must not exceed base_batch_size ({b0:g}); the "
                         f"schedule lowers the momentum for batches smaller than the reference size. Raise "
                         f"base_batch_size to at least the batch size.")
    if isinstance(tau0, bool) or not isinstance(tau0, Real) or not 0.0 < float(tau0) < 1.0:
        raise ValueError(f"kobler_momentum: tau0 must be in (0, 1), got {tau0!r}")
    q = b / b0
    if big_k == 1:
        w = 1.0 if k == 1 else 0.0
    else:
        w = max(big_k - k, 0) / (big_k - 1)
    train = 1.0 + q - q ** w
    tau = float(tau0) ** (q * (1.0 - w) + w)
    return min(max(train, q), 1.0), 1.0 - tau


def set_norm_momentum(model: nn.Module, train: float | None = None,
                      test: float | None = None) -> list[nn.Module]:
    """Call ``set_momentum(train=train, test=test)`` on every submodule of ``model`` that has it.

    Parameters
    ----------
    model : nn.Module
        Searched with ``model.modules()`` (``model`` itself included).
    train, test : float, optional
        Training momentum :math:`\\eta` and test (running-statistics) momentum; ``None`` leaves a value as it
        is. The layers validate the range :math:`[0, 1]`.

    Returns
    -------
    list of nn.Module
        The modules that were updated (empty if the model has no schedulable norm layer).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_norm_momentum: model must be an nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if callable(getattr(m, "set_momentum", None))]
    for m in layers:
        m.set_momentum(train=train, test=test)
    return layers
