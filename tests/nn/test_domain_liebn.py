"""DomainLieBatchNorm: per-domain LieBN statistics, evaluation, refit on a target domain, gradients, registry."""

from __future__ import annotations

import pytest
import torch
from conftest import concentrated_spd, random_spd

from manifoldnorm import functional as mf
from manifoldnorm.nn import (
    DomainLieBatchNorm,
    LieBatchNorm,
    create_norm_layer,
    get_norm_info,
    list_norms,
    refit_domain_norms,
    refittable_norms,
)
from tests.nn.nn_helpers import F64, gradcheck_norm, ref_mean, ref_sqdist

# (metric, theta, alpha, beta): standard and deformed metrics
CASES = [
    ("aim", 1.0, 1.0, 0.0),
    ("aim", 0.5, 2.0, -0.1),
    ("lem", 1.0, 0.5, 0.3),
    ("lcm", 1.0, 1.0, 0.0),
    ("lcm", 1.5, 1.0, 0.0),
]
METRICS = ["aim", "lem", "lcm"]


def _set_params(bn, n, seed):
    with torch.no_grad():
        bn.weight.copy_(random_spd(1, n=n, seed=seed + 50, cond=5.0))
        bn.shift.fill_(0.6 + 0.2 * seed)
    return bn


def _layer(metric, theta=1.0, alpha=1.0, beta=0.0, n=3, seed=0, **kw):
    return _set_params(DomainLieBatchNorm(n, metric=metric, theta=theta, alpha=alpha, beta=beta, **kw), n, seed)


def _two_domains(n, seed, sizes=(7, 6)):
    """Two well-separated domains (ids 0 and 2), samples shuffled."""
    Xa = concentrated_spd(sizes[0], n, sigma=0.3, seed=seed)
    Xb = concentrated_spd(sizes[1], n, sigma=0.5, seed=seed + 10)
    N = sum(sizes)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    return torch.cat([Xa, Xb])[perm], torch.tensor([0] * sizes[0] + [2] * sizes[1])[perm]


@pytest.mark.parametrize("metric,theta,alpha,beta", CASES)
def test_each_domain_is_centred_at_the_bias_with_dispersion_shift(metric, theta, alpha, beta, seed):
    n = 4
    X, d = _two_domains(n, seed)
    steps = 25 if metric == "aim" else 1
    bn = _layer(metric, theta, alpha, beta, n, seed, num_domains=3, karcher_steps=steps)
    Y = bn(X, domain=d).detach()
    W, s = bn.weight.detach()[0], float(bn.shift.detach())
    tol = 1e-9 if metric == "aim" else 1e-11
    for dom in (0, 2):
        m = d == dom
        torch.testing.assert_close(ref_mean(metric, Y[m], theta), W, atol=tol, rtol=tol)
        M = ref_mean(metric, X[m], theta)
        v2 = ref_sqdist(metric, M, X[m], theta, alpha, beta).mean()
        disp = ref_sqdist(metric, W, Y[m], theta, alpha, beta).mean()
        torch.testing.assert_close(disp, s**2 * v2 / (v2 + bn.eps), atol=1e-9, rtol=1e-9)
        assert float(v2) > 0.05
    # the two domains are far apart, so one set of statistics could not centre both
    assert float((ref_mean(metric, X[d == 0], theta) - ref_mean(metric, X[d == 2], theta)).abs().max()) > 0.1


