"""The composite's ``matrix`` rule: hidden matrices to a normalized optimizer, the rest to AdamW."""

from __future__ import annotations

import geoopt
import pytest
import torch
from torch import nn

from manifoldnorm.models import GPT, ResNet, SPDNet
from manifoldnorm.optim import Muon, NorMuon, create_optimizer
from manifoldnorm.optim.compose import hidden_matrices


def _groups(opt) -> dict[str, set[int]]:
    return {k: {id(p) for g in o.param_groups for p in g["params"]} for k, o in opt.optimizers.items()}


def test_gpt_hidden_matrices_go_to_normuon_embeddings_and_gains_to_adamw() -> None:
    model = GPT(11, 8, n_layer=2, n_head=2, d_model=8)
    opt = create_optimizer(model, manifold=None, matrix={"name": "normuon", "lr": 0.02},
                           rest={"name": "adamw", "lr": 1e-3})
    assert isinstance(opt.optimizers["matrix"], NorMuon)
    groups = _groups(opt)
    named = dict(model.named_parameters())
    assert id(named["wte.weight"]) in groups["rest"] and id(named["wpe.weight"]) in groups["rest"]
    assert id(named["blocks.0.attn.q_proj.weight"]) in groups["matrix"]
    assert all(named[n].ndim == 1 for n in named if id(named[n]) in groups["rest"] and "wte" not in n
               and "wpe" not in n)
    assert groups["matrix"] | groups["rest"] == {id(p) for p in model.parameters()}  # every parameter claimed
    x = torch.randint(0, 11, (2, 8))
    before = named["blocks.0.attn.q_proj.weight"].detach().clone()
    model(x).square().mean().backward()
    opt.step()
    assert not torch.equal(before, named["blocks.0.attn.q_proj.weight"])


def test_conv_kernels_are_hidden_matrices_and_the_head_is_not() -> None:
    model = ResNet(1, 10, widths=(4, 8))
    hidden = hidden_matrices(model)
    for name, p in model.named_parameters():
        expected = p.ndim >= 2 and not name.startswith("head")
        assert (id(p) in hidden) == expected, name
    opt = create_optimizer(model, manifold=None, matrix={"name": "muon", "lr": 0.02})
    assert isinstance(opt.optimizers["matrix"], Muon)


def test_manifold_rule_comes_first_and_a_stiefel_weight_never_reaches_muon() -> None:
    model = SPDNet(6, [4], num_classes=2, norm_layer="liebn_aim")
    opt = create_optimizer(model, matrix={"name": "muon"})
    groups = _groups(opt)
    manifold = {id(p) for p in model.parameters() if isinstance(p, geoopt.ManifoldParameter)}
    assert manifold and manifold <= groups["manifold"] and not manifold & groups.get("matrix", set())
    with pytest.raises(ValueError, match="muon"):
        create_optimizer(model, manifold=None, matrix={"name": "muon"})


def test_unknown_matrix_optimizer_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="normuon"):
        create_optimizer(nn.Linear(3, 3), matrix={"name": "nomuon"})
