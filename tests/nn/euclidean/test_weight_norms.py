"""Weight normalization, weight standardization and spectral normalization against their formulas in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import manifoldnorm.nn.euclidean.weight_norms  # noqa: F401  (registers the reparametrizations)
from manifoldnorm.nn import create_norm_layer, get_norm_info
from manifoldnorm.nn.euclidean.weight_norms import (
    WeightStandardization,
    WSConv2d,
    WSLinear,
    spectral_norm,
    weight_norm,
    weight_std,
)

F64 = torch.float64
KEYS = {"weight_norm": weight_norm, "weight_std": weight_std, "spectral_norm": spectral_norm}


def _rand(*shape: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g, dtype=F64) + shift


def _conv(seed: int = 0, out_ch: int = 5) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(3, out_ch, 3, padding=1, dtype=F64)


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(6, 4, dtype=F64)


def _ref_standardize(w: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(w)
    for i in range(w.shape[0]):
        row = w[i]
        count = row.numel()
        mu = row.sum() / count
        sigma = torch.sqrt((row * row).sum() / count - mu * mu + eps)
        out[i] = (row - mu) / sigma
    return out


# --------------------------------------------------------------------------------------------- weight_norm


@pytest.mark.parametrize("dim", [0, 1, -1, None])
def test_weight_norm_formula_and_initial_weight_kept(dim) -> None:
    conv = _conv(1)
    w0 = conv.weight.detach().clone()
    weight_norm(conv, dim=dim)
    torch.testing.assert_close(conv.weight, w0, rtol=1e-12, atol=1e-12)
    pw = conv.parametrizations.weight
    with torch.no_grad():
        pw.original0.copy_(_rand(*pw.original0.shape, seed=2, shift=0.5))
        pw.original1.copy_(_rand(*pw.original1.shape, seed=3))
    g, v = pw.original0, pw.original1
    if dim is None:
        assert g.numel() == 1
        ref = g * v / torch.sqrt((v * v).sum())
    else:
        d = dim % v.ndim
        assert g.shape == tuple(v.shape[i] if i == d else 1 for i in range(v.ndim))
        other = tuple(i for i in range(v.ndim) if i != d)
        ref = g * v / torch.sqrt((v * v).sum(dim=other, keepdim=True))
    torch.testing.assert_close(conv.weight, ref, rtol=1e-12, atol=1e-12)


def test_weight_norm_linear_rows_have_norm_g() -> None:
    lin = weight_norm(_linear(4))
    with torch.no_grad():
        lin.parametrizations.weight.original0.copy_(torch.tensor([[0.5], [1.0], [2.0], [3.0]], dtype=F64))
    torch.testing.assert_close(torch.linalg.vector_norm(lin.weight, dim=1),
                               torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=F64), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- weight_std


@pytest.mark.parametrize("eps", [1e-5, 0.3])
def test_weight_std_formula_conv_and_linear(eps: float) -> None:
    for module in (_conv(5), _linear(6)):
        with torch.no_grad():
            module.weight.copy_(_rand(*module.weight.shape, seed=7, scale=2.0, shift=0.4))
        raw = module.weight.detach().clone()
        weight_std(module, eps=eps)
        torch.testing.assert_close(module.parametrizations.weight.original, raw, rtol=0, atol=0)
        torch.testing.assert_close(module.weight, _ref_standardize(raw, eps), rtol=1e-12, atol=1e-12)
    assert isinstance(module.parametrizations.weight[0], WeightStandardization)


def test_weight_std_gives_zero_mean_unit_variance_rows() -> None:
    conv = weight_std(_conv(8, out_ch=7), eps=1e-12)
    flat = conv.weight.reshape(7, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(7, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(flat.var(1, unbiased=False), torch.ones(7, dtype=F64), rtol=1e-9, atol=0)


def test_ws_convenience_classes_match_the_written_out_convolution() -> None:
    torch.manual_seed(9)
    conv = WSConv2d(3, 4, 3, padding=1, bias=True, dtype=F64, eps=1e-4)
    x = _rand(2, 3, 5, 5, seed=10)
    w = _ref_standardize(conv.parametrizations.weight.original.detach(), 1e-4)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, w, conv.bias, padding=1), rtol=1e-12, atol=1e-12)
    lin = WSLinear(6, 3, dtype=F64)
    x = _rand(5, 6, seed=11)
    w = _ref_standardize(lin.parametrizations.weight.original.detach(), 1e-5)
    torch.testing.assert_close(lin(x), x @ w.T + lin.bias, rtol=1e-12, atol=1e-12)
    assert isinstance(conv, nn.Conv2d) and isinstance(lin, nn.Linear)


# ------------------------------------------------------------------------------------------- spectral_norm


@pytest.mark.parametrize("make", [lambda: nn.Linear(7, 5, dtype=F64), lambda: nn.Conv2d(3, 4, 2, dtype=F64)])
def test_spectral_norm_converges_to_largest_singular_value(make) -> None:
    torch.manual_seed(12)
    module = make()
    raw = module.weight.detach().clone()
    spectral_norm(module, n_power_iterations=100).train()
    for _ in range(5):  # every training-mode access runs the power iteration
        w_sn = module.weight
    sigma = torch.linalg.matrix_norm(raw.reshape(raw.shape[0], -1), 2)
    torch.testing.assert_close(w_sn, raw / sigma, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.linalg.matrix_norm(w_sn.reshape(raw.shape[0], -1), 2),
                               torch.tensor(1.0, dtype=F64), rtol=1e-10, atol=0)


def test_spectral_norm_eval_uses_the_stored_singular_vectors() -> None:
    lin = spectral_norm(_linear(13), n_power_iterations=1).eval()
    pw = lin.parametrizations.weight
    u, v = pw[0]._u.clone(), pw[0]._v.clone()
    raw = pw.original
    torch.testing.assert_close(lin.weight, raw / (u @ raw @ v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pw[0]._u, u, rtol=0, atol=0)
    lin.train()
    _ = lin.weight
    assert not torch.equal(pw[0]._u, u) or not torch.equal(pw[0]._v, v)


# ----------------------------------------------------------------------------------- shared module behaviour


def _reparam(key: str, seed: int) -> nn.Module:
    module = _conv(seed)
    if key == "spectral_norm":
        return spectral_norm(module, n_power_iterations=3).eval()
    return KEYS[key](module)


@pytest.mark.parametrize("key", sorted(KEYS))
def test_gradcheck_through_the_module(key: str) -> None:
    module = _reparam(key, 14)
    names = [n for n, _ in module.named_parameters()]
    assert any(n.startswith("parametrizations.weight.original") for n in names)
    params = [p.detach().clone().requires_grad_() for _, p in module.named_parameters()]
    x = _rand(2, 3, 4, 4, seed=15).requires_grad_()

    def f(x, *ps):
        return functional_call(module, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("key", sorted(KEYS))
def test_state_dict_round_trip_gives_identical_outputs(key: str) -> None:
    module, fresh = _reparam(key, 16), _reparam(key, 17)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fresh.load_state_dict(copy.deepcopy(module.state_dict()))
    x = _rand(2, 3, 4, 4, seed=18)
    assert torch.equal(fresh(x), module(x))
    module.train(), fresh.train()
    assert torch.equal(fresh(x), module(x))


@pytest.mark.parametrize("key", sorted(KEYS))
def test_optimizer_step_changes_the_underlying_parameters(key: str) -> None:
    module = _reparam(key, 19).train()
    originals = {n: p.detach().clone() for n, p in module.named_parameters() if "original" in n}
    w_before = module.weight.detach().clone()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    x = _rand(4, 3, 4, 4, seed=20)
    loss = (module(x) * _rand(4, 5, 4, 4, seed=21)).sum()
    loss.backward()
    opt.step()
    current = dict(module.named_parameters())
    assert originals and all(not torch.equal(current[n], originals[n]) for n in originals)
    assert not torch.allclose(module.weight, w_before)
    if key == "weight_std":
        torch.testing.assert_close(module.weight, _ref_standardize(current["parametrizations.weight.original"], 1e-5),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("key", sorted(KEYS))
def test_registry_resolves_weight_reparametrizations(key: str) -> None:
    info = get_norm_info(key)
    assert info.inputs == ("weight",) and info.kind == "euclidean" and info.factory is KEYS[key]
    lin = _linear(22)
    out = create_norm_layer(key, lin)
    assert out is lin and torch.nn.utils.parametrize.is_parametrized(lin, "weight")
    with pytest.raises(ValueError, match="cannot fill a euclidean slot"):
        create_norm_layer(key, _linear(23), expect="euclidean")


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fn", [weight_norm, weight_std, spectral_norm])
def test_modules_without_a_float_weight_are_refused(fn) -> None:
    with pytest.raises(TypeError, match="expected the nn.Module whose weight"):
        fn(torch.ones(3, 3))
    with pytest.raises(TypeError, match="no parameter named 'weight'"):
        fn(nn.ReLU())
    with pytest.raises(TypeError, match="no parameter named 'weight'"):
        fn(nn.LayerNorm(4, elementwise_affine=False))
    with pytest.raises(TypeError, match=r"its parameters: weight, bias"):
        fn(_linear(), name="kernel")
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.ones(3, 3, dtype=torch.long), requires_grad=False)
    with pytest.raises(TypeError, match="floating-point"):
        fn(holder)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match=r"dim must lie in \[-4, 3\]"):
        weight_norm(_conv(), dim=4)
    with pytest.raises(TypeError, match="dim must be an int"):
        weight_norm(_conv(), dim=1.0)
    for bad in (0.0, -1e-5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite positive"):
            weight_std(_conv(), eps=bad)
        with pytest.raises(ValueError, match="eps must be a finite positive"):
            spectral_norm(_conv(), eps=bad)
    with pytest.raises(TypeError, match="eps must be a float"):
        weight_std(_conv(), eps="small")
    with pytest.raises(ValueError, match="n_power_iterations must be >= 1"):
        spectral_norm(_conv(), n_power_iterations=0)
    with pytest.raises(TypeError, match="n_power_iterations must be an int"):
        spectral_norm(_conv(), n_power_iterations=2.0)
    with pytest.raises(ValueError, match="fan-in of more than one value"):
        weight_std(nn.Linear(1, 4))
    with pytest.raises(ValueError, match="at least 2 dims"):
        weight_std(_linear(), name="bias")
    with pytest.raises(ValueError, match="input channels in dim 0"):
        weight_std(nn.ConvTranspose2d(3, 4, 3))
    with pytest.raises(ValueError, match="at least 2 dims"):
        WeightStandardization()(torch.ones(4))
