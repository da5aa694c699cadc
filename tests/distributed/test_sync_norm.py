"""Synchronized norms: 2 gloo processes on uneven parts of a batch = 1 process on the whole batch (float64).

Every registered SPD / Lie norm is covered (the list comes from the registry): outputs, input gradients, summed
parameter gradients, running statistics and refitted statistics of each process match a single process that
sees the concatenated batch. One spawn runs every norm.
"""

from __future__ import annotations

import copy
import datetime
import importlib.util
import inspect
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from manifoldnorm.distributed.sync_norm import (
    ProcessGroupReducer,
    convert_sync_norm,
    is_synchronized,
    revert_sync_norm,
    synchronizable_layers,
)
from manifoldnorm.functional.so3 import so3_exp
from manifoldnorm.nn import create_norm_layer, get_norm_info, list_norms, refit_domain_norms

RIEMANNIAN = sorted(k for kind in ("spd", "lie") for k in list_norms(kind))
N, C = 3, 2  # matrix size, channels (features for SO(3))
SPLIT = (5, 3)  # uneven parts; the domain ids put domain 2 on the second process only
EMPTY_SPLIT = (0, 4)  # the first process holds no sample
DOMAINS = (0, 1, 0, 1, 0, 1, 2, 2)
VARIANTS = {
    "default": {},
    # gradients through the unrolled mean iterations (all-reduces in the backward)
    "unrolled": {"detach_mean": False, "karcher_steps": 2, "mean_steps": 2, "momentum": 0.3},
    "train_momentum": {"train_momentum": 0.7},  # training normalizes with momentum statistics
}
STEPS = 2
ATOL = 1e-10


# ------------------------------------------------------------------------------------------------ helpers


def _is_so3(key: str) -> bool:
    return "so3" in get_norm_info(key).inputs


def _rand_spd(*lead: int, g: torch.Generator) -> torch.Tensor:
    A = torch.randn(*lead, N, N, generator=g, dtype=torch.float64)
    return A @ A.mT / N + 0.3 * torch.eye(N, dtype=torch.float64)


def _build(key: str, variant: str) -> nn.Module:
    """A layer with non-trivial parameters (the same on every process)."""
    info = get_norm_info(key)
    accepted = inspect.signature(info.factory).parameters
    kwargs = {k: v for k, v in VARIANTS[variant].items() if k in accepted}
    if _is_so3(key):
        layer = create_norm_layer(key, C, **kwargs)
    else:
        layer = create_norm_layer(key, N, channels=C, **kwargs)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "shift":
                p.copy_(1.0 + 0.5 * torch.rand(p.shape, generator=g, dtype=torch.float64))
            elif _is_so3(key):
                p.copy_(so3_exp(0.5 * torch.randn(*p.shape[:-2], 3, generator=g, dtype=torch.float64)))
            else:  # SPD bias / metric parameter
                p.copy_(_rand_spd(*p.shape[:-2], g=g))
    return layer


