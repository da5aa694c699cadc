"""BiMap, ReEig, LogEig, CovPool: geometry, identities, gradients, errors."""

from __future__ import annotations

import geoopt
import numpy as np
import pytest
import torch
from conftest import random_spd

from manifoldnorm import functional as mf
from manifoldnorm.nn import BiMap, CovPool, LogEig, ReEig, vech
from tests.nn.nn_helpers import F64


def test_bimap_weight_on_stiefel_and_output_spd(seed):
    torch.manual_seed(seed)
    layer = BiMap(6, 3)
    W = layer.weight
    assert isinstance(W, geoopt.ManifoldParameter) and isinstance(W.manifold, geoopt.Stiefel)
    assert W.shape == (6, 3) and W.dtype == F64
    torch.testing.assert_close(W.mT @ W, torch.eye(3, dtype=F64), atol=1e-12, rtol=0)
    X = random_spd(5, n=6, seed=seed)
    Y = layer(X)
    assert Y.shape == (5, 3, 3)
    torch.testing.assert_close(Y, W.detach().mT @ X @ W.detach())
    mf.check_spd(Y.detach())
    # float32 input is promoted to the float64 weight
    assert layer(X.float()).dtype == F64


def test_bimap_stays_on_stiefel_under_riemannian_optimizer():
    torch.manual_seed(0)
    layer = BiMap(5, 2)
    opt = geoopt.optim.RiemannianSGD(layer.parameters(), lr=0.1)
    X = random_spd(4, n=5, seed=1)
    for _ in range(5):
        opt.zero_grad()
        layer(X).square().sum().backward()
        opt.step()
    W = layer.weight.detach()
    torch.testing.assert_close(W.mT @ W, torch.eye(2, dtype=F64), atol=1e-10, rtol=0)


def test_bimap_channels_and_errors():
    layer = BiMap(4, 2, channels=3)
    assert layer.weight.shape == (3, 4, 2)
    X = random_spd(2, 3, n=4)
    Y = layer(X)
    torch.testing.assert_close(Y[:, 1], layer.weight[1].detach().mT @ X[:, 1] @ layer.weight[1].detach())
    with pytest.raises(ValueError, match="channels=3"):
        layer(random_spd(2, n=4))
    with pytest.raises(ValueError, match="must not exceed"):
        BiMap(3, 4)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4, 4\)"):
        BiMap(4, 2)(random_spd(2, n=3))


def test_bimap_gradcheck():
    layer = BiMap(4, 2)
    X = random_spd(3, n=4, seed=2).requires_grad_(True)
    W = layer.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda X, W: torch.func.functional_call(layer, {"weight": W}, (X,)), (X, W))


def test_reeig_clamps_eigenvalues_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))
    lam = torch.tensor([1e-6, 1e-3, 0.5, 2.0], dtype=F64)
    X = (Q * lam) @ Q.mT
    Y = ReEig(1e-2)(X)
    torch.testing.assert_close(torch.linalg.eigvalsh(Y), torch.tensor([1e-2, 1e-2, 0.5, 2.0], dtype=F64))
    A = X.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda A: ReEig(1e-2)(mf.sym(A)), (A,))
    with pytest.raises(ValueError, match="positive"):
        ReEig(0.0)


def test_logeig_norm_identity_and_layout(seed):
    n = 5
    X = random_spd(7, n=n, seed=seed, cond=50.0)
    v = LogEig()(X)
    assert v.shape == (7, n * (n + 1) // 2)
    # ||vec||_2 = ||log X||_F = d_AIM(I, X)
    eye = torch.eye(n, dtype=F64)
    torch.testing.assert_close(v.norm(dim=-1), mf.distance_aim(eye, X), atol=1e-12, rtol=1e-12)
    # inner products are preserved as well, and the layout is the row-major upper triangle
    S1, S2 = mf.sym_logm(X[0]), mf.sym_logm(X[1])
    torch.testing.assert_close(v[0] @ v[1], (S1 * S2).sum())
    rows, cols = np.triu_indices(n)
    scale = np.where(rows == cols, 1.0, np.sqrt(2.0))
    torch.testing.assert_close(v[0], torch.from_numpy(S1.numpy()[rows, cols] * scale))


def test_logeig_gradcheck_and_vech_channels():
    A = random_spd(3, n=3, seed=1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda A: LogEig()(mf.sym(A)), (A,))
    S = mf.sym(torch.randn(2, 4, 3, 3, dtype=F64))
    assert vech(S).shape == (2, 4, 6)


def test_covpool_matches_numpy_and_is_spd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 200, generator=g, dtype=F64) * 1e-5
    C = CovPool(eps=0.0)(x)
    torch.testing.assert_close(C[1], torch.from_numpy(np.cov(x[1].numpy())), atol=0, rtol=1e-10)
    # fewer samples than channels: the relative ridge keeps the output SPD at any signal scale
    short = torch.randn(2, 8, 4, generator=g) * 1e-6
    Cs = CovPool(eps=1e-3)(short)
    assert Cs.dtype == F64
    mf.check_spd(Cs)
    Csh = CovPool(shrinkage=1.0, eps=0.0)(x)
    mu = torch.diagonal(C, dim1=-2, dim2=-1).mean(-1)
    torch.testing.assert_close(Csh, mu[:, None, None] * torch.eye(5, dtype=F64))


def test_covpool_errors():
    with pytest.raises(ValueError, match="T=1"):
        CovPool()(torch.randn(2, 3, 1))
    with pytest.raises(ValueError, match="shrinkage"):
        CovPool(shrinkage=1.5)
