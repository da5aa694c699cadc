"""Contract every registered norm layer must meet (the test matrix is the registry)."""

from __future__ import annotations

import copy
import inspect

import geoopt
import pytest
import torch
from conftest import concentrated_spd, random_spd

from manifoldnorm.nn import create_norm_layer, get_norm_info, get_norm_layer, list_norms, refit_domain_norms
from tests.nn.nn_helpers import F64, input_grad_norm

SPD_NORMS = [k for k in list_norms() if "spd" in get_norm_info(k).inputs]
NORMALIZING = [k for k in SPD_NORMS if k != "none"]
N_MAT = 4


def _domains(N):
    return torch.arange(N) % 2


def _accepts(name, arg):
    return arg in inspect.signature(get_norm_layer(name)).parameters


def test_registry_has_the_required_keys():
    required = {"liebn_aim", "liebn_lem", "liebn_lcm", "spdbn", "spdmbn", "spddsmbn", "none"}
    assert required <= set(list_norms())
    assert {"liebn_aim", "liebn_lem", "liebn_lcm", "liebn_crim"} <= set(list_norms("lie"))
    assert {"spdbn", "spdmbn", "spddsmbn"} <= set(list_norms("spd"))
    assert get_norm_info("spddsmbn").domain_aware and not get_norm_info("liebn_aim").domain_aware


@pytest.mark.parametrize("name", SPD_NORMS)
@pytest.mark.parametrize("shape", [(6,), (6, 1)])
def test_forward_shape_dtype_and_domain_argument(name, shape):
    layer = create_norm_layer(name, N_MAT)
    fresh = copy.deepcopy(layer)  # untrained twin: every comparison below starts from the same state
    X = random_spd(*shape, n=N_MAT, seed=1)
    d = _domains(6)
    Y = layer(X, domain=d)
    assert Y.shape == X.shape and Y.dtype == F64 and torch.isfinite(Y).all()
    if name == "none":
        assert Y is X
        assert layer.eval()(X, domain=d) is X
        return
    # outputs are SPD
    torch.testing.assert_close(Y, Y.mT, atol=1e-12, rtol=0)
    assert float(torch.linalg.eigvalsh(Y).min()) > 0
    # (N, n, n) is the one-channel case of (N, C, n, n)
    other = X.unsqueeze(1) if len(shape) == 1 else X.squeeze(1)
    Y_other = copy.deepcopy(fresh)(other, domain=d)
    torch.testing.assert_close(Y_other.reshape(Y.shape), Y, atol=1e-12, rtol=1e-12)
    # training is equivariant to a permutation of the batch (the statistics are symmetric in the samples)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(copy.deepcopy(fresh)(X[perm], domain=d[perm]), Y[perm], atol=1e-10, rtol=1e-10)
    # the domain argument: ignored by single-domain layers; a domain-aware layer normalizes each domain alone
    if get_norm_info(name).domain_aware:
        for k in (0, 1):
            rows = d == k
            alone = copy.deepcopy(fresh)(X[rows], domain=d[rows])
            torch.testing.assert_close(Y[rows], alone, atol=1e-12, rtol=1e-12)
    else:
        torch.testing.assert_close(copy.deepcopy(fresh)(X), Y, atol=0, rtol=0)
    # evaluation with the statistics training normalized with (train_* copied into running_*) gives the
    # training output, per domain
    ev = copy.deepcopy(layer)
    with torch.no_grad():
        for k, b in ev.named_buffers():
            if k.startswith("train_"):
                getattr(ev, "running_" + k.removeprefix("train_")).copy_(b)
    torch.testing.assert_close(ev.eval()(X, domain=d), Y, atol=1e-10, rtol=1e-10)
    Y2 = layer.eval()(X, domain=d)
    assert Y2.shape == X.shape
    # test-time refit: the refit output is what evaluation with the refitted statistics returns
    refit = copy.deepcopy(fresh)
    out = refit_domain_norms(refit, X, d)
    torch.testing.assert_close(refit.eval()(X, domain=d), out, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", NORMALIZING)
def test_running_statistics_are_buffers_that_survive_state_dict(name):
    layer = create_norm_layer(name, N_MAT)
    buffers = dict(layer.named_buffers())
    assert any(k.startswith("running_") for k in buffers)
    assert set(buffers) <= set(layer.state_dict())
    before = {k: v.clone() for k, v in buffers.items()}
    for seed in range(3):
        layer(concentrated_spd(8, N_MAT, sigma=0.4, seed=seed), domain=_domains(8))
    assert any(not torch.equal(before[k], v) for k, v in layer.named_buffers())
    fresh = create_norm_layer(name, N_MAT)
    fresh.load_state_dict(copy.deepcopy(layer.state_dict()))
    X = random_spd(5, n=N_MAT, seed=7)
    layer.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(X, domain=_domains(5)), layer(X, domain=_domains(5)))


