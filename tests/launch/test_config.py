"""Hydra composition of conf/: the experiment, the run directory, and every option of every group."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_ts
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from manifoldnorm.lit import run
from manifoldnorm.lit.callbacks import LearningRateMonitor
from manifoldnorm.models import SPDNet, TSMNet
from manifoldnorm.nn import get_norm_info, get_norm_layer, list_norms
from manifoldnorm.optim import CompositeOptimizer

CONF = Path(__file__).resolve().parents[2] / "conf"
TINY_DATA = ["data.source_kwargs.n_subjects=2", "data.source_kwargs.trials_per_class=4", "data.batch_size=8"]
INFO = {"n_channels": 22, "n_times": 384, "num_classes": 4, "num_domains": 4}


def options(group: str) -> set[str]:
    return {p.stem for p in (CONF / group).glob("*.yaml")}


@pytest.fixture
def cfg_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MANIFOLDNORM_CACHE", str(tmp_path / "cache"))

    def make(*overrides: str, info: bool = True, hydra: bool = False) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides],
                          return_hydra_config=hydra)
        if info:
            with open_dict(cfg):
                cfg.data_info = INFO
        return cfg

    return make


def test_experiment_spd_eeg_only_overrides(cfg_of) -> None:
    base, exp = cfg_of(), cfg_of("+experiment=spd_eeg")
    assert base.task_name == "train" and exp.task_name == "spd_eeg"
    assert exp.model._target_ == "manifoldnorm.models.SPDNet"
    assert exp.norm._target_ == "manifoldnorm.nn.DomainLieBatchNorm" and exp.norm.metric == "aim"
    assert exp.data.source == "simulated" and exp.data.representation == "cov"
    assert exp.data.protocol == "cross_session" and exp.trainer.accelerator == "cpu"
    assert exp.module.scheduler._target_.endswith("CosineAnnealingLR") and base.module.scheduler is None
    # groups the experiment does not touch keep their defaults
    for group in ("callbacks", "logger", "paths"):
        assert OmegaConf.to_container(exp[group]) == OmegaConf.to_container(base[group])
    model = instantiate(exp.model)
    assert isinstance(model, SPDNet) and type(model.stages[0].norm).__name__ == "DomainLieBatchNorm"


def test_run_dir_keyed_on_slurm_job_id(cfg_of, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = cfg_of("+experiment=spd_eeg", hydra=True)
    assert re.fullmatch(r"outputs/spd_eeg/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", cfg.hydra.run.dir)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = cfg_of("+experiment=spd_eeg", hydra=True)
    assert cfg.hydra.run.dir == "outputs/spd_eeg/4242"
    # a sweep is keyed on its start time: each of its SLURM jobs (submitit) has its own job id
    assert re.fullmatch(r"outputs/spd_eeg/multirun/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", cfg.hydra.sweep.dir)


def test_every_data_option_instantiates(cfg_of, tmp_path: Path) -> None:
    assert options("data") == {"eeg_sim", "eeg_moabb", "arrays", "char_text", "digits", "ts_archive"}
    dm = run.build_datamodule(cfg := cfg_of("data=eeg_sim", *TINY_DATA, info=False))
    assert cfg.data_info.n_channels == 22 and cfg.data_info.num_domains == 4
    assert instantiate(cfg_of("data=eeg_moabb").data).source == "moabb"  # no download without setup
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", X=rng.standard_normal((16, 3, 128)), y=np.tile([0, 1], 8),
             subject=np.zeros(16), session=np.repeat([0, 1], 8), sfreq=128.0)
    dm = run.build_datamodule(cfg := cfg_of("data=arrays", f"data.path={tmp_path / 'd.npz'}", info=False))
    assert dm.info()["n_channels"] == 3 and cfg.data_info.num_classes == 2
    files = [write_ts(tmp_path / f"d_{part}.ts", list(rng.standard_normal((6, 2, 30))), ["a", "b"] * 3, ["a", "b"])
             for part in ("TRAIN", "TEST")]
    dm = run.build_datamodule(cfg := cfg_of("data=ts_archive", f"data.source_kwargs.train_file={files[0]}",
                                            f"data.source_kwargs.test_file={files[1]}", info=False))
    assert dm.split.protocol == "official" and len(dm.split["test"]) == 6
    assert (cfg.data_info.n_channels, cfg.data_info.num_classes, cfg.data_info.num_domains) == (2, 2, 1)
    run.build_datamodule(cfg := cfg_of("data=digits", info=False))
    assert (cfg.data_info.in_channels, cfg.data_info.num_classes, list(cfg.data_info.image_size)) == (1, 10, [8, 8])
    run.build_datamodule(cfg := cfg_of("data=char_text", info=False))
    assert cfg.data_info.vocab_size > 90 and cfg.data_info.block_size == cfg.data.block_size


SPD_MODELS = ("spdnet", "tsmnet")
EUCLIDEAN_MODELS = ("gpt", "resnet")


def _norm_configs(space: str) -> set[str]:
    return {k for k in options("norm") if space in get_norm_info(k).inputs}


def test_norm_configs_are_registry_keys_and_cover_the_registry() -> None:
    # every config file is named after the registry key it builds, and every slot-fillable norm has one
    assert options("norm") <= set(list_norms())
    spd_input = {k for k in list_norms(kind="spd") + list_norms(kind="lie") if "spd" in get_norm_info(k).inputs}
    assert _norm_configs("spd") == spd_input | {"none"}
    euclidean = {k for k in list_norms(kind="euclidean") if "euclidean" in get_norm_info(k).inputs}
    assert _norm_configs("euclidean") == euclidean - {"ngpt_norm", "qknorm"}  # used inside GPT only
    for name in options("norm"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            built = instantiate(compose("train", overrides=[f"norm={name}"]).norm)
        registered = get_norm_layer(name)
        fixed = getattr(registered, "keywords", {})  # e.g. metric="lcm" of liebn_lcm
        assert built.func is getattr(registered, "func", registered), name
        assert all(built.keywords.get(k) == v for k, v in fixed.items()), name


@pytest.mark.parametrize("model", SPD_MODELS)
def test_every_model_norm_pair_instantiates_and_runs(cfg_of, model: str) -> None:
    assert options("model") == {*SPD_MODELS, *EUCLIDEAN_MODELS}
    g = torch.Generator().manual_seed(0)
    for norm in sorted(_norm_configs("spd")):
        cfg = cfg_of(f"model={model}", f"norm={norm}", "model.dims=[4]" if model == "spdnet" else "model.spd_dims=[4]")
        if model == "tsmnet":
            assert cfg.data.representation == "raw"
            x = torch.randn(6, 22, 64, generator=g)
        else:
            a = torch.randn(6, 22, 30, generator=g, dtype=torch.float64)
            x = a @ a.mT / 30
        module = run.build_module(cfg)
        assert isinstance(module.model, SPDNet if model == "spdnet" else TSMNet)
        domain = torch.tensor([0, 0, 1, 1, 2, 2])
        out = module(x, domain=domain)
        assert out.shape == (6, 4) and torch.isfinite(out).all(), (model, norm)
        # every norm slot holds the registered layer, with the options of the config file
        registered = get_norm_layer(norm)
        norms = [stage.norm for stage in module.model.stages]
        assert norms and all(type(n) is getattr(registered, "func", registered) for n in norms), (model, norm)
        for n in norms:
            for key in ("metric", "momentum", "train_momentum", "karcher_steps"):
                if key in cfg.norm:
                    assert getattr(n, key) == cfg.norm[key], (model, norm, key)
        # evaluation is per sample (running statistics of each sample's domain)
        module.eval()
        torch.testing.assert_close(module(x[2:4], domain=domain[2:4]), module(x, domain=domain)[2:4],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", EUCLIDEAN_MODELS)
def test_every_euclidean_norm_fills_both_euclidean_models(cfg_of, model: str) -> None:
    g = torch.Generator().manual_seed(0)
    if model == "gpt":
        experiment, info = "lm_char", {"vocab_size": 11, "block_size": 8}
        tiny = ["model.n_layer=1", "model.d_model=16", "model.n_head=2"]
        x, shape = torch.randint(0, 11, (4, 8), generator=g), (4, 8, 11)
    else:
        experiment, info = "cnn_digits", {"in_channels": 1, "num_classes": 10, "image_size": 8}
        tiny = ["model.widths=[8,16]", "model.blocks_per_stage=1"]
        x, shape = torch.randn(4, 1, 8, 8, generator=g), (4, 10)
    def build(norm: str):
        cfg = cfg_of(f"+experiment={experiment}", f"norm={norm}", *tiny, info=False)
        with open_dict(cfg):
            cfg.data_info = info
        return run.build_module(cfg)

    for norm in sorted(_norm_configs("euclidean")):
        module = build(norm)
        out = module(x)
        assert out.shape == shape and torch.isfinite(out).all(), (model, norm)
        out.square().mean().backward()
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads if gr is not None), (model, norm)
    with pytest.raises(run.ConfigError, match="cannot fill a euclidean slot"):
        build("liebn_aim")


def test_every_optimizer_and_scheduler_option(cfg_of) -> None:
    from manifoldnorm.optim import list_optimizers

    assert {"riemannian_adam", "adamw", "adamp", "muon", "normuon", "conda", "sinkgd"} <= options("optimizer")
    lin = torch.nn.ModuleDict({"body": torch.nn.Linear(3, 4), "head": torch.nn.Linear(4, 2)})
    for name in sorted(options("optimizer")):
        node = cfg_of(f"optimizer={name}").optimizer  # every sub-optimizer a config names is registered
        assert {node[r]["name"] for r in ("manifold", "matrix", "rest") if r in node} <= set(list_optimizers()), name
        # SPDNet: manifold parameters keep Riemannian Adam, the rest gets the chosen optimizer
        opt = run.build_module(cfg_of(f"optimizer={name}", "model.dims=[4]")).configure_optimizers()
        assert isinstance(opt, CompositeOptimizer) and set(opt.optimizers) == {"manifold", "rest"}, name
        assert type(opt.optimizers["manifold"]).__name__ == "RiemannianAdam"
        euclid = instantiate(cfg_of(f"optimizer={name}").optimizer)(lin)
        matrix = euclid.optimizers.get("matrix")
        rest = type(euclid.optimizers["rest"]).__name__.lower()
        if "matrix" in node:  # hidden matrix: body.weight; head: rest
            assert type(matrix).__name__.lower() == node.matrix.name and len(matrix.param_groups[0]["params"]) == 1
            assert rest == "adamw"
        else:
            assert matrix is None and rest == node.rest.name, name
    rules = "optimizer.rules=[{match: '\\.bias$', into: rest, weight_decay: 0.0}]"
    opt = instantiate(cfg_of("optimizer=adamw", rules).optimizer)(lin)
    assert [g["weight_decay"] for g in opt.param_groups] == [1.0e-4, 0.0]
    for sched in sorted(options("scheduler")):
        module = run.build_module(cfg_of(f"scheduler={sched}", "model.dims=[4]"))
        if sched == "warmup_cosine":  # total_steps comes from the trainer (max_epochs here)
            with pytest.raises(ValueError, match="total_steps"):
                module.configure_optimizers()
            module.trainer = Trainer(max_epochs=7, logger=False, enable_checkpointing=False)
        conf = module.configure_optimizers()
        assert isinstance(conf["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.LRScheduler)
        assert conf["lr_scheduler"]["scheduler"].optimizer is conf["optimizer"]
        if sched == "warmup_cosine":
            assert conf["lr_scheduler"]["scheduler"].total_steps == 7


def test_every_trainer_logger_callbacks_option(cfg_of, tmp_path: Path) -> None:
    assert options("trainer") == {"default", "cpu", "ddp_cpu", "gpu", "ddp"}
    assert options("logger") == {"wandb", "csv", "none"}
    loggers = {name: run.build_loggers(cfg_of(f"logger={name}")) for name in sorted(options("logger"))}
    assert loggers["none"] == [] and isinstance(loggers["csv"][0], CSVLogger)
    wandb = loggers["wandb"][0]
    assert isinstance(wandb, WandbLogger) and wandb._wandb_init["mode"] == "offline"
    assert Path(wandb.save_dir) == tmp_path
    for name in sorted(options("trainer") - {"gpu", "ddp"}):  # the GPU ones: tests/launch/test_gpu_configs_on_cpu.py
        trainer = run.build_trainer(cfg_of(f"trainer={name}"), [], [])
        assert trainer.max_epochs == 30
    assert options("callbacks") == {"default", "early_stopping", "momentum_schedule"}
    cbs = run.build_callbacks(cfg_of("callbacks=early_stopping"))
    kinds = [type(cb) for cb in cbs]
    assert kinds.count(ModelCheckpoint) == 2 and EarlyStopping in kinds
    assert LearningRateMonitor in kinds  # inert without a scheduler: tests/lit/test_lr_monitor.py
    from manifoldnorm.lit.callbacks import MomentumSchedule

    cbs = run.build_callbacks(cfg_of("callbacks=momentum_schedule"))
    assert MomentumSchedule in [type(cb) for cb in cbs] and [type(cb) for cb in cbs].count(ModelCheckpoint) == 2
    cbs = run.build_callbacks(cfg_of("scheduler=cosine"))
    assert LearningRateMonitor in [type(cb) for cb in cbs]


def test_resolved_config_is_saved_and_logged(cfg_of, tmp_path: Path) -> None:
    cfg = cfg_of("logger=csv", "+experiment=spd_eeg")
    loggers = run.build_loggers(cfg)
    resolved = run.save_config(cfg, loggers, tmp_path)
    saved = OmegaConf.load(tmp_path / "config_resolved.yaml")
    assert saved.data_info.n_channels == 22 and saved.model.in_dim == 22
    assert saved.model.norm_layer.metric == "aim" and resolved["task_name"] == "spd_eeg"
    assert loggers[0].experiment.hparams["model"]["dims"] == [16]


@pytest.mark.parametrize("model", EUCLIDEAN_MODELS)
def test_every_optimizer_config_steps_the_euclidean_models(cfg_of, model: str) -> None:
    g = torch.Generator().manual_seed(0)
    if model == "gpt":
        experiment, info = "lm_char", {"vocab_size": 11, "block_size": 8}
        tiny = ["model.n_layer=1", "model.d_model=16", "model.n_head=2"]
        x = torch.randint(0, 11, (4, 8), generator=g)
    else:
        experiment, info = "cnn_digits", {"in_channels": 1, "num_classes": 10, "image_size": 8}
        tiny = ["model.widths=[8,16]", "model.blocks_per_stage=1"]
        x = torch.randn(4, 1, 8, 8, generator=g)
    for name in sorted(options("optimizer")):
        # lm_char sets Adam's betas on `rest`; an SGD-type rest (sgdp) needs them dropped (documented in sgdp.yaml)
        drop = ["~optimizer.rest.betas"] if experiment == "lm_char" and name == "sgdp" else []
        cfg = cfg_of(f"+experiment={experiment}", f"optimizer={name}", *tiny, *drop, info=False)
        with open_dict(cfg):
            cfg.data_info = info
        module = run.build_module(cfg)
        conf = module.configure_optimizers()
        opt = conf["optimizer"] if isinstance(conf, dict) else conf
        matrix = opt.optimizers.get("matrix")
        if "matrix" in cfg.optimizer:  # the hidden (attention/MLP or conv) weights
            assert type(matrix).__name__.lower() == cfg.optimizer.matrix.name and all(
                p.ndim >= 2 for gr in matrix.param_groups for p in gr["params"])
        before = [p.detach().clone() for p in module.parameters()]
        module(x).square().mean().backward()
        opt.step()
        moved = [not torch.equal(a, p) for a, p in zip(before, module.parameters(), strict=True)]
        assert all(torch.isfinite(p).all() for p in module.parameters()) and sum(moved) > len(moved) // 2, name
