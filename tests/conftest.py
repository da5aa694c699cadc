"""Shared fixtures: seeded float64 SPD batches."""

from __future__ import annotations

import pytest
import torch

# the tests use tiny matrices: one thread is faster and immune to a loaded machine
torch.set_num_threads(1)


def random_spd(
    *shape: int, n: int, dtype: torch.dtype = torch.float64, cond: float = 10.0, seed: int = 0
) -> torch.Tensor:
    """SPD matrices ``(*shape, n, n)`` with log-uniform eigenvalues in ``[1/sqrt(cond), sqrt(cond)]``."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*shape, n, n, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(A)
    half = 0.5 * torch.log(torch.tensor(cond, dtype=torch.float64))
    lam = torch.exp((torch.rand(*shape, n, generator=g, dtype=torch.float64) * 2 - 1) * half)
    return ((Q * lam.unsqueeze(-2)) @ Q.mT).to(dtype)


def concentrated_spd(N: int, n: int, sigma: float = 0.3, seed: int = 0) -> torch.Tensor:
    """``M^{1/2} exp(sigma S_i) M^{1/2}``: a batch concentrated around a random SPD ``M``."""
    g = torch.Generator().manual_seed(seed)
    M = random_spd(n=n, seed=seed + 1000)
    S = torch.randn(N, n, n, generator=g, dtype=torch.float64)
    S = 0.5 * (S + S.mT)
    lam, U = torch.linalg.eigh(M)
    Mh = (U * lam.sqrt().unsqueeze(-2)) @ U.mT
    le, Ue = torch.linalg.eigh(sigma * S)
    E = (Ue * le.exp().unsqueeze(-2)) @ Ue.mT
    X = Mh @ E @ Mh
    return 0.5 * (X + X.mT)


@pytest.fixture(params=[0, 1, 2])
def seed(request: pytest.FixtureRequest) -> int:
    return int(request.param)
