"""SyncBatchNorm: parity with torch batch norm in one process and on the concatenated batch over 2 gloo processes."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import manifoldnorm.nn.euclidean.sync_bn  # noqa: F401  (registers the layer)
from manifoldnorm.nn.euclidean.sync_bn import SyncBatchNorm

C = 4
ATOL = 1e-12


def _rand(*shape: int, seed: int, scale: float = 1.5, shift: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64) + shift


def _torch_bn(ndim: int, **kwargs) -> torch.nn.Module:
    cls = torch.nn.BatchNorm2d if ndim == 4 else torch.nn.BatchNorm1d
    return cls(C, dtype=torch.float64, **kwargs)


def _pair(ndim: int, momentum: float | None = 0.1, affine: bool = True) -> tuple[SyncBatchNorm, torch.nn.Module]:
    ours = SyncBatchNorm(C, momentum=momentum, affine=affine, dtype=torch.float64)
    ref = _torch_bn(ndim, momentum=momentum, affine=affine)
    if affine:
        with torch.no_grad():
            ours.weight.copy_(_rand(C, seed=101))
            ours.bias.copy_(_rand(C, seed=102))
            ref.weight.copy_(ours.weight)
            ref.bias.copy_(ours.bias)
    return ours, ref


# --------------------------------------------------------------------------------------------- single process


@pytest.mark.parametrize("shape", [(7, C), (5, C, 3), (3, C, 3, 2)])
@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
def test_single_process_matches_torch_batchnorm(shape: tuple[int, ...], momentum: float | None) -> None:
    assert not (dist.is_available() and dist.is_initialized())
    ours, ref = _pair(len(shape), momentum)
    for step in range(3):
        x = _rand(*shape, seed=step)
        w = _rand(*shape, seed=50 + step)
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = ours(xo), ref(xr)
        torch.testing.assert_close(yo, yr, rtol=0, atol=ATOL)
        (yo * w).sum().backward()
        (yr * w).sum().backward()
        torch.testing.assert_close(xo.grad, xr.grad, rtol=0, atol=ATOL)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=0, atol=ATOL)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=0, atol=ATOL)
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=0, atol=ATOL)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=0, atol=ATOL)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    ours.eval(), ref.eval()
    x = _rand(*shape, seed=9)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=ATOL)


def test_formula_written_out_and_no_running_stats_mode() -> None:
    x = _rand(6, C, 5, seed=3)
    layer = SyncBatchNorm(C, eps=1e-3, affine=False, track_running_stats=False, dtype=torch.float64)
    assert layer.running_mean is None and len(list(layer.parameters())) == 0
    mean = x.mean(dim=(0, 2), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2), keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-3)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(layer.eval()(x), expected, rtol=0, atol=ATOL)  # no running stats: batch stats


def test_world_size_one_group_is_plain_batchnorm(tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv1'}", rank=0, world_size=1)
    try:
        ours, ref = _pair(3)
        x = _rand(5, C, 2, seed=4)
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = ours(xo), ref(xr)
        torch.testing.assert_close(yo, yr, rtol=0, atol=ATOL)
        yo.square().sum().backward()
        yr.square().sum().backward()
        torch.testing.assert_close(xo.grad, xr.grad, rtol=0, atol=ATOL)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=0, atol=ATOL)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shape", [(6, C), (3, C, 2)])
def test_gradcheck(shape: tuple[int, ...]) -> None:
    layer = SyncBatchNorm(C, dtype=torch.float64)
    x = _rand(*shape, seed=1).requires_grad_()
    w = _rand(C, seed=2).requires_grad_()
    b = _rand(C, seed=3).requires_grad_()

    def f(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_state_dict_round_trip_and_eval_uses_running_stats() -> None:
    layer = SyncBatchNorm(C, momentum=0.3, dtype=torch.float64)
    for seed in range(3):
        layer(_rand(8, C, 2, seed=seed, shift=2.0))
    with torch.no_grad():
        layer.weight.add_(0.1), layer.bias.sub_(0.2)
    state = copy.deepcopy(layer.state_dict())
    assert set(state) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert set(state) == set(torch.nn.BatchNorm1d(C).state_dict())
    fresh = SyncBatchNorm(C, momentum=0.3, dtype=torch.float64)
    fresh.load_state_dict(state)
    layer.eval(), fresh.eval()
    x = _rand(4, C, 2, seed=7)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    shape = (1, C, 1)
    expected = ((x - layer.running_mean.reshape(shape)) / torch.sqrt(layer.running_var.reshape(shape) + 1e-5)
                * layer.weight.reshape(shape) + layer.bias.reshape(shape))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=ATOL)
    before = layer.running_mean.clone()
    layer(_rand(4, C, 2, seed=8))
    torch.testing.assert_close(layer.running_mean, before, rtol=0, atol=0)  # eval leaves the stats alone
    assert layer(_rand(1, C, seed=8)).shape == (1, C)  # a single sample is fine in eval mode


def test_float32_and_half_inputs_keep_dtype() -> None:
    layer = SyncBatchNorm(C)
    for dtype in (torch.float32, torch.bfloat16):
        x = _rand(6, C, 3, seed=5).to(dtype)
        y = layer(x)
        assert y.dtype == dtype and torch.isfinite(y).all()
        ref = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5 if dtype == torch.float32 else 5e-2)


def test_bad_input_and_options() -> None:
    layer = SyncBatchNorm(C)
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(5, C + 1))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(C))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(5, C, dtype=torch.long))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, C))
    layer(torch.randn(1, C, 2))  # two values per channel suffice
    with pytest.raises(ValueError, match="momentum"):
        SyncBatchNorm(C, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        SyncBatchNorm(C, eps=0.0)
    with pytest.raises(ValueError, match="num_features"):
        SyncBatchNorm(0)


def test_registry_key() -> None:
    import manifoldnorm.nn as mnn

    layer = mnn.create_norm_layer("syncbatchnorm", C, momentum=0.2)
    assert isinstance(layer, SyncBatchNorm) and layer.momentum == 0.2
    assert mnn.get_norm_info("syncbatchnorm").kind == "euclidean"


# ------------------------------------------------------------------------------------------- two processes

CASES = {  # name -> (rank-0 shape, rank-1 shape)
    "seq": ((3, C, 2), (5, C, 2)),
    "flat": ((3, C), (5, C)),
    "empty_rank": ((0, C), (4, C)),
}
STEPS = 2


def _case_data(name: str, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = CASES[name][rank]
    seed = 1000 * step + 10 * rank + sorted(CASES).index(name)
    return _rand(*shape, seed=seed, shift=0.5 + rank), _rand(*shape, seed=seed + 500)


def _worker(rank: int, rdv: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdv, rank=rank, world_size=2)
    try:
        results: dict = {}
        for name in CASES:
            layer = SyncBatchNorm(C, momentum=0.3, dtype=torch.float64)
            with torch.no_grad():
                layer.weight.copy_(_rand(C, seed=101))
                layer.bias.copy_(_rand(C, seed=102))
            for step in range(STEPS):
                x, w = _case_data(name, step, rank)
                x.requires_grad_()
                layer.weight.grad = layer.bias.grad = None
                y = layer(x)
                (y * w).sum().backward()
                results[name, step] = {"y": y.detach(), "x_grad": x.grad, "w_grad": layer.weight.grad.clone(),
                                       "b_grad": layer.bias.grad.clone()}
            results[name, "running"] = (layer.running_mean.clone(), layer.running_var.clone())
        layer = SyncBatchNorm(C)
        try:
            layer(torch.randn(1 - rank, C, dtype=torch.float64))  # one value per channel over both processes
            results["error"] = None
        except ValueError as exc:
            results["error"] = str(exc)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("syncbn")
    mp.spawn(_worker, args=(f"file://{out / 'rdv'}", str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_processes_match_batchnorm_on_concatenated_batch(two_process_results: list[dict], name: str) -> None:
    ndim = len(CASES[name][0])
    ref = _torch_bn(ndim, momentum=0.3)
    with torch.no_grad():
        ref.weight.copy_(_rand(C, seed=101))
        ref.bias.copy_(_rand(C, seed=102))
    sizes = [CASES[name][r][0] for r in range(2)]
    for step in range(STEPS):
        xs, ws = zip(*(_case_data(name, step, r) for r in range(2)), strict=True)
        x = torch.cat(xs).requires_grad_()
        ref.weight.grad = ref.bias.grad = None
        y = ref(x)
        (y * torch.cat(ws)).sum().backward()  # the sum of the per-process losses
        for r, (y_r, g_r) in enumerate(zip(y.detach().split(sizes), x.grad.split(sizes), strict=True)):
            got = two_process_results[r][name, step]
            torch.testing.assert_close(got["y"], y_r, rtol=0, atol=ATOL)
            torch.testing.assert_close(got["x_grad"], g_r, rtol=0, atol=ATOL)
        for key, ref_grad in (("w_grad", ref.weight.grad), ("b_grad", ref.bias.grad)):
            summed = two_process_results[0][name, step][key] + two_process_results[1][name, step][key]
            torch.testing.assert_close(summed, ref_grad, rtol=0, atol=ATOL)
    for r in range(2):
        mean, var = two_process_results[r][name, "running"]
        torch.testing.assert_close(mean, ref.running_mean, rtol=0, atol=ATOL)
        torch.testing.assert_close(var, ref.running_var, rtol=0, atol=ATOL)


def test_two_processes_local_stats_differ_from_global(two_process_results: list[dict]) -> None:
    """The reference check above is not vacuous: local normalization gives a different answer."""
    x, _ = _case_data("seq", 0, 0)
    local = torch.nn.functional.batch_norm(x, None, None, _rand(C, seed=101), _rand(C, seed=102), training=True)
    assert (two_process_results[0]["seq", 0]["y"] - local).abs().max() > 1e-2


def test_two_processes_single_value_per_channel_raises_everywhere(two_process_results: list[dict]) -> None:
    for r in range(2):
        assert two_process_results[r]["error"] is not None
        assert "more than 1 value per channel" in two_process_results[r]["error"]

