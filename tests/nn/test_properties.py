"""Properties every Riemannian norm of the registry must have, checked against independent oracles (float64).

The test matrix is the registry: each SPD/Lie norm needs an entry in ``ORACLES`` (its geometry: Fréchet mean and
squared distance written from the definitions), so a new layer cannot slip in untested.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from conftest import concentrated_spd, random_spd
from pyriemann.geometry.mean import mean_logeuclid, mean_riemann

from manifoldnorm import functional as mf
from manifoldnorm.functional import so3 as fso3
from manifoldnorm.nn import create_norm_layer, get_norm_info, get_norm_layer, list_norms, refit_domain_norms
from tests.nn.nn_helpers import F64, gradcheck_norm

NORMS = [k for k in list_norms("spd") + list_norms("lie")]
SEEDS = [0, 1, 2, 3, 4]
N_SPD, N_ROT = 4, 3  # matrix size of SPD inputs; number of rotation features of SO(3) inputs


def _iota(P: torch.Tensor) -> torch.Tensor:
    Li = torch.linalg.inv(torch.linalg.cholesky(P))
    return Li @ Li.mT


def _aim_mean(X):
    return mf.mean_aim(X, dim=0, karcher_steps=300, tol=1e-13)


def _aim_sqd(A, B):
    return mf.distance_aim(A, B) ** 2


_LIE = {
    "aim": (_aim_mean, _aim_sqd),
    "lem": (lambda X: mf.mean_lem(X, dim=0), lambda A, B: mf.distance_lem(A, B) ** 2),
    "lcm": (lambda X: mf.mean_lcm(X, dim=0), lambda A, B: mf.distance_lcm(A, B) ** 2),
    "crim": (lambda X: _iota(_aim_mean(_iota(X))), lambda A, B: _aim_sqd(_iota(A), _iota(B))),
}
#: name -> (mean over dim 0, squared distance, whether the layer normalizes the dispersion)
ORACLES = {
    **{f"liebn_{m}": (*f, True) for m, f in _LIE.items()},
    **{f"dsliebn_{m}": (*f, True) for m, f in _LIE.items() if m != "crim"},
    "spdbn": (_aim_mean, _aim_sqd, False),
    "spdmbn": (_aim_mean, _aim_sqd, True),
    "spddsmbn": (_aim_mean, _aim_sqd, True),
    "gbwbn": (lambda X: mf.mean_bw(X, dim=0, steps=500, tol=1e-13), lambda A, B: mf.distance_bw(A, B) ** 2, True),
    "liebn_so3": (lambda X: fso3.mean_so3(X, dim=0, steps=300, tol=1e-13),
                  lambda A, B: fso3.distance_so3(A, B) ** 2, True),
}
TOL: dict[str, float] = {}


def _is_rot(name: str) -> bool:
    return "so3" in get_norm_info(name).inputs


def _size(name: str) -> int:
    return N_ROT if _is_rot(name) else N_SPD


def _accepts(name: str, arg: str) -> bool:
    return arg in inspect.signature(get_norm_layer(name)).parameters


def _layer(name: str, **kw) -> torch.nn.Module:
    for steps in ("karcher_steps", "mean_steps"):
        if _accepts(name, steps) and steps not in kw:
            kw[steps] = 60
    return create_norm_layer(name, _size(name), validate=True, **kw)


def _batch(name: str, N: int, seed: int, sigma: float = 0.4) -> torch.Tensor:
    if _is_rot(name):
        g = torch.Generator().manual_seed(seed)
        centre = fso3.so3_exp(torch.randn(N_ROT, 3, generator=g, dtype=F64))
        return centre @ fso3.so3_exp(sigma * torch.randn(N, N_ROT, 3, generator=g, dtype=F64))
    return concentrated_spd(N, N_SPD, sigma=sigma, seed=seed)


def _set_params(layer: torch.nn.Module, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        if _is_rot(name):
            layer.weight.copy_(fso3.so3_exp(torch.randn(layer.weight.shape[:-1], generator=g, dtype=F64)))
        else:
            # BW exponentials are injective only near the bias (see GBWBatchNorm Notes): keep it well conditioned
            cond = 2.0 if name == "gbwbn" else 10.0
            layer.weight.copy_(random_spd(*layer.weight.shape[:-2], n=N_SPD, cond=cond, seed=200 + seed))
        if hasattr(layer, "shift"):
            # BW exponentials are injective only within ~ the bias' scale: outputs at dispersion s^2 need s small
            layer.shift.fill_(0.3 + 0.05 * seed if name == "gbwbn" else 0.6 + 0.1 * seed)


def _per_feature(X: torch.Tensor, name: str) -> torch.Tensor:
    """Stack ``(N, F, k, k)``: SPD inputs ``(N, n, n)`` get one feature axis."""
    return X if _is_rot(name) else X.unsqueeze(1)


def test_every_registered_riemannian_norm_has_an_oracle():
    assert set(NORMS) <= set(ORACLES), f"add oracles for {sorted(set(NORMS) - set(ORACLES))}"
    assert {"gbwbn", "liebn_crim", "liebn_so3"} <= set(NORMS)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", NORMS)
def test_training_output_has_the_bias_as_mean_and_the_learned_dispersion(name, seed):
    mean_fn, sqd, has_var = ORACLES[name]
    layer = _layer(name)
    _set_params(layer, name, seed)
    X = _batch(name, 12, seed)
    Y = _per_feature(layer(X).detach(), name)
    Xf = _per_feature(X, name)
    B = layer.weight.detach().reshape(-1, *Y.shape[-2:])
    tol = TOL.get(name, 1e-8)
    for f in range(Y.shape[1]):
        torch.testing.assert_close(mean_fn(Y[:, f]), B[f], atol=tol, rtol=tol)
        if has_var:
            v_in = sqd(Xf[:, f], mean_fn(Xf[:, f])).mean()
            v_out = sqd(Y[:, f], B[f]).mean()
            s = layer.shift.detach().reshape(-1)[f]
            torch.testing.assert_close(v_out, s**2 * v_in / (v_in + layer.eps), atol=tol, rtol=10 * tol)


@pytest.mark.parametrize("name", NORMS)
def test_eval_mode_uses_the_running_statistics(name):
    kw = {"momentum": 1.0}
    layer = _layer(name, **kw)
    _set_params(layer, name, 0)
    X = _batch(name, 10, 1)
    y_train = layer(X).detach()
    layer.eval()
    torch.testing.assert_close(layer(X), y_train, atol=TOL.get(name, 1e-8), rtol=TOL.get(name, 1e-8))
    other = _batch(name, 10, 2, sigma=0.8)
    y_other = layer(other)  # eval does not look at the batch: one sample alone gives the same output
    torch.testing.assert_close(layer(other[:1]), y_other[:1])
    before = copy.deepcopy(dict(layer.named_buffers()))
    assert all(torch.equal(before[k], v) for k, v in layer.named_buffers())  # eval never updates statistics


@pytest.mark.parametrize("name", NORMS)
def test_state_dict_round_trip_and_float32(name):
    layer = _layer(name)
    _set_params(layer, name, 3)
    for s in range(3):
        layer(_batch(name, 8, s))
    fresh = _layer(name)
    fresh.load_state_dict(copy.deepcopy(layer.state_dict()))
    X = _batch(name, 6, 9)
    layer.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(X), layer(X), atol=0, rtol=0)
    low = copy.deepcopy(layer).to(torch.float32)
    y32 = low(X.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), layer(X), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NORMS)
def test_fast_path_matches_the_plain_autograd_reference(name):
    layer = _layer(name, karcher_steps=2) if _accepts(name, "karcher_steps") else _layer(name)
    _set_params(layer, name, 4)
    X = _batch(name, 9, 4, sigma=0.6)
    g = torch.Generator().manual_seed(0)
    G = torch.randn(X.shape, generator=g, dtype=F64)
    xs = [X.clone().requires_grad_(True) for _ in range(2)]
    ys = [copy.deepcopy(layer)(xs[0]), copy.deepcopy(layer).forward_ref(xs[1])]
    for y in ys:
        (y * G).sum().backward()
    torch.testing.assert_close(ys[0], ys[1], atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("name", [k for k in NORMS if not _is_rot(k)])
def test_gradcheck_small_batch(name):
    layer = create_norm_layer(name, 3, validate=False, detach_mean=False)
    params = tuple(p for p in ("weight", "shift") if hasattr(layer, p))
    X = concentrated_spd(4, 3, sigma=0.5, seed=11)
    assert gradcheck_norm(layer, X, params)


@pytest.mark.parametrize("name", [k for k in NORMS if _is_rot(k)])
def test_gradcheck_rotation_norms_in_axis_angle_coordinates(name):
    layer = create_norm_layer(name, 2, validate=False, detach_mean=False)
    g = torch.Generator().manual_seed(0)
    w = (0.5 * torch.randn(4, 2, 3, generator=g, dtype=F64)).requires_grad_(True)
    s = layer.shift.detach().clone().requires_grad_(True)

    def f(w, s):
        fresh = copy.deepcopy(layer)
        return torch.func.functional_call(fresh, {"shift": s}, (fso3.so3_exp(w),))

    assert torch.autograd.gradcheck(f, (w, s), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", [k for k in NORMS if not _is_rot(k)])
def test_ill_conditioned_inputs_stay_finite_in_float64(name):
    layer = _layer(name)
    ref = copy.deepcopy(layer)
    X = random_spd(8, n=N_SPD, cond=1e6, seed=5).requires_grad_(True)
    Y = layer(X)
    G = torch.randn(Y.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    (Y * G).sum().backward()
    assert torch.isfinite(Y).all() and torch.isfinite(X.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    # not merely finite: SPD outputs, and output and input gradient of the independent plain-autograd path
    assert float(torch.linalg.eigvalsh(Y.detach()).min()) > 0
    Xr = X.detach().clone().requires_grad_(True)
    Yr = ref.forward_ref(Xr)
    (Yr * G).sum().backward()
    torch.testing.assert_close(Y, Yr, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(X.grad, Xr.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", NORMS)
def test_autocast_and_float64_compute_switch(name):
    layer = _layer(name).to(torch.float32)
    _set_params(layer, name, 1)
    X = _batch(name, 8, 6)
    exact = copy.deepcopy(layer).double()(X)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = copy.deepcopy(layer)(X.float())
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    err32 = float((y.double() - exact).detach().norm() / exact.detach().norm())
    assert err32 < 1e-4
    hi = copy.deepcopy(layer)
    hi.compute_dtype = torch.float64
    y64 = hi(X.float())
    assert y64.dtype == torch.float32
    err64 = float((y64.double() - exact).detach().norm() / exact.detach().norm())
    assert err64 <= err32 + 1e-7 and err64 < 1e-6


@pytest.mark.parametrize("name,oracle", [("spdmbn", mean_riemann), ("spdbn", mean_riemann),
                                         ("liebn_aim", mean_riemann), ("liebn_lem", mean_logeuclid)])
def test_refit_statistics_match_pyriemann(name, oracle):
    layer = create_norm_layer(name, N_SPD)
    X = concentrated_spd(20, N_SPD, sigma=0.6, seed=8)
    refit_domain_norms(layer, X, None)
    expect = torch.from_numpy(oracle(X.numpy(), **({"tol": 1e-12, "maxiter": 200} if oracle is mean_riemann else {})))
    torch.testing.assert_close(layer.running_mean.reshape(N_SPD, N_SPD), expect, atol=1e-8, rtol=1e-8)
