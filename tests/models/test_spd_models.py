"""SPDNet and TSMNet: every SPD norm plugs in, shapes and dtypes, training with geoopt, test-time refit."""

from __future__ import annotations

import copy
import functools

import geoopt
import pytest
import torch
import torch.nn.functional as F
from conftest import random_spd

from manifoldnorm.models import SPDNet, TSMNet
from manifoldnorm.nn import (
    BiMap,
    DomainSPDBatchNorm,
    IdentityNorm,
    LieBatchNorm,
    get_norm_info,
    list_norms,
    refit_domain_norms,
)

SPD_NORMS = [k for k in list_norms() if "spd" in get_norm_info(k).inputs]
F64 = torch.float64


def _spd_data(N=24, n=6, seed=0):
    """Two classes of SPD matrices with different means, two domains."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N) % 2
    base = torch.stack([random_spd(n=n, seed=seed + 1, cond=3.0), random_spd(n=n, seed=seed + 2, cond=3.0)])
    noise = random_spd(N, n=n, seed=seed + 3, cond=2.0)
    X = base[y] @ noise @ base[y] + 1e-3 * torch.eye(n, dtype=F64)
    X = 0.5 * (X + X.mT)
    d = torch.randint(0, 2, (N,), generator=g)
    return X.float(), y, d


def _eeg_data(N=16, C=5, T=64, seed=0):
    """Two classes differing in the spatial covariance of the signal."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N) % 2
    mix = torch.randn(2, C, C, generator=g)
    x = torch.einsum("nij,njt->nit", mix[y], torch.randn(N, C, T, generator=g))
    return x.float(), y, (torch.arange(N) // 2) % 2  # domain independent of the class


def _train(model, x, y, d, steps=25, lr=0.03):
    torch.manual_seed(0)
    opt = geoopt.optim.RiemannianAdam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x, domain=d), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("norm", SPD_NORMS)
def test_spdnet_forward_backward_with_every_spd_norm(norm):
    torch.manual_seed(0)
    X, y, d = _spd_data()
    model = SPDNet(6, (4, 3), 2, norm_layer=norm)
    logits = model(X, domain=d)
    assert logits.shape == (24, 2) and logits.dtype == torch.float32
    F.cross_entropy(logits, y).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(isinstance(s.bimap.weight, geoopt.ManifoldParameter) for s in model.stages)
    assert model.stages[0].bimap.weight.dtype == F64
    # training is equivariant to a permutation of the batch (and of its domain ids)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(X[perm], domain=d[perm]), model(X, domain=d)[perm], atol=1e-5, rtol=1e-5)
    model.eval()
    assert model(X[:1].double(), domain=d[:1]).shape == (1, 2)
    _check_eval_model(model, X, d)


def _is_spd_parameter(p):
    return isinstance(p, geoopt.ManifoldParameter) and isinstance(p.manifold, geoopt.SymmetricPositiveDefinite)


