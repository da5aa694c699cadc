"""EvoNorm-B0/S0 and PowerNorm against their defining formulas written out in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

import manifoldnorm.nn.euclidean.batch_free  # noqa: F401  (registers the layers)
from manifoldnorm.nn import create_norm_layer
from manifoldnorm.nn.euclidean.batch_free import EvoNormB0, EvoNormS0, PowerNorm
from tests.nn.euclidean.twin_helpers import assert_step_matches_twin, float64_twin

F64 = torch.float64


def _rand(*shape: int, seed: int, scale: float = 1.5, shift: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=F64) + shift


def _randomize(layer: torch.nn.Module, seed: int) -> torch.nn.Module:
    with torch.no_grad():
        for i, p in enumerate(layer.parameters()):
            p.copy_(_rand(*p.shape, seed=seed + i, scale=0.7, shift=0.5))
    return layer


def _bc(p: torch.Tensor, ndim: int) -> torch.Tensor:
    return p.reshape(1, -1, *([1] * (ndim - 2)))


def _ref_b0(x, v1, w, b, eps, batch_var=None):
    n, c = x.shape[:2]
    flat = x.transpose(0, 1).reshape(c, -1)
    if batch_var is None:
        mu = flat.sum(1) / flat.shape[1]
        batch_var = ((flat - mu[:, None]) ** 2).sum(1) / flat.shape[1]
    inst = x.reshape(n, c, -1)
    m = inst.sum(-1, keepdim=True) / inst.shape[-1]
    iv = (((inst - m) ** 2).sum(-1) / inst.shape[-1]).reshape(n, c, *([1] * (x.ndim - 2)))
    left = _bc(torch.sqrt(batch_var + eps), x.ndim).expand_as(x)
    right = _bc(v1, x.ndim) * x + torch.sqrt(iv + eps)
    den = torch.where(left > right, left, right)
    return x / den * _bc(w, x.ndim) + _bc(b, x.ndim)


def _ref_s0(x, v1, w, b, eps, groups):
    n, c = x.shape[:2]
    out = torch.empty_like(x)
    size = c // groups
    for k in range(n):
        for g in range(groups):
            block = x[k, g * size:(g + 1) * size]
            var = ((block - block.mean()) ** 2).mean()
            vv = v1[g * size:(g + 1) * size].reshape(-1, *([1] * (x.ndim - 2)))
            ww = w[g * size:(g + 1) * size].reshape(vv.shape)
            bb = b[g * size:(g + 1) * size].reshape(vv.shape)
            out[k, g * size:(g + 1) * size] = block / (1 + torch.exp(-vv * block)) / torch.sqrt(var + eps) * ww + bb
    return out


# ----------------------------------------------------------------------------------------------- EvoNorm-B0


@pytest.mark.parametrize("shape", [(5, 4, 3, 2), (6, 4, 7), (8, 4)])
def test_b0_train_formula_and_running_update(shape) -> None:
    layer = _randomize(EvoNormB0(4, momentum=0.2, dtype=F64), 10).train()
    x = _rand(*shape, seed=1)
    y = layer(x)
    torch.testing.assert_close(y, _ref_b0(x, layer.v1, layer.weight, layer.bias, 1e-5), rtol=1e-12, atol=1e-12)
    flat = x.transpose(0, 1).reshape(4, -1)
    cnt = flat.shape[1]
    unbiased = ((flat - flat.mean(1, keepdim=True)) ** 2).sum(1) / (cnt - 1)
    torch.testing.assert_close(layer.running_var, 0.8 * torch.ones(4, dtype=F64) + 0.2 * unbiased)
    assert int(layer.num_batches_tracked) == 1


def test_b0_two_dim_input_uses_sqrt_eps_instance_term() -> None:
    layer = _randomize(EvoNormB0(4, eps=1e-3, dtype=F64), 3).train()
    x = _rand(8, 4, seed=2)
    bv = x.var(0, unbiased=False)
    den = torch.maximum(torch.sqrt(bv + 1e-3).expand_as(x), layer.v1 * x + 1e-3 ** 0.5)
    torch.testing.assert_close(layer(x), x / den * layer.weight + layer.bias)


def test_b0_eval_uses_running_variance() -> None:
    layer = _randomize(EvoNormB0(4, dtype=F64), 20)
    with torch.no_grad():
        layer.running_var.copy_(_rand(4, seed=5).abs() + 0.1)
    before = layer.running_var.clone()
    x = _rand(3, 4, 5, seed=6)
    y = layer.eval()(x)
    torch.testing.assert_close(y, _ref_b0(x, layer.v1, layer.weight, layer.bias, 1e-5, batch_var=before))
    torch.testing.assert_close(layer.running_var, before, rtol=0, atol=0)
    assert not torch.allclose(y, layer.train()(x))


@pytest.mark.parametrize("train", [True, False])
def test_b0_gradcheck(train: bool) -> None:
    layer = _randomize(EvoNormB0(3, dtype=F64), 30).train(train)
    with torch.no_grad():
        layer.running_var.fill_(0.7)
    x = _rand(4, 3, 2, 2, seed=7).requires_grad_()
    params = {k: v.detach().clone().requires_grad_() for k, v in layer.named_parameters()}

    def f(x, v1, w, b):
        return functional_call(layer, {"v1": v1, "weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, params["v1"], params["weight"], params["bias"]))


def test_b0_single_value_per_channel_in_training_raises() -> None:
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        EvoNormB0(4).train()(torch.randn(1, 4))
    EvoNormB0(4).eval()(torch.randn(1, 4))


# ----------------------------------------------------------------------------------------------- EvoNorm-S0


@pytest.mark.parametrize(("c", "groups", "shape"), [(4, 2, (3, 4, 3, 2)), (8, 4, (5, 8)), (6, 32, (2, 6, 5))])
def test_s0_formula_and_train_equals_eval(c, groups, shape) -> None:
    layer = _randomize(EvoNormS0(c, groups=groups, dtype=F64), 40)
    assert layer.groups == min(groups, c)
    x = _rand(*shape, seed=8)
    y = layer.train()(x)
    ref = _ref_s0(x, layer.v1.detach(), layer.weight.detach(), layer.bias.detach(), 1e-5, layer.groups)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.eval()(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("train", [True, False])
def test_s0_gradcheck(train: bool) -> None:
    layer = _randomize(EvoNormS0(4, groups=2, dtype=F64), 50).train(train)
    x = _rand(2, 4, 3, seed=9).requires_grad_()
    params = {k: v.detach().clone().requires_grad_() for k, v in layer.named_parameters()}

    def f(x, v1, w, b):
        return functional_call(layer, {"v1": v1, "weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, params["v1"], params["weight"], params["bias"]))


def test_s0_bad_groups_and_singleton_groups() -> None:
    with pytest.raises(ValueError, match="must divide"):
        EvoNormS0(6, groups=4)
    with pytest.raises(ValueError, match="groups"):
        EvoNormS0(4, groups=0)
    with pytest.raises(ValueError, match="1 value per sample"):
        EvoNormS0(4, groups=4)(torch.randn(3, 4))


# ----------------------------------------------------------------------------------------------- PowerNorm


def _power(seed: int, **kw) -> PowerNorm:
    layer = _randomize(PowerNorm(4, dtype=F64, **kw), seed)
    with torch.no_grad():
        layer.running_phi.copy_(_rand(4, seed=seed + 99).abs() + 0.2)
    return layer


def test_powernorm_forward_uses_pre_update_running_value() -> None:
    layer = _power(60, alpha=0.8).train()
    psi2 = layer.running_phi.clone()
    for seed in (1, 2):
        x = _rand(3, 5, 4, seed=seed)
        y = layer(x)
        torch.testing.assert_close(y, x / torch.sqrt(psi2 + 1e-5) * layer.weight + layer.bias)
        batch = (x ** 2).sum((0, 1)) / 15
        psi2 = 0.8 * psi2 + 0.2 * batch
        torch.testing.assert_close(layer.running_phi, psi2)
    assert int(layer.num_batches_tracked) == 2


def test_powernorm_warmup_uses_batch_quadratic_mean() -> None:
    layer = _power(61, warmup_iters=1).train()
    psi2 = layer.running_phi.clone()
    x = _rand(6, 4, seed=3)
    batch = (x ** 2).mean(0)
    torch.testing.assert_close(layer(x), x / torch.sqrt(batch + 1e-5) * layer.weight + layer.bias)
    psi2 = 0.9 * psi2 + 0.1 * batch
    torch.testing.assert_close(layer.running_phi, psi2)
    x2 = _rand(6, 4, seed=4)
    torch.testing.assert_close(layer(x2), x2 / torch.sqrt(psi2 + 1e-5) * layer.weight + layer.bias)


def test_powernorm_eval_uses_running_value_without_update() -> None:
    layer = _power(62).eval()
    psi2 = layer.running_phi.clone()
    x = _rand(2, 3, 4, seed=5)
    torch.testing.assert_close(layer(x), x / torch.sqrt(psi2 + 1e-5) * layer.weight + layer.bias)
    torch.testing.assert_close(layer.running_phi, psi2, rtol=0, atol=0)
    assert int(layer.num_batches_tracked) == 0


def test_powernorm_approximate_backward_and_nu_update() -> None:
    layer = _power(63, alpha=0.7).train()
    nu0 = _rand(4, seed=11, scale=0.3)
    with torch.no_grad():
        layer.running_grad.copy_(nu0)
    psi2 = layer.running_phi.clone()
    x = _rand(3, 5, 4, seed=12).requires_grad_()
    up = _rand(3, 5, 4, seed=13)
    (layer(x) * up).sum().backward()
    s = torch.sqrt(psi2 + 1e-5)
    x_hat = x.detach() / s
    g = layer.weight.detach() * up
    g_tilde = g - nu0 * x_hat
    torch.testing.assert_close(x.grad, g_tilde / s)
    gam = (x_hat * g_tilde).sum((0, 1)) / 15
    torch.testing.assert_close(layer.running_grad, nu0 + 0.3 * gam)
    # the same update written with Gamma = mean(x_hat^2) and Lambda = mean(x_hat * g)
    big_gamma, lam = (x_hat ** 2).sum((0, 1)) / 15, (x_hat * g).sum((0, 1)) / 15
    torch.testing.assert_close(layer.running_grad, nu0 * (1 - 0.3 * big_gamma) + 0.3 * lam)
    torch.testing.assert_close(layer.weight.grad, (up * x_hat).sum((0, 1)))
    torch.testing.assert_close(layer.bias.grad, up.sum((0, 1)))


def test_powernorm_backward_matches_the_authors_ema_gz_recursion_over_three_steps() -> None:
    # mask_powernorm.py keeps ema_gz = nu / (1 - abkw): approx = g - (1 - abkw) * ema_gz * z,
    # ema_gz += mean(approx * z); its forward (after warmup) divides by sqrt(running_phi + eps) before the update
    layer = _power(66, alpha=0.8, alpha_bkw=0.6).train()
    a_f, a_b = 0.8, 0.6
    ema_gz = _rand(4, seed=67, scale=0.5)
    with torch.no_grad():
        layer.running_grad.copy_((1 - a_b) * ema_gz)
    phi = layer.running_phi.clone()
    w = layer.weight.detach()
    for step in range(3):
        x = _rand(2, 3, 4, seed=70 + step).requires_grad_()
        up = _rand(2, 3, 4, seed=80 + step)
        layer.zero_grad()
        (layer(x) * up).sum().backward()
        z = x.detach() / torch.sqrt(phi + 1e-5)
        approx = up * w - (1 - a_b) * ema_gz * z
        ema_gz = ema_gz + (approx * z).sum((0, 1)) / 6
        torch.testing.assert_close(x.grad, approx / torch.sqrt(phi + 1e-5))
        torch.testing.assert_close(layer.running_grad, (1 - a_b) * ema_gz)
        phi = a_f * phi + (1 - a_f) * (x.detach() ** 2).sum((0, 1)) / 6
        torch.testing.assert_close(layer.running_phi, phi)


def test_powernorm_backward_is_homogeneous_in_the_gradient() -> None:
    # scaling the incoming gradient and the state nu by c scales the input gradient and the new nu by c
    c = 7.0
    results = []
    for factor in (1.0, c):
        layer = _power(68, alpha=0.5).train()
        with torch.no_grad():
            layer.running_grad.copy_(factor * _rand(4, seed=69, scale=0.5))
        x = _rand(3, 4, seed=90).requires_grad_()
        (layer(x) * (factor * _rand(3, 4, seed=91))).sum().backward()
        results.append((x.grad, layer.running_grad.clone()))
    torch.testing.assert_close(results[1][0], c * results[0][0])
    torch.testing.assert_close(results[1][1], c * results[0][1])


def test_powernorm_approximate_backward_with_zero_nu_is_the_fixed_psi_gradient() -> None:
    approx, exact = _power(64).train(), _power(64, approx_backward=False).train()
    x = _rand(4, 4, seed=14)
    xa, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    up = _rand(4, 4, seed=15)
    (approx(xa) * up).sum().backward()
    (exact(xe) * up).sum().backward()
    torch.testing.assert_close(xa.grad, xe.grad)
    assert not torch.equal(approx.running_grad, torch.zeros(4, dtype=F64))


@pytest.mark.parametrize("train", [True, False])
def test_powernorm_gradcheck_exact_paths(train: bool) -> None:
    # alpha = 1 keeps psi^2 fixed across the repeated training forwards of gradcheck
    layer = _power(65, alpha=1.0, approx_backward=False, warmup_iters=10**6 if train else 0).train(train)
    x = _rand(3, 2, 4, seed=16).requires_grad_()
    params = {k: v.detach().clone().requires_grad_() for k, v in layer.named_parameters()}

    def f(x, w, b):
        return functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, params["weight"], params["bias"]))
    layer.warmup_iters = 0
    assert torch.autograd.gradcheck(f, (x, params["weight"], params["bias"]))


# ----------------------------------------------------------------------------------------------- common


LAYERS = {
    "evonorm_b0": (EvoNormB0, (6, 4, 3)),
    "evonorm_s0": (EvoNormS0, (6, 4, 3)),
    "powernorm": (PowerNorm, (6, 3, 4)),
}


@pytest.mark.parametrize("key", sorted(LAYERS))
def test_registry_key_resolves(key: str) -> None:
    cls, _ = LAYERS[key]
    layer = create_norm_layer(key, 4, eps=1e-4)
    assert isinstance(layer, cls) and layer.num_features == 4 and layer.eps == 1e-4


@pytest.mark.parametrize("key", sorted(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_shape_dtype_and_finite_backward(key: str, dtype: torch.dtype) -> None:
    cls, shape = LAYERS[key]
    layer = cls(4).train()
    twin = float64_twin(layer)
    x = _rand(*shape, seed=17).to(dtype).requires_grad_()
    y = layer(x)
    assert y.shape == x.shape and y.dtype == dtype
    (y * _rand(*shape, seed=18).to(dtype)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    # the step computes in the promoted dtype: it matches the float64 step up to the round-off of the input dtype
    assert_step_matches_twin(layer, twin, x, y, _rand(*shape, seed=18).to(dtype))
    assert layer.eval()(x).dtype == dtype


@pytest.mark.parametrize("key", sorted(LAYERS))
def test_state_dict_round_trip(key: str) -> None:
    cls, shape = LAYERS[key]
    layer = _randomize(cls(4, dtype=F64), 70).train()
    for seed in range(3):
        x = _rand(*shape, seed=seed).requires_grad_()
        layer(x).sum().backward()
    fresh = cls(4, dtype=F64)
    fresh.load_state_dict(copy.deepcopy(layer.state_dict()))
    for name, t in layer.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], t, rtol=0, atol=0)
    x = _rand(*shape, seed=9)
    torch.testing.assert_close(fresh.eval()(x), layer.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("key", sorted(LAYERS))
def test_bad_inputs_raise(key: str) -> None:
    cls, shape = LAYERS[key]
    layer = cls(4)
    wrong = list(shape)
    wrong[-1 if key == "powernorm" else 1] = 5
    with pytest.raises(ValueError, match="4"):
        layer(torch.randn(*wrong))
    with pytest.raises(ValueError):
        layer(torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(*shape, dtype=torch.long))
    with pytest.raises(ValueError, match="eps"):
        cls(4, eps=0.0)
    with pytest.raises(TypeError):
        cls(4.0)


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="momentum"):
        EvoNormB0(4, momentum=1.5)
    with pytest.raises(ValueError, match="alpha"):
        PowerNorm(4, alpha=-0.1)
    with pytest.raises(ValueError, match="alpha_bkw"):
        PowerNorm(4, alpha_bkw=1.5)
    with pytest.raises(ValueError, match="warmup_iters"):
        PowerNorm(4, warmup_iters=-1)
