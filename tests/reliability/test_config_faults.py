"""Bad option types and values fail when the optimizer or module is built, with one line naming the option.

Every numeric or flag keyword of every registered optimizer is tried with a value of the wrong type and with one out
of range, directly (``build_optimizer``), through :func:`create_optimizer` (the message names the config key, e.g.
``rest.lr``), and as a parameter-group option of a rule. The Lightning modules' options are checked at construction,
and ``launch/train.py`` reports such an error in one line without a traceback, before any training.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict
from torch import nn

from manifoldnorm.lit import CharLMDataModule, ClassificationModule, ImageDataModule, LanguageModelModule, run
from manifoldnorm.optim import (
    WarmupCosine,
    build_optimizer,
    create_optimizer,
    get_optimizer,
    list_optimizers,
)
from manifoldnorm.optim._validate import OPTIMIZER_OPTIONS

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
INFO = {"n_channels": 22, "n_times": 384, "num_classes": 4, "num_domains": 4}

# A value of the wrong type and one of the right type but out of range, per kind of option.
REAL_GE0 = ("lr", "weight_decay", "delta")
REAL_GT0 = ("eps", "ns_eps", "scale")
UNIT = ("momentum", "beta2", "dampening", "wd_ratio")
INTS = ("ns_steps", "iters", "update_proj_gap", "stabilize")
FLAGS = ("amsgrad", "nesterov", "maximize", "capturable", "differentiable", "decoupled_weight_decay", "distributed",
         "foreach", "fused")


def bad_values(key: str) -> list[tuple[object, type[Exception]]]:
    if key in REAL_GE0:
        return [("abc", TypeError), (True, TypeError), (None, TypeError), (-1.0, ValueError),
                (float("nan"), ValueError)]
    if key in REAL_GT0:
        return [("abc", TypeError), (0.0, ValueError), (float("inf"), ValueError)]
    if key in UNIT:
        return [("abc", TypeError), (1.5, ValueError), (-0.1, ValueError)]
    if key in INTS:
        return [("abc", TypeError), (2.5, ValueError), (0, ValueError)]
    if key in FLAGS:
        return [("maybe", TypeError), (1, TypeError)]
    if key == "betas":
        return [("abc", TypeError), ([0.9], TypeError), ([0.9, "x"], TypeError), ([0.9, 1.0], ValueError)]
    if key == "ns_coefficients":
        return [((1.0, 2.0), ValueError), ((1.0, 2.0, "c"), TypeError)]
    if key == "adjust_lr_fn":
        return [("spectral", ValueError), (3, TypeError)]
    if key == "ns_dtype":
        return [("bf16", ValueError), (3, TypeError)]
    if key == "momentum_variant":
        return [("authors", ValueError), (True, TypeError)]
    raise AssertionError(f"no bad values for {key!r}")


def numeric_keys(name: str) -> list[str]:
    return [k for k in get_optimizer(name).keyword_names() if k in OPTIMIZER_OPTIONS]


CASES = [(name, key) for name in list_optimizers() for key in numeric_keys(name)]


def test_every_registered_option_has_a_check() -> None:
    """A keyword of a registered optimizer without a check must be one that is not a number or a flag."""
    unchecked = {k for n in list_optimizers() for k in get_optimizer(n).keyword_names()} - set(OPTIMIZER_OPTIONS)
    assert unchecked == {"process_group"}
    assert len(CASES) >= 60


def _param(name: str) -> nn.Parameter:
    return nn.Parameter(torch.randn(4, 3))


@pytest.mark.parametrize(("name", "key"), CASES, ids=[f"{n}.{k}" for n, k in CASES])
def test_bad_option_fails_at_build_naming_it(name: str, key: str) -> None:
    for value, err in bad_values(key):
        kwargs = {"lr": 0.01, key: value}
        with pytest.raises(err, match=rf"\b{key}\b") as info:
            build_optimizer(name, [_param(name)], **kwargs)
        message = str(info.value)
        assert "\n" not in message
        if not isinstance(value, (list, tuple)):
            assert repr(value) in message  # the value given
        # through the composite: the message names the config key (optimizer.<role>.<key>)
        role = "manifold" if get_optimizer(name).kind == "riemannian" else "rest"
        spec = {"name": name, **kwargs}
        specs = {"manifold": spec} if role == "manifold" else {"rest": spec, "manifold": None}
        with pytest.raises(err, match=rf"{role}\.{key}\b"):
            create_optimizer(nn.Linear(3, 4), **specs)


@pytest.mark.parametrize(("name", "key"), CASES, ids=[f"{n}.{k}" for n, k in CASES])
def test_bad_group_option_fails_at_build(name: str, key: str) -> None:
    """A rule's own option (``into`` a sub-optimizer, or a sub-optimizer of its own) and a hand-made param group."""
    value, err = bad_values(key)[0]
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    into = "manifold" if get_optimizer(name).kind == "riemannian" else "rest"
    roles = {"manifold": {"name": name, "lr": 0.01}, "rest": {"name": "riemannian_sgd", "lr": 0.01}} \
        if into == "manifold" else {"rest": {"name": name, "lr": 0.01}}
    with pytest.raises(err, match=rf"rules\[0\]\.{key}\b"):
        create_optimizer(model, rules=[{"match": r"^1\.", "into": into, key: value}], **roles)
    with pytest.raises(err, match=rf"rules\[0\]\.{key}\b"):
        create_optimizer(model, rules=[{"match": r"^1\.", "name": name, "lr": 0.01, key: value}])
    with pytest.raises(err, match=rf"\b{key}\b"):
        build_optimizer(name, [{"params": [_param(name)], key: value}], lr=0.01)