def _check_eval_model(model, X, d):
    """An SPD model in eval mode: logits = classify(features), per-sample, and exact gradients (float64)."""
    logits = model(X, domain=d)
    torch.testing.assert_close(model.classify(model.features(X, domain=d)), logits, atol=0, rtol=0)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(X[perm], domain=d[perm]), logits[perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(X[:1].double(), domain=d[:1]), logits[:1], atol=1e-5, rtol=1e-5)
    # float64 directional derivative of a loss along every parameter, against central differences
    m64 = copy.deepcopy(model).double()
    X64 = X.double()
    g = torch.Generator().manual_seed(2)
    dirs = [torch.randn(p.shape, generator=g, dtype=F64) for p in m64.parameters()]
    # SPD parameters are read as symmetric matrices (eigh sees one triangle): symmetric directions only
    dirs = [0.5 * (v + v.mT) if _is_spd_parameter(p) else v for p, v in zip(m64.parameters(), dirs, strict=True)]

    def loss(t: float) -> torch.Tensor:
        params = {k: p.detach() + t * v for (k, p), v in zip(m64.named_parameters(), dirs, strict=True)}
        out = torch.func.functional_call(m64, params, (X64,), {"domain": d})
        return out.square().sum()

    m64.zero_grad()
    m64(X64, domain=d).square().sum().backward()
    analytic = sum((p.grad * v).sum() for p, v in zip(m64.parameters(), dirs, strict=True))
    h = 1e-5
    numeric = (loss(h) - loss(-h)) / (2 * h)
    torch.testing.assert_close(analytic, numeric, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("norm", ["liebn_aim", "liebn_lcm", "spddsmbn", "none"])
def test_spdnet_overfits_a_tiny_problem(norm):
    torch.manual_seed(1)
    X, y, d = _spd_data(N=16, seed=3)
    model = SPDNet(6, (4,), 2, norm_layer=norm)
    losses = _train(model, X, y, d, steps=20, lr=0.05)
    assert losses[-1] < 0.6 * losses[0], losses
    for stage in model.stages:
        W = stage.bimap.weight.detach()
        torch.testing.assert_close(W.mT @ W, torch.eye(W.shape[1], dtype=F64), atol=1e-8, rtol=0)


def test_spdnet_arguments_and_input_errors():
    model = SPDNet(5, (3,), 2, norm_layer=functools.partial(LieBatchNorm, metric="lem"),
                   norm_kwargs={"momentum": 0.2})
    assert model.stages[0].norm.metric == "lem" and model.stages[0].norm.momentum == 0.2
    assert isinstance(SPDNet(5, (3,), 2, norm_layer=DomainSPDBatchNorm).stages[0].norm, DomainSPDBatchNorm)
    with pytest.raises(ValueError, match=r"\(N, 5, 5\)"):
        model(random_spd(4, n=4))
    with pytest.raises(ValueError, match="positive definite"):
        model(-random_spd(4, n=5))
    with pytest.raises(ValueError, match="cannot fill a spd slot"):
        SPDNet(5, (3,), 2, norm_layer="batchnorm")
    with pytest.raises(ValueError, match="valid names"):
        SPDNet(5, (3,), 2, norm_layer="no_such_norm")
    with pytest.raises(TypeError, match="momentun"):
        SPDNet(5, (3,), 2, norm_kwargs={"momentun": 0.1})
    with pytest.raises(ValueError, match="must not exceed"):
        SPDNet(5, (6,), 2)


def test_spdnet_state_dict_round_trip_with_domain_norms():
    torch.manual_seed(0)
    X, y, d = _spd_data()
    model = SPDNet(6, (4,), 2, norm_layer="spddsmbn", norm_kwargs={"num_domains": 2})
    _train(model, X, y, d, steps=3)
    clone = SPDNet(6, (4,), 2, norm_layer="spddsmbn", norm_kwargs={"num_domains": 2})
    clone.load_state_dict(model.state_dict())
    model.eval()
    clone.eval()
    torch.testing.assert_close(clone(X, domain=d), model(X, domain=d))


@pytest.mark.parametrize("norm", SPD_NORMS)
def test_tsmnet_forward_backward_with_every_spd_norm(norm):
    torch.manual_seed(0)
    x, y, d = _eeg_data()
    model = TSMNet(5, 2, temporal_filters=2, spatial_filters=6, temporal_kernel=9, spd_dims=(4,), norm_layer=norm)
    logits = model(x, domain=d)
    assert logits.shape == (16, 2) and logits.dtype == torch.float32
    F.cross_entropy(logits, y).backward()
    assert model.temporal.weight.grad is not None and torch.isfinite(model.temporal.weight.grad).all()
    assert model.features(x, domain=d).dtype == F64
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x[perm], domain=d[perm]), model(x, domain=d)[perm], atol=1e-5, rtol=1e-5)
    model.eval()
    _check_eval_model(model, x, d)


