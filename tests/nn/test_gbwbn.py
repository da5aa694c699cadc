"""GBWBatchNorm: gradients, statistics guarantees, running/momentum statistics, reference parity, edge cases."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import concentrated_spd, random_spd
from pyriemann.geometry.mean import mean_wasserstein

from manifoldnorm import functional as mf
from manifoldnorm.functional import spd_bw as bw
from manifoldnorm.nn import refit_domain_norms
from manifoldnorm.nn.gbwbn import GBWBatchNorm
from tests.nn.nn_helpers import F64, call_with, input_grad_norm

SPD_PARAMS = ("weight", "metric_weight")


def _layer(n: int = 4, seed: int = 0, shift: float = 0.5, **kw) -> GBWBatchNorm:
    """A layer with a non-trivial bias ``B`` and metric ``M``."""
    layer = GBWBatchNorm(n, **kw)
    with torch.no_grad():
        layer.weight.copy_(random_spd(layer.channels, n=n, seed=100 + seed))
        layer.metric_weight.copy_(random_spd(layer.channels, n=n, seed=200 + seed, cond=4.0))
        layer.shift.fill_(shift)
    return layer


def _gradcheck(layer: GBWBatchNorm, X: torch.Tensor, params: tuple[str, ...]) -> bool:
    """float64 gradcheck in the input and ``params`` (SPD parameters symmetrised), buffers untouched."""
    A = X.detach().clone().requires_grad_(True)
    P = [getattr(layer, k).detach().clone().requires_grad_(True) for k in params]

    def f(A: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        named = {k: (mf.sym(v) if k in SPD_PARAMS else v) for k, v in zip(params, values, strict=True)}
        return call_with(layer, mf.sym(A), named)

    return torch.autograd.gradcheck(f, (A, *P), eps=1e-6, atol=1e-6, rtol=1e-5)


def _phi(X: torch.Tensor, layer: GBWBatchNorm) -> torch.Tensor:
    """BW coordinates :math:`M^{-1/2} X^\\theta M^{-1/2}` written with torch built-ins."""
    lam, U = torch.linalg.eigh(layer.metric_weight.detach()[0])
    Mi = (U * lam.rsqrt()) @ U.mT
    lx, Ux = torch.linalg.eigh(X)
    return mf.sym(Mi @ ((Ux * lx.pow(layer.theta).unsqueeze(-2)) @ Ux.mT) @ Mi)


# ---- gradients ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("theta", [1.0, 0.5])
def test_gradcheck_training_with_full_gradient(theta):
    X = concentrated_spd(4, 3, sigma=0.4, seed=5)
    layer = _layer(3, theta=theta, detach_mean=False, mean_steps=2, shift=0.8)
    assert _gradcheck(layer, X, ("weight", "metric_weight", "shift"))


def test_gradcheck_at_the_identity_initialisation():
    """Bias and metric start at exactly I (all eigenvalues equal): gradients must still be exact."""
    X = concentrated_spd(4, 3, sigma=0.4, seed=6)
    assert _gradcheck(GBWBatchNorm(3, detach_mean=False), X, ("weight", "metric_weight", "shift"))


@pytest.mark.parametrize("learn_metric", [True, False])
def test_gradcheck_eval_mode(learn_metric):
    layer = _layer(3, theta=1.5, learn_metric=learn_metric)
    with torch.no_grad():
        layer.running_mean.copy_(random_spd(1, n=3, seed=11))
        layer.running_var.fill_(0.7)
    layer.eval()
    params = ("weight", "metric_weight", "shift") if learn_metric else ("weight", "shift")
    assert _gradcheck(layer, concentrated_spd(4, 3, sigma=0.4, seed=7), params)


def test_frozen_metric_gets_no_gradient_and_learned_metric_does():
    X = concentrated_spd(6, 3, seed=1)
    frozen = GBWBatchNorm(3, learn_metric=False)
    frozen(X).sum().backward()
    assert not frozen.metric_weight.requires_grad and frozen.metric_weight.grad is None
    learned = GBWBatchNorm(3)
    G = random_spd(6, n=3, seed=2)
    (learned(X) * G).sum().backward()
    g = learned.metric_weight.grad
    assert g is not None and torch.isfinite(g).all() and float(g.abs().max()) > 1e-6
    # away from the identity (the reference's plain eigh autograd needs distinct eigenvalues): the metric
    # gradient is the one of the independent plain-autograd reference (same detached batch mean) ...
    learned, ref = _layer(3), _layer(3)
    A = X.clone().requires_grad_(True)
    Y = learned(A)
    (Y * G).sum().backward()
    (ref.forward_ref(X) * G).sum().backward()
    torch.testing.assert_close(mf.sym(learned.metric_weight.grad), mf.sym(ref.metric_weight.grad), atol=1e-9,
                               rtol=1e-8)
    # ... and freezing the metric only stops it learning: same outputs and input gradients as the learned one
    still = _layer(3, learn_metric=False)
    B = X.clone().requires_grad_(True)
    Y_frozen = still(B)
    (Y_frozen * G).sum().backward()
    torch.testing.assert_close(Y_frozen, Y, atol=0, rtol=0)
    torch.testing.assert_close(B.grad, A.grad, atol=1e-12, rtol=1e-12)


# ---- statistics --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("theta", [1.0, 0.5])
def test_training_output_has_the_bias_as_mean_and_the_scaled_dispersion(theta):
    layer = _layer(4, seed=1, theta=theta, mean_steps=80)
    X = concentrated_spd(12, 4, sigma=0.4, seed=3)
    Y = layer(X).detach()
    Zx, Zy, W = _phi(X, layer), _phi(Y, layer), _phi(layer.weight.detach()[0], layer)
    G = bw.mean_bw(Zx, steps=500, tol=1e-14)
    torch.testing.assert_close(bw.mean_bw(Zy, steps=500, tol=1e-14), W, atol=1e-9, rtol=1e-9)
    v_in = bw.sqdistance_bw(Zx, G).mean() / theta**2
    v_out = bw.sqdistance_bw(Zy, W).mean() / theta**2
    s = layer.shift.detach()[0]
    torch.testing.assert_close(v_out, s**2 * v_in / (v_in + layer.eps), atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(layer.running_var[0], 0.1 * v_in + 0.9, atol=1e-9, rtol=1e-9)


def test_variance_is_the_dispersion_around_the_batch_mean_not_around_identity():
    layer = GBWBatchNorm(3, momentum=1.0, mean_steps=60)
    X = 10.0 * concentrated_spd(10, 3, sigma=0.2, seed=2)  # mean far from I
    layer(X)
    G = torch.from_numpy(mean_wasserstein(X.numpy(), tol=1e-13, maxiter=300))
    around_mean = bw.sqdistance_bw(X, G).mean()
    torch.testing.assert_close(layer.running_var[0], around_mean, atol=1e-9, rtol=1e-9)
    assert float(bw.sqdistance_bw(X, torch.eye(3, dtype=F64)).mean()) > 10 * float(around_mean)
    torch.testing.assert_close(layer.running_mean[0], G, atol=1e-9, rtol=1e-9)


def test_running_mean_moves_along_the_bw_geodesic_in_metric_coordinates():
    layer = _layer(3, seed=2, momentum=0.3, mean_steps=3)
    with torch.no_grad():
        layer.running_mean.copy_(random_spd(1, n=3, seed=9))
    R0 = layer.running_mean.detach()[0].clone()
    X = concentrated_spd(8, 3, seed=4)
    layer(X)
    G = bw.mean_bw(_phi(X, layer), steps=3, tol=0.0)
    expect = bw.geodesic_bw(_phi(R0, layer), G, 0.3)
    torch.testing.assert_close(_phi(layer.running_mean.detach()[0], layer), expect, atol=1e-10, rtol=1e-10)


def test_train_momentum_normalizes_with_momentum_statistics():
    layer = _layer(3, seed=3, train_momentum=0.4)
    with torch.no_grad():
        layer.train_mean.copy_(random_spd(1, n=3, seed=12))
        layer.train_var.fill_(0.3)
    X = concentrated_spd(8, 3, sigma=0.5, seed=5)
    T0 = _phi(layer.train_mean.detach()[0], layer)
    y = layer(X).detach()
    centre = bw.geodesic_bw(T0, bw.mean_bw(_phi(X, layer), steps=1), 0.4)
    torch.testing.assert_close(_phi(layer.train_mean.detach()[0], layer), centre, atol=1e-10, rtol=1e-10)
    v = bw.sqdistance_bw(_phi(X, layer), centre).mean()
    torch.testing.assert_close(layer.train_var[0], 0.6 * 0.3 + 0.4 * v, atol=1e-10, rtol=1e-10)
    # the same output as evaluating with the momentum statistics as running statistics
    twin = copy.deepcopy(layer).eval()
    with torch.no_grad():
        twin.running_mean.copy_(layer.train_mean)
        twin.running_var.copy_(layer.train_var)
    torch.testing.assert_close(twin(X), y, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="train_momentum"):
        layer.set_momentum(train=0.0)
    layer.set_momentum(train=1.0, test=0.5)
    assert (layer.train_momentum, layer.momentum) == (1.0, 0.5)


def test_refit_sets_exact_statistics_and_eval_output_has_the_bias_as_mean():
    layer = GBWBatchNorm(4, learn_metric=False)
    with torch.no_grad():
        layer.weight.copy_(random_spd(1, n=4, seed=3))
        layer.shift.fill_(0.5)
    X = concentrated_spd(16, 4, sigma=0.5, seed=6)
    Y = refit_domain_norms(layer, X, None)
    G = torch.from_numpy(mean_wasserstein(X.numpy(), tol=1e-13, maxiter=300))
    torch.testing.assert_close(layer.running_mean[0], G, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(layer.running_var[0], bw.sqdistance_bw(X, G).mean(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(bw.mean_bw(Y, steps=500, tol=1e-14), layer.weight.detach()[0], atol=1e-9, rtol=1e-9)
    assert not layer.refitting and layer.training


# ---- reference parity ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["default", "deformed", "channels", "far_from_identity", "full_grad"])
def test_fast_path_matches_forward_ref(case):
    n, X = 4, concentrated_spd(9, 4, sigma=0.6, seed=4)
    if case == "default":
        layer = GBWBatchNorm(n)
    elif case == "deformed":
        layer = _layer(n, theta=0.5, shift=1.3, mean_steps=2)
    elif case == "channels":
        layer = _layer(n, channels=2, shift=0.9)
        X = torch.stack([X, concentrated_spd(9, n, sigma=0.3, seed=8)], dim=1)
    elif case == "far_from_identity":
        # batch mean ~ 50 I: I + V/2 is indefinite for some transported logs (exact Log_I Exp_I path)
        layer = GBWBatchNorm(n)
        X = 50.0 * X
        Gm = bw.mean_bw(X, steps=1)
        V = bw.transport_bw_to_identity(Gm, bw.logmap_bw(Gm, X))
        assert float(torch.linalg.eigvalsh(torch.eye(n, dtype=F64) + 0.5 * V).min()) < 0
    else:
        layer = _layer(n, detach_mean=False, mean_steps=2)
    G = torch.randn(X.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    xs = [X.clone().requires_grad_(True) for _ in range(2)]
    ys = [copy.deepcopy(layer)(xs[0]), copy.deepcopy(layer).forward_ref(xs[1])]
    for y in ys:
        (y * G).sum().backward()
    rel = lambda a, b: float(torch.linalg.norm(a - b) / torch.linalg.norm(b))  # noqa: E731
    assert rel(ys[0].detach(), ys[1].detach()) < 1e-8
    assert rel(xs[0].grad, xs[1].grad) < 1e-8


# ---- edge cases ----------------------------------------------------------------------------------------------------

def test_batch_of_one_and_identical_matrices():
    X = concentrated_spd(8, 4, sigma=0.4, seed=4)
    g_batch, _ = input_grad_norm(_layer(4), X)
    layer = _layer(4)
    g_one, Y1 = input_grad_norm(layer, X[:1])
    assert torch.isfinite(Y1).all() and g_one < 3.0 * g_batch
    torch.testing.assert_close(Y1[0], layer.weight.detach()[0], atol=1e-9, rtol=1e-9)  # centred to B
    assert torch.equal(layer.running_var, torch.ones(1, dtype=F64))
    g_same, Ys = input_grad_norm(_layer(4), X[:1].expand(5, 4, 4))
    assert torch.isfinite(Ys).all() and g_same < 3.0 * g_batch


@pytest.mark.parametrize("theta", [1.0, 0.5])
def test_ill_conditioned_inputs_stay_finite(theta):
    layer = _layer(5, theta=theta)
    X = random_spd(8, n=5, cond=1e6, seed=5).requires_grad_(True)
    ref = copy.deepcopy(layer)
    Y = layer(X)
    (Y * random_spd(8, n=5, seed=1)).sum().backward()
    assert torch.isfinite(Y).all() and torch.isfinite(X.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    # not merely finite: the output and gradients are those of the plain-autograd reference, and SPD
    Xr = X.detach().clone().requires_grad_(True)
    Yr = ref.forward_ref(Xr)
    (Yr * random_spd(8, n=5, seed=1)).sum().backward()
    torch.testing.assert_close(Y, Yr, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(X.grad, Xr.grad, atol=1e-6, rtol=1e-6)
    assert float(torch.linalg.eigvalsh(Y.detach()).min()) > 0
    layer.eval()
    assert torch.isfinite(layer(X)).all()


def test_state_dict_round_trip_and_float32():
    layer = _layer(3, theta=0.5, train_momentum=0.7)
    for s in range(3):
        layer(concentrated_spd(6, 3, seed=s))
    fresh = GBWBatchNorm(3, theta=0.5, train_momentum=0.7)
    fresh.load_state_dict(copy.deepcopy(layer.state_dict()))
    assert set(fresh.state_dict()) >= {"metric_weight", "train_mean", "train_var", "running_mean", "running_var"}
    X = random_spd(5, n=3, seed=7)
    torch.testing.assert_close(fresh.eval()(X), layer.eval()(X), atol=0, rtol=0)
    low = copy.deepcopy(layer).to(torch.float32)
    y32 = low(X.float())
    assert y32.dtype == torch.float32 and all(b.dtype == torch.float32 for b in low.buffers())
    torch.testing.assert_close(y32.double(), layer(X), atol=1e-4, rtol=1e-4)
    low.train()
    y = low(X.float().requires_grad_(True))
    assert torch.isfinite(y).all()
    hi = copy.deepcopy(low)
    hi.compute_dtype = torch.float64
    assert hi(X.float()).dtype == torch.float32


def test_bad_arguments_raise_clear_errors():
    for kw, match in [({"theta": 0.0}, "theta"), ({"theta": float("inf")}, "theta"), ({"eps": 0.0}, "eps"),
                      ({"train_momentum": 0.0}, "train_momentum"), ({"momentum": 1.5}, "momentum"),
                      ({"mean_steps": 0}, "mean_steps"), ({"compute_dtype": "float16"}, "compute_dtype"),
                      ({"channels": 0}, "channels")]:
        with pytest.raises(ValueError, match=match):
            GBWBatchNorm(3, **kw)
    layer = GBWBatchNorm(3)
    with pytest.raises(ValueError, match="momentum"):
        layer.set_momentum(test=-0.1)
    with pytest.raises(ValueError, match="shape"):
        layer(random_spd(4, n=4))
    with pytest.raises(ValueError, match="positive definite"):
        layer(-random_spd(4, n=3))
    assert "theta=1" in repr(layer)