def test_own_optimizers_check_groups_added_later() -> None:
    """Muon & co. (StepOptimizer) check a group added after construction and stay unchanged when it is refused."""
    for name in ("muon", "normuon", "conda", "sinkgd", "adamp", "sgdp"):
        opt = build_optimizer(name, [_param(name)], lr=0.01)
        with pytest.raises(TypeError, match="lr must be a real number"):
            opt.add_param_group({"params": [_param(name)], "lr": "abc"})
        assert len(opt.param_groups) == 1
    composite = create_optimizer(nn.Linear(3, 4))
    with pytest.raises(TypeError, match="weight_decay"):
        composite.add_param_group({"params": [nn.Parameter(torch.ones(2))], "optimizer": "rest",
                                   "weight_decay": "none"})


def test_valid_values_still_accepted() -> None:
    w = nn.Parameter(torch.randn(4, 3))
    build_optimizer("adamw", [w], lr=torch.tensor(1e-3), betas=[0.9, 0.99], weight_decay=np.float64(0.1))
    build_optimizer("muon", [nn.Parameter(torch.randn(4, 3))], lr=np.float32(0.02), ns_steps=np.int64(5),
                    ns_dtype="bfloat16", adjust_lr_fn=None)
    build_optimizer("riemannian_adam", [nn.Parameter(torch.randn(3))], lr=1, stabilize=None, amsgrad=True)
    build_optimizer("sgd", [nn.Parameter(torch.randn(3))], lr=0.1, momentum=0.9, nesterov=True, foreach=None)
    for path in sorted((CONF / "optimizer").glob("*.yaml")):  # every shipped optimizer config builds
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[f"optimizer={path.stem}"])
        factory = instantiate(cfg.optimizer)
        factory(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))


def test_schedule_options() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0)
    with pytest.raises(TypeError, match="WarmupCosine: min_lr_ratio must be a real number in \\[0, 1\\], got 'abc'"):
        WarmupCosine(opt, total_steps=10, min_lr_ratio="abc")
    with pytest.raises(TypeError, match="total_steps"):
        WarmupCosine(opt, total_steps="10")
    with pytest.raises(TypeError, match="warmup_steps"):
        WarmupCosine(opt, total_steps=10, warmup_steps="2")


def _spdnet() -> nn.Module:
    from manifoldnorm.models import SPDNet

    return SPDNet(4, [3], 2, norm_layer="liebn_aim")


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"refit_on_test": "maybe"}, TypeError, "refit_on_test must be true, false or null, got 'maybe'"),
        ({"refit_on_test": 1}, TypeError, "refit_on_test"),
        ({"num_classes": "4"}, TypeError, "num_classes must be an int >= 2, got '4'"),
        ({"num_classes": 4.0}, ValueError, "num_classes"),
        ({"scheduler_monitor": 3}, TypeError, "scheduler_monitor"),
        ({"scheduler_interval": ["epoch"]}, ValueError, "scheduler_interval"),
        ({"optimizer": "adamw"}, TypeError, "optimizer must be a factory"),
        ({"scheduler": 0.5}, TypeError, "scheduler must be a factory"),
    ],
)
def test_classification_module_options(kwargs: dict, err: type[Exception], match: str) -> None:
    kwargs = {"num_classes": 2, **kwargs}
    with pytest.raises(err, match=match):
        ClassificationModule(_spdnet(), **kwargs)


def test_classification_module_valid_refit_values() -> None:
    for value in (None, False, True):  # liebn_aim is refittable
        assert ClassificationModule(_spdnet(), num_classes=2, refit_on_test=value).hparams.refit_on_test is value