def test_tsmnet_trains_and_refits_a_new_domain():
    torch.manual_seed(0)
    x, y, d = _eeg_data(N=16, seed=1)
    model = TSMNet(5, 2, temporal_filters=2, spatial_filters=6, temporal_kernel=9, spd_dims=(4,),
                   norm_kwargs={"num_domains": 3})
    losses = _train(model, x, y, d, steps=20, lr=0.03)
    assert losses[-1] < 0.7 * losses[0], losses
    target, _, _ = _eeg_data(N=10, seed=7)
    target = 3.0 * target  # a shifted domain
    dom = torch.full((10,), 2, dtype=torch.long)
    out = refit_domain_norms(model, target, dom)
    assert model.training
    norm = model.stages[0].norm
    assert not torch.equal(norm.running_mean[2], torch.eye(4, dtype=F64).unsqueeze(0))
    model.eval()
    torch.testing.assert_close(model(target, domain=dom), out)


def test_tsmnet_spd_part_ignores_autocast():
    torch.manual_seed(0)
    x, _, d = _eeg_data(N=6)
    model = TSMNet(5, 2, temporal_filters=2, spatial_filters=6, temporal_kernel=9, spd_dims=(4,),
                   norm_layer="liebn_aim")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = model.features(x, domain=d)
        logits = model(x, domain=d)
    assert f.dtype == F64 and torch.isfinite(f).all() and torch.isfinite(logits.float()).all()
    with pytest.raises(ValueError, match=r"\(N, 5, T\)"):
        model(torch.randn(4, 6, 64))


def test_bimap_in_models_is_the_stiefel_layer():
    model = TSMNet(5, 2, spatial_filters=6, spd_dims=(4, 3), norm_layer="none")
    assert [type(s.bimap) for s in model.stages] == [BiMap, BiMap]
    assert [s.bimap.weight.shape for s in model.stages] == [(6, 4), (4, 3)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("norm", ["liebn_aim", "spddsmbn"])
def test_models_run_on_cuda(norm):
    torch.manual_seed(0)
    x, y, d = _eeg_data()
    model = TSMNet(5, 2, temporal_filters=2, spatial_filters=6, temporal_kernel=9, spd_dims=(4,),
                   norm_layer=norm).cuda()
    x, y, d = x.cuda(), y.cuda(), d.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x, domain=d)
    F.cross_entropy(logits.float(), y).backward()
    assert all(b.is_cuda for b in model.buffers())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    cpu = TSMNet(5, 2, temporal_filters=2, spatial_filters=6, temporal_kernel=9, spd_dims=(4,), norm_layer=norm)
    cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("model", ["spdnet", "tsmnet"])
def test_norm_layer_none_is_the_none_entry(model):
    """``norm_layer=None`` builds the same network as ``norm_layer="none"``: identity norms, equal outputs."""
    def build(spec):
        torch.manual_seed(0)
        if model == "spdnet":
            return SPDNet(8, [6], 3, norm_layer=spec).double()
        return TSMNet(4, 3, spatial_filters=6, spd_dims=(4,), norm_layer=spec)

    a, b = build(None), build("none")
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    assert any(isinstance(m, IdentityNorm) for m in a.modules())
    x = random_spd(5, n=8, seed=1) if model == "spdnet" else torch.randn(5, 4, 64)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["liebn_aim", "dsliebn_aim", None])
def test_spdnet_fused_reeig_logeig_matches_the_layers(norm):
    """The last ReEig + LogEig from one eigendecomposition: the same logits and gradients as the modules."""
    torch.manual_seed(0)
    kw = {"norm_kwargs": {"num_domains": 3}} if norm == "dsliebn_aim" else {}
    fused = SPDNet(8, [6, 4], 3, norm_layer=norm, reeig_threshold=0.05, **kw).double().train()
    plain = copy.deepcopy(fused)
    plain.fuse_reeig_logeig = False
    X, d = random_spd(12, n=8, seed=1), torch.arange(12) % 3
    outs = []
    for m in (fused, plain):
        y = m(X, domain=d)
        y.square().sum().backward()
        outs.append((y.detach(), [p.grad for p in m.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-12)
    for ga, gb in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)
