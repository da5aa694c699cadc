"""Rules by parameter name, the matrix rule with every normalized optimizer, state-dict round trips, WarmupCosine."""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import geoopt
import pytest
import torch
from torch import nn

from manifoldnorm.optim import WarmupCosine, create_optimizer, warmup_cosine_factor

MATRIX = {
    "muon": {"name": "muon", "lr": 1e-2, "weight_decay": 0.01},
    "normuon": {"name": "normuon", "lr": 1e-2, "adjust_lr_fn": "match_rms_adamw"},
    "conda": {"name": "conda", "lr": 1e-2, "update_proj_gap": 2},
    "sinkgd": {"name": "sinkgd", "lr": 1e-2, "weight_decay": 0.01},
}


class Net(nn.Module):
    """Stiefel BiMap weight and SPD bias (manifold), a hidden matrix, a LayerNorm and a head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(5, 3, generator=g, dtype=torch.float64))
        self.w = geoopt.ManifoldParameter(q, manifold=geoopt.Stiefel())
        self.spd_bias = geoopt.ManifoldParameter(torch.eye(3, dtype=torch.float64),
                                                 manifold=geoopt.SymmetricPositiveDefinite())
        self.body = nn.Linear(9, 12, dtype=torch.float64)
        self.norm = nn.LayerNorm(12, dtype=torch.float64)
        self.head = nn.Linear(12, 2, dtype=torch.float64)
        with torch.no_grad():
            for p in self.parameters():
                if not isinstance(p, geoopt.ManifoldParameter):
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.w.mT @ x @ self.w + self.spd_bias
        return self.head(torch.tanh(self.norm(self.body(y.flatten(1)))))


def _train(model: nn.Module, opt, sched, steps: range) -> None:
    for s in steps:
        g = torch.Generator().manual_seed(100 + s)
        a = torch.randn(8, 5, 5, generator=g, dtype=torch.float64)
        x, y = a @ a.mT + torch.eye(5, dtype=torch.float64), torch.randint(0, 2, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()


def _build(model: nn.Module, name: str):
    opt = create_optimizer(model, matrix=MATRIX[name], rest={"name": "adamw", "lr": 1e-2, "weight_decay": 0.1},
                           rules=[{"match": r"(^|\.)norm\.|\.bias$", "into": "rest", "weight_decay": 0.0}])
    return opt, WarmupCosine(opt, total_steps=8, warmup_steps=2)


def test_name_rules_route_first_match_and_group_options() -> None:
    model = Net()
    opt = create_optimizer(model, matrix=MATRIX["normuon"], rules=[
        {"match": r"^body\.weight$", "name": "sgd", "lr": 0.5, "key": "body"},  # before the matrix rule
        {"match": r"\.bias$|^norm\.", "into": "rest", "weight_decay": 0.0},
        {"match": r"^body\.", "into": "rest", "lr": 9.0},  # body.weight taken by the first rule, body.bias by the 2nd
    ])
    assert list(opt.optimizers) == ["body", "manifold", "rest"]  # no hidden matrix left for NorMuon
    body = opt.optimizers["body"]
    assert type(body).__name__ == "SGD" and body.param_groups[0]["params"] == [model.body.weight]
    groups = opt.optimizers["rest"].param_groups
    assert groups[0]["params"] == [model.head.weight] and groups[0]["weight_decay"] == pytest.approx(0.01)
    assert {id(p) for p in groups[1]["params"]} == {id(model.body.bias), id(model.norm.weight),
                                                   id(model.norm.bias), id(model.head.bias)}
    assert groups[1]["weight_decay"] == 0.0 and len(groups) == 2  # the third rule matched nothing new
    every = {id(p) for g in opt.param_groups for p in g["params"]}
    assert every == {id(p) for p in model.parameters()}  # every parameter claimed, once


def test_name_rule_cannot_send_a_manifold_parameter_to_a_euclidean_optimizer() -> None:
    with pytest.raises(ValueError, match=r"'w' is a geoopt.ManifoldParameter.*'adamw' \(sub-optimizer 'rule0'\)"):
        create_optimizer(Net(), rules=[{"match": r"^w$", "name": "adamw"}])
    with pytest.raises(ValueError, match=r"spd_bias.*Euclidean optimizer 'adamw'"):
        create_optimizer(Net(), rules=[{"match": "bias", "into": "rest"}])
    # into the manifold optimizer with an own lr: fine
    opt = create_optimizer(Net(), rules=[{"match": "spd_bias", "into": "manifold", "lr": 1e-4}])
    assert [g["lr"] for g in opt.optimizers["manifold"].param_groups] == [1e-3, 1e-4]


def test_name_rule_errors_and_unmatched_warning() -> None:
    cases = [({"match": "(", "into": "rest"}, "invalid regular expression"),
             ({"match": "x"}, "either 'name'.*or 'into'"),
             ({"match": "x", "name": "adamw", "into": "rest"}, "either 'name'"),
             ({"match": "x", "into": "nowhere"}, "unknown sub-optimizer 'nowhere'.*manifold, matrix, rest"),
             ({"match": "x", "name": "lion"}, "unknown optimizer 'lion'; valid optimizers: adam"),
             ({"match": "bias", "into": "rest", "betaz": 1}, "no group option.*betaz; valid: amsgrad, betas"),
             ({"match": "x", "name": "sgd", "lr": 1, "key": "rest"}, "key 'rest' is already used"),
             ({"match": "body", "into": "matrix"}, "not configured"),
             ({"match": 3, "into": "rest"}, "'match' must be a regular expression")]
    for rule, message in cases:
        with pytest.raises(ValueError, match=message):
            create_optimizer(Net(), rules=[rule])
    with pytest.warns(UserWarning, match="'nothing' matches no trainable parameter"):
        create_optimizer(Net(), rules=[{"match": "nothing", "into": "rest"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_optimizer(Net(), rules=[{"match": "head", "into": "rest"}])


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_round_trip_with_schedule_gives_identical_next_steps(name: str) -> None:
    model = Net()
    opt, sched = _build(model, name)
    assert type(opt.optimizers["matrix"]).__name__.lower() == name
    assert opt.optimizers["matrix"].param_groups[0]["params"] == [model.body.weight]
    _train(model, opt, sched, range(3))
    saved_model = copy.deepcopy(model.state_dict())
    saved = pickle.loads(pickle.dumps((opt.state_dict(), sched.state_dict())))

    clone = Net(seed=1)
    clone.load_state_dict(saved_model)
    clone_opt, clone_sched = _build(clone, name)
    clone_opt.load_state_dict(saved[0])
    clone_sched.load_state_dict(saved[1])
    assert [g["lr"] for g in clone_opt.param_groups] == [g["lr"] for g in opt.param_groups]
    _train(model, opt, sched, range(3, 7))
    _train(clone, clone_opt, clone_sched, range(3, 7))
    for (key, a), (_, b) in zip(model.state_dict().items(), clone.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    assert geoopt.Stiefel().check_point_on_manifold(model.w.detach(), atol=1e-10)
    # without the saved optimizer and schedule state the trajectory differs (the test can fail)
    fresh = Net(seed=1)
    fresh.load_state_dict(saved_model)
    fresh_opt, fresh_sched = _build(fresh, name)
    _train(fresh, fresh_opt, fresh_sched, range(3, 7))
    assert not torch.equal(fresh.body.weight, model.body.weight)


def test_warmup_cosine_factor_and_errors() -> None:
    f = [warmup_cosine_factor(t, total_steps=10, warmup_steps=4, min_lr_ratio=0.1) for t in range(12)]
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # (t+1)/(w+1): never zero
    assert f[4] == pytest.approx(1.0) and f[10] == pytest.approx(0.1) and f[11] == pytest.approx(0.1)
    assert f[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False))
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=2.0)
    sched = WarmupCosine(opt, total_steps=100, warmup_steps=0.1)
    assert sched.warmup_steps == 10 and opt.param_groups[0]["lr"] == pytest.approx(2.0 / 11)
    for kwargs, message in [({"total_steps": 0}, "total_steps"),
                            ({"total_steps": 10, "warmup_steps": 1.5}, r"\[0, 1\)"),
                            ({"total_steps": 10, "warmup_steps": 11}, "warmup_steps"),
                            ({"total_steps": 10, "min_lr_ratio": 2.0}, "min_lr_ratio")]:
        with pytest.raises(ValueError, match=message):
            WarmupCosine(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0), **kwargs)
