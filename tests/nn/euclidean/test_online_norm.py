"""OnlineNorm against its defining recursions (forward statistics, control-process backward) in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

import manifoldnorm.nn.euclidean.online_norm  # noqa: F401  (registers the layer)
from manifoldnorm.nn import create_norm_layer
from manifoldnorm.nn.euclidean.online_norm import OnlineNorm
from tests.nn.euclidean.twin_helpers import assert_step_matches_twin, float64_twin

F64 = torch.float64
EPS = 1e-5


def _rand(*shape: int, seed: int, scale: float = 1.5, shift: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=F64) + shift


def _layer(seed: int, **kw) -> OnlineNorm:
    layer = OnlineNorm(4, dtype=F64, **kw)
    with torch.no_grad():
        layer.weight.copy_(_rand(4, seed=seed, scale=0.5, shift=1.0))
        layer.bias.copy_(_rand(4, seed=seed + 1, scale=0.5, shift=0.0))
        layer.running_mean.copy_(_rand(4, seed=seed + 2, scale=0.5))
        layer.running_var.copy_(_rand(4, seed=seed + 3).abs() + 0.3)
    return layer


def _bc(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (ndim - 2)))


def _channel_values(x: torch.Tensor, c: int) -> torch.Tensor:
    return x[:, c].reshape(-1)


def _batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, variances = [], []
    for c in range(x.shape[1]):
        v = _channel_values(x, c)
        m = v.sum() / v.numel()
        means.append(m)
        variances.append(((v - m) ** 2).sum() / v.numel())
    return torch.stack(means), torch.stack(variances)


def _layer_scale(z: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(z)
    for i in range(z.shape[0]):
        out[i] = z[i] / torch.sqrt((z[i] ** 2).sum() / z[i].numel() + EPS)
    return out


class _Reference:
    """The recursions of Eqs. (8a)-(8c), (11a)-(11b), (12a)-(12b), one step per batch, written out."""

    def __init__(self, mu, var, a_f, a_b, err_y=None, err_1=None):
        self.mu, self.var, self.a_f, self.a_b = mu.clone(), var.clone(), a_f, a_b
        self.err_y = torch.zeros_like(mu) if err_y is None else err_y.clone()
        self.err_1 = torch.zeros_like(mu) if err_1 is None else err_1.clone()

    def forward(self, x):
        s = torch.sqrt(self.var + EPS)
        y = (x - _bc(self.mu, x.ndim)) / _bc(s, x.ndim)
        m, v = _batch_stats(x)
        a = self.a_f
        self.var = a * self.var + (1 - a) * v + a * (1 - a) * (m - self.mu) ** 2
        self.mu = a * self.mu + (1 - a) * m
        return y, s

    def backward(self, g, y, s):
        c = 1 - self.a_b
        n = g.numel() // g.shape[1]
        xt = g - c * _bc(self.err_y, g.ndim) * y
        gx = xt / _bc(s, g.ndim) - c * _bc(self.err_1, g.ndim)
        self.err_y = self.err_y + torch.stack([(_channel_values(xt * y, k)).sum() / n for k in range(g.shape[1])])
        self.err_1 = self.err_1 + torch.stack([_channel_values(gx, k).sum() / n for k in range(g.shape[1])])
        return gx


BATCHES = [(5, 4, 3, 2), (2, 4, 3), (1, 4, 5)]


def test_forward_and_running_recursions_over_three_batches() -> None:
    layer = _layer(10, alpha_fwd=0.7, layer_scaling=False).train()
    ref = _Reference(layer.running_mean, layer.running_var, 0.7, 0.99)
    w, b = layer.weight.detach(), layer.bias.detach()
    for seed, shape in enumerate(BATCHES):
        x = _rand(*shape, seed=seed)
        y_ref, _ = ref.forward(x)
        torch.testing.assert_close(layer(x), y_ref * _bc(w, x.ndim) + _bc(b, x.ndim), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_mean, ref.mu, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, ref.var, rtol=1e-12, atol=1e-12)
    assert int(layer.num_batches_tracked) == 3
    # alpha_fwd = 0 keeps only the last batch: mean and biased variance of that batch
    last = OnlineNorm(4, alpha_fwd=0.0, dtype=F64).train()
    x = _rand(6, 4, 3, seed=7)
    last(x)
    torch.testing.assert_close(last.running_mean, x.mean((0, 2)))
    torch.testing.assert_close(last.running_var, x.var((0, 2), unbiased=False))


def test_layer_scaling_formula() -> None:
    layer = _layer(20, alpha_fwd=0.8).train()
    mu, var = layer.running_mean.clone(), layer.running_var.clone()
    x = _rand(3, 4, 2, 2, seed=3)
    z = (x - _bc(mu, 4)) / _bc(torch.sqrt(var + EPS), 4) * _bc(layer.weight.detach(), 4) + _bc(layer.bias.detach(), 4)
    torch.testing.assert_close(layer(x), _layer_scale(z), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer_scaling", [True, False])
def test_training_forward_equals_eval_forward_before_the_step(layer_scaling: bool) -> None:
    layer = _layer(30, layer_scaling=layer_scaling)
    x = _rand(4, 4, 3, seed=4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y_eval = layer.eval()(x)
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    y_train = layer.train()(x)
    torch.testing.assert_close(y_train, y_eval, rtol=0, atol=0)
    assert not torch.allclose(layer.running_var, before["running_var"])
    assert not torch.allclose(layer.eval()(x), y_eval)


def test_control_backward_matches_written_out_recursion_over_three_batches() -> None:
    layer = _layer(40, alpha_fwd=0.8, alpha_bkw=0.6, layer_scaling=False).train()
    with torch.no_grad():
        layer.err_y.copy_(_rand(4, seed=41, scale=0.4))
        layer.err_1.copy_(_rand(4, seed=42, scale=0.4))
    ref = _Reference(layer.running_mean, layer.running_var, 0.8, 0.6, layer.err_y, layer.err_1)
    w = layer.weight.detach()
    for seed, shape in enumerate(BATCHES):
        x = _rand(*shape, seed=seed + 50).requires_grad_()
        up = _rand(*shape, seed=seed + 60)
        layer.zero_grad()
        (layer(x) * up).sum().backward()
        y_ref, s = ref.forward(x.detach())
        gx = ref.backward(up * _bc(w, x.ndim), y_ref, s)
        torch.testing.assert_close(x.grad, gx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.err_y, ref.err_y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.err_1, ref.err_1, rtol=1e-12, atol=1e-12)
        dims = (0, *range(2, x.ndim))
        torch.testing.assert_close(layer.weight.grad, (up * y_ref).sum(dims))
        torch.testing.assert_close(layer.bias.grad, up.sum(dims))


def test_control_backward_through_layer_scaling() -> None:
    layer = _layer(70, alpha_bkw=0.5).train()
    with torch.no_grad():
        layer.err_y.copy_(_rand(4, seed=71, scale=0.4))
        layer.err_1.copy_(_rand(4, seed=72, scale=0.4))
    ref = _Reference(layer.running_mean, layer.running_var, 0.999, 0.5, layer.err_y, layer.err_1)
    x = _rand(3, 4, 5, seed=73).requires_grad_()
    up = _rand(3, 4, 5, seed=74)
    (layer(x) * up).sum().backward()
    y_ref, s = ref.forward(x.detach())
    y_leaf = y_ref.clone().requires_grad_()
    z = y_leaf * _bc(layer.weight.detach(), 3) + _bc(layer.bias.detach(), 3)
    (g,) = torch.autograd.grad((_layer_scale(z) * up).sum(), y_leaf)
    torch.testing.assert_close(x.grad, ref.backward(g, y_ref, s), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.err_y, ref.err_y, rtol=1e-12, atol=1e-12)


def test_control_backward_differs_from_plain_gradient_only_through_the_error_state() -> None:
    approx = _layer(80, layer_scaling=False, alpha_bkw=0.5).train()
    plain = _layer(80, layer_scaling=False, alpha_bkw=0.5, approx_backward=False).train()
    grads = []
    for step in range(2):
        x = _rand(4, 4, 3, seed=81 + step)
        up = _rand(4, 4, 3, seed=91 + step)
        xa, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        (approx(xa) * up).sum().backward()
        (plain(xp) * up).sum().backward()
        grads.append((xa.grad, xp.grad))
    torch.testing.assert_close(grads[0][0], grads[0][1], rtol=1e-12, atol=1e-12)  # zero error state at step 1
    assert not torch.allclose(grads[1][0], grads[1][1])
    torch.testing.assert_close(plain.err_y, torch.zeros(4, dtype=F64), rtol=0, atol=0)
    assert not torch.equal(approx.err_1, torch.zeros(4, dtype=F64))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("layer_scaling", [True, False])
def test_plain_backward_gradcheck(train: bool, layer_scaling: bool) -> None:
    base = _layer(100, approx_backward=False, layer_scaling=layer_scaling).train(train)
    x = _rand(3, 4, 2, seed=101).requires_grad_()
    w, b = (p.detach().clone().requires_grad_() for p in (base.weight, base.bias))

    def f(x, w, b):  # a fresh copy per call: the forward of a training layer advances its statistics
        return functional_call(copy.deepcopy(base), {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_batch_size_one_trains() -> None:
    layer = OnlineNorm(4, dtype=F64).train()
    for seed in range(3):
        x = _rand(1, 4, seed=seed).requires_grad_()
        layer(x).sum().backward()
        assert torch.isfinite(x.grad).all()
    assert int(layer.num_batches_tracked) == 3


def test_registry_key_resolves() -> None:
    layer = create_norm_layer("onlinenorm", 4, alpha_fwd=0.9, eps=1e-4)
    assert isinstance(layer, OnlineNorm) and layer.num_features == 4
    assert layer.alpha_fwd == 0.9 and layer.eps == 1e-4 and OnlineNorm.feature_dim == 1


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_shape_dtype_and_finite_backward(dtype: torch.dtype) -> None:
    layer = OnlineNorm(4).to(dtype).train()
    with torch.no_grad():  # statistics and control buffers away from their initial values
        for i, b in enumerate((layer.running_mean, layer.running_var, layer.err_y, layer.err_1)):
            b.copy_(_rand(4, seed=112 + i, scale=0.3, shift=1.0 if i == 1 else 0.0))
    twin = float64_twin(layer)
    x = _rand(6, 4, 4, seed=110).to(dtype).requires_grad_()
    y = layer(x)
    assert y.shape == x.shape and y.dtype == dtype
    (y * _rand(6, 4, 4, seed=111).to(dtype)).sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())
    # forward, control-process backward and every buffer update match the float64 step
    assert_step_matches_twin(layer, twin, x, y, _rand(6, 4, 4, seed=111).to(dtype))
    assert layer.eval()(x).dtype == dtype


def test_state_dict_round_trip() -> None:
    layer = _layer(120).train()
    for seed in range(3):
        x = _rand(5, 4, 3, seed=seed).requires_grad_()
        layer(x).sum().backward()
    assert set(layer.state_dict()) >= {"running_mean", "running_var", "err_y", "err_1", "num_batches_tracked"}
    fresh = OnlineNorm(4, dtype=F64)
    fresh.load_state_dict(copy.deepcopy(layer.state_dict()))
    x = _rand(5, 4, 3, seed=9)
    torch.testing.assert_close(fresh.eval()(x), layer.eval()(x), rtol=0, atol=0)


def test_bad_inputs_and_options_raise() -> None:
    layer = OnlineNorm(4)
    with pytest.raises(ValueError, match="4 channels"):
        layer(torch.randn(3, 5, 2))
    with pytest.raises(ValueError, match="2-d|1-d"):
        layer(torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        layer.train()(torch.randn(0, 4))
    with pytest.raises(ValueError, match="alpha_fwd"):
        OnlineNorm(4, alpha_fwd=1.5)
    with pytest.raises(ValueError, match="alpha_bkw"):
        OnlineNorm(4, alpha_bkw=-0.1)
    with pytest.raises(ValueError, match="eps"):
        OnlineNorm(4, eps=0.0)
    with pytest.raises(TypeError):
        OnlineNorm(4.0)
