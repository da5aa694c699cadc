"""Registry contract: names, classes and partials in a slot; errors that list the valid choices."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch
from torch import nn

import manifoldnorm.nn as mnn
from manifoldnorm.nn import (
    LieBatchNorm,
    SPDBatchNorm,
    create_norm_layer,
    get_norm_info,
    get_norm_layer,
    list_norms,
    register_norm,
)
from manifoldnorm.nn import registry as reg


def test_list_norms_by_kind_and_metadata():
    names = list_norms()
    assert names == sorted(names)
    for kind in mnn.KINDS:
        assert all(get_norm_info(k).kind == kind for k in list_norms(kind))
    assert sorted(sum((list_norms(k) for k in mnn.KINDS), [])) == names
    with pytest.raises(ValueError, match="valid kinds: spd, lie, euclidean"):
        list_norms("hyperbolic")


@pytest.mark.parametrize("name", list_norms())
def test_every_registered_name_builds_and_round_trips_metadata(name):
    info = get_norm_info(name)
    if info.inputs == ("weight",):  # a weight reparametrization: built on the module it reparametrizes
        linear = nn.Linear(3, 4)
        assert create_norm_layer(name, linear) is linear and hasattr(linear, "parametrizations")
    else:
        assert isinstance(create_norm_layer(name, 3), nn.Module)
    assert get_norm_layer(name) is info.factory
    assert get_norm_info(name.upper()) is info  # case-insensitive look-up


def test_slot_accepts_name_class_and_partial():
    a = create_norm_layer("liebn_lcm", 3)
    b = create_norm_layer(LieBatchNorm, 3, metric="lcm")
    c = create_norm_layer(functools.partial(LieBatchNorm, metric="lcm", momentum=0.2), 3)
    assert all(isinstance(m, LieBatchNorm) and m.metric == "lcm" for m in (a, b, c))
    assert c.momentum == 0.2
    assert get_norm_info(functools.partial(SPDBatchNorm, momentum=0.3)).name == "spdbn"
    assert get_norm_info(nn.Identity) is None


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        create_norm_layer("liebn_bw", 3)
    for name in ("liebn_aim", "spddsmbn", "none"):
        assert name in str(err.value)
    with pytest.raises(TypeError, match="registered name"):
        get_norm_layer(3.0)


def test_unknown_kwargs_name_the_layer_and_its_arguments():
    with pytest.raises(TypeError) as err:
        create_norm_layer("spdbn", 3, momentun=0.1)
    msg = str(err.value)
    assert "SPDBatchNorm" in msg and "momentun" in msg and "momentum" in msg and "karcher_steps" in msg
    with pytest.raises(TypeError, match="LieBatchNorm.*theta"):
        create_norm_layer(LieBatchNorm, 3, thetta=2.0)
    with pytest.raises(TypeError, match="fixes metric"):
        create_norm_layer("liebn_aim", 3, metric="lem")
    with pytest.raises(TypeError, match="IdentityNorm"):
        create_norm_layer("none", 3, momentum=0.1)


def test_slot_kind_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="cannot fill a spd slot.*liebn_aim"):
        create_norm_layer("batchnorm", 3, expect="spd")
    with pytest.raises(ValueError, match="euclidean slot"):
        create_norm_layer("liebn_aim", 3, expect="euclidean")
    assert isinstance(create_norm_layer("none", 3, expect="euclidean"), mnn.IdentityNorm)
    bn = create_norm_layer("batchnorm", 3, expect="euclidean")
    x = torch.randn(5, 3)
    assert bn(x, domain=torch.zeros(5, dtype=torch.long)).shape == (5, 3)


def test_register_norm_adds_a_key_and_rejects_duplicates():
    key = "test_only_scaled_identity"

    @register_norm(key, "spd")
    class Scaled(nn.Module):
        def __init__(self, n: int, factor: float = 2.0) -> None:
            super().__init__()
            self.factor = factor

        def forward(self, x, domain=None):
            return self.factor * x

    try:
        assert key in list_norms("spd")
        assert create_norm_layer(key, 3, factor=3.0).factor == 3.0
        with pytest.raises(ValueError, match="already registered"):
            register_norm(key, "spd")(Scaled)
    finally:
        reg.NORMS.remove(key)
    with pytest.raises(ValueError, match="valid kinds"):
        register_norm("x", "riemannian")
    with pytest.raises(ValueError, match="lower-case"):
        register_norm("LieBN", "lie")


def test_import_does_not_pull_in_lightning_or_hydra():
    code = (
        "import sys, manifoldnorm.nn, manifoldnorm.models\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
