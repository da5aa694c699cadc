"""Input validation messages."""

from __future__ import annotations

import pytest
import torch
from conftest import random_spd

from manifoldnorm import functional as mf


def test_valid_spd_passes_through() -> None:
    X = random_spd(4, n=5)
    assert mf.check_spd(X) is X
    mf.check_spd(X.float())


def test_errors_are_specific() -> None:
    X = random_spd(4, n=3)
    with pytest.raises(TypeError, match="torch.Tensor"):
        mf.check_spd(X.numpy())
    with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
        mf.check_spd(X[:, 0])
    bad = X.clone()
    bad[2, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="1 NaN"):
        mf.check_spd(bad, name="covariances")
    asym = X.clone()
    asym[1, 0, 2] += 1.0
    with pytest.raises(ValueError, match="symmetric.*batch index \\(1,\\)"):
        mf.check_spd(asym)
    neg = X.clone()
    neg[3] = -neg[3]
    with pytest.raises(ValueError, match="not positive definite at batch index \\(3,\\)"):
        mf.check_spd(neg)


def test_roundoff_asymmetry_is_accepted() -> None:
    X = random_spd(2, n=6, cond=1e4)
    X = X + 1e-13 * torch.randn_like(X)
    mf.check_spd(X)


def test_check_finite_accepts_large_finite_values_whose_sum_overflows() -> None:
    from manifoldnorm.functional.validation import check_finite

    X = torch.full((4,), 1e308, dtype=torch.float64)
    assert check_finite(X) is X
    with pytest.raises(ValueError, match="1 NaN and 1 Inf"):
        check_finite(torch.tensor([1e308, float("nan"), float("-inf")], dtype=torch.float64))