@pytest.mark.parametrize("name", NORMALIZING)
def test_to_float32_keeps_geometry_and_runs(name):
    layer = create_norm_layer(name, N_MAT).to(torch.float32)
    assert all(b.dtype == torch.float32 for b in layer.buffers())
    spd_params = [p for p in layer.parameters() if isinstance(p, geoopt.ManifoldParameter)]
    assert spd_params and all(isinstance(p.manifold, geoopt.SymmetricPositiveDefinite) for p in spd_params)
    X = concentrated_spd(8, N_MAT, sigma=0.4, seed=2).float().requires_grad_(True)
    Y = layer(X, domain=_domains(8))
    assert Y.dtype == torch.float32 and torch.isfinite(Y).all()
    Y.sum().backward()
    assert torch.isfinite(X.grad).all()
    ref = create_norm_layer(name, N_MAT)
    torch.testing.assert_close(Y.detach().double(), ref(X.detach().double(), domain=_domains(8)),
                               atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", NORMALIZING)
def test_bad_inputs_raise_clear_errors(name):
    layer = create_norm_layer(name, N_MAT)
    good = random_spd(4, n=N_MAT, seed=0)
    with pytest.raises(ValueError, match="shape"):
        layer(random_spd(4, n=N_MAT + 1))
    with pytest.raises(ValueError, match="shape"):
        layer(good[0])
    bad = good.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer(bad)
    neg = good.clone()
    neg[2] = -neg[2]
    with pytest.raises(ValueError, match="positive definite"):
        layer(neg)
    asym = good.clone()
    asym[0, 0, 1] += 1.0
    with pytest.raises(ValueError, match="symmetric"):
        layer(asym)
    with pytest.raises(TypeError, match="floating"):
        layer(good.long())
    with pytest.raises(ValueError, match="channels"):
        layer(random_spd(4, 3, n=N_MAT))


@pytest.mark.parametrize("name", NORMALIZING)
def test_degenerate_batches_keep_gradients_bounded(name):
    X = concentrated_spd(8, N_MAT, sigma=0.4, seed=3)
    g_batch, _ = input_grad_norm(create_norm_layer(name, N_MAT), X)
    g_one, Y1 = input_grad_norm(create_norm_layer(name, N_MAT), X[:1])
    g_same, Ys = input_grad_norm(create_norm_layer(name, N_MAT), X[:1].expand(6, N_MAT, N_MAT))
    assert torch.isfinite(Y1).all() and torch.isfinite(Ys).all()
    assert g_one < 3.0 * g_batch and g_same < 3.0 * g_batch


@pytest.mark.parametrize("name", [k for k in NORMALIZING if _accepts(k, "channels")])
def test_multichannel_input(name):
    layer = create_norm_layer(name, 3, channels=2)
    spd_params = {k for k, p in layer.named_parameters() if isinstance(p, geoopt.ManifoldParameter)}
    with torch.no_grad():  # different parameters per channel
        for k, p in layer.named_parameters():
            for c in range(2):
                p[c] = random_spd(n=3, seed=20 + c, cond=2.0) if k in spd_params else 0.7 + 0.4 * c
    X = torch.stack([concentrated_spd(5, 3, seed=1), concentrated_spd(5, 3, seed=2)], dim=1)
    Y = layer(X, domain=_domains(5))
    assert Y.shape == (5, 2, 3, 3)
    assert layer.weight.shape == (2, 3, 3)
    # channels are independent: channel c is a one-channel layer with channel c's parameters
    for c in range(2):
        single = create_norm_layer(name, 3)
        with torch.no_grad():
            for k, p in single.named_parameters():
                p.copy_(dict(layer.named_parameters())[k][c:c + 1])
        torch.testing.assert_close(Y[:, c], single(X[:, c], domain=_domains(5)), atol=1e-12, rtol=1e-12)
        for k, b in single.named_buffers():
            dim = -3 if b.dim() >= 3 else -1  # (..., C, n, n) matrices or (..., C) scalars
            torch.testing.assert_close(dict(layer.named_buffers())[k].select(dim, c), b.select(dim, 0),
                                       atol=1e-12, rtol=1e-12, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("name", NORMALIZING)
def test_parameters_learn_under_riemannian_adam(name):
    torch.manual_seed(0)
    layer = create_norm_layer(name, 3)
    X = concentrated_spd(8, 3, sigma=0.3, seed=4)
    target = random_spd(n=3, seed=5, cond=4.0)
    opt = geoopt.optim.RiemannianAdam(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = (layer(X, domain=_domains(8)) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    W = layer.weight.detach()
    assert torch.linalg.eigvalsh(W).min() > 0 and torch.allclose(W, W.mT)


def test_identity_norm_passes_through():
    layer = create_norm_layer("none", 5)
    X = random_spd(3, n=5)
    assert layer(X, domain=torch.zeros(3, dtype=torch.long)) is X
