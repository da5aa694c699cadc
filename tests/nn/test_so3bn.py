"""SO3BatchNorm (LieBN on rotation matrices): statistics, running buffers, gradients, parity, refit, errors."""

from __future__ import annotations

import copy

import geoopt
import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from manifoldnorm.functional.so3 import distance_so3, geodesic_so3, left_mul, mean_so3, so3_exp, so3_log
from manifoldnorm.manifolds import SpecialOrthogonal
from manifoldnorm.nn import create_norm_layer, refit_domain_norms
from manifoldnorm.nn.so3bn import SO3BatchNorm

F64 = torch.float64


def _axis_angles(N: int, J: int, sigma: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Base rotations ``(J, 3, 3)`` and axis-angle noise ``(N, J, 3)`` of a batch concentrated per feature."""
    g = torch.Generator().manual_seed(seed)
    M = so3_exp(torch.randn(J, 3, generator=g, dtype=F64))
    return M, sigma * torch.randn(N, J, 3, generator=g, dtype=F64)


def _batch(N: int = 16, J: int = 3, sigma: float = 0.4, seed: int = 0) -> torch.Tensor:
    M, w = _axis_angles(N, J, sigma, seed)
    return M @ so3_exp(w)


def _set_params(layer: SO3BatchNorm, seed: int, s: float = 0.7) -> None:
    g = torch.Generator().manual_seed(seed + 99)
    with torch.no_grad():
        layer.weight.copy_(so3_exp(torch.randn(*layer.shape, 3, generator=g, dtype=F64)))
        layer.shift.fill_(s)


def test_output_statistics_are_bias_and_scaled_dispersion(seed: int) -> None:
    X = _batch(24, 3, 0.4, seed)
    layer = SO3BatchNorm(3, karcher_steps=30)
    _set_params(layer, seed)
    Y = layer(X)
    assert Y.shape == X.shape and Y.dtype == F64
    torch.testing.assert_close(Y.mT @ Y, torch.eye(3, dtype=F64).expand_as(Y), atol=1e-13, rtol=0)
    B = layer.weight.detach()
    M_out = mean_so3(Y.detach(), steps=50, tol=1e-14)
    assert float(distance_so3(M_out, B).max()) < 1e-10
    M = mean_so3(X, steps=100, tol=1e-14)
    v2 = so3_log(left_mul(M.mT, X)).square().sum(-1).mean(0)
    disp = distance_so3(B, Y.detach()).square().mean(0)
    torch.testing.assert_close(disp, 0.49 * v2 / (v2 + layer.eps), atol=1e-10, rtol=0)


def test_running_statistics_and_eval_mode(seed: int) -> None:
    X = _batch(16, 2, 0.3, seed)
    layer = SO3BatchNorm(2, momentum=0.25, karcher_steps=30)
    _set_params(layer, seed)
    layer(X)
    M = mean_so3(X, steps=100, tol=1e-14)
    v2 = so3_log(left_mul(M.mT, X)).square().sum(-1).mean(0)
    torch.testing.assert_close(layer.running_mean, geodesic_so3(torch.eye(3, dtype=F64).expand(2, 3, 3), M, 0.25),
                               atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.running_var, 0.75 + 0.25 * v2, atol=1e-10, rtol=0)
    # eval: running statistics, buffers untouched
    before = {k: v.clone() for k, v in layer.named_buffers()}
    layer.eval()
    Z = _batch(5, 2, 0.3, seed + 1)
    Y = layer(Z)
    R, r = layer.running_mean, layer.running_var
    c = (layer.shift / torch.sqrt(r + layer.eps)).detach()
    expected = layer.weight.detach() @ so3_exp(c.unsqueeze(-1) * so3_log(R.mT @ Z))
    torch.testing.assert_close(Y, expected, atol=1e-13, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in layer.named_buffers())


def test_train_momentum_centres_on_the_momentum_mean(seed: int) -> None:
    X = _batch(16, 2, 0.3, seed)
    layer = SO3BatchNorm(2, train_momentum=0.5, karcher_steps=30)
    T0 = layer.train_mean.clone()
    layer(X)
    M = mean_so3(X, steps=100, tol=1e-14)
    R_eta = geodesic_so3(T0, M, 0.5)
    torch.testing.assert_close(layer.train_mean, R_eta, atol=1e-10, rtol=0)
    v = so3_log(left_mul(R_eta.mT, X)).square().sum(-1).mean(0)
    torch.testing.assert_close(layer.train_var, 0.5 + 0.5 * v, atol=1e-10, rtol=0)
    layer.set_momentum(train=1.0, test=0.3)
    assert layer.train_momentum == 1.0 and layer.momentum == 0.3
    with pytest.raises(ValueError, match="train_momentum"):
        layer.set_momentum(train=0.0)
    with pytest.raises(ValueError, match="momentum"):
        layer.set_momentum(test=1.5)


def _call(layer: SO3BatchNorm, w: torch.Tensor, M: torch.Tensor, weight: torch.Tensor,
          shift: torch.Tensor) -> torch.Tensor:
    """Training forward of a fresh copy (buffers untouched) on ``M exp(w)`` with the given parameters."""
    return functional_call(copy.deepcopy(layer), {"weight": weight, "shift": shift}, (M @ so3_exp(w),))


def _gradcheck(layer: SO3BatchNorm, wrt_input: bool) -> bool:
    M, w = _axis_angles(4, 2, 0.5, seed=3)
    W = layer.weight.detach().clone().requires_grad_(True)
    s = layer.shift.detach().clone().requires_grad_(True)
    if not wrt_input:
        return gradcheck(lambda b, c: _call(layer, w, M, b, c), (W, s), eps=1e-6, atol=1e-7)
    w = w.clone().requires_grad_(True)
    return gradcheck(lambda a, b, c: _call(layer, a, M, b, c), (w, W, s), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("karcher_steps", [1, 3])
def test_gradcheck_training_through_the_batch_mean(karcher_steps: int) -> None:
    # detach_mean=False: the chordal start and the unrolled Karcher steps are differentiated exactly
    layer = SO3BatchNorm(2, karcher_steps=karcher_steps, detach_mean=False, validate=False)
    _set_params(layer, 3)
    assert _gradcheck(layer, wrt_input=True)


def test_gradcheck_detached_mean_and_eval_mode() -> None:
    layer = SO3BatchNorm(2, validate=False)
    _set_params(layer, 4)
    assert _gradcheck(layer, wrt_input=False)  # the detached mean is a constant: exact only for parameters
    with torch.no_grad():
        layer.running_mean.copy_(so3_exp(torch.tensor([[0.2, 0.1, -0.3], [0.0, 0.5, 0.1]], dtype=F64)))
        layer.running_var.copy_(torch.tensor([0.3, 0.6], dtype=F64))
    assert _gradcheck(layer.eval(), wrt_input=True)


@pytest.mark.parametrize(("karcher_steps", "detach_mean"), [(1, True), (3, True), (2, False)])
def test_forward_matches_forward_ref(seed: int, karcher_steps: int, detach_mean: bool) -> None:
    M, w = _axis_angles(12, 3, 0.5, seed)
    layer = SO3BatchNorm(3, karcher_steps=karcher_steps, detach_mean=detach_mean)
    _set_params(layer, seed)
    G = torch.randn(12, 3, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))
    outs, grads = [], []
    for ref in (False, True):
        wg = w.clone().requires_grad_(True)
        X = M @ so3_exp(wg)
        Y = copy.deepcopy(layer).forward_ref(X) if ref else copy.deepcopy(layer)(X)
        (Y * G).sum().backward()
        outs.append(Y.detach())
        grads.append(wg.grad)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-12, rtol=0)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=0)


def test_state_dict_round_trip_and_float32(seed: int) -> None:
    layer = SO3BatchNorm(3)
    for k in range(3):
        layer(_batch(10, 3, 0.4, seed + k))
    fresh = SO3BatchNorm(3)
    fresh.load_state_dict(copy.deepcopy(layer.state_dict()))
    assert set(dict(layer.named_buffers())) == {"running_mean", "running_var", "train_mean", "train_var"}
    Z = _batch(6, 3, 0.4, seed + 7)
    torch.testing.assert_close(fresh.eval()(Z), layer.eval()(Z))
    # float32
    layer32 = SO3BatchNorm(3).to(torch.float32)
    assert all(b.dtype == torch.float32 for b in layer32.buffers())
    assert isinstance(layer32.weight, geoopt.ManifoldParameter)
    assert isinstance(layer32.weight.manifold, SpecialOrthogonal) and layer32.weight.dtype == torch.float32
    X = _batch(10, 3, 0.4, seed)
    X32 = X.float().requires_grad_(True)
    Y32 = layer32(X32)
    assert Y32.dtype == torch.float32 and torch.isfinite(Y32).all()
    Y32.sum().backward()
    assert torch.isfinite(X32.grad).all()
    torch.testing.assert_close(Y32.double(), SO3BatchNorm(3)(X), atol=1e-4, rtol=0)
    # compute dtype: float32 arithmetic, float64 output
    Yc = SO3BatchNorm(3, compute_dtype="float32")(X)
    assert Yc.dtype == F64
    torch.testing.assert_close(Yc, SO3BatchNorm(3)(X), atol=1e-4, rtol=0)


def test_refit_replaces_statistics_with_exact_ones(seed: int) -> None:
    layer = SO3BatchNorm(2)
    _set_params(layer, seed)
    for k in range(2):
        layer(_batch(8, 2, 0.3, seed + k))
    target = _batch(20, 2, 0.5, seed + 11)
    Y = refit_domain_norms(layer, target, None)
    M = mean_so3(target, steps=100, tol=1e-14)
    torch.testing.assert_close(layer.running_mean, M, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.train_mean, M, atol=1e-10, rtol=0)
    v2 = so3_log(left_mul(M.mT, target)).square().sum(-1).mean(0)
    torch.testing.assert_close(layer.running_var, v2, atol=1e-10, rtol=0)
    assert not layer.refitting and layer.training
    assert float(distance_so3(mean_so3(Y, steps=50, tol=1e-14), layer.weight.detach()).max()) < 1e-9


def test_batch_dims_pool_frames_and_feature_shapes() -> None:
    N, T, J = 4, 5, 3
    X = _batch(N * T, J, 0.4, seed=1).reshape(N, T, J, 3, 3)
    pooled = SO3BatchNorm(J, batch_dims=(0, 1), karcher_steps=3)
    flat = SO3BatchNorm(J, karcher_steps=3)
    torch.testing.assert_close(pooled(X), flat(X.reshape(N * T, J, 3, 3)).reshape(X.shape))
    torch.testing.assert_close(pooled.running_mean, flat.running_mean)
    # batch dimension in the middle: (T, N, J) pooled over N only, per (T, J) feature
    mid = SO3BatchNorm(shape=(T, J), batch_dims=(1,), karcher_steps=3)
    first = SO3BatchNorm(shape=(T, J), karcher_steps=3)
    torch.testing.assert_close(mid(X.transpose(0, 1)), first(X).transpose(0, 1))
    assert mid.weight.shape == (T, J, 3, 3) and mid.shift.shape == (T, J)
    # no feature dimension
    for nf in (None, 1):
        layer = SO3BatchNorm(nf)
        assert layer.shape == () and layer(X[:, 0, 0]).shape == (N, 3, 3)
    assert create_norm_layer("liebn_so3", J).shape == (J,)


def test_degenerate_batches_reuse_the_running_variance() -> None:
    X = _batch(8, 2, 0.4, seed=2)
    grads = {}
    for name, batch in (("batch", X), ("one", X[:1]), ("same", X[:1].expand(6, 2, 3, 3))):
        layer = SO3BatchNorm(2)
        Xg = batch.clone().requires_grad_(True)
        Y = layer(Xg)
        assert torch.isfinite(Y).all()
        (Y * torch.randn(Y.shape, dtype=F64, generator=torch.Generator().manual_seed(0))).sum().backward()
        grads[name] = float(Xg.grad.norm() / batch.shape[0] ** 0.5)
        if name != "batch":
            torch.testing.assert_close(layer.running_var, torch.ones(2, dtype=F64))
    assert grads["one"] < 3 * grads["batch"] and grads["same"] < 3 * grads["batch"]


def test_parameters_learn_and_bias_stays_a_rotation() -> None:
    torch.manual_seed(0)
    layer = SO3BatchNorm(2)
    X = _batch(16, 2, 0.4, seed=4)
    target = so3_exp(torch.tensor([[0.3, -0.5, 0.2], [1.0, 0.1, 0.0]], dtype=F64))
    opt = geoopt.optim.RiemannianAdam(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (layer(X) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0]
    W = layer.weight.detach()
    torch.testing.assert_close(W.mT @ W, torch.eye(3, dtype=F64).expand_as(W), atol=1e-12, rtol=0)
    assert bool((torch.linalg.det(W) > 0).all()) and layer.shift.grad is not None


def test_bad_inputs_and_arguments_raise() -> None:
    layer = SO3BatchNorm(3)
    X = _batch(4, 3, 0.3, seed=0)
    with pytest.raises(ValueError, match="orthogonal"):
        layer(1.1 * X)
    bad = X.clone()
    bad[1, 2] = -bad[1, 2]
    with pytest.raises(ValueError, match="determinant"):
        layer(bad)
    bad = X.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer(bad)
    with pytest.raises(ValueError, match="NaN"):
        SO3BatchNorm(3, validate=False)(bad)
    for shape_bad in (X[:, :2], X[0], torch.eye(4, dtype=F64).expand(4, 3, 4, 4)):
        with pytest.raises(ValueError, match="shape"):
            layer(shape_bad)
    with pytest.raises(TypeError, match="floating"):
        layer(X.long())
    with pytest.raises(ValueError, match="contradicts"):
        SO3BatchNorm(5, shape=(2, 3))
    with pytest.raises(ValueError, match="batch_dims"):
        SO3BatchNorm(3, batch_dims=(0, 0))
    with pytest.raises(ValueError, match="batch_dims"):
        SO3BatchNorm(3, batch_dims=(3,))
    with pytest.raises(ValueError, match="eps"):
        SO3BatchNorm(3, eps=0.0)
    with pytest.raises(ValueError, match="compute_dtype"):
        SO3BatchNorm(3, compute_dtype="float16")
    with pytest.raises(TypeError, match="num_features"):
        SO3BatchNorm(2.5)


def test_registry_size_counts_rotations_not_the_matrix_size():
    """``create_norm_layer("liebn_so3", J)`` takes (N, J, 3, 3); given the matrix size by mistake, the error says so."""
    R = so3_exp(0.3 * torch.randn(8, 5, 3, dtype=torch.float64))
    assert create_norm_layer("liebn_so3", 5)(R).shape == (8, 5, 3, 3)
    assert create_norm_layer("liebn_so3", None)(R[:, 0]).shape == (8, 3, 3)
    with pytest.raises(ValueError, match=r"count rotations per sample .* not the matrix size .*num_features=None"):
        create_norm_layer("liebn_so3", 3)(R[:, 0])
