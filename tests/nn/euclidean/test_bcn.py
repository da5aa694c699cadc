"""Batch-Channel Normalization against its defining formula written out in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

import manifoldnorm.nn.euclidean.bcn  # noqa: F401  (registers the layer)
from manifoldnorm.nn import create_norm_layer, get_norm_info
from manifoldnorm.nn.euclidean.bcn import BatchChannelNorm

F64 = torch.float64


def _rand(*shape: int, seed: int, scale: float = 1.5, shift: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g, dtype=F64) + shift


def _randomize(layer: BatchChannelNorm, seed: int) -> BatchChannelNorm:
    with torch.no_grad():
        for i, p in enumerate(layer.parameters()):
            p.copy_(_rand(*p.shape, seed=seed + i, scale=0.7, shift=0.5))
    return layer


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean, biased and unbiased variance over the batch and spatial positions, by explicit sums."""
    c = x.shape[1]
    flat = x.transpose(0, 1).reshape(c, -1)
    n = flat.shape[1]
    mean = flat.sum(1) / n
    ss = ((flat - mean[:, None]) ** 2).sum(1)
    return mean, ss / n, ss / (n - 1)


def _ref_bcn(x, mean, var, gb, bb, gc, bc, groups, eps):
    """Batch part with the given per-channel statistics, then a per-sample group standardization, loop by loop."""
    n, c = x.shape[:2]
    shape = (-1, *([1] * (x.ndim - 2)))
    xb = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps) * gb.reshape(shape) + bb.reshape(shape)
    out = torch.empty_like(x)
    size = c // groups
    for k in range(n):
        for g in range(groups):
            sl = slice(g * size, (g + 1) * size)
            block = xb[k, sl]
            m = block.sum() / block.numel()
            v = ((block - m) ** 2).sum() / block.numel()
            out[k, sl] = (block - m) / torch.sqrt(v + eps) * gc[sl].reshape(shape) + bc[sl].reshape(shape)
    return out


def _ref_from_layer(layer: BatchChannelNorm, x, mean, var):
    return _ref_bcn(x, mean, var, layer.batch_weight, layer.batch_bias, layer.weight, layer.bias,
                    layer.num_groups, layer.eps)


# ------------------------------------------------------------------------------------------ formula & stats


@pytest.mark.parametrize("shape", [(1, 8, 3, 2), (3, 8, 5), (6, 8)])
def test_micro_batch_mode_normalizes_with_estimates_updated_this_step(shape) -> None:
    r = 0.3
    layer = _randomize(BatchChannelNorm(8, num_groups=2, momentum=r, eps=1e-3, dtype=F64), 10).train()
    est_mean, est_var = torch.zeros(8, dtype=F64), torch.ones(8, dtype=F64)
    for step in range(3):
        x = _rand(*shape, seed=step, shift=0.3 * step)
        y = layer(x)
        mu_b, var_b, _ = _channel_stats(x)
        est_mean = (1 - r) * est_mean + r * mu_b
        est_var = (1 - r) * est_var + r * var_b
        torch.testing.assert_close(layer.running_mean, est_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, est_var, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y, _ref_from_layer(layer, x, est_mean, est_var), rtol=1e-11, atol=1e-11)
    assert int(layer.num_batches_tracked) == 3


def test_micro_batch_eval_right_after_train_is_identical_and_frozen() -> None:
    layer = _randomize(BatchChannelNorm(4, momentum=0.2, dtype=F64), 20)
    layer.train()(_rand(2, 4, 3, 3, seed=21))
    x = _rand(2, 4, 3, 3, seed=22, shift=1.0)
    y_train = layer(x)
    buffers = [b.clone() for b in layer.buffers()]
    y_eval = layer.eval()(x)
    assert torch.equal(y_eval, y_train)
    y_eval2 = layer(_rand(2, 4, 3, 3, seed=23))
    assert all(torch.equal(a, b) for a, b in zip(buffers, layer.buffers(), strict=True))
    torch.testing.assert_close(y_eval2, _ref_from_layer(layer, _rand(2, 4, 3, 3, seed=23), layer.running_mean,
                                                        layer.running_var), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(5, 6, 3, 2), (4, 6, 7), (8, 6)])
def test_large_batch_mode_uses_batch_stats_and_updates_running_like_batchnorm(shape) -> None:
    layer = _randomize(BatchChannelNorm(6, num_groups=3, momentum=0.25, estimated_stats=False, dtype=F64), 30)
    x = _rand(*shape, seed=31)
    y = layer.train()(x)
    mu_b, var_b, var_unbiased = _channel_stats(x)
    torch.testing.assert_close(y, _ref_from_layer(layer, x, mu_b, var_b), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(layer.running_mean, 0.25 * mu_b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, 0.75 + 0.25 * var_unbiased, rtol=1e-12, atol=1e-12)
    # eval: the running statistics replace the batch statistics in the batch part
    y_eval = layer.eval()(x)
    torch.testing.assert_close(y_eval, _ref_from_layer(layer, x, layer.running_mean, layer.running_var),
                               rtol=1e-11, atol=1e-11)
    assert not torch.allclose(y_eval, y)


def test_large_batch_mode_matches_torch_batchnorm_then_groupnorm() -> None:
    layer = _randomize(BatchChannelNorm(8, num_groups=4, estimated_stats=False, dtype=F64), 40).train()
    x = _rand(3, 8, 4, 4, seed=41)
    xb = torch.nn.functional.batch_norm(x, None, None, layer.batch_weight, layer.batch_bias, True, 0.0, layer.eps)
    ref = torch.nn.functional.group_norm(xb, 4, layer.weight, layer.bias, layer.eps)
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)


