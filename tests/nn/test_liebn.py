"""LieBatchNorm: Fréchet mean / dispersion of the outputs, running statistics, gradients, argument checks."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from conftest import concentrated_spd, random_spd

from manifoldnorm import functional as mf
from manifoldnorm.nn import LieBatchNorm
from tests.nn.nn_helpers import F64, call_with, gradcheck_norm, input_grad_norm, powm, ref_mean, ref_sqdist

# (metric, theta, alpha, beta): standard metrics and deformed ones
CASES = [
    ("aim", 1.0, 1.0, 0.0),
    ("aim", 0.5, 2.0, -0.1),
    ("lem", 1.0, 1.0, 0.0),
    ("lem", 1.0, 0.5, 0.3),
    ("lcm", 1.0, 1.0, 0.0),
    ("lcm", 1.5, 1.0, 0.0),
]


def _layer(metric, theta, alpha, beta, n, seed, **kw):
    bn = LieBatchNorm(n, metric=metric, theta=theta, alpha=alpha, beta=beta, **kw)
    with torch.no_grad():
        bn.weight.copy_(random_spd(1, n=n, seed=seed + 50, cond=5.0))
        bn.shift.fill_(0.6 + 0.2 * seed)
    return bn


@pytest.mark.parametrize("metric,theta,alpha,beta", CASES)
def test_output_mean_is_bias_and_dispersion_is_shift(metric, theta, alpha, beta, seed):
    n, N = 4, 12
    X = concentrated_spd(N, n, sigma=0.4, seed=seed)
    steps = 25 if metric == "aim" else 1
    bn = _layer(metric, theta, alpha, beta, n, seed, karcher_steps=steps)
    Y = bn(X)
    W, s = bn.weight.detach()[0], float(bn.shift.detach())
    # Fréchet mean of the outputs under the deformed metric equals the SPD bias
    tol = 1e-9 if metric == "aim" else 1e-11
    torch.testing.assert_close(ref_mean(metric, Y.detach(), theta), W, atol=tol, rtol=tol)
    # dispersion of the outputs around the bias equals s^2 v^2 / (v^2 + eps)
    M = ref_mean(metric, X, theta)
    v2 = ref_sqdist(metric, M, X, theta, alpha, beta).mean()
    disp = ref_sqdist(metric, W, Y.detach(), theta, alpha, beta).mean()
    torch.testing.assert_close(disp, s**2 * v2 / (v2 + bn.eps), atol=1e-9, rtol=1e-9)
    assert float(v2) > 0.1  # the batch is not degenerate


@pytest.mark.parametrize("metric,theta,alpha,beta", CASES)
def test_running_stats_follow_geodesic_and_ema(metric, theta, alpha, beta):
    n, N = 3, 10
    X = concentrated_spd(N, n, sigma=0.3, seed=3)
    bn = _layer(metric, theta, alpha, beta, n, 0, karcher_steps=25, momentum=0.25)
    R0 = random_spd(1, n=n, seed=9)
    with torch.no_grad():
        bn.running_mean.copy_(R0)
        bn.running_var.fill_(2.0)
    bn(X)
    M = ref_mean(metric, X, theta)
    # geodesic of the deformed metric = phi^{-1} of the geodesic of phi(.)
    if metric == "aim":
        expect = powm(mf.geodesic_aim(powm(R0[0], theta), powm(M, theta), 0.25), 1 / theta)
    elif metric == "lem":
        expect = mf.geodesic_lem(R0[0], M, 0.25)
    else:
        expect = powm(mf.geodesic_lcm(powm(R0[0], theta), powm(M, theta), 0.25), 1 / theta)
    torch.testing.assert_close(bn.running_mean[0], expect, atol=1e-9, rtol=1e-9)
    v2 = ref_sqdist(metric, M, X, theta, alpha, beta).mean()
    torch.testing.assert_close(bn.running_var[0], 0.75 * 2.0 + 0.25 * v2, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("metric", ["aim", "lem", "lcm"])
def test_eval_uses_running_stats(metric, seed):
    n, N = 4, 8
    X = concentrated_spd(N, n, sigma=0.3, seed=seed)
    bn = _layer(metric, 1.0, 1.0, 0.0, n, seed, momentum=1.0, karcher_steps=3)
    Y_train = bn(X).detach()
    bn.eval()
    Y_eval = bn(X)
    torch.testing.assert_close(Y_eval, Y_train, atol=1e-10, rtol=1e-10)
    # evaluation is per sample: no dependence on the rest of the batch
    torch.testing.assert_close(bn(X[2:3]), Y_eval[2:3], atol=1e-12, rtol=1e-12)
    before = (bn.running_mean.clone(), bn.running_var.clone())
    bn(random_spd(5, n=n, seed=seed + 7))
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])


@pytest.mark.parametrize("metric", ["aim", "lem", "lcm"])
def test_shift_and_weight_get_gradients(metric):
    X = concentrated_spd(8, 4, sigma=0.5, seed=1)
    bn = _layer(metric, 1.0, 1.0, 0.0, 4, 0)
    G = random_spd(8, n=4, seed=2)
    Y = bn(X)
    (Y * G).sum().backward()
    assert bn.shift.grad is not None and float(bn.shift.grad.abs().sum()) > 1e-6
    assert bn.weight.grad is not None and float(bn.weight.grad.abs().sum()) > 1e-6
    # the parameter gradients of a default training step (detached batch mean) are the derivatives: finite
    # differences in float64 (the batch statistics do not depend on the parameters) ...
    W0 = bn.weight.detach().clone().requires_grad_(True)
    s0 = bn.shift.detach().clone().requires_grad_(True)
    fresh = _layer(metric, 1.0, 1.0, 0.0, 4, 0)

    def f(W, s):
        return call_with(fresh, X, {"weight": mf.sym(W), "shift": s})

    assert torch.autograd.gradcheck(f, (W0, s0), eps=1e-6, atol=1e-6, rtol=1e-5)
    # ... and equal those of the independent plain-autograd reference
    ref = _layer(metric, 1.0, 1.0, 0.0, 4, 0)
    (ref.forward_ref(X) * G).sum().backward()
    torch.testing.assert_close(bn.shift.grad, ref.shift.grad, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(mf.sym(bn.weight.grad), mf.sym(ref.weight.grad), atol=1e-9, rtol=1e-9)


def _sym_inputs(X):
    return X.clone().requires_grad_(True)


@pytest.mark.parametrize("metric,theta,alpha,beta", CASES)
@pytest.mark.parametrize("mode", ["eval", "train_full_grad"])
def test_gradcheck(metric, theta, alpha, beta, mode):
    n, N = 3, 4
    X0 = concentrated_spd(N, n, sigma=0.4, seed=5)
    bn = _layer(metric, theta, alpha, beta, n, 1, detach_mean=(mode == "eval"), karcher_steps=2)
    if mode == "eval":
        with torch.no_grad():
            bn.running_mean.copy_(random_spd(1, n=n, seed=11))
            bn.running_var.fill_(0.7)
        bn.eval()
    assert gradcheck_norm(bn, _sym_inputs(X0))


def test_detached_gradient_equals_gradient_at_frozen_stats():
    """With the mean detached, the training gradient is the gradient at frozen batch statistics."""
    X = concentrated_spd(6, 3, sigma=0.4, seed=2)
    bn = _layer("aim", 1.0, 1.0, 0.0, 3, 0, momentum=1.0, karcher_steps=5)
    g_train, _ = input_grad_norm(bn, X)
    bn.eval()  # running stats now equal the batch stats; the variance is no longer a function of X
    g_eval, _ = input_grad_norm(bn, X)
    assert g_train != pytest.approx(g_eval)  # the variance still carries a gradient in training
    assert 0.2 < g_train / g_eval < 5.0


@pytest.mark.parametrize("metric", ["aim", "lem", "lcm"])
def test_batch_of_one_and_identical_inputs_have_bounded_gradients(metric):
    n = 4
    X = concentrated_spd(8, n, sigma=0.4, seed=4)
    g_batch, _ = input_grad_norm(_layer(metric, 1.0, 1.0, 0.0, n, 0), X)
    bn1 = _layer(metric, 1.0, 1.0, 0.0, n, 0)
    g_one, Y1 = input_grad_norm(bn1, X[:1])
    # 1/sqrt(eps) ~ 316 would be the blow-up; a single matrix must behave like a row of a normal batch
    assert g_one < 3.0 * g_batch
    torch.testing.assert_close(Y1[0], bn1.weight.detach()[0], atol=1e-8, rtol=1e-8)
    assert torch.equal(bn1.running_var, torch.ones(1, dtype=F64))  # not updated from a degenerate batch
    bn_same = _layer(metric, 1.0, 1.0, 0.0, n, 0)
    g_same, Ysame = input_grad_norm(bn_same, X[:1].expand(5, n, n))
    assert torch.isfinite(Ysame).all() and g_same < 3.0 * g_batch


def test_channels_are_normalized_independently():
    n, N, C = 3, 6, 2
    X = torch.stack([concentrated_spd(N, n, seed=1), concentrated_spd(N, n, sigma=0.6, seed=2)], dim=1)
    bn = LieBatchNorm(n, metric="lem", channels=C)
    with torch.no_grad():
        bn.shift.copy_(torch.tensor([0.5, 2.0]))
    Y = bn(X)
    for c in range(C):
        single = LieBatchNorm(n, metric="lem")
        with torch.no_grad():
            single.shift.fill_(float(bn.shift[c]))
        torch.testing.assert_close(Y[:, c], single(X[:, c]), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(bn.running_mean[c], single.running_mean[0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"metric": "bw"}, "valid names: aim, lem, lcm"),
        ({"theta": 0.0}, "theta"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.0, "beta": -0.5}, "beta"),
        ({"metric": "lem", "theta": 0.5}, "theta has no effect"),
        ({"metric": "lcm", "beta": 0.1}, "LCM"),
        ({"momentum": 1.5}, "momentum"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LieBatchNorm(4, **kwargs)


def test_beta_bound_uses_n():
    LieBatchNorm(4, alpha=1.0, beta=-0.24)  # -alpha/n = -0.25 < beta: fine
    with pytest.raises(ValueError, match="-alpha/n"):
        LieBatchNorm(4, alpha=1.0, beta=-0.25)


def test_lem_gradient_is_exact_for_identical_inputs_at_identity_bias():
    """Outputs at the identity (expm argument ~ 1e-16 noise) still get the exact gradient c * Dlog_X[.]^*."""
    n = 4
    X = random_spd(n=n, seed=3)
    bn = LieBatchNorm(n, metric="lem")  # bias I: the outputs equal I up to round-off
    A = X.expand(5, n, n).clone().requires_grad_(True)
    G = mf.sym(torch.randn(5, n, n, generator=torch.Generator().manual_seed(0), dtype=F64))
    (bn(A) * G).sum().backward()
    B = X.expand(5, n, n).clone().requires_grad_(True)
    c = 1.0 / (1.0 + bn.eps) ** 0.5  # running variance 1 is used for a degenerate batch
    (c * mf.sym_logm(B) * G).sum().backward()
    torch.testing.assert_close(A.grad, B.grad, atol=1e-10, rtol=1e-10)


# detach_var: the batch variance computed on the detached centred batch (ICLR'24 code, LieBN toolbox) ------------
DETACH_METRICS = ["aim", "lem", "lcm", "crim"]


def _upstream(shape, seed):
    return mf.sym(torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64))


def _step(bn, X, G):
    """One training step: output, symmetrised input gradient, parameter gradients."""
    A = X.clone().requires_grad_(True)
    Y = bn(A)
    (Y * G).sum().backward()
    return Y.detach(), mf.sym(A.grad), bn.shift.grad.clone(), mf.sym(bn.weight.grad)


@pytest.mark.parametrize("metric", DETACH_METRICS)
@pytest.mark.parametrize("detach_mean", [True, False])
def test_detach_var_keeps_outputs_and_changes_only_input_gradients(metric, detach_mean, seed):
    n, N = 4, 8
    X = concentrated_spd(N, n, sigma=0.5, seed=seed)
    G = _upstream((N, n, n), seed + 20)
    theta = 1.0 if metric == "lem" else 0.5  # deformed metrics too
    layers = [_layer(metric, theta, 1.0, 0.0, n, seed, detach_mean=detach_mean, karcher_steps=2, detach_var=dv)
              for dv in (False, True)]
    (Y0, g0, s0, w0), (Y1, g1, s1, w1) = (_step(bn, X, G) for bn in layers)
    assert layers[1].detach_var and not layers[0].detach_var
    assert torch.equal(Y0, Y1)  # the forward values do not change ...
    for b0, b1 in zip(layers[0].buffers(), layers[1].buffers(), strict=True):
        assert torch.equal(b0, b1)  # ... nor the running statistics
    # the batch statistics do not depend on the parameters: their gradients are the same
    torch.testing.assert_close(s1, s0, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w1, w0, atol=1e-12, rtol=1e-12)
    # the input gradient loses the term through the variance
    assert float((g0 - g1).norm() / g1.norm()) > 1e-3


def _lem_detached_var(X, W, s, alpha, beta, eps):
    """LEM-LieBN written out with ``torch.linalg.eigh``: log-map, detached mean, centring, variance from the detached
    centred batch, scaling, bias, exp-map."""

    def fn(A, f):
        lam, U = torch.linalg.eigh(A)
        return (U * f(lam).unsqueeze(-2)) @ U.mT

    L = fn(X, torch.log)
    Lc = L - L.detach().mean(dim=0)
    Ld = Lc.detach()
    tr = torch.diagonal(Ld, dim1=-2, dim2=-1).sum(-1)
    v = (alpha * Ld.square().sum((-1, -2)) + beta * tr.square()).mean(dim=0)
    c = s / torch.sqrt(v + eps)
    return fn(c * Lc + fn(W, torch.log), torch.exp)


def test_detach_var_lem_gradient_equals_closed_form(seed):
    n, N, alpha, beta = 4, 8, 0.5, 0.3
    X = concentrated_spd(N, n, sigma=0.5, seed=seed)
    G = _upstream((N, n, n), seed + 30)
    A = X.clone().requires_grad_(True)
    bn = _layer("lem", 1.0, alpha, beta, n, seed)
    Y_ref = _lem_detached_var(A, bn.weight.detach()[0], float(bn.shift.detach()), alpha, beta, bn.eps)
    (Y_ref * G).sum().backward()
    g_ref = mf.sym(A.grad)
    for detach_var in (True, False):
        Y, g, _, _ = _step(_layer("lem", 1.0, alpha, beta, n, seed, detach_var=detach_var), X, G)
        torch.testing.assert_close(Y, Y_ref.detach(), atol=1e-11, rtol=1e-11)
        if detach_var:
            torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-10)
        else:  # the default differentiates the variance: a different gradient
            assert float((g - g_ref).norm() / g_ref.norm()) > 1e-3


@pytest.mark.parametrize("metric", DETACH_METRICS)
@pytest.mark.parametrize("detach_mean", [True, False])
def test_detach_var_forward_matches_forward_ref(metric, detach_mean):
    n, N = 4, 7
    X = concentrated_spd(N, n, sigma=0.5, seed=4)
    G = _upstream((N, n, n), 5)
    theta, alpha, beta = {"aim": (0.5, 2.0, -0.1), "lem": (1.0, 0.5, 0.3), "lcm": (1.5, 1.0, 0.0),
                          "crim": (0.5, 1.0, 0.1)}[metric]
    fast = _layer(metric, theta, alpha, beta, n, 1, detach_mean=detach_mean, karcher_steps=2, detach_var=True)
    ref = _layer(metric, theta, alpha, beta, n, 1, detach_mean=detach_mean, karcher_steps=2, detach_var=True)
    default = _layer(metric, theta, alpha, beta, n, 1, detach_mean=detach_mean, karcher_steps=2)
    Y, g, gs, gw = _step(fast, X, G)
    A = X.clone().requires_grad_(True)
    Yr = ref.forward_ref(A)
    (Yr * G).sum().backward()
    torch.testing.assert_close(Y, Yr.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(g, mf.sym(A.grad), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(gs, ref.shift.grad, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(gw, mf.sym(ref.weight.grad), atol=1e-9, rtol=1e-9)
    # the reference follows the option: its default (differentiated variance) gradient is another one
    B = X.clone().requires_grad_(True)
    (default.forward_ref(B) * G).sum().backward()
    assert float((mf.sym(B.grad) - g).norm() / g.norm()) > 1e-3


@pytest.mark.parametrize("metric", DETACH_METRICS)
def test_detach_var_gradients_pass_gradcheck(metric):
    """With the mean and the variance detached, the training input gradient is the derivative of the layer at
    frozen batch statistics (evaluation mode with running statistics = batch statistics), which gradcheck
    verifies; the parameter gradients in training mode are derivatives too (the statistics do not depend on
    the parameters)."""
    n, N = 3, 5
    X = concentrated_spd(N, n, sigma=0.4, seed=2)
    theta = 1.0 if metric == "lem" else 0.5
    bn = _layer(metric, theta, 1.0, 0.0, n, 0, momentum=1.0, detach_var=True)
    G = _upstream((N, n, n), 3)
    _, g_train, _, _ = _step(bn, X, G)  # momentum 1: the running statistics are now the batch statistics
    bn.eval()
    _, g_eval, _, _ = _step(bn, X, G)
    torch.testing.assert_close(g_train, g_eval, atol=1e-10, rtol=1e-10)
    assert gradcheck_norm(bn, X)  # evaluation mode: input, weight and shift
    train = _layer(metric, theta, 1.0, 0.0, n, 0, detach_var=True)
    W0 = train.weight.detach().clone().requires_grad_(True)
    s0 = train.shift.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda W, s: call_with(train, X, {"weight": mf.sym(W), "shift": s}), (W0, s0),
                                    eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("value", [1, 0, "true", "false", None, 1.0])
def test_detach_var_must_be_a_bool(value):
    from manifoldnorm.nn import DomainLieBatchNorm, create_norm_layer

    for build in (lambda: LieBatchNorm(3, detach_var=value),
                  lambda: DomainLieBatchNorm(3, num_domains=2, detach_var=value),
                  lambda: create_norm_layer("liebn_lcm", 3, detach_var=value),
                  lambda: create_norm_layer("dsliebn_aim", 3, num_domains=2, detach_var=value)):
        with pytest.raises(TypeError, match="detach_var"):
            build()


def test_detach_var_reaches_every_registry_entry():
    from manifoldnorm.nn import DomainLieBatchNorm, create_norm_layer, list_norms

    names = [k for k in list_norms() if k.startswith(("liebn_", "dsliebn_")) and k != "liebn_so3"]
    assert {"liebn_aim", "liebn_lem", "liebn_lcm", "liebn_crim", "dsliebn_aim", "dsliebn_lem",
            "dsliebn_lcm"} <= set(names)
    for name in names:
        kw = {"num_domains": 1} if name.startswith("dsliebn_") else {}
        assert create_norm_layer(name, 3, detach_var=True, **kw).detach_var is True
        assert create_norm_layer(name, 3, **kw).detach_var is False
    # the domain-specific layer passes it on: one domain = LieBN, gradients included
    X = concentrated_spd(6, 3, sigma=0.5, seed=1)
    G = _upstream((6, 3, 3), 2)
    for metric in ("aim", "lem", "lcm"):
        plain = _step(_layer(metric, 1.0, 1.0, 0.0, 3, 0, detach_var=True), X, G)
        dom = DomainLieBatchNorm(3, num_domains=1, metric=metric, detach_var=True)
        with torch.no_grad():
            dom.weight.copy_(random_spd(1, n=3, seed=50, cond=5.0))
            dom.shift.fill_(0.6)
        got = _step(dom, X, G)
        for a, b in zip(plain, got, strict=True):
            torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("metric,low,high", [("aim", 1.0, 15.9), ("lem", 1.1, 15.7), ("lcm", 0.7, 13.6),
                                             ("crim", 0.6, 12.7)])
def test_detach_var_input_gradient_difference(metric, low, high):
    """Relative input-gradient difference between the default (differentiated variance) and ``detach_var=True``
    (the ICLR'24 code and the toolbox), float64, n = 8, N = 16, seeds 0-4: the range quoted in the docstring."""
    n, N = 8, 16
    rel = []
    for s in range(5):
        X = random_spd(N, n=n, seed=s)
        G = _upstream((N, n, n), 100 + s)
        g0, g1 = (_step(LieBatchNorm(n, metric=metric, detach_var=dv), X, G)[1] for dv in (False, True))
        rel.append(float((g0 - g1).norm() / g1.norm()))
    assert all(1e-3 < r < 0.3 for r in rel), rel  # nonzero, and a correction rather than another gradient
    # the range quoted in the docstring, in percent to one decimal
    assert abs(100 * min(rel) - low) <= 0.06 and abs(100 * max(rel) - high) <= 0.06, rel


# the fused training kernels and the codomain statistics --------------------------------------------------------
FUSED_CASES = [("lem", 1.0, 1.0, 0.0), ("lem", 1.0, 0.5, 0.3), ("lcm", 1.0, 1.0, 0.0), ("aim", 1.0, 1.0, 0.0),
               ("aim", 1.0, 2.0, -0.1)]


def _channels_layer(metric, theta, alpha, beta, n, C, seed, identity_bias=False, **kw):
    bn = LieBatchNorm(n, metric=metric, theta=theta, alpha=alpha, beta=beta, channels=C, **kw)
    with torch.no_grad():
        bn.weight.copy_(random_spd(C, n=n, seed=seed + 50, cond=5.0))
        if identity_bias:  # repeated eigenvalues: the exact Loewner closed forms
            bn.weight[0] = torch.eye(n, dtype=F64)
        bn.shift.copy_(0.6 + 0.3 * torch.arange(C, dtype=F64))
    return bn


def _batch(N, n, C, seed):
    return torch.stack([concentrated_spd(N, n, sigma=0.3 + 0.2 * c, seed=seed + 10 * c) for c in range(C)], dim=1)


def _train_step(bn, X, G):
    A = X.clone().requires_grad_(True)
    bn.zero_grad(set_to_none=True)
    Y = bn(A)
    (Y * G).sum().backward()
    return [Y.detach(), A.grad, bn.weight.grad.clone(), bn.shift.grad.clone()]


def _sgd(bn, lr=0.02):
    with torch.no_grad():
        bn.weight.copy_(mf.sym(bn.weight + lr * (bn.weight.grad @ bn.weight.grad.mT)))  # stays SPD
        bn.shift.sub_(lr * bn.shift.grad)


def _assert_all_close(a, b, tol=1e-12):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=tol * max(1.0, float(y.abs().max())), rtol=tol)


