"""SO3Net (LieNet-style) and the synthetic rotation sequences: shapes, gradients, pooling, a short training run."""

from __future__ import annotations

import time

import geoopt
import pytest
import torch

from manifoldnorm.data.rotations import simulate_rotation_sequences
from manifoldnorm.functional.so3 import check_rotation, mean_so3, so3_log
from manifoldnorm.models.so3net import RotPooling, SO3Net
from manifoldnorm.nn import refit_domain_norms
from manifoldnorm.nn.so3bn import SO3BatchNorm

F64 = torch.float64


def _data(n_per_class: int = 6, seed: int = 0, **kw):
    return simulate_rotation_sequences(n_classes=3, n_per_class=n_per_class, num_frames=6, num_joints=4,
                                       seed=seed, **kw)


def test_simulated_sequences() -> None:
    X, y = _data(5)
    assert X.shape == (15, 6, 4, 3, 3) and X.dtype == F64
    assert y.dtype == torch.long and torch.equal(torch.bincount(y), torch.tensor([5, 5, 5]))
    check_rotation(X)
    X2, y2 = _data(5)
    assert torch.equal(X, X2) and torch.equal(y, y2)
    X3, _ = _data(5, seed=1)
    assert not torch.allclose(X, X3)
    # classes differ by their trajectories: class-mean rotations at the last frame are far apart
    means = torch.stack([mean_so3(X[y == c, -1], steps=20) for c in range(3)])
    gaps = torch.linalg.vector_norm(so3_log(means[0].mT @ means[1:]), dim=-1)
    assert float(gaps.min()) > 0.1
    for bad in ({"n_classes": 1}, {"num_frames": 1}, {"noise": -0.1}, {"n_per_class": 0}):
        with pytest.raises(ValueError, match="simulate_rotation_sequences"):
            simulate_rotation_sequences(**bad)


@pytest.mark.parametrize("norm_layer", ["liebn_so3", None, "none"])
@pytest.mark.parametrize("pooling", ["max_angle", "mean", "none"])
def test_shapes(norm_layer, pooling) -> None:
    X, _ = _data(2)
    model = SO3Net(4, 6, 3, rot_channels=2, norm_layer=norm_layer, pooling=pooling, pool_size=4)
    logits = model(X)
    assert logits.shape == (6, 3) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    frames = 6 if pooling == "none" else 1
    assert model.features(X).shape == (6, frames * 8 * 3)
    # training is equivariant to a permutation of the batch
    perm = torch.tensor([4, 2, 0, 5, 1, 3])
    torch.testing.assert_close(model(X[perm]), model(X)[perm], atol=1e-5, rtol=1e-5)
    model.eval()
    assert model(X.float(), domain=torch.zeros(6, dtype=torch.long)).shape == (6, 3)
    # the logits are the float32 classifier on the float64 features; float32 input only rounds the input
    f = model.features(X)
    assert f.dtype == F64
    torch.testing.assert_close(model(X), model.classifier(f.float()), atol=0, rtol=0)
    torch.testing.assert_close(model(X.float()), model(X), atol=1e-4, rtol=1e-4)
    # evaluation is per sample: permutation equivariant, one sample alone gets the same logits
    y = model(X)
    torch.testing.assert_close(model(X[perm]), y[perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(X[3:4]), y[3:4], atol=1e-5, rtol=1e-5)
    if norm_layer != "liebn_so3" and pooling == "none":
        # no norm, no pooling: the features are the ReLU'd axis-angle vectors of the RotMap outputs W_jk X_j
        W = model.rotmap.weight.detach().reshape(4, 2, 3, 3)
        rotated = W.unsqueeze(0).unsqueeze(0) @ X.unsqueeze(3)  # (N, T, J, K, 3, 3)
        torch.testing.assert_close(f, torch.relu(so3_log(rotated)).flatten(1), atol=1e-12, rtol=1e-12)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    X, y = _data(3)
    model = SO3Net(4, 6, 3, rot_channels=2, norm_layer="liebn_so3")
    torch.nn.functional.cross_entropy(model(X), y).backward()
    names = {n for n, _ in model.named_parameters()}
    assert {"rotmap.weight", "norm.weight", "norm.shift", "classifier.weight", "classifier.bias"} <= names
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and float(p.grad.abs().max()) > 0, name
    assert isinstance(model.norm, SO3BatchNorm) and model.norm.shape == (8,)


def test_rotation_pooling() -> None:
    X, _ = _data(2)
    h = X[:, :5]  # odd number of frames: the last one is dropped
    out = RotPooling("max_angle", 2)(h)
    assert out.shape == (6, 2, 4, 3, 3)
    angles = torch.linalg.vector_norm(so3_log(h[:, :4]), dim=-1).reshape(6, 2, 2, 4)
    picked = torch.linalg.vector_norm(so3_log(out), dim=-1)
    torch.testing.assert_close(picked, angles.amax(dim=2))
    mean = RotPooling("mean", 2)(h)
    torch.testing.assert_close(mean[:, 1], mean_so3(h[:, 2:4], dim=1, steps=3, tol=0.0))
    with pytest.raises(ValueError, match="valid names"):
        RotPooling("avg")


def test_bad_inputs_and_arguments() -> None:
    model = SO3Net(4, 6, 3)
    X, _ = _data(1)
    with pytest.raises(ValueError, match="shape"):
        model(X[:, :5])
    with pytest.raises(ValueError, match="orthogonal"):
        model(2.0 * X)
    with pytest.raises(ValueError, match="so3"):
        SO3Net(4, 6, 3, norm_layer="liebn_aim")
    with pytest.raises(ValueError, match="pool_size"):
        SO3Net(4, 6, 3, pool_size=7)
    with pytest.raises(ValueError, match="positive"):
        SO3Net(0, 6, 3)


def test_refit_through_the_model() -> None:
    X, _ = _data(4)
    model = SO3Net(4, 6, 3, norm_layer="liebn_so3")
    before = model.norm.running_mean.clone()
    refit_domain_norms(model, X, None)
    assert not torch.allclose(before, model.norm.running_mean)
    assert model.training and not model.norm.refitting


def test_short_training_run_beats_chance_on_held_out_data() -> None:
    torch.manual_seed(0)
    X, y = simulate_rotation_sequences(n_classes=4, n_per_class=30, num_frames=8, num_joints=4, noise=0.4, seed=3)
    Xtr, ytr, Xte, yte = X[:60], y[:60], X[60:], y[60:]
    model = SO3Net(4, 8, 4, rot_channels=2, norm_layer="liebn_so3")
    opt = geoopt.optim.RiemannianAdam(model.parameters(), lr=1e-2)
    start = time.perf_counter()
    for _ in range(15):
        for idx in torch.randperm(60).split(20):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
    elapsed = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        acc = float((model(Xte).argmax(1) == yte).float().mean())
    assert acc > 0.6, acc  # chance: 0.25
    assert elapsed < 10.0
    W = model.rotmap.weight.detach()
    check_rotation(W)