@pytest.mark.parametrize(
    ("factory", "kwargs", "err", "match"),
    [
        (LanguageModelModule, {"model": nn.Linear(2, 2), "scheduler_monitor": None}, TypeError, "scheduler_monitor"),
        (LanguageModelModule, {"model": nn.Linear(2, 2), "optimizer": "muon"}, TypeError, "optimizer must be"),
        (CharLMDataModule, {"seed": "abc"}, TypeError, "seed must be an int"),
        (CharLMDataModule, {"num_workers": -1}, ValueError, "num_workers must be an int >= 0"),
        (CharLMDataModule, {"val_fraction": "0.1"}, TypeError, "val_fraction must be a real number in \\[0, 1\\)"),
        (CharLMDataModule, {"test_fraction": 1.5}, ValueError, "test_fraction"),
        (ImageDataModule, {"augment": "maybe"}, TypeError, "augment must be true or false, got 'maybe'"),
        (ImageDataModule, {"normalize": "false"}, TypeError, "normalize"),
        (ImageDataModule, {"drop_last": 0}, TypeError, "drop_last"),
        (ImageDataModule, {"seed": 1.5}, ValueError, "seed"),
        (ImageDataModule, {"val_fraction": float("nan")}, ValueError, "val_fraction"),
    ],
)
def test_lm_and_image_module_options(factory: type, kwargs: dict, err: type[Exception], match: str) -> None:
    with pytest.raises(err, match=match):
        factory(**kwargs)


@pytest.fixture
def cfg_of(tmp_path: Path):
    def make(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides])
        with open_dict(cfg):
            cfg.data_info = INFO
        return cfg

    return make


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["optimizer.rest.lr=abc"], r"rest\.lr must be a real number >= 0, got 'abc' \(str\)"),
        (["optimizer.manifold.amsgrad=maybe"], r"manifold\.amsgrad must be true or false, got 'maybe'"),
        (["optimizer=muon", "+optimizer.matrix.ns_steps=five"], r"matrix\.ns_steps must be an int >= 1"),
        (["optimizer=conda", "optimizer.matrix.betas=[0.9,1.0]"], r"matrix\.betas\[1\] must be a finite real"),
        (["optimizer.rules=[{match: bias, into: rest, lr: abc}]"], r"rules\[0\]\.lr must be a real number"),
        (["optimizer.rules=[{match: bias, name: sgd, lr: 0.1, momentum: high}]"], r"rules\[0\]\.momentum"),
        (["module.refit_on_test=maybe"], "refit_on_test must be true, false or null, got 'maybe'"),
    ],
)
def test_build_module_refuses_bad_options(cfg_of, overrides: list[str], match: str) -> None:
    """run.build_module (what launch/train.py calls before the trainer exists) raises a ConfigError."""
    with pytest.raises(run.ConfigError, match=match):
        run.build_module(cfg_of(*overrides))


TINY = ["trainer=cpu", "trainer.max_epochs=1", "logger=none", "data.source_kwargs.n_subjects=2",
        "data.source_kwargs.trials_per_class=4", "data.batch_size=8", "model.dims=[6]"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")  # the simulated data, made once for both runs


@pytest.mark.parametrize(
    ("override", "key"),
    [("optimizer.rest.lr=abc", "rest.lr"),
     pytest.param("module.refit_on_test=maybe", "refit_on_test", marks=pytest.mark.slow)],  # in-process above
)
def test_launch_reports_bad_option_in_one_line(override: str, key: str, tmp_path: Path, cache: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "WANDB_", "SLURM_"))}
    env["MANIFOLDNORM_CACHE"] = str(cache)
    proc = subprocess.run([sys.executable, "launch/train.py", override, *TINY, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and key in errors[0] and "got" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training


@pytest.mark.parametrize("bad", [0, -2, 1.5, "two", True])
def test_threads_option_rejects_bad_values(bad: object) -> None:
    """``threads`` (conf/train.yaml): a positive int or null; anything else stops with one line naming the key."""
    before = torch.get_num_threads()
    with pytest.raises(run.ConfigError, match=r"'threads': expected a positive int or null"):
        run.set_threads(bad)
    assert torch.get_num_threads() == before


def test_threads_option_sets_torch_threads() -> None:
    before = torch.get_num_threads()
    try:
        run.set_threads(None)
        assert torch.get_num_threads() == before
        run.set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        assert compose("train").threads is None
        assert compose("train", overrides=["+experiment=spd_eeg"]).threads == 1