@pytest.mark.parametrize("metric,theta,alpha,beta", FUSED_CASES)
@pytest.mark.parametrize("eta,C,detach_var", [(1.0, 1, False), (0.6, 2, False), (1.0, 2, True)])
def test_fused_step_equals_the_composed_group_operations(metric, theta, alpha, beta, eta, C, detach_var, seed):
    """One autograd node per training step gives what the group operations give (float64, to round-off): outputs,
    input and parameter gradients, running statistics over several steps (a degenerate batch among them), and
    the evaluation output after them."""
    n, N = 4, 7
    kw = dict(train_momentum=eta, detach_var=detach_var, momentum=0.3, karcher_steps=2, identity_bias=C == 2)
    fused, composed = (_channels_layer(metric, theta, alpha, beta, n, C, seed, **kw) for _ in range(2))
    composed._fused = False
    assert fused._fusable(None) and not composed._fusable(None)
    for step in range(5):
        X = _batch(N, n, C, seed + step)
        if step == 2:  # identical matrices: scaled with the running variance, which stays
            X = X[:1].expand_as(X).clone()
        G = _upstream(X.shape, step)
        _assert_all_close(_train_step(fused, X, G), _train_step(composed, X, G))
        for (k, a), b in zip(fused.named_buffers(), composed.buffers(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m, k=k: f"{k}: {m}")
        _sgd(fused)
        _sgd(composed)
    fused.eval()
    composed.eval()
    X = _batch(5, n, C, seed + 9)
    torch.testing.assert_close(fused(X), composed(X), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("metric", ["aim", "lem", "lcm"])
def test_fused_step_matches_forward_ref(metric, seed):
    """The fused step against the independent plain-autograd reference (eigh's own backward: distinct
    eigenvalues, so a random bias)."""
    n, N = 5, 9
    bn = _channels_layer(metric, 1.0, 1.0, 0.0, n, 2, seed)
    ref = _channels_layer(metric, 1.0, 1.0, 0.0, n, 2, seed)
    X = _batch(N, n, 2, seed)
    G = _upstream(X.shape, seed + 1)
    got = _train_step(bn, X, G)
    A = X.clone().requires_grad_(True)
    Yr = ref.forward_ref(A)
    (Yr * G).sum().backward()
    _assert_all_close(got, [Yr.detach(), A.grad, ref.weight.grad, ref.shift.grad], tol=1e-10)


@pytest.mark.parametrize("metric", ["aim", "lem", "lcm"])
@pytest.mark.parametrize("identity_bias", [False, True])
def test_fused_step_parameter_gradients_pass_gradcheck(metric, identity_bias):
    """The batch statistics do not depend on the bias and the dispersion: their training gradients are derivatives
    (finite differences in float64), also at the identity bias (repeated eigenvalues)."""
    n = 3
    X = _batch(6, n, 2, 3)
    bn = _channels_layer(metric, 1.0, 1.0, 0.0, n, 2, 1, identity_bias=identity_bias)
    assert bn._fusable(None)
    W0 = bn.weight.detach().clone().requires_grad_(True)
    s0 = bn.shift.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda W, s: call_with(bn, X, {"weight": mf.sym(W), "shift": s}), (W0, s0),
                                    eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("metric", ["aim", "lem", "lcm"])
def test_fused_step_refuses_a_second_derivative(metric):
    bn = _channels_layer(metric, 1.0, 1.0, 0.0, 3, 1, 0)
    A = _batch(5, 3, 1, 1).requires_grad_(True)
    (g,) = torch.autograd.grad((bn(A) * _upstream(A.shape, 0)).sum(), A, create_graph=True)
    with pytest.raises(NotImplementedError, match="once differentiable.*forward_ref"):
        g.square().sum().backward()


def _stats_of(bn):
    return {k: v.clone() for k, v in bn.state_dict().items()}


@pytest.mark.parametrize("metric", ["aim", "lem", "lcm", "crim"])
def test_codomain_copies_live_in_the_state_dict_and_resume_bit_exactly(metric):
    """Training updates the means in the codomain of the deformation; the state dict carries them next to the SPD
    means, so a run resumed from it continues bit for bit."""
    n, N = 4, 6
    a = _channels_layer(metric, 1.0, 1.0, 0.0, n, 2, 0, train_momentum=0.7)
    for step in range(3):
        X = _batch(N, n, 2, step)
        _train_step(a, X, _upstream(X.shape, step))
        _sgd(a)
    sd = a.state_dict()
    assert {"running_mean_phi", "train_mean_phi"} <= set(sd)
    # the codomain copies are the images of the SPD means
    torch.testing.assert_close(sd["running_mean_phi"], a.group.deform(sd["running_mean"]), atol=1e-12, rtol=1e-12)
    b = _channels_layer(metric, 1.0, 1.0, 0.0, n, 2, 7, train_momentum=0.7)
    b.load_state_dict(copy.deepcopy(sd))
    for step in range(3, 6):
        X = _batch(N, n, 2, step)
        G = _upstream(X.shape, step)
        for x, y in zip(_train_step(a, X, G), _train_step(b, X, G), strict=True):
            assert torch.equal(x, y)
        _sgd(a)
        _sgd(b)
    for (k, x), y in zip(a.named_buffers(), b.buffers(), strict=True):
        assert torch.equal(x, y), k


def _old_format(sd):
    """A state dict as written before the codomain copies: parameters and the four statistics, SPD means."""
    old = collections.OrderedDict((k, v.clone()) for k, v in sd.items() if not k.endswith("_phi"))
    assert list(old) == ["weight", "shift", "running_mean", "running_var", "train_mean", "train_var"]
    return old


def _eval_by_formula(metric, X, R, r, W, s, eps):
    """Evaluation output from SPD running statistics, written from the definitions (θ = 1)."""
    c = s / (r + eps) ** 0.5
    if metric == "lem":
        return mf.sym_expm(c * (mf.sym_logm(X) - mf.sym_logm(R)) + mf.sym_logm(W))
    if metric == "lcm":
        return mf.cholesky_exp(c * (mf.cholesky_log(X) - mf.cholesky_log(R)) + mf.cholesky_log(W))
    Li = torch.linalg.inv(torch.linalg.cholesky(R))
    LB = torch.linalg.cholesky(W)
    return LB @ powm(Li @ X @ Li.mT, c) @ LB.mT


@pytest.mark.parametrize("metric", ["aim", "lem", "lcm"])
def test_old_format_state_dict_loads_and_gives_the_same_results(metric):
    """A state dict without the codomain copies (SPD running means, as written before them) loads strictly; the
    layer evaluates with those statistics and trains on from them as a layer holding them in its buffers."""
    n = 4
    R, T = random_spd(n=n, seed=3), random_spd(n=n, seed=4)
    old = collections.OrderedDict(
        weight=random_spd(1, n=n, seed=5, cond=4.0), shift=torch.tensor([0.8], dtype=F64),
        running_mean=R.unsqueeze(0), running_var=torch.tensor([1.7], dtype=F64),
        train_mean=T.unsqueeze(0), train_var=torch.tensor([0.9], dtype=F64))
    bn = LieBatchNorm(n, metric=metric, train_momentum=0.5)
    bn.load_state_dict(copy.deepcopy(old))
    assert torch.equal(bn.running_mean, old["running_mean"]) and torch.equal(bn.train_mean, old["train_mean"])
    torch.testing.assert_close(bn.running_mean_phi, bn.group.deform(old["running_mean"]), atol=1e-13, rtol=1e-13)
    X = concentrated_spd(6, n, sigma=0.4, seed=2)
    bn.eval()
    torch.testing.assert_close(bn(X), _eval_by_formula(metric, X, R, 1.7, old["weight"][0], 0.8, bn.eps),
                               atol=1e-11, rtol=1e-11)
    # training on: the same as a layer whose SPD buffers were written with these statistics
    other = LieBatchNorm(n, metric=metric, train_momentum=0.5)
    with torch.no_grad():
        for k, v in old.items():
            getattr(other, k).copy_(v)
    bn.train()
    for step in range(3):
        X = concentrated_spd(6, n, sigma=0.4, seed=10 + step)
        G = _upstream(X.shape, step)
        _assert_all_close(_train_step(bn, X, G), _train_step(other, X, G))
        _sgd(bn)
        _sgd(other)
    for (k, a), b in zip(bn.named_buffers(), other.buffers(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m, k=k: f"{k}: {m}")
    # and a round trip through the old format changes nothing in evaluation
    again = LieBatchNorm(n, metric=metric, train_momentum=0.5)
    again.load_state_dict(_old_format(bn.state_dict()))
    bn.eval()
    again.eval()
    torch.testing.assert_close(again(X), bn(X), atol=1e-12, rtol=1e-12)


def test_codomain_copies_of_another_metric_are_recomputed():
    """Loaded codomain copies are used only when they are the image of the loaded SPD means under this layer's
    deformation; a state dict of another metric (same keys) gets them recomputed."""
    n = 3
    lem = LieBatchNorm(n, metric="lem")
    lem(concentrated_spd(6, n, sigma=0.4, seed=1))
    lcm = LieBatchNorm(n, metric="lcm")
    lcm.load_state_dict(lem.state_dict())
    torch.testing.assert_close(lcm.running_mean_phi, mf.cholesky_log(lem.running_mean), atol=1e-12, rtol=1e-12)
    assert float((lcm.running_mean_phi - lem.running_mean_phi).abs().max()) > 1e-3


@pytest.mark.parametrize("metric", ["aim", "lem", "lcm"])
def test_writing_an_spd_buffer_takes_effect(metric):
    """The SPD buffers stay the statistics: a write from outside (copy_, to(), a load) is seen by the next step."""
    n = 3
    bn = LieBatchNorm(n, metric=metric, momentum=1.0)
    bn(concentrated_spd(6, n, sigma=0.4, seed=1))
    R = random_spd(1, n=n, seed=8)
    with torch.no_grad():
        bn.running_mean.copy_(R)
        bn.running_var.fill_(0.5)
    bn.eval()
    X = concentrated_spd(4, n, sigma=0.4, seed=3)
    torch.testing.assert_close(bn(X), _eval_by_formula(metric, X, R[0], 0.5, bn.weight.detach()[0], 1.0, bn.eps),
                               atol=1e-11, rtol=1e-11)
    low = copy.deepcopy(bn).to(torch.float32)
    torch.testing.assert_close(low(X.float()), bn(X).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("metric,calls,matrices", [("lcm", {"cholesky": 2}, lambda N: N + 1),
                                                   ("lem", {"eigh": 4}, lambda N: 2 * N + 1 + 2),
                                                   ("aim", {"eigh": 6, "cholesky": 2}, lambda N: 2 * N + 6)])
def test_training_step_decompositions(metric, calls, matrices):
    """A training step decomposes what its math needs: LCM one Cholesky of the batch and one of the bias (the
    statistics stay in log-Cholesky coordinates); LEM the batch and the bias logarithms, the output exponential
    and one exponential of the two running means; AIM the Karcher step, the centred batch and the statistics."""
    from manifoldnorm.functional.profile import count_decompositions

    n, N = 5, 12
    bn = LieBatchNorm(n, metric=metric, validate=False)
    X = concentrated_spd(N, n, sigma=0.4, seed=0).requires_grad_(True)
    bn(X.detach())  # a first step: the codomain copies are in use from then on
    with count_decompositions() as log:
        (bn(X) * _upstream(X.shape, 0)).sum().backward()
    assert log.by_kind() == calls
    assert log.matrices() == matrices(N)


def test_variance_test_never_skips_a_degenerate_batch():
    """The cheap spread test that skips the entry-wise test never calls a degenerate batch non-degenerate."""
    from manifoldnorm.functional._liebn_ops import _spread_rules_out_degenerate
    from manifoldnorm.nn._batch_stats import degenerate_batch

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        eps = torch.finfo(dtype).eps
        for n, N in ((3, 2), (6, 9), (8, 64)):
            Z0 = torch.randn(1, 2, n, n, generator=g, dtype=F64) * 3.0
            for ulps in (0.0, 1.0, 4.0, 8.0, 16.0, 1e3, 1e6):
                Z = (Z0 + ulps * eps * Z0.abs().amax() * torch.rand(N, 2, n, n, generator=g, dtype=F64)).to(dtype)
                M = Z.mean(dim=0)
                sq = torch.linalg.vector_norm(Z - M, dim=(-2, -1)).square()
                if bool(degenerate_batch(Z, N, None).any()):
                    assert not _spread_rules_out_degenerate(sq, M)
            Z = concentrated_spd(N, n, sigma=0.3, seed=1).reshape(N, 1, n, n).to(dtype)
            M = Z.mean(dim=0)
            assert _spread_rules_out_degenerate(torch.linalg.vector_norm(Z - M, dim=(-2, -1)).square(), M)


@pytest.mark.parametrize("metric", ["aim", "lem", "lcm"])
def test_domain_layer_keeps_spd_statistics_only(metric):
    """The domain-specific subclass keeps no codomain copies (its batched path reads and writes the SPD means):
    slots grown on the fly and state dicts of another number of domains load, evaluate and train on as before."""
    from manifoldnorm.nn import DomainLieBatchNorm

    n = 3
    X = concentrated_spd(8, n, sigma=0.4, seed=2)
    d = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])
    a = DomainLieBatchNorm(n, metric=metric)  # undeclared: grows to 3 slots
    with pytest.warns(UserWarning, match="grows"):
        a(X, domain=d)
    a(X, domain=d)
    sd = a.state_dict()
    assert sd["running_mean"].shape == (3, 1, n, n) and not any(k.endswith("_phi") for k in sd)
    b = DomainLieBatchNorm(n, metric=metric)
    b.load_state_dict(_old_format(a.state_dict()))
    assert b.num_domains == 3
    a.eval()
    b.eval()
    torch.testing.assert_close(b(X, domain=d), a(X, domain=d), atol=1e-12, rtol=1e-12)
    a.train()
    b.train()
    torch.testing.assert_close(b(X, domain=d), a(X, domain=d), atol=1e-12, rtol=1e-12)
    for (k, x), y in zip(a.named_buffers(), b.buffers(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("metric", ["aim", "lem", "lcm", "crim"])
def test_layers_made_and_run_in_inference_mode(metric):
    """Inference tensors have no version counter: the codomain copies of such buffers are recomputed at each use."""
    X = concentrated_spd(6, 3, sigma=0.4, seed=1)
    expect = LieBatchNorm(3, metric=metric)(X).detach()
    with torch.inference_mode():
        bn = LieBatchNorm(3, metric=metric)
        torch.testing.assert_close(bn(X), expect, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(bn(X), expect, atol=1e-12, rtol=1e-12)
        bn.eval()
        assert torch.isfinite(bn(X)).all()
