"""UnifiedNorm against its window/filtration/backward rules written out in float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.func import functional_call

import manifoldnorm.nn.euclidean.unified_norm  # noqa: F401  (registers the layer)
from manifoldnorm.nn import create_norm_layer
from manifoldnorm.nn.euclidean.unified_norm import UnifiedNorm
from tests.nn.euclidean.twin_helpers import assert_step_matches_twin, float64_twin

F64 = torch.float64
EPS = 1e-5
C = 4


def _rand(*shape: int, seed: int, scale: float = 1.5, shift: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=F64) + shift


def _layer(seed: int, **kw) -> UnifiedNorm:
    layer = UnifiedNorm(C, dtype=F64, **kw)
    with torch.no_grad():
        layer.weight.copy_(_rand(C, seed=seed, scale=0.5, shift=1.0))
        layer.bias.copy_(_rand(C, seed=seed + 1, scale=0.5, shift=0.0))
        layer.running_phi.copy_(_rand(C, seed=seed + 2).abs() + 0.5)
    return layer


def _per_feature_mean(v: torch.Tensor) -> torch.Tensor:
    rows = v.reshape(-1, C)
    return torch.stack([rows[:, k].sum() / rows.shape[0] for k in range(C)])


class _Reference:
    """Step-by-step rules of UnifiedNorm with Python lists as the two windows."""

    def __init__(self, layer: UnifiedNorm):
        self.m, self.mb = layer.window_size
        self.alpha, self.warmup = layer.alpha, layer.warmup_iters
        self.filt, self.t_c, self.clip = layer.outlier_filtration, layer.compensation_iters, layer.compensation_clip
        self.win = [torch.zeros(C, dtype=F64) for _ in range(self.m)]
        self.gwin = [torch.zeros(C, dtype=F64) for _ in range(self.mb)]
        self.phi, self.nu = layer.running_phi.clone(), layer.running_grad.clone()
        self.t, self.skips = 0, 0

    def forward(self, x):
        self.t += 1
        t, m = self.t, self.m
        psi_b = _per_feature_mean(x ** 2)
        skipped = m == 1
        if self.filt:
            vals = [math.sqrt(float(v)) for w in self.win for v in w]
            mean = sum(vals) / len(vals)
            recorded = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
        self.win[t % m] = psi_b.clone()
        if self.filt and t >= self.warmup:
            for k in range(C):
                col = [float(w[k]) for w in self.win]
                am, gm = sum(col) / m, math.prod(col) ** (1.0 / m)
                if am - gm > m * recorded:
                    skipped = True
            if skipped:
                self.win[t % m] = self.phi.clone()
                self.skips += 1
        if t <= m or t < self.warmup or skipped:
            psi = psi_b
        else:
            psi = torch.stack([torch.prod(torch.stack([w[k] for w in self.win])) ** (1.0 / m) for k in range(C)])
        if t > max(self.t_c, self.warmup) and not skipped:
            r = torch.clamp(torch.sqrt(psi + EPS) / torch.sqrt(self.phi + EPS), 1 / self.clip, self.clip)
        else:
            r = torch.ones(C, dtype=F64)
        self.phi = self.alpha * self.phi + (1 - self.alpha) * psi
        return {"z": x / torch.sqrt(psi + EPS), "psi": psi, "r": r, "skipped": skipped, "t": t}

    def backward(self, up, st, w):
        g = up * w * st["r"]
        z = st["z"]
        gam = _per_feature_mean(g * z)
        self.gwin[st["t"] % self.mb] = self.nu.clone() if st["skipped"] else gam
        per_batch = st["t"] <= self.mb or st["t"] < self.warmup or st["skipped"]
        gbar = gam if per_batch else sum(self.gwin) / self.mb
        self.nu = self.alpha * self.nu + (1 - self.alpha) * gbar
        proj = gbar if st["skipped"] else self.nu
        grad_x = (g - proj * z) / torch.sqrt(st["psi"] + EPS)
        rows = up.numel() // C
        return grad_x, _per_feature_mean(up * st["r"] * z) * rows, _per_feature_mean(up) * rows


SHAPES = [(3, 5, C), (2, C), (4, 2, C), (1, 3, C), (6, C), (2, 2, 2, C), (3, C)]


def _batches(scales, seed0: int) -> list[torch.Tensor]:
    return [_rand(*SHAPES[i % len(SHAPES)], seed=seed0 + i, scale=s) for i, s in enumerate(scales)]


def _run(layer: UnifiedNorm, xs: list[torch.Tensor], seed0: int, backward: bool = True):
    ref = _Reference(layer)
    w = layer.weight.detach()
    out = []
    for i, x in enumerate(xs):
        x = x.clone().requires_grad_()
        up = _rand(*x.shape, seed=seed0 + 100 + i)
        layer.zero_grad()
        y = layer(x)
        st = ref.forward(x.detach())
        torch.testing.assert_close(y, st["z"] * w + layer.bias.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_phi, ref.phi, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.window_phi, torch.stack(ref.win), rtol=1e-12, atol=1e-12)
        assert int(layer.num_skipped) == ref.skips
        if backward:
            (y * up).sum().backward()
            gx, gw, gb = ref.backward(up, st, w)
            torch.testing.assert_close(x.grad, gx, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(layer.weight.grad, gw, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(layer.bias.grad, gb, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(layer.running_grad, ref.nu, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(layer.window_grad, torch.stack(ref.gwin), rtol=1e-10, atol=1e-12)
        out.append(st)
    return out


def test_forward_window_geometric_mean_and_running_statistic() -> None:
    layer = _layer(10, window_size=3, warmup_iters=2, alpha=0.7).train()
    steps = _run(layer, _batches([1.0, 2.0, 0.5, 1.5, 3.0, 0.8, 1.2], 0), seed0=0, backward=False)
    assert [s["t"] for s in steps] == list(range(1, 8))
    # t <= M: batch statistic; t > M: cube root of the last three batch statistics
    x_stats = [_per_feature_mean(_rand(*SHAPES[i], seed=i, scale=s) ** 2)
               for i, s in enumerate([1.0, 2.0, 0.5, 1.5, 3.0])]
    torch.testing.assert_close(steps[2]["psi"], x_stats[2])
    torch.testing.assert_close(steps[4]["psi"], (x_stats[2] * x_stats[3] * x_stats[4]) ** (1 / 3))


def test_approximate_backward_window_ema_and_compensation() -> None:
    layer = _layer(20, window_size=(3, 2), warmup_iters=0, compensation_iters=2, compensation_clip=1.3,
                   alpha=0.6).train()
    with torch.no_grad():
        layer.running_grad.copy_(_rand(C, seed=21, scale=0.3))
    steps = _run(layer, _batches([1.0, 2.5, 0.4, 1.5, 3.0, 0.6, 1.1], 30), seed0=30)
    rs = torch.stack([s["r"] for s in steps[3:]])
    assert (rs != 1.0).any() and ((rs - 1.3).abs() < 1e-12).any()  # compensation active and clipped


@pytest.mark.parametrize(("jump", "filtered"), [(64.0, True), (4.1, False)])
def test_outlier_filtration_skips_the_outlier_batch(jump: float, filtered: bool) -> None:
    # batches (2, C) with rows (a, -a) have the batch quadratic mean a**2 exactly; the features differ in scale.
    # At t = 6 feature 2 jumps by `jump`; 4.1 gives AM - GM between M times the biased and the unbiased variance,
    # so it passes, and its entry in the window makes the return to the normal level at t = 7 the outlier.
    base = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=F64)
    levels = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0, 1.0]
    xs = [torch.stack([a, -a]) for a in (torch.sqrt(base * lv) for lv in levels)]
    factor = torch.tensor([1.0, 1.0, jump, 1.0], dtype=F64)
    xs[5] = xs[5] * factor.sqrt()
    layer = _layer(40, window_size=3, warmup_iters=4, outlier_filtration=True, compensation_iters=0).train()
    steps = _run(layer, xs, seed0=50)
    assert [s["skipped"] for s in steps] == [False] * 5 + [filtered, not filtered]
    assert int(layer.num_skipped) == 1
    if filtered:
        torch.testing.assert_close(steps[5]["psi"], base * factor)  # the outlier uses its batch statistic
        assert float(layer.window_phi.max()) < 3.0  # and never enters the window


def test_window_of_one_is_the_batch_quadratic_mean_with_its_exact_gradient() -> None:
    layer = _layer(60, window_size=1, warmup_iters=0, eps=1e-12).train()
    x = _rand(5, 3, C, seed=61).requires_grad_()
    up = _rand(5, 3, C, seed=62)
    (layer(x) * up).sum().backward()
    assert int(layer.num_skipped) == 0 and layer.num_batches_tracked == 1
    xe = x.detach().clone().requires_grad_()
    psi = _per_feature_mean(xe ** 2)
    ((xe / torch.sqrt(psi + 1e-12) * layer.weight.detach() + layer.bias.detach()) * up).sum().backward()
    torch.testing.assert_close(x.grad, xe.grad, rtol=1e-9, atol=1e-9)
    _run(_layer(60, window_size=1, warmup_iters=0), _batches([1.0, 2.0, 0.5], 63), seed0=63)


@pytest.mark.parametrize("prefill", [0, 5])
def test_plain_backward_gradcheck(prefill: int) -> None:
    base = _layer(70, window_size=3, warmup_iters=0, approx_backward=False).train()
    for i in range(prefill):  # fill the window so the geometric-mean branch is taken
        base(_rand(4, C, seed=71 + i))
    x = _rand(3, 2, C, seed=80).requires_grad_()
    w, b = (p.detach().clone().requires_grad_() for p in (base.weight, base.bias))

    def f(x, w, b):  # a fresh copy per call: a training forward advances the windows
        return functional_call(copy.deepcopy(base), {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))
    base.eval()
    assert torch.autograd.gradcheck(lambda x, w, b: functional_call(base, {"weight": w, "bias": b}, (x,)), (x, w, b))


def test_eval_uses_running_statistic_without_update() -> None:
    layer = _layer(90).eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = _rand(2, 3, C, seed=91)
    y = layer(x)
    torch.testing.assert_close(y, x / torch.sqrt(before["running_phi"] + EPS) * layer.weight + layer.bias)
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert not torch.allclose(layer.train()(x), y)


def test_registry_key_resolves() -> None:
    layer = create_norm_layer("unifiednorm", C, window_size=(2, 5), eps=1e-4)
    assert isinstance(layer, UnifiedNorm) and layer.num_features == C and UnifiedNorm.feature_dim == -1
    assert layer.window_size == (2, 5) and layer.window_phi.shape == (2, C) and layer.window_grad.shape == (5, C)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_shape_dtype_and_finite_backward(dtype: torch.dtype) -> None:
    layer = UnifiedNorm(C, warmup_iters=0, compensation_iters=0, outlier_filtration=True).to(dtype).train()
    for seed in range(6):
        twin = float64_twin(layer)
        layer.zero_grad()
        x = _rand(6, 3, C, seed=seed).to(dtype).requires_grad_()
        y = layer(x)
        assert y.shape == x.shape and y.dtype == dtype
        (y * _rand(6, 3, C, seed=seed + 10).to(dtype)).sum().backward()
        assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())
        # each step (window, filtration, compensation, approximate backward) matches the float64 step
        assert_step_matches_twin(layer, twin, x, y, _rand(6, 3, C, seed=seed + 10).to(dtype))
    assert layer.eval()(x).dtype == dtype


def test_state_dict_round_trip() -> None:
    layer = _layer(100, warmup_iters=0, window_size=2).train()
    for seed in range(4):
        x = _rand(5, C, seed=seed).requires_grad_()
        layer(x).sum().backward()
    fresh = UnifiedNorm(C, window_size=2, warmup_iters=0, dtype=F64)
    fresh.load_state_dict(copy.deepcopy(layer.state_dict()))
    for name, t in layer.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], t, rtol=0, atol=0)
    x = _rand(5, C, seed=9)
    torch.testing.assert_close(fresh.train()(x), layer.train()(x), rtol=0, atol=0)


def test_bad_inputs_and_options_raise() -> None:
    layer = UnifiedNorm(C)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match="at least 2 dims"):
        layer(torch.randn(C))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(3, C, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        layer.train()(torch.randn(0, C))
    with pytest.raises(ValueError, match="window_size"):
        UnifiedNorm(C, window_size=0)
    with pytest.raises(ValueError, match="window_size"):
        UnifiedNorm(C, window_size=(1, 2, 3))
    with pytest.raises(ValueError, match="alpha"):
        UnifiedNorm(C, alpha=2.0)
    with pytest.raises(ValueError, match="warmup_iters"):
        UnifiedNorm(C, warmup_iters=-1)
    with pytest.raises(ValueError, match="compensation_clip"):
        UnifiedNorm(C, compensation_clip=0.5)
    with pytest.raises(ValueError, match="eps"):
        UnifiedNorm(C, eps=-1.0)