@pytest.mark.parametrize("metric,theta,alpha,beta", CASES)
def test_training_matches_one_liebn_per_domain(metric, theta, alpha, beta):
    n = 3
    X, d = _two_domains(n, 1)
    bn = _layer(metric, theta, alpha, beta, n, 1, num_domains=3, momentum=0.3, karcher_steps=2)
    Y = bn(X, domain=d)
    for dom in (0, 2):
        ref = _set_params(LieBatchNorm(n, metric=metric, theta=theta, alpha=alpha, beta=beta, momentum=0.3,
                                       karcher_steps=2), n, 1)
        torch.testing.assert_close(Y[d == dom], ref(X[d == dom]), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(bn.running_mean[dom], ref.running_mean)
        torch.testing.assert_close(bn.running_var[dom], ref.running_var)
    # the absent domain keeps its initial statistics
    assert torch.equal(bn.running_mean[1], torch.eye(n, dtype=F64).unsqueeze(0))
    assert torch.equal(bn.running_var[1], torch.ones(1, dtype=F64))


@pytest.mark.parametrize("metric", METRICS)
def test_eval_uses_each_domains_running_stats(metric, seed):
    n = 3
    X, d = _two_domains(n, seed)
    bn = _layer(metric, n=n, seed=seed, num_domains=3, momentum=0.5, karcher_steps=3)
    for _ in range(2):
        bn(X, domain=d)
    bn.eval()
    Ye = bn(X, domain=d)
    for dom in (0, 2):
        m = d == dom
        ref = _set_params(LieBatchNorm(n, metric=metric), n, seed).eval()
        with torch.no_grad():
            ref.running_mean.copy_(bn.running_mean[dom])
            ref.running_var.copy_(bn.running_var[dom])
        torch.testing.assert_close(Ye[m], ref(X[m]), atol=1e-12, rtol=1e-12)
    # per-domain statistics differ, so swapping the ids changes the outputs
    assert not torch.allclose(Ye, bn(X, domain=2 - d), atol=1e-4)


@pytest.mark.parametrize("metric", METRICS)
def test_refit_centres_a_new_target_domain_at_the_bias(metric, seed):
    n = 3
    bn = _layer(metric, n=n, seed=seed, num_domains=5, karcher_steps=1)  # domain 4: held out until the refit
    X, _ = _two_domains(n, seed)
    for _ in range(3):
        bn(X, domain=0)
    target = concentrated_spd(20, n, sigma=0.4, seed=seed + 99)
    source = (bn.running_mean[0].clone(), bn.running_var[0].clone())

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn

        def forward(self, x, domain=None):
            return self.bn(x, domain=domain)

    net = Net().train()
    assert refittable_norms(net, domain_aware_only=True) == [bn]
    out = refit_domain_norms(net, target, torch.full((20,), 4, dtype=torch.long), domain_aware_only=True)
    assert net.training and not bn.refitting
    assert bn.num_domains == 5
    M = ref_mean(metric, target)
    torch.testing.assert_close(bn.running_mean[4, 0], M, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(bn.running_var[4, 0], ref_sqdist(metric, M, target).mean(), atol=1e-9, rtol=1e-9)
    assert torch.equal(bn.running_mean[0], source[0]) and torch.equal(bn.running_var[0], source[1])
    W, s = bn.weight.detach()[0], float(bn.shift.detach())
    torch.testing.assert_close(ref_mean(metric, out), W, atol=1e-8, rtol=1e-8)
    v2 = float(bn.running_var[4, 0])
    torch.testing.assert_close(ref_sqdist(metric, W, out).mean(), torch.tensor(s**2 * v2 / (v2 + bn.eps), dtype=F64),
                               atol=1e-9, rtol=1e-9)
    bn.eval()
    torch.testing.assert_close(bn(target, domain=4), out)


def test_refit_uses_a_converged_karcher_mean_for_aim():
    n = 3
    bn = DomainLieBatchNorm(n, metric="aim", karcher_steps=1, refit_karcher_steps=50)
    target = concentrated_spd(16, n, sigma=0.9, seed=3)
    refit_domain_norms(bn, target, 0)
    exact = ref_mean("aim", target)
    one_step = mf.mean_aim(target, karcher_steps=1, tol=0.0)
    assert float((one_step - exact).abs().max()) > 1e-6  # one step is not enough here
    torch.testing.assert_close(bn.running_mean[0, 0], exact, atol=1e-10, rtol=1e-10)


def test_state_dict_round_trip_with_grown_domains():
    n = 3
    X, d = _two_domains(n, 0)
    bn = DomainLieBatchNorm(n, metric="lcm", theta=0.5)  # one slot; domain 2 grows the buffers
    bn(X, domain=d)
    assert bn.num_domains == 3 and bn.running_mean.shape == (3, 1, n, n) and bn.running_var.shape == (3, 1)
    fresh = DomainLieBatchNorm(n, metric="lcm", theta=0.5)
    fresh.load_state_dict(bn.state_dict())
    assert fresh.num_domains == 3
    bn.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(X, domain=d), bn(X, domain=d))


def test_multichannel_and_argument_checks():
    bn = DomainLieBatchNorm(3, metric="lem", channels=2, num_domains=2)
    X = torch.stack([concentrated_spd(6, 3, seed=1), concentrated_spd(6, 3, seed=2)], dim=1)
    Y = bn(X, domain=torch.tensor([0, 1, 0, 1, 0, 1]))
    assert Y.shape == (6, 2, 3, 3) and bn.running_var.shape == (2, 2)
    with pytest.raises(ValueError, match="num_domains"):
        DomainLieBatchNorm(3, num_domains=0)
    with pytest.raises(ValueError, match="DomainLieBatchNorm: theta has no effect"):
        DomainLieBatchNorm(3, metric="lem", theta=2.0)
    with pytest.raises(ValueError, match="non-negative"):
        bn(X, domain=torch.tensor([0, -1, 0, 0, 0, 0]))
    with pytest.raises(TypeError, match="integer"):
        bn(X, domain=torch.zeros(6))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradcheck(metric, mode):
    n = 3
    X = concentrated_spd(5, n, sigma=0.4, seed=6)
    d = torch.tensor([1, 0, 1, 0, 1])
    bn = _layer(metric, n=n, seed=1, num_domains=2, momentum=0.8, detach_mean=False, karcher_steps=2)
    if mode == "eval":
        bn(X, domain=d)
        bn.eval()
    assert gradcheck_norm(bn, X, domain=d)


def test_registry_keys_are_domain_aware_spd_norms():
    keys = {"dsliebn_aim", "dsliebn_lem", "dsliebn_lcm"}
    assert keys <= set(list_norms("spd"))
    for key in keys:
        info = get_norm_info(key)
        assert info.domain_aware and info.inputs == ("spd",)
        layer = create_norm_layer(key, 3, num_domains=4, momentum=0.2)
        assert isinstance(layer, DomainLieBatchNorm) and layer.metric == key.split("_")[1]
        assert layer.num_domains == 4 and layer.momentum == 0.2
    assert refittable_norms(create_norm_layer("liebn_aim", 3))  # plain LieBN refits its single set of statistics