def test_micro_batch_gradient_does_not_flow_through_the_estimates() -> None:
    layer = _randomize(BatchChannelNorm(4, momentum=0.5, dtype=F64), 50)
    x = _rand(2, 4, 3, 3, seed=51).requires_grad_()
    w = _rand(2, 4, 3, 3, seed=52)
    (g_train,) = torch.autograd.grad((layer.train()(x) * w).sum(), x)
    (g_eval,) = torch.autograd.grad((layer.eval()(x) * w).sum(), x)  # same estimates, held constant
    torch.testing.assert_close(g_train, g_eval, rtol=1e-12, atol=1e-12)


def test_num_groups_capped_to_a_divisor() -> None:
    assert BatchChannelNorm(4).num_groups == 4
    assert BatchChannelNorm(64).num_groups == 32
    assert BatchChannelNorm(6, num_groups=4).num_groups == 3
    assert BatchChannelNorm(7, num_groups=3).num_groups == 1


# ---------------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("estimated, training", [(True, True), (True, False), (False, True), (False, False)])
def test_gradcheck(estimated: bool, training: bool) -> None:
    # momentum 0 keeps the estimates fixed between the repeated evaluations of gradcheck
    layer = _randomize(BatchChannelNorm(4, num_groups=2, momentum=0.0, estimated_stats=estimated, dtype=F64), 60)
    with torch.no_grad():
        layer.running_mean.copy_(_rand(4, seed=61, scale=0.5))
        layer.running_var.copy_(_rand(4, seed=62, scale=0.3, shift=1.2).abs())
    layer.train(training)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = _rand(3, 4, 2, 3, seed=63).requires_grad_()

    def f(x, *ps):
        return functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-8, rtol=1e-6)


# ------------------------------------------------------------------------------------- module behaviour


def test_registry_key_and_class_attributes() -> None:
    layer = create_norm_layer("bcn", 4, expect="euclidean", estimated_stats=False)
    assert isinstance(layer, BatchChannelNorm) and not layer.estimated_stats
    info = get_norm_info("bcn")
    assert info.kind == "euclidean" and info.inputs == ("euclidean",) and info.factory is BatchChannelNorm
    assert BatchChannelNorm.feature_dim == 1 and BatchChannelNorm.pairs_with_weight_standardization is True


def test_state_dict_round_trip_and_float32_input() -> None:
    layer = _randomize(BatchChannelNorm(4, dtype=F64), 70).train()
    for seed in range(3):
        layer(_rand(2, 4, 3, seed=seed))
    fresh = BatchChannelNorm(4, dtype=F64)
    fresh.load_state_dict(copy.deepcopy(layer.state_dict()))
    x = _rand(2, 4, 3, seed=9)
    assert torch.equal(fresh.eval()(x), layer.eval()(x))
    assert torch.equal(fresh.train()(x), layer.train()(x))
    y32 = BatchChannelNorm(4)(x.float(), domain=torch.zeros(2))
    assert y32.dtype == torch.float32 and y32.shape == x.shape and torch.isfinite(y32).all()


def test_bad_input_and_options() -> None:
    layer = BatchChannelNorm(4)
    with pytest.raises(ValueError, match=r"expected an input \(N, 4\)"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"expected an input \(N, 4\)"):
        layer(torch.randn(4))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([[1.0] * 4])
    with pytest.raises(ValueError, match="holds 1 value per sample"):
        layer(torch.randn(8, 4))
    with pytest.raises(ValueError, match="non-empty batch"):
        layer(torch.randn(0, 4, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchChannelNorm(4, num_groups=1, estimated_stats=False)(torch.randn(1, 4))
    BatchChannelNorm(4, num_groups=1)(torch.randn(1, 4))  # micro-batch mode accepts a single sample
    with pytest.raises(ValueError, match="num_groups must be >= 1"):
        BatchChannelNorm(4, num_groups=0)
    with pytest.raises(TypeError, match="num_features must be an int"):
        BatchChannelNorm(4.0)
    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\]"):
        BatchChannelNorm(4, momentum=1.5)
    with pytest.raises(TypeError, match="momentum must be a float"):
        BatchChannelNorm(4, momentum=None)
    with pytest.raises(ValueError, match="eps must be a finite positive"):
        BatchChannelNorm(4, eps=0.0)
    with pytest.raises(TypeError, match="estimated_stats must be a bool"):
        BatchChannelNorm(4, estimated_stats="yes")
