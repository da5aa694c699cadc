"""BatchNorm/GroupNorm norm-slot wrappers and the feature-layout adapter (float64)."""

from __future__ import annotations

import pytest
import torch

import manifoldnorm.nn as mnn
from manifoldnorm.nn.euclidean import BatchNorm, GroupNorm, MovedFeatures, adapt_layout, feature_dim_of


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(*shape, generator=g, dtype=torch.float64) + 0.5


def test_batchnorm_formula_on_images_and_running_stats() -> None:
    bn = BatchNorm(3, momentum=0.1).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    x = _x(4, 3, 5, 2)
    y = bn(x, domain=None)
    mu = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mu) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    ref = (x - mu) / torch.sqrt(var + 1e-5) * bn.weight.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    m = x.numel() // 3
    torch.testing.assert_close(bn.running_mean, 0.1 * mu.flatten())
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var.flatten() * m / (m - 1))
    bn.eval()
    ref_eval = (x - bn.running_mean.view(1, 3, 1, 1)) / torch.sqrt(bn.running_var.view(1, 3, 1, 1) + 1e-5)
    ref_eval = ref_eval * bn.weight.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(bn(x), ref_eval, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(5, 3), (5, 3, 4), (2, 3, 4, 4), (2, 3, 2, 2, 2)])
def test_batchnorm_any_spatial_rank_matches_torch(shape: tuple[int, ...]) -> None:
    ours = BatchNorm(3).double()
    ref = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
           5: torch.nn.BatchNorm3d}[len(shape)](3).double()
    x = _x(*shape)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


def test_groupnorm_formula_and_group_cap() -> None:
    gn = GroupNorm(6, num_groups=4).double()  # 4 does not divide 6: largest divisor <= 4 is 3
    assert gn.num_groups == 3
    assert GroupNorm(4).num_groups == 4 and GroupNorm(64).num_groups == 32
    with torch.no_grad():
        gn.weight.copy_(torch.linspace(0.5, 2.0, 6))
        gn.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    x = _x(2, 6, 3, 3)
    g = x.reshape(2, 3, -1)
    mu = g.mean(-1, keepdim=True)
    var = ((g - mu) ** 2).mean(-1, keepdim=True)
    ref = ((g - mu) / torch.sqrt(var + 1e-5)).reshape_as(x) * gn.weight.view(1, 6, 1, 1) + gn.bias.view(1, 6, 1, 1)
    torch.testing.assert_close(gn(x, domain=None), ref, rtol=1e-12, atol=1e-12)


def test_gradcheck() -> None:
    x = _x(3, 2, 2).requires_grad_()
    assert torch.autograd.gradcheck(BatchNorm(2).double(), (x,))
    assert torch.autograd.gradcheck(GroupNorm(2, num_groups=1).double(), (x,))


def test_registry_and_errors() -> None:
    assert isinstance(mnn.create_norm_layer("batchnorm", 3), BatchNorm)
    assert isinstance(mnn.create_norm_layer("groupnorm", 8, num_groups=2), GroupNorm)
    with pytest.raises(ValueError, match="expected 3 features"):
        BatchNorm(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="at least 2 dims"):
        BatchNorm(3)(torch.randn(3))
    with pytest.raises(ValueError, match=r"expected an input \(N, 4"):
        GroupNorm(4)(torch.randn(2, 3, 2))
    with pytest.raises(ValueError, match="num_groups must be >= 1"):
        GroupNorm(4, num_groups=0)


def test_layouts_declared_by_every_registered_euclidean_norm() -> None:
    for name in mnn.list_norms("euclidean"):
        if "euclidean" not in mnn.get_norm_info(name).inputs:
            continue
        layer = mnn.create_norm_layer(name, 4)
        assert feature_dim_of(layer) in (1, -1, None), name
    assert feature_dim_of(torch.nn.LayerNorm(4)) == -1
    assert feature_dim_of(torch.nn.BatchNorm1d(4)) == 1


def test_adapt_layout_moves_features_and_keeps_same_layout_untouched() -> None:
    ln = mnn.create_norm_layer("layernorm", 3).double()
    assert adapt_layout(ln, -1) is ln
    wrapped = adapt_layout(ln, 1)
    assert isinstance(wrapped, MovedFeatures)
    x = _x(2, 3, 4, 5)  # channels first
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (3,), ln.weight, ln.bias, 1e-5).permute(0, 3, 1, 2)
    torch.testing.assert_close(wrapped(x, domain=None), ref, rtol=1e-12, atol=1e-12)
    bn = BatchNorm(5).double()
    tokens = _x(2, 7, 5)  # (B, T, C): BatchNorm over (B, T) per feature
    ref_bn = torch.nn.functional.batch_norm(tokens.transpose(1, 2), None, None, bn.weight, bn.bias, True)
    torch.testing.assert_close(adapt_layout(bn, -1)(tokens), ref_bn.transpose(1, 2), rtol=1e-12, atol=1e-12)
    ident = mnn.create_norm_layer("none", 3)
    assert adapt_layout(ident, 1) is ident and adapt_layout(ident, -1) is ident
    with pytest.raises(ValueError, match="features_dim must be 1"):
        adapt_layout(ln, 2)
