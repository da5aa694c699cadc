"""Kobler's batch-size-aware momentum schedule and set_norm_momentum."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from manifoldnorm.nn import SPDMomentumBatchNorm
from manifoldnorm.nn.schedule import kobler_momentum, set_norm_momentum


@pytest.mark.parametrize("K,bs,bs0,tau0", [(40, 10, 50, 0.85), (5, 8, 64, 0.9), (2, 32, 32, 0.5), (100, 1, 7, 0.2)])
def test_endpoints_and_monotone(K: int, bs: float, bs0: float, tau0: float) -> None:
    q = bs / bs0
    values = [kobler_momentum(k, K, bs, bs0, tau0) for k in range(1, K + 6)]
    train = [v[0] for v in values]
    test = [v[1] for v in values]
    assert train[0] == 1.0 and test[0] == pytest.approx(1 - tau0, abs=1e-15)
    assert train[K - 1] == pytest.approx(q, abs=1e-15) and test[K - 1] == pytest.approx(1 - tau0 ** q, abs=1e-15)
    assert all(a >= b for a, b in zip(train, train[1:], strict=False))  # non-increasing
    assert all(a >= b for a, b in zip(test, test[1:], strict=False))
    if q < 1:
        assert all(a > b for a, b in zip(train[:K], train[1:K], strict=False))  # strictly inside the ramp
    assert train[K:] == [train[K - 1]] * 5 and test[K:] == [test[K - 1]] * 5  # constant after K
    assert all(0 < v <= 1 for v in train + test)


def test_matches_the_reference_recursion() -> None:
    """η_k = 1 − (ρ^{K(K−k)/(K−1)} − ρ^K), ρ = (bs/bs0)^{1/K}, and τ_k = τ0^{q(1−w)+w}, written out directly."""
    K, bs, bs0, tau0 = 40, 10, 50, 0.85
    rho = (bs / bs0) ** (1 / K)
    for k in (1, 2, 7, 20, 39, 40, 45):
        w = max(K - k, 0) / (K - 1)
        eta = 1 - (rho ** (K * max(K - k, 0) / (K - 1)) - rho ** K)
        tau = tau0 ** (bs / bs0 * (1 - w) + w)
        train, test = kobler_momentum(k, K, bs, bs0, tau0)
        assert train == pytest.approx(eta, rel=1e-12) and test == pytest.approx(1 - tau, rel=1e-12)
    # the paper's setting: 0.15 -> 0.032 for the test momentum
    assert kobler_momentum(40, 40, 10, 50, 0.85)[1] == pytest.approx(1 - 0.85 ** 0.2)
    assert math.isclose(kobler_momentum(40, 40, 10, 50, 0.85)[1], 0.03198, abs_tol=1e-5)


def test_single_epoch_ramp_is_a_step() -> None:
    assert kobler_momentum(1, 1, 16, 64) == (1.0, pytest.approx(0.15))
    assert kobler_momentum(2, 1, 16, 64) == (pytest.approx(0.25), pytest.approx(1 - 0.85 ** 0.25))


def test_equal_batch_sizes_keep_batch_statistics() -> None:
    assert all(kobler_momentum(k, 10, 32, 32)[0] == 1.0 for k in range(1, 15))


@pytest.mark.parametrize("kwargs,match", [
    ({"epoch": 0}, "epoch must be an int >= 1"),
    ({"epoch": 1.5}, "epoch must be an int >= 1"),
    ({"epochs": 0}, "epochs must be an int >= 1"),
    ({"epochs": True}, "epochs must be an int >= 1"),
    ({"batch_size": 0}, "batch_size must be a finite number > 0"),
    ({"batch_size": float("nan")}, "batch_size must be a finite number > 0"),
    ({"base_batch_size": -1}, "base_batch_size must be a finite number > 0"),
    ({"batch_size": 65}, r"batch_size \(65\) must not exceed base_batch_size \(64\)"),
    ({"tau0": 1.0}, r"tau0 must be in \(0, 1\)"),
    ({"tau0": 0.0}, r"tau0 must be in \(0, 1\)"),
])
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    args = {"epoch": 1, "epochs": 10, "batch_size": 16, "base_batch_size": 64, "tau0": 0.85, **kwargs}
    with pytest.raises(ValueError, match=match):
        kobler_momentum(**args)


def test_set_norm_momentum_on_a_model_with_spdmbn() -> None:
    a, b = SPDMomentumBatchNorm(4), SPDMomentumBatchNorm(4, channels=2)
    model = nn.Sequential(nn.Identity(), a, nn.Sequential(b, nn.ReLU()))
    layers = set_norm_momentum(model, train=0.3, test=0.05)
    assert layers == [a, b]
    for m in layers:
        assert m.train_momentum == 0.3 and m.momentum == 0.05
    set_norm_momentum(model, train=0.7)  # None leaves the other value alone
    assert a.train_momentum == 0.7 and a.momentum == 0.05
    set_norm_momentum(model, test=0.2)
    assert b.train_momentum == 0.7 and b.momentum == 0.2
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        set_norm_momentum(model, train=1.5)
    assert set_norm_momentum(nn.Linear(2, 2), train=0.5) == []
    with pytest.raises(TypeError, match="nn.Module"):
        set_norm_momentum("model", train=0.5)  # type: ignore[arg-type]


def test_scheduled_momentum_changes_the_training_statistics() -> None:
    """After set_norm_momentum(train=η) the layer's training mean moves a fraction η towards the batch mean."""
    torch.manual_seed(0)
    A = torch.randn(16, 4, 4, dtype=torch.float64)
    X = A @ A.mT + 0.5 * torch.eye(4, dtype=torch.float64)
    full, slow = SPDMomentumBatchNorm(4), SPDMomentumBatchNorm(4)
    set_norm_momentum(slow, train=kobler_momentum(10, 10, 8, 64)[0])  # η = 1/8
    full(X)
    slow(X)
    eye = torch.eye(4, dtype=torch.float64)
    d_full = torch.linalg.matrix_norm(full.train_mean.squeeze(0) - eye)
    d_slow = torch.linalg.matrix_norm(slow.train_mean.squeeze(0) - eye)
    assert 0 < d_slow < 0.5 * d_full
