"""Contract every registered Euclidean norm meets (the test matrix is the registry).

Inputs are ``(N, C, C)``: a valid layout both for layers normalizing features in dim 1 (BatchNorm style) and for
layers normalizing the last dim (LayerNorm style).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch.func import functional_call

import manifoldnorm.nn as mnn
from manifoldnorm.nn.euclidean import feature_dim_of
from tests.nn.euclidean.twin_helpers import assert_step_matches_twin, float64_twin

C = 4
EUCLIDEAN = [k for k in mnn.list_norms("euclidean") if "euclidean" in mnn.get_norm_info(k).inputs]

#: How the training output of a norm with running statistics relates to them (read from each layer):
#: ``"batch"``: training normalizes with the batch mean and biased variance (over all dims but the features),
#: evaluation with ``running_mean``/``running_var`` (EvoNorm-B0: the variance only);
#: ``"batch_square"``: training scales by the batch quadratic mean, evaluation by ``running_phi`` (UnifiedNorm
#: during its warmup);
#: ``"before"``: training normalizes with the running statistics from before its own update (OnlineNorm,
#: PowerNorm), so it equals evaluation before the step;
#: ``"after"``: training normalizes with the running estimates after its update (micro-batch BCN), so it equals
#: evaluation after the step.
RUNNING_STATS = {
    "batchnorm": "batch", "syncbatchnorm": "batch", "evonorm_b0": "batch",
    "unifiednorm": "batch_square",
    "onlinenorm": "before", "powernorm": "before",
    "bcn": "after",
}
#: constructor options that make the backward the exact derivative of the forward (for gradcheck)
EXACT_BACKWARD = {"approx_backward": False, "estimated_stats": False}


def _x(seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (1.5 * torch.randn(6, C, C, generator=g, dtype=torch.float64) + 0.3).to(dtype)


def _layer(name: str, **kw) -> torch.nn.Module:
    return mnn.create_norm_layer(name, C, **kw).to(torch.float64)


def _perturb(layer: torch.nn.Module, seed: int = 11) -> torch.nn.Module:
    """Parameters away from their initial values, so the affine parts are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return layer


def _stateful(layer: torch.nn.Module) -> bool:
    return any(b.is_floating_point() for b in layer.buffers())


def _stat_dims(layer: torch.nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    """Dims the per-feature statistics reduce over (all but the feature dim of the layer's layout)."""
    fd = feature_dim_of(layer)
    return (0, *range(2, x.ndim)) if fd == 1 else tuple(range(x.ndim - 1))


def _exact_kwargs(name: str) -> dict:
    params = inspect.signature(mnn.get_norm_layer(name)).parameters
    return {k: v for k, v in EXACT_BACKWARD.items() if k in params}


def test_registry_lists_the_euclidean_zoo() -> None:
    assert {"batchnorm", "layernorm", "rmsnorm", "syncbatchnorm"} <= set(EUCLIDEAN)


@pytest.mark.parametrize("name", EUCLIDEAN)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shape_dtype_and_finite_backward(name: str, dtype: torch.dtype) -> None:
    layer = mnn.create_norm_layer(name, C).to(dtype).train()
    twin = float64_twin(layer)
    x = _x(0, dtype).requires_grad_()
    y = layer(x, domain=None)
    assert y.shape == x.shape and y.dtype == dtype
    (y * _x(1, dtype)).sum().backward()
    assert torch.isfinite(x.grad).all()
    for p in layer.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    # the dtype only changes the round-off: output, gradients and buffers match the float64 step, and a
    # float64 step is more accurate than a float32 one
    assert_step_matches_twin(layer, twin, x, y, _x(1, dtype))


@pytest.mark.parametrize("name", EUCLIDEAN)
def test_gradcheck_in_training_mode(name: str) -> None:
    """The gradient (with an exact backward where the layer offers an approximate one) is the derivative."""
    layer = _perturb(_layer(name, **_exact_kwargs(name))).train()
    for seed in (5, 6):  # running statistics away from their initial values
        layer(_x(seed))
    x = _x(2)[:3].clone().requires_grad_()
    names = [k for k, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def f(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        # a fresh copy per call: each evaluation starts from the same running statistics
        return functional_call(copy.deepcopy(layer), dict(zip(names, values, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", EUCLIDEAN)
def test_state_dict_round_trip(name: str) -> None:
    layer = _layer(name).train()
    for seed in range(3):
        layer(_x(seed))
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fresh = _layer(name)
    fresh.load_state_dict(copy.deepcopy(layer.state_dict()))
    layer.eval(), fresh.eval()
    torch.testing.assert_close(fresh(_x(9)), layer(_x(9)), rtol=0, atol=0)


@pytest.mark.parametrize("name", EUCLIDEAN)
def test_train_and_eval_differ_only_through_running_stats(name: str) -> None:
    layer = _perturb(_layer(name))
    stateful = _stateful(layer)
    x = _x(3)
    if not stateful:
        y_train = layer.train()(x)
        y_eval = layer.eval()(x)
        torch.testing.assert_close(y_train, y_eval, rtol=0, atol=0)
        return
    rule = RUNNING_STATS.get(name)
    assert rule is not None, f"{name} keeps running statistics: declare how training uses them in RUNNING_STATS"
    layer.train()
    for seed in (5, 6):  # running statistics away from their initial values
        layer(_x(seed))
    before = copy.deepcopy(layer)
    y_train = layer(x)
    if rule == "before":
        ref = before
    elif rule == "after":
        ref = copy.deepcopy(layer)
    else:  # the statistics of this batch, computed here, written into the running buffers of a copy
        ref = copy.deepcopy(layer)
        dims = _stat_dims(layer, x)
        with torch.no_grad():
            if rule == "batch_square":
                ref.running_phi.copy_(x.square().mean(dims))
            else:
                var, mean = torch.var_mean(x, dim=dims, unbiased=False)
                ref.running_var.copy_(var)
                if hasattr(ref, "running_mean"):
                    ref.running_mean.copy_(mean)
        # the layer's own running statistics are not this batch's: its eval output differs from training
        assert not torch.allclose(layer.eval()(x), y_train, rtol=1e-3, atol=1e-3)
    y_eval = ref.eval()(x)
    torch.testing.assert_close(y_eval, y_train, rtol=1e-12, atol=1e-12)
    # evaluation is per sample and leaves every buffer alone
    state = copy.deepcopy(ref.state_dict())
    torch.testing.assert_close(ref(x[2:3]), y_eval[2:3], rtol=1e-12, atol=1e-12)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, state[k]), k