def _data(key: str, total: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, loss weights and domain ids of the whole batch."""
    g = torch.Generator().manual_seed(1000 * seed + RIEMANNIAN.index(key))
    if _is_so3(key):
        x = so3_exp(0.7 * torch.randn(total, C, 3, generator=g, dtype=torch.float64))
    else:
        x = _rand_spd(total, C, g=g)
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x, w, torch.tensor(DOMAINS[:total]) if total <= len(DOMAINS) else torch.zeros(total, dtype=torch.long)


def _run(key: str, variant: str, lo: int, hi: int, total: int, sync: bool) -> dict:
    """Train ``STEPS`` steps on samples ``lo:hi`` of each batch, then refit and evaluate; return everything."""
    layer = _build(key, variant)
    if sync:
        convert_sync_norm(layer)
    out: dict = {"steps": []}
    for step in range(STEPS):
        x, w, dom = _data(key, total, step)
        xs = x[lo:hi].clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        y = layer(xs, domain=dom[lo:hi])
        (y * w[lo:hi]).sum().backward()
        out["steps"].append({"y": y.detach(), "x_grad": xs.grad.clone(),
                             "p_grad": {n: p.grad.clone() for n, p in layer.named_parameters()
                                        if p.grad is not None}})
    out["trained"] = {k: v.clone() for k, v in layer.state_dict().items()}
    x, _, dom = _data(key, total, 99)
    out["refit_y"] = refit_domain_norms(layer, x[lo:hi], dom[lo:hi])
    out["refitted"] = {k: v.clone() for k, v in layer.state_dict().items()}
    return out


def _cases() -> list[tuple[str, str, tuple[int, int]]]:
    return ([(key, variant, SPLIT) for key in RIEMANNIAN for variant in VARIANTS]
            + [(key, "default", EMPTY_SPLIT) for key in RIEMANNIAN])


def _worker(rank: int, rdv: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdv, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        assert ProcessGroupReducer().active
        results: dict = {}
        for key, variant, split in _cases():
            lo = sum(split[:rank])
            results[key, variant, split] = _run(key, variant, lo, lo + split[rank], sum(split), sync=True)
        errors = {}
        for key in ("liebn_lem", "dsliebn_aim", "liebn_so3"):  # empty on every process: same error everywhere
            layer = convert_sync_norm(_build(key, "default"))
            x, _, dom = _data(key, 2, 0)
            try:
                layer(x[:0], domain=dom[:0])
                errors[key] = None
            except ValueError as exc:
                errors[key] = str(exc)
        results["errors"] = errors
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("syncnorm")
    mp.spawn(_worker, args=(f"file://{out / 'rdv'}", str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


# ------------------------------------------------------------------------------------------- two processes


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize(("key", "variant", "split"), _cases(), ids=lambda v: str(v))
def test_two_processes_match_one_process_on_the_whole_batch(two_process_results: list[dict], key: str,
                                                            variant: str, split: tuple[int, int]) -> None:
    total = sum(split)
    ref = _run(key, variant, 0, total, total, sync=False)
    bounds = [(sum(split[:r]), sum(split[:r + 1])) for r in range(2)]
    got = [two_process_results[r][key, variant, split] for r in range(2)]
    for step, want in enumerate(ref["steps"]):
        for r, (lo, hi) in enumerate(bounds):
            _close(got[r]["steps"][step]["y"], want["y"][lo:hi], f"output, step {step}, rank {r}")
            _close(got[r]["steps"][step]["x_grad"], want["x_grad"][lo:hi], f"input grad, step {step}, rank {r}")
        for name, g in want["p_grad"].items():
            summed = sum(got[r]["steps"][step]["p_grad"].get(name, torch.zeros_like(g)) for r in range(2))
            _close(summed, g, f"grad of {name} summed over ranks, step {step}")
    for r, (lo, hi) in enumerate(bounds):
        assert set(got[r]["trained"]) == set(ref["trained"])
        for name, buf in ref["trained"].items():
            _close(got[r]["trained"][name], buf, f"{name} after training, rank {r}")
            _close(got[r]["refitted"][name], ref["refitted"][name], f"{name} after refit, rank {r}")
        _close(got[r]["refit_y"], ref["refit_y"][lo:hi], f"refit output, rank {r}")


@pytest.mark.parametrize("key", RIEMANNIAN)
def test_local_statistics_differ(two_process_results: list[dict], key: str) -> None:
    """Non-vacuous: the first process normalizing its own part alone gives another output."""
    lo, hi = 0, SPLIT[0]
    local = _run(key, "default", lo, hi, sum(SPLIT), sync=False)
    synced = two_process_results[0][key, "default", SPLIT]
    assert (local["steps"][0]["y"] - synced["steps"][0]["y"]).abs().max() > 1e-3


def test_empty_union_raises_on_every_process(two_process_results: list[dict]) -> None:
    for r in range(2):
        for key, msg in two_process_results[r]["errors"].items():
            assert msg is not None and "empty" in msg, (key, r, msg)


# ----------------------------------------------------------------------------------- conversion structure


class _Mixed(nn.Module):
    """Euclidean batch norms of every flavour next to Riemannian norms, nested in containers."""

    def __init__(self) -> None:
        super().__init__()
        import manifoldnorm.nn as mnn

        self.bn1 = nn.BatchNorm1d(4, dtype=torch.float64)
        self.block = nn.Sequential(nn.Linear(4, 4, dtype=torch.float64), mnn.BatchNorm(4, dtype=torch.float64),
                                   nn.BatchNorm1d(4, affine=False, momentum=None, dtype=torch.float64))
        self.bn2 = nn.BatchNorm2d(4, track_running_stats=False, dtype=torch.float64)
        self.torch_sync = nn.SyncBatchNorm(4, dtype=torch.float64)
        self.ours = mnn.SyncBatchNorm(4, dtype=torch.float64)
        self.riem = nn.ModuleDict({k: (create_norm_layer(k, C) if _is_so3(k) else create_norm_layer(k, N))
                                   for k in RIEMANNIAN})

    def forward(self, v: torch.Tensor, spd: torch.Tensor, rot: torch.Tensor) -> list[torch.Tensor]:
        h = self.block(self.bn1(v))
        outs = [h, self.bn2(h.reshape(-1, 4, 1, 1)), self.ours(h)]
        outs += [layer(rot if _is_so3(k) else spd) for k, layer in self.riem.items()]
        return outs


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(6, 4, generator=g, dtype=torch.float64), _rand_spd(6, g=g),
            so3_exp(0.5 * torch.randn(6, C, 3, generator=g, dtype=torch.float64)))


def test_convert_replaces_every_batch_norm_and_keeps_the_state() -> None:
    import manifoldnorm.nn as mnn

    model = _Mixed()
    model(*_inputs())  # non-trivial running statistics
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model.bn1.weight
    assert not is_synchronized(model)
    assert convert_sync_norm(model) is model
    assert is_synchronized(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for name in ("bn1", "bn2", "torch_sync", "ours"):
        assert type(getattr(model, name)) is mnn.SyncBatchNorm
    assert type(model.block[1]) is mnn.SyncBatchNorm and type(model.block[2]) is mnn.SyncBatchNorm
    assert model.bn1.weight is weight  # the same parameter objects: optimizers keep working
    riem = [m for m in synchronizable_layers(model) if hasattr(type(m), "stats_reducer")]
    assert len(riem) == len(RIEMANNIAN)
    assert all(isinstance(m.stats_reducer, ProcessGroupReducer) for m in riem)
    state = model.state_dict()
    assert list(state) == list(keys)
    for k, v in keys.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    assert model.block[2].momentum is None and not model.block[2].affine
    assert model.bn2.running_mean is None
    twin = copy.deepcopy(model)  # copies share the reducer (a process group cannot be copied)
    assert is_synchronized(twin) and twin.riem["liebn_lem"].stats_reducer is model.riem["liebn_lem"].stats_reducer

    revert_sync_norm(model)
    assert not is_synchronized(model)
    assert type(model.bn1) is nn.BatchNorm1d and type(model.bn2) is nn.BatchNorm2d
    assert type(model.block[1]) is mnn.BatchNorm and type(model.torch_sync) is nn.SyncBatchNorm
    assert type(model.ours) is mnn.SyncBatchNorm  # was a SyncBatchNorm already
    assert all(m.stats_reducer is None for m in riem)
    assert list(model.state_dict()) == list(keys)


def test_a_single_batch_norm_is_returned_converted() -> None:
    import manifoldnorm.nn as mnn

    bn = nn.BatchNorm1d(3)
    sync = convert_sync_norm(bn)
    assert type(sync) is mnn.SyncBatchNorm and sync.weight is bn.weight
    assert type(revert_sync_norm(sync)) is nn.BatchNorm1d


def test_without_process_group_outputs_and_gradients_are_unchanged() -> None:
    assert not (dist.is_available() and dist.is_initialized())
    torch.manual_seed(0)
    plain = _Mixed()
    synced = convert_sync_norm(_Mixed())
    synced.load_state_dict(plain.state_dict())
    for step in range(2):
        args = _inputs()
        a = [t.clone().requires_grad_() for t in args]
        b = [t.clone().requires_grad_() for t in args]
        ya, yb = plain(*a), synced(*b)
        sum(y.square().sum() for y in ya).backward()
        sum(y.square().sum() for y in yb).backward()
        for u, v in zip(ya + [t.grad for t in a], yb + [t.grad for t in b], strict=True):
            torch.testing.assert_close(v, u, rtol=0, atol=1e-12, msg=f"step {step}")
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(synced.state_dict()[k], v, rtol=0, atol=1e-12)
    # Riemannian layers run their local code path: bit-identical
    for k in RIEMANNIAN:
        torch.testing.assert_close(synced.riem[k].running_mean, plain.riem[k].running_mean, rtol=0, atol=0)


def test_world_size_one_group_is_local(tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv1'}", rank=0, world_size=1)
    try:
        assert not ProcessGroupReducer().active
        for key in RIEMANNIAN:
            a, b = _build(key, "default"), convert_sync_norm(_build(key, "default"))
            x, _, dom = _data(key, 5, 0)
            torch.testing.assert_close(b(x, domain=dom), a(x, domain=dom), rtol=0, atol=0)
            with pytest.raises(ValueError, match="empty"):  # local path: an empty batch is an error as before
                b(x[:0], domain=dom[:0])
    finally:
        dist.destroy_process_group()


def test_unsupported_registered_norm_is_rejected() -> None:
    from manifoldnorm.nn import register_norm
    from manifoldnorm.nn.registry import NORMS

    class Unhooked(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()

    register_norm("_test_unhooked_spd", "spd")(Unhooked)
    try:
        with pytest.raises(TypeError, match="stats_reducer"):
            convert_sync_norm(nn.Sequential(Unhooked(3)))
    finally:
        NORMS.remove("_test_unhooked_spd")


# ------------------------------------------------------------------------------------- Lightning LayerSync

SCRIPT = Path(__file__).with_name("lightning_sync_script.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_script():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("lightning_sync_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_sync_plugin_under_lightning_ddp(tmp_path) -> None:
    """Trainer(strategy="ddp", devices=2, plugins=[RiemannianSyncBatchNorm()]) on CPU: one step on two halves."""
    drop = ("SLURM_", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["MASTER_ADDR"], env["MASTER_PORT"] = "127.0.0.1", str(_free_port())
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    script = _load_script()
    ref = script.TinySPD()
    x, _, domain = script.make_data().tensors
    ref.train()(x, domain)  # one process, the whole batch
    for r, got in enumerate(ranks):
        assert got["seen"] == [{"synchronized": True, "bn_class": "SyncBatchNorm", "batch": 4}]
        assert got["bn_class_after"] == "BatchNorm1d" and not got["synchronized_after"]  # reverted at teardown
        for name, buf in ref.named_buffers():
            if name.startswith(("norms.", "bn.running")):
                _close(got["state"][name], buf, f"{name}, rank {r}")
