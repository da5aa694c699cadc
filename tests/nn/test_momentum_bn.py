"""SPDMomentumBatchNorm / DomainSPDBatchNorm (Kobler et al. 2022): statistics, domains, refit, gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import concentrated_spd, random_spd

from manifoldnorm import functional as mf
from manifoldnorm.nn import DomainSPDBatchNorm, SPDMomentumBatchNorm, refit_domain_norms
from tests.nn.nn_helpers import F64, call_with, gradcheck_norm, input_grad_norm, powm


def _sqd(P, X):
    return mf.distance_aim(P, X).square()


def _set_params(bn, n, seed):
    with torch.no_grad():
        bn.weight.copy_(random_spd(1, n=n, seed=seed + 40, cond=5.0))
        bn.shift.fill_(0.5 + 0.3 * seed)
    return bn


def _manual(X, R, r, B, s, eps):
    """B^{1/2} (R^{-1/2} X R^{-1/2})^{s / sqrt(r + eps)} B^{1/2} from plain eigendecompositions."""
    Ri, Bh = powm(R, -0.5), powm(B, 0.5)
    return Bh @ powm(Ri @ X @ Ri, s / (r + eps) ** 0.5) @ Bh


def test_output_mean_is_bias_and_dispersion_is_shift(seed):
    n, N = 4, 12
    X = concentrated_spd(N, n, sigma=0.4, seed=seed)
    bn = _set_params(SPDMomentumBatchNorm(n, karcher_steps=25), n, seed)
    Y = bn(X).detach()
    B, s = bn.weight.detach()[0], float(bn.shift.detach())
    torch.testing.assert_close(mf.mean_aim(Y, karcher_steps=200, tol=1e-14), B, atol=1e-9, rtol=1e-9)
    G = mf.mean_aim(X, karcher_steps=200, tol=1e-14)
    v = _sqd(G, X).mean()
    torch.testing.assert_close(_sqd(B, Y).mean(), s**2 * v / (v + bn.eps), atol=1e-9, rtol=1e-9)


def test_momentum_statistics_and_test_statistics(seed):
    n, N, eta, eta_t = 3, 8, 0.4, 0.2
    X = concentrated_spd(N, n, sigma=0.3, seed=seed)
    bn = _set_params(SPDMomentumBatchNorm(n, train_momentum=eta, momentum=eta_t, karcher_steps=25), n, seed)
    R0, Rt0 = random_spd(1, n=n, seed=seed + 1), random_spd(1, n=n, seed=seed + 2)
    with torch.no_grad():
        bn.train_mean.copy_(R0)
        bn.train_var.fill_(1.5)
        bn.running_mean.copy_(Rt0)
        bn.running_var.fill_(0.8)
    Y = bn(X).detach()
    G = mf.mean_aim(X, karcher_steps=200, tol=1e-14)
    R_eta = mf.geodesic_aim(R0[0], G, eta)
    r_eta = (1 - eta) * 1.5 + eta * _sqd(R_eta, X).mean()
    torch.testing.assert_close(Y, _manual(X, R_eta, r_eta, bn.weight.detach()[0], float(bn.shift.detach()),
                                          bn.eps), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(bn.train_mean[0], R_eta, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(bn.train_var[0], r_eta, atol=1e-9, rtol=1e-9)
    Rt = mf.geodesic_aim(Rt0[0], G, eta_t)
    torch.testing.assert_close(bn.running_mean[0], Rt, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(bn.running_var[0], (1 - eta_t) * 0.8 + eta_t * _sqd(Rt, X).mean(),
                               atol=1e-9, rtol=1e-9)
    # evaluation uses the test statistics
    bn.eval()
    expect = _manual(X, bn.running_mean[0], bn.running_var[0], bn.weight.detach()[0],
                     float(bn.shift.detach()), bn.eps)
    torch.testing.assert_close(bn(X), expect, atol=1e-9, rtol=1e-9)


def test_shift_gradient_and_gradcheck():
    n = 3
    X = concentrated_spd(4, n, sigma=0.4, seed=2)
    bn = _set_params(SPDMomentumBatchNorm(n, train_momentum=0.7, detach_mean=False, karcher_steps=2), n, 0)
    (bn(X) * random_spd(4, n=n, seed=3)).sum().backward()
    assert float(bn.shift.grad.abs().sum()) > 1e-6
    assert gradcheck_norm(bn, X)


@pytest.mark.parametrize("cls", [SPDMomentumBatchNorm, DomainSPDBatchNorm])
def test_batch_of_one_and_identical_inputs(cls):
    n = 4
    X = concentrated_spd(8, n, sigma=0.4, seed=5)
    g_batch, _ = input_grad_norm(cls(n), X)
    bn = cls(n)
    g_one, Y = input_grad_norm(bn, X[:1])
    assert torch.isfinite(Y).all() and g_one < 3.0 * g_batch
    assert torch.equal(bn.train_var, torch.ones_like(bn.train_var))
    g_same, Y = input_grad_norm(cls(n), X[:1].expand(6, n, n))
    assert torch.isfinite(Y).all() and g_same < 3.0 * g_batch


def _two_domains(n, seed):
    Xa = concentrated_spd(6, n, sigma=0.3, seed=seed)
    Xb = concentrated_spd(5, n, sigma=0.5, seed=seed + 10)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(seed))
    X = torch.cat([Xa, Xb])[perm]
    d = torch.tensor([0] * 6 + [2] * 5)[perm]
    return X, d


def test_domain_bn_uses_per_domain_statistics(seed):
    n = 3
    X, d = _two_domains(n, seed)
    bn = _set_params(DomainSPDBatchNorm(n, num_domains=3, karcher_steps=3, momentum=0.5), n, seed)
    Y = bn(X, domain=d)
    for dom in (0, 2):
        ref = _set_params(SPDMomentumBatchNorm(n, karcher_steps=3, momentum=0.5), n, seed)
        torch.testing.assert_close(Y[d == dom], ref(X[d == dom]), atol=1e-12, rtol=1e-12)
        for name in ("train_mean", "train_var", "running_mean", "running_var"):
            torch.testing.assert_close(getattr(bn, name)[dom], getattr(ref, name))
    # the absent domain keeps its initial statistics
    assert torch.equal(bn.train_mean[1], torch.eye(n, dtype=F64).unsqueeze(0))
    assert float(bn.running_var[1]) == 1.0
    # evaluation: each sample is normalized with its own domain's test statistics (batched, no loop)
    bn.eval()
    Ye = bn(X, domain=d)
    for dom in (0, 2):
        m = d == dom
        expect = _manual(X[m], bn.running_mean[dom, 0], bn.running_var[dom, 0], bn.weight.detach()[0],
                         float(bn.shift.detach()), bn.eps)
        torch.testing.assert_close(Ye[m], expect, atol=1e-9, rtol=1e-9)


def test_domain_growth_and_state_dict_round_trip():
    n = 3
    X, d = _two_domains(n, 0)
    bn = DomainSPDBatchNorm(n)  # one slot; domain 2 grows the buffers
    bn(X, domain=d)
    assert bn.num_domains == 3 and bn.train_mean.shape == (3, 1, n, n)
    fresh = DomainSPDBatchNorm(n)
    fresh.load_state_dict(bn.state_dict())
    assert fresh.num_domains == 3
    bn.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(X, domain=d), bn(X, domain=d))


def test_domain_argument_validation():
    bn = DomainSPDBatchNorm(3)
    X = random_spd(4, n=3)
    with pytest.raises(ValueError, match="non-negative"):
        bn(X, domain=torch.tensor([0, -1, 0, 0]))
    with pytest.raises(ValueError, match="shape"):
        bn(X, domain=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        bn(X, domain=torch.zeros(4))
    with pytest.raises(ValueError, match="num_domains"):
        DomainSPDBatchNorm(3, num_domains=0)


def test_refit_on_unlabeled_target_domain(seed):
    n = 3
    bn = _set_params(DomainSPDBatchNorm(n, num_domains=6), n, seed)  # domain 5: held out until the refit
    for _ in range(3):
        X, _ = _two_domains(n, seed)
        bn(X, domain=torch.zeros(11, dtype=torch.long))
    target = concentrated_spd(20, n, sigma=0.4, seed=seed + 99)
    source_stats = bn.running_mean[0].clone()

    class Net(torch.nn.Module):  # refit works on any module tree containing the layer
        def __init__(self):
            super().__init__()
            self.bn = bn

        def forward(self, x, domain=None):
            return self.bn(x, domain=domain)

    net = Net().train()
    out = refit_domain_norms(net, target, torch.full((20,), 5, dtype=torch.long))
    assert net.training and not bn.refitting  # modes restored
    assert bn.num_domains == 6
    G = mf.mean_aim(target, karcher_steps=200, tol=1e-14)
    torch.testing.assert_close(bn.running_mean[5, 0], G, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(bn.running_var[5, 0], _sqd(G, target).mean(), atol=1e-9, rtol=1e-9)
    assert torch.equal(bn.running_mean[0], source_stats)  # other domains untouched
    # after refitting, the target outputs are centred at the bias with dispersion s^2 v / (v + eps)
    B = bn.weight.detach()[0]
    torch.testing.assert_close(mf.mean_aim(out, karcher_steps=200, tol=1e-14), B, atol=1e-8, rtol=1e-8)
    bn.eval()
    torch.testing.assert_close(bn(target, domain=5), out)


def test_refit_requires_a_refittable_layer():
    with pytest.raises(ValueError, match="no refittable norm"):
        refit_domain_norms(torch.nn.Identity(), torch.eye(2).expand(3, 2, 2), None)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_domain_bn_gradcheck(mode):
    n = 3
    X = concentrated_spd(4, n, sigma=0.4, seed=6)
    d = torch.tensor([1, 0, 1, 0])
    bn = _set_params(DomainSPDBatchNorm(n, num_domains=2, train_momentum=0.8, detach_mean=False), n, 1)
    if mode == "eval":
        bn(X, domain=d)
        bn.eval()
    assert gradcheck_norm(bn, X, domain=d)


# the fused training step and the test dispersion -------------------------------------------------------------------
def _mbn_step(bn, X, G, **kw):
    A = X.clone().requires_grad_(True)
    bn.zero_grad(set_to_none=True)
    Y = bn(A, **kw)
    (Y * G).sum().backward()
    return [Y.detach(), A.grad, bn.weight.grad.clone(), bn.shift.grad.clone()]


def _sym_noise(shape, seed):
    return mf.sym(torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64))


@pytest.mark.parametrize("cls", [SPDMomentumBatchNorm, DomainSPDBatchNorm])
@pytest.mark.parametrize("eta,channels", [(1.0, 1), (0.6, 2)])
def test_fused_step_equals_the_composed_spectral_functions(cls, eta, channels, seed):
    """The training step as one autograd node (whiten, power, bias) equals the composition of the spectral
    functions (float64, to round-off): outputs, gradients and statistics over several steps, a degenerate batch
    among them, with several domains."""
    n, N = 4, 8
    layers = []
    for _ in range(2):
        bn = cls(n, train_momentum=eta, momentum=0.3, karcher_steps=2, channels=channels)
        with torch.no_grad():
            bn.weight.copy_(random_spd(channels, n=n, seed=seed + 40, cond=5.0))
            bn.weight[0] = torch.eye(n, dtype=F64)  # repeated eigenvalues in the bias
            bn.shift.copy_(0.5 + 0.3 * torch.arange(channels, dtype=F64))
        layers.append(bn)
    layers[1]._fused = False
    kw = {"domain": torch.tensor([0, 1] * (N // 2))} if cls is DomainSPDBatchNorm else {}
    for step in range(4):
        X = torch.stack([concentrated_spd(N, n, sigma=0.3 + 0.2 * c, seed=seed + step + 10 * c)
                         for c in range(channels)], dim=1)
        if step == 2:
            X = X[:1].expand_as(X).clone()
        G = _sym_noise(X.shape, step)
        for a, b in zip(*(_mbn_step(bn, X, G, **kw) for bn in layers), strict=True):
            torch.testing.assert_close(a, b, atol=1e-12 * max(1.0, float(b.abs().max())), rtol=1e-12)
        for (k, a), b in zip(layers[0].named_buffers(), layers[1].buffers(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m, k=k: f"{k}: {m}")
        with torch.no_grad():
            for bn in layers:
                bn.shift.sub_(0.05 * bn.shift.grad)
                bn.weight.copy_(mf.sym(bn.weight + 0.02 * bn.weight.grad @ bn.weight.grad.mT))


def test_fused_step_matches_forward_ref(seed):
    n, N = 5, 9
    X = concentrated_spd(N, n, sigma=0.4, seed=seed)
    G = _sym_noise(X.shape, seed)
    bn, ref = (_set_params(SPDMomentumBatchNorm(n), n, seed) for _ in range(2))
    got = _mbn_step(bn, X, G)
    A = X.clone().requires_grad_(True)
    Yr = ref.forward_ref(A)
    (Yr * G).sum().backward()
    for a, b in zip(got, [Yr.detach(), A.grad, ref.weight.grad, ref.shift.grad], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_fused_step_parameter_gradients_pass_gradcheck():
    n = 3
    X = concentrated_spd(6, n, sigma=0.4, seed=2)
    for bias in (random_spd(1, n=n, seed=4, cond=3.0), torch.eye(n, dtype=F64).unsqueeze(0)):
        bn = SPDMomentumBatchNorm(n)
        W0, s0 = bias.clone().requires_grad_(True), torch.tensor([0.7], dtype=F64, requires_grad=True)

        def f(W, s, bn=bn):
            return call_with(bn, X, {"weight": mf.sym(W), "shift": s})

        assert torch.autograd.gradcheck(f, (W0, s0), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_tangent_test_dispersion_is_koblers_and_saves_a_decomposition():
    """``test_dispersion='tangent'``: the test variance from the last Karcher step's tangent vectors,
    :math:`\\|T_i - \\log(S^- R_t S^-)\\|^2` (TSMNet); outputs, gradients and the training statistics are those of
    the exact default, and the step decomposes one batch fewer (2N + 7 matrices instead of 3N + 7 with one
    Karcher step)."""
    from manifoldnorm.functional.profile import count_decompositions

    n, N, ks, mom = 4, 10, 2, 0.3
    X = concentrated_spd(N, n, sigma=0.4, seed=1)
    G = _sym_noise(X.shape, 2)
    exact, tangent = (_set_params(SPDMomentumBatchNorm(n, karcher_steps=ks, momentum=mom, test_dispersion=t,
                                                       validate=False), n, 0) for t in ("exact", "tangent"))
    logs = []
    for bn in (exact, tangent):
        with count_decompositions() as log:
            _mbn_step(bn, X, G)
        logs.append(log)
    for a, b in zip(_mbn_step(exact, X, G), _mbn_step(tangent, X, G), strict=True):
        assert torch.equal(a, b)
    # Karcher steps (N + 2 each), centred batch, R^{-1/2}, W^{1/2}, test geodesic (2), test dispersion (N + 1 or 1)
    assert logs[0].matrices() == (ks + 2) * N + 2 * ks + 5 and logs[1].matrices() == (ks + 1) * N + 2 * ks + 5
    for name in ("train_mean", "train_var", "running_mean"):
        assert torch.equal(getattr(exact, name), getattr(tangent, name))
    # Kobler's formula, written out (two steps, each from the statistics before it)
    fresh = _set_params(SPDMomentumBatchNorm(n, karcher_steps=ks, momentum=mom), n, 0)
    Rt, rt = fresh.running_mean[0].clone(), 1.0
    for _ in range(2):
        Gk = X.mean(dim=0)
        for _ in range(ks):
            Si = powm(Gk, -0.5)
            T = mf.sym_logm(Si @ X @ Si)
            Gk = powm(Gk, 0.5) @ mf.sym_expm(T.mean(dim=0)) @ powm(Gk, 0.5)
        Rt = mf.geodesic_aim(Rt, Gk, mom)
        vt = (T - mf.sym_logm(Si @ Rt @ Si)).square().sum((-1, -2)).mean()
        rt = (1 - mom) * rt + mom * vt
    torch.testing.assert_close(tangent.running_mean[0], Rt, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(tangent.running_var[0], rt, atol=1e-10, rtol=1e-10)
    assert abs(float(tangent.running_var[0] - exact.running_var[0])) > 1e-8  # an approximation
    with pytest.raises(ValueError, match="test_dispersion must be one of exact, tangent"):
        SPDMomentumBatchNorm(n, test_dispersion="approx")
