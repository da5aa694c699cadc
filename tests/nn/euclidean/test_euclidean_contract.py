"""Contract every registered Euclidean norm meets (the test matrix is the registry).

Inputs are ``(N, C, C)``: a valid layout both for layers normalizing features in dim 1 (BatchNorm style) and for
layers normalizing the last dim (LayerNorm style).
"""

from __future__ import annotations

import copy

import pytest
import torch

import manifoldnorm.nn as mnn

C = 4
EUCLIDEAN = [k for k in mnn.list_norms("euclidean") if "euclidean" in mnn.get_norm_info(k).inputs]


def _x(seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (1.5 * torch.randn(6, C, C, generator=g, dtype=torch.float64) + 0.3).to(dtype)


def _layer(name: str) -> torch.nn.Module:
    return mnn.create_norm_layer(name, C).to(torch.float64)


def test_registry_lists_the_euclidean_zoo() -> None:
    assert {"batchnorm", "layernorm", "rmsnorm", "syncbatchnorm"} <= set(EUCLIDEAN)


@pytest.mark.parametrize("name", EUCLIDEAN)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shape_dtype_and_finite_backward(name: str, dtype: torch.dtype) -> None:
    layer = mnn.create_norm_layer(name, C).to(dtype).train()
    x = _x(0, dtype).requires_grad_()
    y = layer(x, domain=None)
    assert y.shape == x.shape and y.dtype == dtype
    (y * _x(1, dtype)).sum().backward()
    assert torch.isfinite(x.grad).all()
    for p in layer.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


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
    layer = _layer(name)
    stateful = len(list(layer.buffers())) > 0
    x = _x(3)
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    if not stateful:
        torch.testing.assert_close(y_train, y_eval, rtol=0, atol=0)
    else:
        assert any(b.is_floating_point() for b in layer.buffers())
        assert y_eval.shape == y_train.shape
