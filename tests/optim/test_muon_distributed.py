"""Muon / NorMuon under DDP: Newton–Schulz sharded by whole matrices over 2 gloo processes, bit-identical steps."""

from __future__ import annotations

import copy
import math
import os
import pickle
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import manifoldnorm.optim.muon as muon_module
from manifoldnorm.optim._sharding import all_gather_owned, assign_owners, newton_schulz_cost, sharding_world
from manifoldnorm.optim.muon import Muon, NorMuon

F64 = torch.float64
# a tall, a wide, a conv (out, in, 3, 3), a square, then a second group (Newton–Schulz in float32) with a wide, a tall
# and a matrix that never gets a gradient
SHAPES = [(24, 8), (8, 30), (16, 2, 3, 3), (12, 12), (5, 40), (40, 5), (6, 6)]
FROZEN = 6
CONFIGS = {
    "muon": (Muon, {"lr": 0.05, "weight_decay": 0.1}),
    "muon_rms": (Muon, {"lr": 0.05, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw", "nesterov": False}),
    "normuon": (NorMuon, {"lr": 0.02, "weight_decay": 0.01}),
    "normuon_rms": (NorMuon, {"lr": 0.02, "adjust_lr_fn": "match_rms_adamw"}),
}
STEPS = 3  # distributed steps before the checkpoint; one more after it


def _rand(shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _build(name: str, distributed: bool = True, process_group=None):
    cls, kw = CONFIGS[name]
    params = [torch.nn.Parameter(_rand(shape, seed=100 + i)) for i, shape in enumerate(SHAPES)]
    groups = [{"params": params[:4]}, {"params": params[4:], "lr": 0.03, "ns_dtype": torch.float32}]
    return params, cls(groups, distributed=distributed, process_group=process_group, **kw)


def _set_grads(params, name: str, step: int) -> None:
    offset = sorted(CONFIGS).index(name)
    for i, p in enumerate(params):
        p.grad = None if i == FROZEN else _rand(p.shape, seed=1000 * step + 10 * i + offset)


def _state(opt, params) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state]


def _values(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


# ------------------------------------------------------------------------------------------------ ownership
def test_assign_owners_greedy_and_deterministic() -> None:
    # largest first; each to the least-loaded rank, ties to the lowest rank, equal costs in index order
    assert assign_owners([5, 4, 3, 3, 3], 2) == [0, 1, 1, 0, 1]
    assert assign_owners([3, 3, 3, 3], 2) == [0, 1, 0, 1]
    assert assign_owners([1.0, 3.0], 4) == [1, 0]
    assert assign_owners([], 3) == []
    assert assign_owners([7, 2, 9], 1) == [0, 0, 0]
    rng = random.Random(0)
    for world in (2, 3, 8):
        costs = [rng.uniform(0, 100) for _ in range(40)]
        owners = assign_owners(costs, world)
        assert owners == assign_owners(list(costs), world)
        assert len(owners) == len(costs) and set(owners) == set(range(world))  # every item owned once, all busy
        loads = [sum(c for c, r in zip(costs, owners, strict=True) if r == k) for k in range(world)]
        assert max(loads) <= sum(costs) / world + max(costs)  # the greedy bound
        assert max(loads) - min(loads) <= max(costs)


def test_assign_owners_rejects_bad_input() -> None:
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="world_size"):
            assign_owners([1.0], bad)
    for costs in ([1.0, -1.0], [float("nan")], [float("inf")]):
        with pytest.raises(ValueError, match="costs"):
            assign_owners(costs, 2)


def test_newton_schulz_cost_uses_the_flattened_matrix() -> None:
    assert newton_schulz_cost((24, 8)) == 24 * 8 * 8
    assert newton_schulz_cost((8, 30)) == 8 * 30 * 8
    assert newton_schulz_cost((16, 2, 3, 3)) == 16 * 18 * 16


# ------------------------------------------------------------------------------------- without process group
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_without_process_group_distributed_flag_changes_nothing(name: str) -> None:
    assert not (dist.is_available() and dist.is_initialized())
    assert sharding_world(True) is None
    (p1, o1), (p2, o2) = _build(name, distributed=True), _build(name, distributed=False)
    for step in range(3):
        _set_grads(p1, name, step)
        _set_grads(p2, name, step)
        o1.step()
        o2.step()
    assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))
    for s1, s2 in zip(_state(o1, p1), _state(o2, p2), strict=True):
        assert all(torch.equal(s1[k], s2[k]) for k in s2)


def test_options_are_attributes_and_pickle() -> None:
    params, opt = _build("normuon", distributed=False)
    assert all("distributed" not in g and "process_group" not in g for g in opt.param_groups)
    with pytest.raises(TypeError, match="distributed"):
        Muon(params[:1], distributed="yes")
    _set_grads(params, "normuon", 0)
    opt.step()
    restored = pickle.loads(pickle.dumps(opt))
    assert restored._distributed is True and restored._process_group is None  # the default after unpickling
    with pytest.raises(ValueError, match="exactly the results it owns"):
        all_gather_owned({0: torch.zeros(2)}, [((2,), F64, torch.device("cpu"))] * 2, [0, 1], 1, 2)


