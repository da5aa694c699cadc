"""Shared fixtures: seeded float64 SPD batches; a writer of ``.ts`` time-series files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def write_ts(path, trials, labels, classes, header: dict | None = None, fmt: str = "{!r}") -> Path:
    """Write trials (each (C, T_i); NaN written as '?') and labels as a ``.ts`` classification file."""
    lengths = {np.shape(t)[-1] for t in trials}
    head = {"problemName": Path(path).stem.removesuffix("_TRAIN").removesuffix("_TEST"), "timeStamps": "false",
            "missing": str(any(np.isnan(t).any() for t in trials)).lower(), "univariate": "false",
            "dimensions": np.shape(trials[0])[0], "equalLength": str(len(lengths) == 1).lower()}
    if len(lengths) == 1:
        head["seriesLength"] = lengths.pop()
    head["classLabel"] = "true " + " ".join(classes)
    head.update(header or {})
    lines = ["# written by the tests"] + [f"@{k} {v}" for k, v in head.items() if v is not None] + ["@data"]
    for X, label in zip(trials, labels, strict=True):
        channels = [",".join("?" if np.isnan(v) else fmt.format(float(v)) for v in row) for row in np.asarray(X)]
        lines.append(":".join([*channels, str(label)]))
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)
