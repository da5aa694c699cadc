"""Tests of the small-image ResNet: shapes for every norm slot, Weight Standardization, Fixup, training, errors."""

from __future__ import annotations

import copy
import functools
import importlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import manifoldnorm.nn.euclidean as euclidean
import manifoldnorm.nn.euclidean.standard  # noqa: F401  (registers batchnorm / groupnorm)
from manifoldnorm.models.resnet import BasicBlock, ResNet
from manifoldnorm.nn import IdentityNorm, get_norm_layer, list_norms
from manifoldnorm.nn.euclidean.layout import MovedFeatures, feature_dim_of
from manifoldnorm.nn.euclidean.standard import GroupNorm

if (Path(euclidean.__file__).parent / "bcn.py").exists():
    importlib.import_module("manifoldnorm.nn.euclidean.bcn")

NORMS = ["batchnorm", "groupnorm", "evonorm_b0", "evonorm_s0", "layernorm", "rmsnorm", "none"]
NORMS += ["bcn"] if "bcn" in list_norms() else []
WIDTHS = (4, 8)


class PairedGroupNorm(GroupNorm):
    """An unregistered channels-first norm asking for Weight Standardization."""

    pairs_with_weight_standardization = True


def _unwrap(factory):
    while isinstance(factory, functools.partial):
        factory = factory.func
    return factory


def _norm_slots(model: ResNet) -> list[nn.Module]:
    slots = [model.stem_norm]
    for block in model.blocks:
        slots += [block.norm1, block.norm2] + ([block.proj_norm] if block.proj_norm is not None else [])
    return slots


def _convs(model: ResNet) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _inner(slot: nn.Module) -> nn.Module:
    return slot.layer if isinstance(slot, MovedFeatures) else slot