def test_world_size_one_group_is_the_local_step(tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv1'}", rank=0, world_size=1)
    try:
        assert sharding_world(True) is None
        (p1, o1), (p2, o2) = _build("normuon"), _build("normuon", distributed=False)
        for step in range(2):
            _set_grads(p1, "normuon", step)
            _set_grads(p2, "normuon", step)
            o1.step()
            o2.step()
        assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- two processes
def _worker(rank: int, rdv: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdv, rank=rank, world_size=2)
    calls: list[tuple[int, ...]] = []
    real = muon_module._newton_schulz  # what the optimizers call (newton_schulz minus the argument checks)

    def counting_newton_schulz(G, *args, **kwargs):
        calls.append(tuple(G.shape))
        return real(G, *args, **kwargs)

    muon_module._newton_schulz = counting_newton_schulz
    try:
        results: dict = {"sharding_world": sharding_world(True)}
        for name in CONFIGS:
            params, opt = _build(name, process_group=dist.group.WORLD if name == "muon" else None)
            ref_params, ref_opt = _build(name, distributed=False)
            for step in range(STEPS + 1):
                if step == STEPS:
                    results[name, "checkpoint"] = (copy.deepcopy(opt.state_dict()), _values(params))
                    pickle.dumps(opt.state_dict())
                _set_grads(params, name, step)
                _set_grads(ref_params, name, step)
                calls.clear()
                opt.step()
                mine = list(calls)
                calls.clear()
                ref_opt.step()
                results[name, step] = {"calls": mine, "ref_calls": list(calls), "params": _values(params),
                                       "ref_params": _values(ref_params), "state": _state(opt, params),
                                       "ref_state": _state(ref_opt, ref_params)}
        # ranks that disagree on which parameters have gradients: an error on both, before any state changes
        params, opt = _build("muon")
        _set_grads(params, "muon", 0)
        if rank == 1:
            params[3].grad = None
        before = _values(params)
        try:
            opt.step()
            results["mismatch"] = None
        except RuntimeError as exc:
            results["mismatch"] = str(exc)
        results["mismatch_untouched"] = len(opt.state) == 0 and all(
            torch.equal(a, b) for a, b in zip(before, _values(params), strict=True))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        muon_module._newton_schulz = real
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("muon_ddp")
    mp.spawn(_worker, args=(f"file://{out / 'rdv'}", str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _local_run(name: str, steps: int):
    """The single-process reference in this (process-group-free) process, with the workers' thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params, opt = _build(name, distributed=False)
        history = []
        for step in range(steps):
            _set_grads(params, name, step)
            opt.step()
            history.append((_values(params), _state(opt, params)))
        return history
    finally:
        torch.set_num_threads(threads)


def _equal_lists(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _equal_states(a, b) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_two_ranks_match_single_process_bit_for_bit(two_ranks: list[dict], name: str) -> None:
    assert [r["sharding_world"] for r in two_ranks] == [(0, 2), (1, 2)]
    local = _local_run(name, STEPS + 1)
    for step in range(STEPS + 1):
        r0, r1 = two_ranks[0][name, step], two_ranks[1][name, step]
        for res in (r0, r1):
            assert _equal_lists(res["params"], res["ref_params"])  # same process, distributed=False
            assert _equal_states(res["state"], res["ref_state"])
            assert _equal_lists(res["params"], local[step][0])  # no process group at all
            assert _equal_states(res["state"], local[step][1])
        assert len(r0["state"]) == len(SHAPES) - 1  # every matrix with a gradient has state on every rank
        keys = {"momentum_buffer", "second_moment"} if name.startswith("normuon") else {"momentum_buffer"}
        assert all(set(s) == keys for s in r0["state"])
    # the steps moved the parameters (the comparison is not between untouched copies)
    assert not torch.equal(two_ranks[0][name, 0]["params"][2], _rand(SHAPES[2], seed=102))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_rank_orthogonalizes_only_its_share(two_ranks: list[dict], name: str) -> None:
    matrices = [(s[0], math.prod(s[1:])) for i, s in enumerate(SHAPES) if i != FROZEN]
    owners = assign_owners([newton_schulz_cost(s) for s in matrices], 2)
    assert owners == [1, 1, 0, 1, 0, 1]  # both ranks busy, and the float32 group split over both
    for step in range(STEPS + 1):
        for rank in range(2):
            res = two_ranks[rank][name, step]
            assert res["calls"] == [m for m, r in zip(matrices, owners, strict=True) if r == rank]
            assert res["ref_calls"] == matrices  # the local step orthogonalizes everything


def test_rank0_checkpoint_loads_into_single_process_optimizer(two_ranks: list[dict]) -> None:
    for name in CONFIGS:
        saved, values = two_ranks[0][name, "checkpoint"]
        assert "process_group" not in saved["param_groups"][0] and "distributed" not in saved["param_groups"][0]
        params, opt = _build(name, distributed=False)
        with torch.no_grad():
            for p, v in zip(params, values, strict=True):
                p.copy_(v)
        opt.load_state_dict(saved)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _set_grads(params, name, STEPS)
            opt.step()
        finally:
            torch.set_num_threads(threads)
        assert _equal_lists(_values(params), two_ranks[0][name, STEPS]["params"])
        assert _equal_states(_state(opt, params), two_ranks[1][name, STEPS]["state"])


def test_ranks_stepping_different_parameters_raise_everywhere(two_ranks: list[dict]) -> None:
    for rank in range(2):
        assert two_ranks[rank]["mismatch"] is not None and "same parameters" in two_ranks[rank]["mismatch"]
        assert two_ranks[rank]["mismatch_untouched"]
