"""SPDBatchNorm (Brooks et al. 2019): centering to the bias, running mean, evaluation, gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import concentrated_spd, random_spd

from manifoldnorm import functional as mf
from manifoldnorm.nn import SPDBatchNorm
from tests.nn.nn_helpers import gradcheck_norm, input_grad_norm


def _layer(n, seed, **kw):
    bn = SPDBatchNorm(n, **kw)
    with torch.no_grad():
        bn.weight.copy_(random_spd(1, n=n, seed=seed + 30, cond=5.0))
    return bn


def test_output_mean_is_bias_and_distances_are_preserved(seed):
    n, N = 4, 10
    X = concentrated_spd(N, n, sigma=0.5, seed=seed)
    bn = _layer(n, seed, karcher_steps=25)
    Y = bn(X).detach()
    B = bn.weight.detach()[0]
    torch.testing.assert_close(mf.mean_aim(Y, karcher_steps=200, tol=1e-14), B, atol=1e-9, rtol=1e-9)
    # centering + biasing are AIM isometries: pairwise distances unchanged (no variance normalisation)
    torch.testing.assert_close(mf.distance_aim(Y[:-1], Y[1:]), mf.distance_aim(X[:-1], X[1:]), atol=1e-9, rtol=1e-9)


def test_running_mean_update_and_eval(seed):
    n = 3
    X = concentrated_spd(8, n, sigma=0.3, seed=seed)
    bn = _layer(n, seed, momentum=0.3, karcher_steps=25)
    R0 = random_spd(1, n=n, seed=seed + 5)
    with torch.no_grad():
        bn.running_mean.copy_(R0)
    bn(X)
    G = mf.mean_aim(X, karcher_steps=200, tol=1e-14)
    torch.testing.assert_close(bn.running_mean[0], mf.geodesic_aim(R0[0], G, 0.3), atol=1e-9, rtol=1e-9)
    bn.eval()
    R = bn.running_mean[0]
    Bh = mf.sym_sqrtm(bn.weight.detach()[0])
    Ri = mf.sym_invsqrtm(R)
    expect = Bh @ Ri @ X @ Ri @ Bh
    torch.testing.assert_close(bn(X), expect, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("detach", [True, False])
def test_gradcheck(detach):
    n = 3
    X = concentrated_spd(4, n, sigma=0.4, seed=1).requires_grad_(True)
    bn = _layer(n, 0, detach_mean=detach, karcher_steps=2)
    if detach:
        bn.eval()
        with torch.no_grad():
            bn.running_mean.copy_(random_spd(1, n=n, seed=4))
    assert gradcheck_norm(bn, X, params=("weight",))


def test_batch_of_one_is_bounded():
    X = concentrated_spd(8, 4, sigma=0.4, seed=3)
    g_batch, _ = input_grad_norm(_layer(4, 0), X)
    bn = _layer(4, 0)
    g_one, Y = input_grad_norm(bn, X[:1])
    assert torch.isfinite(Y).all() and g_one < 3.0 * g_batch
    # a single matrix is its own mean: the output is the bias, and with the mean detached the input gradient is
    # that of the fixed congruence Y = W X W^T, W = B^{1/2} X0^{-1/2}
    B = bn.weight.detach()[0]
    torch.testing.assert_close(Y[0], B, atol=1e-10, rtol=1e-10)
    A = X[:1].clone().requires_grad_(True)
    U = mf.sym(torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    (_layer(4, 0)(A) * U).sum().backward()
    W = mf.sym_sqrtm(B) @ mf.sym_invsqrtm(X[0])
    torch.testing.assert_close(A.grad[0], mf.sym(W.mT @ U[0] @ W), atol=1e-10, rtol=1e-10)
