"""Per-token norms over the last dimension: formulas in float64, gradients, contract properties, registry keys."""

from __future__ import annotations

import math

import pytest
import scipy.special
import torch
from torch import nn
from torch.func import functional_call

import manifoldnorm.nn.euclidean.pointwise as pw
from manifoldnorm.nn import create_norm_layer, get_norm_info
from tests.nn.euclidean.twin_helpers import assert_step_matches_twin, float64_twin

F64 = torch.float64
C = 5
KEYS = {"layernorm": pw.LayerNorm, "rmsnorm": pw.RMSNorm, "crmsnorm": pw.CRMSNorm, "qknorm": pw.QKNorm,
        "dyt": pw.DyT, "derf": pw.Derf, "ngpt_norm": pw.HypersphereNorm}


def _x(*shape: int, dtype: torch.dtype = F64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * 2.0 + 0.3).to(dtype)


def _randomize(layer: nn.Module, seed: int = 1) -> nn.Module:
    """Move every parameter away from its initial value so the formulas are tested with non-trivial weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype))
    return layer


def _make(key: str, n: int = C, dtype: torch.dtype = F64) -> nn.Module:
    return _randomize(KEYS[key](n, dtype=dtype))


# ---- reference formulas, written from the papers ----------------------------------------------------------------

def ref_layernorm(x, w, b, eps):
    mu = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mu) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_rms(x, w, eps):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * w


def test_layernorm_formula():
    layer = _make("layernorm")
    x = _x(3, 4, C)
    torch.testing.assert_close(layer(x), ref_layernorm(x, layer.weight, layer.bias, 1e-5), rtol=1e-12, atol=1e-12)


def test_rmsnorm_formula_and_qknorm():
    x = _x(3, 4, C)
    for key in ("rmsnorm", "qknorm"):
        layer = _make(key)
        assert layer.eps == 1e-6
        torch.testing.assert_close(layer(x), ref_rms(x, layer.weight, 1e-6), rtol=1e-12, atol=1e-12)
    plain = pw.RMSNorm(C, elementwise_affine=False, dtype=F64)
    assert plain.weight is None
    torch.testing.assert_close(plain(x), ref_rms(x, 1.0, 1e-6), rtol=1e-12, atol=1e-12)


def test_qknorm_on_heads():
    q = _x(2, 3, 7, 4)  # (batch, heads, tokens, head_dim)
    layer = _make("qknorm", n=4)
    out = layer(q)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref_rms(q, layer.weight, 1e-6), rtol=1e-12, atol=1e-12)


def test_crmsnorm_formula():
    layer = _make("crmsnorm")
    x = _x(6, C)
    s = x.sum(-1, keepdim=True)
    rms = torch.sqrt(((x**2).sum(-1, keepdim=True) + s**2) / (C + 1) + 1e-6)
    torch.testing.assert_close(layer(x), x / rms * layer.weight, rtol=1e-12, atol=1e-12)


def test_crmsnorm_equals_rmsnorm_of_decompressed_vector():
    crms = _make("crmsnorm")
    rms = pw.RMSNorm(C + 1, dtype=F64)
    with torch.no_grad():
        rms.weight[:C] = crms.weight
        rms.weight[C] = 7.0  # the dropped coordinate's gain must not matter
    x = _x(4, 3, C)
    full = torch.cat([x, -x.sum(-1, keepdim=True)], dim=-1)
    assert torch.allclose(full.sum(-1), torch.zeros((), dtype=F64), atol=1e-12)
    torch.testing.assert_close(crms(x), rms(full)[..., :C], rtol=1e-12, atol=1e-12)


def test_dyt_formula_and_init():
    fresh = pw.DyT(C, dtype=F64)
    assert fresh.alpha.item() == 0.5 and torch.all(fresh.weight == 1) and torch.all(fresh.bias == 0)
    assert pw.DyT(C, alpha0=1.5).alpha.item() == 1.5
    layer = _randomize(fresh)
    x = _x(3, C)
    a = layer.alpha.item()
    expected = layer.weight * torch.tanh(a * x) + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def _erf_series(z: torch.Tensor, terms: int = 80) -> torch.Tensor:
    """Maclaurin series of erf: 2/sqrt(pi) * sum_n (-1)^n z^(2n+1) / (n! (2n+1))."""
    out = torch.zeros_like(z)
    for n in range(terms):
        out = out + (-1) ** n * z ** (2 * n + 1) / (float(math.factorial(n)) * (2 * n + 1))
    return 2.0 / math.sqrt(math.pi) * out


def test_derf_formula_and_init():
    fresh = pw.Derf(C, dtype=F64)
    assert fresh.alpha.item() == 0.5 and fresh.shift.item() == 0.0
    assert torch.all(fresh.weight == 1) and torch.all(fresh.bias == 0)
    layer = _randomize(fresh)
    assert layer.shift.item() != 0.0
    x = _x(3, C).clamp(-2.5, 2.5)
    z = layer.alpha.item() * x + layer.shift.item()
    expected = layer.weight * _erf_series(z) + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    scipy_erf = torch.from_numpy(scipy.special.erf(z.numpy()))
    torch.testing.assert_close(layer(x), layer.weight * scipy_erf + layer.bias, rtol=1e-12, atol=1e-12)


def test_hypersphere_norm():
    layer = pw.HypersphereNorm(C)
    assert len(list(layer.parameters())) == 0
    x = _x(4, 2, C)
    y = layer(x)
    norms = torch.sqrt((x * x).sum(-1, keepdim=True))
    torch.testing.assert_close(y, x / norms, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y.pow(2).sum(-1), torch.ones(4, 2, dtype=F64))
    zero = torch.zeros(2, C, dtype=F64)
    assert torch.equal(layer(zero), zero)


def test_normalize_weights_():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, C), nn.Linear(C, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, C, bias=True)))
    bias_before = model[1].bias.detach().clone()
    assert pw.normalize_weights_(model) == 3
    for w in (model[0].weight, model[1].weight, model[3][0].weight):
        torch.testing.assert_close(w.norm(dim=-1), torch.ones(w.shape[0]))
    assert torch.equal(model[1].bias, bias_before)
    lin = nn.Linear(4, 6)
    direction = lin.weight.detach() / lin.weight.detach().norm(dim=0, keepdim=True)
    pw.normalize_weights_(lin, dim=0)
    torch.testing.assert_close(lin.weight, direction)
    with pytest.raises(TypeError, match="nn.Module"):
        pw.normalize_weights_(torch.zeros(3))
    with pytest.raises(ValueError, match="dim"):
        pw.normalize_weights_(lin, dim=2)


def test_eigen_lr_update_formula():
    layer = pw.EigenLR(C, dtype=F64)
    assert layer.alpha_scale == pytest.approx(1 / math.sqrt(C))
    torch.testing.assert_close(layer.effective_alpha(), torch.full((C,), 0.05, dtype=F64))
    _randomize(layer)
    h = _x(3, C, seed=2)
    h = h / h.norm(dim=-1, keepdim=True)
    hb = _x(3, C, seed=3)
    alpha = layer.alpha.detach() * 0.05 * math.sqrt(C)
    hb_unit = hb / torch.sqrt((hb**2).sum(-1, keepdim=True))
    v = h + alpha * (hb_unit - h)
    expected = v / torch.sqrt((v**2).sum(-1, keepdim=True))
    out = layer(h, hb)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, dtype=F64), rtol=1e-12, atol=1e-12)
    custom = pw.EigenLR(C, alpha_init=0.2, alpha_scale=0.5, dtype=F64)
    assert torch.all(custom.alpha == 0.5)
    torch.testing.assert_close(custom.effective_alpha(), torch.full((C,), 0.2, dtype=F64))
    with pytest.raises(ValueError, match="alpha_scale"):
        pw.EigenLR(C, alpha_scale=0.0)


def test_eigen_lr_gradcheck():
    layer = _randomize(pw.EigenLR(3, dtype=F64))
    h = _x(2, 3, seed=4).requires_grad_()
    hb = _x(2, 3, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: layer(a, b), (h, hb))
    assert torch.autograd.gradcheck(
        lambda p: torch.func.functional_call(layer, {"alpha": p}, (h.detach(), hb.detach())),
        (layer.alpha.detach().clone().requires_grad_(),))


# ---- contract properties, every registered layer --------------------------------------------------------------

@pytest.mark.parametrize("key", sorted(KEYS))
def test_gradcheck(key):
    layer = _make(key, n=3)
    x = _x(2, 3, seed=6).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
    names = [n for n, _ in layer.named_parameters()]
    if names:
        params = tuple(p.detach().clone().requires_grad_() for _, p in layer.named_parameters())

        def f(*ps):
            return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x.detach(),))

        assert torch.autograd.gradcheck(f, params)


@pytest.mark.parametrize("key", sorted(KEYS))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_shape_dtype_and_backward(key, dtype):
    layer = _randomize(KEYS[key](C))  # float32 parameters; a float64 input must stay float64
    twin = float64_twin(layer)
    x = _x(2, 3, C, dtype=dtype).requires_grad_()
    y = layer(x, domain=torch.zeros(2, dtype=torch.long))
    assert y.shape == x.shape and y.dtype == dtype
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for p in layer.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert layer(_x(C, dtype=dtype)).shape == (C,)
    # computed in the promoted dtype: output and gradients match the float64 layer to the input's round-off
    assert_step_matches_twin(layer, twin, x, y, domain=torch.zeros(2, dtype=torch.long))
    # a single vector is one token: the same as that row of a batch
    torch.testing.assert_close(layer(x.detach()[1, 2]), y.detach()[1, 2], rtol=0, atol=0)
    # and the gradient is the derivative (float64 finite differences through the same layer in float64)
    names = [k for k, _ in twin.named_parameters()]

    def f(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return functional_call(twin, dict(zip(names, values, strict=True)), (x,))

    params = [p.detach().clone().requires_grad_() for p in twin.parameters()]
    assert torch.autograd.gradcheck(f, (x.detach().double().requires_grad_(), *params), eps=1e-6, atol=1e-6,
                                    rtol=1e-5)


@pytest.mark.parametrize("key", sorted(KEYS))
def test_train_equals_eval(key):
    layer = _make(key)
    x = _x(4, C)
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    assert torch.equal(y_train, y_eval)
    assert len(list(layer.buffers())) == 0


@pytest.mark.parametrize("key", sorted(KEYS))
def test_state_dict_round_trip(key):
    src = _make(key)
    dst = KEYS[key](C, dtype=F64)
    dst.load_state_dict(src.state_dict())
    x = _x(3, C)
    assert torch.equal(src(x), dst(x))


@pytest.mark.parametrize("key", sorted(KEYS))
def test_registry_resolves(key):
    layer = create_norm_layer(key, C)
    assert type(layer) is KEYS[key]
    info = get_norm_info(key)
    assert info.kind == "euclidean" and info.inputs == ("euclidean",) and not info.domain_aware
    assert create_norm_layer(key, C, expect="euclidean").num_features == C


@pytest.mark.parametrize("key", sorted(KEYS))
def test_bad_input(key):
    layer = KEYS[key](C)
    with pytest.raises(ValueError, match=f"last dimension.*size {C}"):
        layer(torch.randn(2, C + 1))
    with pytest.raises(ValueError, match="0-d"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(2, C, dtype=torch.long))
    with pytest.raises(TypeError, match="Tensor"):
        layer([[1.0] * C])
    with pytest.raises((TypeError, ValueError), match="num_features"):
        KEYS[key](0)
    with pytest.raises(TypeError, match="num_features"):
        KEYS[key](2.5)


def test_bad_options():
    with pytest.raises(ValueError, match="eps"):
        pw.RMSNorm(C, eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        pw.CRMSNorm(C, eps=0.0)
    with pytest.raises(ValueError, match="alpha0"):
        pw.DyT(C, alpha0=float("nan"))
    with pytest.raises(ValueError, match="shift0"):
        pw.Derf(C, shift0=float("inf"))
    with pytest.raises(TypeError, match="accepted arguments"):
        create_norm_layer("dyt", C, momentum=0.1)
    layer = pw.EigenLR(C)
    with pytest.raises(ValueError, match="size 5"):
        layer(torch.randn(2, C), torch.randn(2, C - 1))