@torch.no_grad()
def _perturb(model: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Move every parameter off its init (norm gains, zero-initialized Fixup convs and head included)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model


# ----------------------------------------------------------------------------------------------------- shapes, slots
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("size,channels", [(8, 1), (16, 3)])
def test_output_shape_every_norm(norm: str, size: int, channels: int) -> None:
    torch.manual_seed(0)
    model = ResNet(channels, 5, widths=WIDTHS, norm_layer=norm)
    x = torch.randn(3, channels, size, size)
    out = model(x)
    assert out.shape == (3, 5) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # training is equivariant to a permutation of the batch (batch statistics are symmetric in the samples)
    perm = torch.tensor([2, 0, 1])
    _perturb(model)
    y_train = model(x)
    torch.testing.assert_close(model(x[perm]), y_train[perm], atol=1e-5, rtol=1e-5)
    model.eval()
    assert model(x).shape == (3, 5)
    assert model.features(x).shape == (3, WIDTHS[-1])
    # the logits are the linear head on the pooled features
    f = model.features(x)
    if model.head_bias_in is not None:
        f = f + model.head_bias_in
    torch.testing.assert_close(model.head(f), model(x), atol=0, rtol=0)
    # evaluation is per sample: equivariant to permutations, a sample alone gets the same logits
    y = model(x)
    torch.testing.assert_close(model(x[perm]), y[perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x[1:2]), y[1:2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck_every_norm(norm: str) -> None:
    """float64 finite differences of a tiny ResNet in training mode, w.r.t. the input and the head."""
    torch.manual_seed(1)
    model = _perturb(ResNet(1, 2, widths=(2, 4), norm_layer=norm).double())
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    w = model.head.weight.detach().clone().requires_grad_(True)

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(copy.deepcopy(model), {"head.weight": w}, (x,))

    assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_default_widths_on_8x8_digits() -> None:
    model = ResNet(1, 10)
    assert model.widths == (16, 32, 64) and len(model.blocks) == 3
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    # stages run at 8, 4, 2 pixels; the head reads the global average of the last stage
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, inp, out: seen.append(out.detach()))
    x = torch.randn(2, 1, 8, 8)
    logits = model(x)
    assert [tuple(h.shape[1:]) for h in seen] == [(16, 8, 8), (32, 4, 4), (64, 2, 2)]
    torch.testing.assert_close(logits, model.head(seen[-1].mean(dim=(2, 3))), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("norm", NORMS)
def test_norm_slots_hold_requested_class(norm: str) -> None:
    model = ResNet(1, 3, widths=WIDTHS, blocks_per_stage=2, norm_layer=norm)
    expected = _unwrap(get_norm_layer(norm))
    slots = _norm_slots(model)
    assert len(slots) == 1 + 2 * 4 + 1  # stem, two per block, one projection (stage 2)
    for slot in slots:
        inner = _inner(slot)
        assert isinstance(inner, expected)
        assert isinstance(slot, MovedFeatures) == (feature_dim_of(inner) == -1)
    assert [b.conv1.stride for b in model.blocks] == [(1, 1), (1, 1), (2, 2), (1, 1)]


def test_norm_layer_as_class_and_partial() -> None:
    model = ResNet(1, 3, widths=WIDTHS, norm_layer=functools.partial(GroupNorm, num_groups=2))
    assert all(isinstance(s, GroupNorm) and s.num_groups == 2 for s in _norm_slots(model))
    # the partial's argument reaches the computation: the stem normalizes over 2 groups of channels
    seen = []
    model.stem_norm.register_forward_hook(lambda m, inp, out: seen.append((inp[0].detach(), out.detach())))
    model(torch.randn(3, 1, 8, 8))
    h, y = seen[0]
    norm = model.stem_norm
    torch.testing.assert_close(y, F.group_norm(h, 2, norm.weight, norm.bias, norm.eps), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(y, F.group_norm(h, WIDTHS[0], norm.weight, norm.bias, norm.eps), atol=1e-3)
    model = ResNet(1, 3, widths=WIDTHS, norm_layer=euclidean.EvoNormB0)
    assert all(isinstance(s, euclidean.EvoNormB0) for s in _norm_slots(model))
    # a class builds the same network as its registry name
    torch.manual_seed(0)
    by_class = ResNet(1, 3, widths=WIDTHS, norm_layer=euclidean.EvoNormB0)
    torch.manual_seed(0)
    by_name = ResNet(1, 3, widths=WIDTHS, norm_layer="evonorm_b0")
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(by_class(x), by_name(x), atol=0, rtol=0)


def test_channels_last_norm_normalizes_over_channels() -> None:
    torch.manual_seed(1)
    model = ResNet(2, 3, widths=WIDTHS, norm_layer="layernorm")
    seen = []
    model.stem_norm.register_forward_hook(lambda m, inp, out: seen.append(out.detach()))
    model(torch.randn(4, 2, 8, 8))
    y = seen[0].double()
    assert y.shape == (4, WIDTHS[0], 8, 8)
    torch.testing.assert_close(y.mean(dim=1), torch.zeros(4, 8, 8, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=1, unbiased=False), torch.ones(4, 8, 8, dtype=torch.float64),
                               atol=1e-3, rtol=0)


def test_domain_is_passed_through() -> None:
    for norm in ("batchnorm", "layernorm"):
        model = ResNet(1, 3, widths=WIDTHS, norm_layer=norm).eval()
        x = torch.randn(2, 1, 8, 8)
        torch.testing.assert_close(model(x, domain=torch.zeros(2, dtype=torch.long)), model(x))


# --------------------------------------------------------------------------------------------- weight standardization
def test_weight_standardization_auto_switch() -> None:
    assert not ResNet(1, 3, widths=WIDTHS).weight_standardization
    paired = ResNet(1, 3, widths=WIDTHS, norm_layer=PairedGroupNorm)
    assert paired.weight_standardization and not paired.fixup
    assert all(parametrize.is_parametrized(c, "weight") for c in _convs(paired))
    assert len(_convs(paired)) == 1 + 2 * 2 + 1
    assert not any(parametrize.is_parametrized(c, "weight") for c in _convs(ResNet(1, 3, widths=WIDTHS)))
    forced = ResNet(1, 3, widths=WIDTHS, norm_layer="batchnorm", weight_standardization=True)
    assert all(parametrize.is_parametrized(c, "weight") for c in _convs(forced))
    off = ResNet(1, 3, widths=WIDTHS, norm_layer=PairedGroupNorm, weight_standardization=False)
    assert not any(parametrize.is_parametrized(c, "weight") for c in _convs(off))
    if "bcn" in NORMS:
        assert ResNet(1, 3, widths=WIDTHS, norm_layer="bcn").weight_standardization


def test_conv_weight_seen_in_forward_is_standardized() -> None:
    torch.manual_seed(2)
    model = ResNet(2, 3, widths=WIDTHS, norm_layer=PairedGroupNorm).double()
    records: dict[nn.Module, dict] = {}

    def pre(m, inp):
        records[m] = {"w": m.weight.detach().clone(), "x": inp[0].detach()}

    def post(m, inp, out):
        records[m]["y"] = out.detach()

    for conv in _convs(model):
        conv.register_forward_pre_hook(pre)
        conv.register_forward_hook(post)
    model(torch.randn(3, 2, 8, 8, dtype=torch.float64))
    assert len(records) == len(_convs(model))
    for conv, rec in records.items():
        w = rec["w"]
        assert w.dtype == torch.float64
        flat = w.reshape(w.shape[0], -1)
        torch.testing.assert_close(flat.mean(1), torch.zeros(w.shape[0], dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(flat.std(1, unbiased=False), torch.ones(w.shape[0], dtype=torch.float64),
                                   atol=1e-3, rtol=0)
        raw = conv.parametrizations.weight.original.detach().reshape(w.shape[0], -1)
        centred = raw - raw.mean(1, keepdim=True)
        direction = centred / centred.norm(dim=1, keepdim=True)
        torch.testing.assert_close(flat / flat.norm(dim=1, keepdim=True), direction, atol=1e-10, rtol=0)
        expected = F.conv2d(rec["x"], w, stride=conv.stride, padding=conv.padding)
        torch.testing.assert_close(rec["y"], expected, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------------- fixup
def test_fixup_auto_switch_and_scalars() -> None:
    assert ResNet(1, 3, widths=WIDTHS, norm_layer="none").fixup
    assert ResNet(1, 3, widths=WIDTHS, norm_layer=IdentityNorm).fixup
    assert not ResNet(1, 3, widths=WIDTHS, norm_layer="batchnorm").fixup
    plain = ResNet(1, 3, widths=WIDTHS, norm_layer="none", fixup=False)
    assert plain.fixup_scale == 1.0 and plain.blocks[0].scale is None and plain.head_bias_in is None
    fix = ResNet(1, 3, widths=WIDTHS, norm_layer="none")
    for block in fix.blocks:
        assert block.scale.item() == 1.0
        assert all(getattr(block, n).item() == 0.0 for n in ("bias1a", "bias1b", "bias2a", "bias2b"))


@pytest.mark.parametrize("widths,blocks", [((4, 8), 1), ((4, 8, 8), 2), ((4,), 3)])
def test_fixup_scale_value(widths: tuple[int, ...], blocks: int) -> None:
    model = ResNet(1, 3, widths=widths, blocks_per_stage=blocks, norm_layer="none")
    num_branches = len(widths) * blocks
    assert len(model.blocks) == num_branches
    assert math.isclose(model.fixup_scale, num_branches ** (-1.0 / (2 * 2 - 2)), rel_tol=1e-15)


def test_fixup_weight_statistics() -> None:
    torch.manual_seed(3)
    model = ResNet(16, 3, widths=(16, 32), blocks_per_stage=2, norm_layer="none")
    assert model.fixup_scale == 0.5

    def ratio(conv: nn.Conv2d, scale: float) -> float:
        fan_in = conv.weight[0].numel()
        return conv.weight.std().item() / (math.sqrt(2.0 / fan_in) * scale)

    for block in model.blocks:
        assert 0.9 < ratio(block.conv1, 0.5) < 1.1
        assert torch.count_nonzero(block.conv2.weight) == 0
    assert 0.9 < ratio(model.blocks[2].proj_conv, 1.0) < 1.1  # shortcut: outside the branch, not scaled
    assert 0.9 < ratio(model.stem_conv, 1.0) < 1.1
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0


def test_fixup_network_at_init_is_its_shortcut_path() -> None:
    torch.manual_seed(4)
    model = ResNet(2, 3, widths=(4, 8, 8), blocks_per_stage=2, norm_layer="none").double()
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    h = F.relu(F.conv2d(x, model.stem_conv.weight, padding=1))  # Fixup biases are zero at init
    for block in model.blocks:
        assert torch.equal(block.branch(h), torch.zeros_like(block.shortcut(h)))
        if block.proj_conv is not None:
            h = F.conv2d(h, block.proj_conv.weight, stride=2)
        h = F.relu(h)
    torch.testing.assert_close(model.features(x), h.mean(dim=(2, 3)), atol=1e-12, rtol=0)
    assert torch.equal(model(x), torch.zeros(5, 3, dtype=torch.float64))


def test_plain_network_branches_are_not_zero() -> None:
    model = ResNet(1, 3, widths=WIDTHS, norm_layer="none", fixup=False)
    h = model.stem(torch.randn(2, 1, 8, 8))
    assert model.blocks[0].branch(h).abs().sum() > 0
    # without norms and Fixup the block is the plain conv-ReLU-conv branch plus the identity, hand-built
    block = model.blocks[0]
    branch = F.conv2d(F.relu(F.conv2d(h, block.conv1.weight, padding=1)), block.conv2.weight, padding=1)
    torch.testing.assert_close(block.branch(h), branch, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(block(h), F.relu(branch + h), atol=1e-6, rtol=1e-6)


# -------------------------------------------------------------------------------------------- training, state dict
def _toy_batch(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(12) % 3
    patterns = torch.randn(3, 1, 8, 8, generator=g)
    x = patterns[y] + 0.5 * torch.randn(12, 1, 8, 8, generator=g)
    return x, y


@pytest.mark.parametrize("norm", ["batchnorm", "groupnorm", "none"])
def test_adam_steps_reduce_loss(norm: str) -> None:
    torch.manual_seed(6)
    model = ResNet(1, 3, widths=WIDTHS, norm_layer=norm)
    assert model.fixup == (norm == "none")
    x, y = _toy_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]
    if norm == "none":
        assert model.blocks[0].conv2.weight.abs().sum() > 0  # the zero-initialized convs learned


@pytest.mark.parametrize("norm", ["batchnorm", "none", PairedGroupNorm])
def test_state_dict_round_trip(norm) -> None:
    torch.manual_seed(7)
    src = ResNet(1, 3, widths=WIDTHS, norm_layer=norm)
    x, y = _toy_batch()
    opt = torch.optim.SGD(src.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(src(x), y).backward()
        opt.step()
    torch.manual_seed(8)
    dst = ResNet(1, 3, widths=WIDTHS, norm_layer=norm)
    dst.load_state_dict(src.state_dict())
    src.eval()
    dst.eval()
    torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise() -> None:
    model = ResNet(3, 4, widths=WIDTHS)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="non-empty"):
        model(torch.randn(0, 3, 8, 8))
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="Tensor"):
        model([[0.0]])


@pytest.mark.parametrize("kwargs,err,match", [
    ({"widths": ()}, ValueError, "non-empty"),
    ({"widths": (4, 0)}, ValueError, "positive"),
    ({"widths": (4.0, 8)}, ValueError, "positive"),
    ({"widths": "48"}, TypeError, "sequence"),
    ({"widths": 8}, TypeError, "sequence"),
    ({"blocks_per_stage": 0}, ValueError, "blocks_per_stage"),
    ({"fixup": "yes"}, TypeError, "fixup"),
    ({"weight_standardization": 1}, TypeError, "weight_standardization"),
    ({"norm_layer": "spdbn"}, ValueError, "euclidean"),
    ({"norm_layer": "liebn_aim"}, ValueError, "euclidean"),
    ({"norm_layer": "weight_std"}, ValueError, "cannot fill"),
    ({"norm_layer": "no_such_norm"}, ValueError, "valid names"),
    ({"norm_layer": "none", "fixup": True, "weight_standardization": True}, ValueError, "cannot be combined"),
])
def test_bad_construction_raises(kwargs: dict, err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        ResNet(1, 3, **{"widths": WIDTHS, **kwargs})


def test_bad_channel_counts_raise() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        ResNet(0, 3)
    with pytest.raises(TypeError, match="num_classes"):
        ResNet(1, True)


def test_block_shapes() -> None:
    block = BasicBlock(4, 8, 2, "groupnorm")
    assert block(torch.randn(2, 4, 7, 7)).shape == (2, 8, 4, 4)
    assert block.proj_conv is not None and BasicBlock(4, 4, 1, "groupnorm").proj_conv is None
    # the block against a hand-built post-activation block (He et al. 2016, option B projection)
    _perturb(block)
    x = torch.randn(2, 4, 7, 7)

    def gn(layer, h):
        return F.group_norm(h, layer.num_groups, layer.weight, layer.bias, layer.eps)

    h = F.relu(gn(block.norm1, F.conv2d(x, block.conv1.weight, stride=2, padding=1)))
    h = gn(block.norm2, F.conv2d(h, block.conv2.weight, padding=1))
    short = gn(block.proj_norm, F.conv2d(x, block.proj_conv.weight, stride=2))
    torch.testing.assert_close(block(x), F.relu(h + short), atol=1e-5, rtol=1e-5)
    same = _perturb(BasicBlock(4, 4, 1, "groupnorm"))
    torch.testing.assert_close(same(x), F.relu(same.branch(x) + x), atol=0, rtol=0)
