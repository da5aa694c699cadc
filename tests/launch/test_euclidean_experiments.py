"""The Euclidean experiments (lm_char, cnn_digits): composition, tiny end-to-end runs of launch/train.py's train()
with every norm of their sweeps, and one multirun from the command line."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from manifoldnorm.data import load_text
from manifoldnorm.lit import CharLMDataModule, ClassificationModule, ImageDataModule, LanguageModelModule

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
QUIET = ["trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "trainer.enable_model_summary=false"]
TINY = {
    "lm_char": ["trainer.max_epochs=2", "data.block_size=16", "data.batch_size=8", "data.steps_per_epoch=6",
                "data.val_batches=2", "model.n_layer=1", "model.n_head=2", "model.d_model=16"],
    "cnn_digits": ["trainer.max_epochs=2", "data.batch_size=32", "model.widths=[8,16]"],
}
SWEEPS = {"lm_char": ("layernorm", "rmsnorm", "dyt", "derf"), "cnn_digits": ("batchnorm", "groupnorm", "evonorm_s0",
                                                                              "none")}


def _load_train():
    spec = importlib.util.spec_from_file_location("launch_train", ROOT / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.train


train = _load_train()


def _cfg(*overrides: str, out: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={out}", *overrides])


def test_lm_char_composes_from_overrides(tmp_path: Path) -> None:
    base, exp = _cfg(out=tmp_path), _cfg("+experiment=lm_char", out=tmp_path)
    assert exp.task_name == "lm_char" and exp.optimized_metric == "val/bpc"
    assert exp.data._target_ == "manifoldnorm.lit.CharLMDataModule" and exp.data.source == "pydoc"
    assert exp.model._target_ == "manifoldnorm.models.GPT" and exp.module._target_.endswith("LanguageModelModule")
    assert exp.norm._target_.endswith("LayerNorm") and exp.norm._partial_
    assert exp.optimizer.rest.name == "adamw" and exp.optimizer.manifold.name == "riemannian_adam"
    assert exp.module.scheduler._target_.endswith("CosineAnnealingLR") and exp.module.scheduler_interval == "epoch"
    assert exp.callbacks.model_checkpoint.monitor == "val/loss" and exp.callbacks.model_checkpoint.mode == "min"
    assert exp.trainer.accelerator == "cpu"
    for group in ("logger", "paths"):
        assert OmegaConf.to_container(exp[group]) == OmegaConf.to_container(base[group])
    # the default stays the EEG classifier, now through the `module` group
    assert base.module._target_ == "manifoldnorm.lit.ClassificationModule" and base.module.scheduler is None
    assert base.module.refit_on_test is None and base.optimized_metric == "val/bacc"


def test_lm_corpus_is_under_one_pass_and_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The optimizer study's setting: the offline corpus, a token budget of at most one pass over its training
    text, a model whose hidden matrices hold most parameters; a tiny run of it end to end."""
    from manifoldnorm.data import split_text
    from manifoldnorm.optim import hidden_matrices

    exp = _cfg("+experiment=lm_corpus", out=tmp_path)
    assert exp.task_name == "lm_corpus" and exp.data.source == "corpus" and exp.model.dropout == 0.0
    train_text, _, _ = split_text(load_text("corpus"), exp.data.val_fraction, exp.data.test_fraction)
    budget = exp.data.steps_per_epoch * exp.trainer.max_epochs * exp.data.batch_size * exp.data.block_size
    assert 0.3 * len(train_text) < budget <= len(train_text)
    with open_dict(exp):
        exp.data_info = {"vocab_size": len(set(load_text("corpus"))), "block_size": exp.data.block_size}
    model = instantiate(exp.model)
    hidden = hidden_matrices(model)
    n_hidden = sum(p.numel() for p in model.parameters() if id(p) in hidden)
    assert n_hidden > 0.9 * sum(p.numel() for p in model.parameters())
    cfg = _cfg("+experiment=lm_corpus", "logger=csv", *QUIET, *TINY["lm_char"], out=tmp_path / "run")
    value = train(cfg)
    assert value is not None and math.isfinite(value) and value < math.log(exp.data_info.vocab_size)
    assert "test/loss" in capsys.readouterr().out


def test_cnn_digits_composes_from_overrides(tmp_path: Path) -> None:
    exp = _cfg("+experiment=cnn_digits", out=tmp_path)
    assert exp.task_name == "cnn_digits" and exp.optimized_metric == "val/acc"
    assert exp.data._target_ == "manifoldnorm.lit.ImageDataModule" and exp.data.source == "digits"
    assert exp.model._target_ == "manifoldnorm.models.ResNet" and exp.module._target_.endswith("ClassificationModule")
    assert exp.norm._target_.endswith("BatchNorm")
    assert exp.callbacks.model_checkpoint.monitor == "val/acc" and exp.callbacks.model_checkpoint.mode == "max"


@pytest.mark.parametrize(("experiment", "norm"), [(e, n) for e, norms in SWEEPS.items() for n in norms])
def test_tiny_run_end_to_end(experiment: str, norm: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _cfg(f"+experiment={experiment}", f"norm={norm}", "logger=csv", *QUIET, *TINY[experiment], out=tmp_path)
    value = train(cfg)
    printed = capsys.readouterr().out
    assert value is not None and math.isfinite(value)
    resolved = OmegaConf.load(tmp_path / "config_resolved.yaml")
    assert resolved.norm._target_ == cfg.norm._target_ and resolved.model.norm_layer._target_ == cfg.norm._target_
    assert len(list((tmp_path / "checkpoints").glob("best-epoch*.ckpt"))) == 1
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    if experiment == "lm_char":
        vocab = len(set(load_text("pydoc")))
        assert resolved.data_info.vocab_size == resolved.model.vocab_size == vocab
        assert resolved.model.block_size == 16
        assert {"train/loss_step", "val/loss", "val/bpc", "test/loss", "test/bpc"} <= set(header)
        assert "test/bpc" in printed and "best/val/loss" in printed
        assert value < math.log2(vocab)  # val/bpc below uniform guessing after a dozen steps
    else:
        assert resolved.data_info.in_channels == 1 and resolved.model.num_classes == 10
        assert {"val/acc", "test/acc", "test/bacc"} <= set(header)
        assert "test/acc" in printed and "best/val/acc" in printed
        assert value > 0.2  # best val/acc after two epochs (chance: 0.1)


def test_experiments_instantiate_the_new_modules(tmp_path: Path) -> None:
    from manifoldnorm.lit import run

    for experiment, kinds in (("lm_char", (CharLMDataModule, LanguageModelModule)),
                              ("cnn_digits", (ImageDataModule, ClassificationModule))):
        cfg = _cfg(f"+experiment={experiment}", *TINY[experiment], out=tmp_path)
        dm, module = run.build_datamodule(cfg), run.build_module(cfg)
        assert isinstance(dm, kinds[0]) and isinstance(module, kinds[1])
        x, y, domain = next(iter(dm.val_dataloader()))
        out = module(x, domain=domain)
        assert torch.isfinite(out).all()
        # the overrides reached the objects, and the untrained model is an honest starting point
        if experiment == "lm_char":
            assert (module.model.n_layer, module.model.d_model) == (1, 16) and x.shape == (8, 16)
            vocab = dm.info()["vocab_size"]
            assert out.shape == (8, 16, vocab)
            # GPT's small init: next-token predictions close to uniform over the vocabulary
            loss = float(torch.nn.functional.cross_entropy(out.flatten(0, 1), y.flatten()))
            assert abs(loss - math.log(vocab)) < 0.1, (loss, math.log(vocab))
        else:
            assert tuple(module.model.widths) == (8, 16) and out.shape == (x.shape[0], 10)
            module.eval()  # evaluation is per image: one image alone gets its row of the batch's logits
            torch.testing.assert_close(module(x[:1], domain=domain[:1]), module(x, domain=domain)[:1],
                                       atol=1e-5, rtol=1e-5)


def test_command_line_multirun(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "WANDB_", "SLURM_"))}
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "-m", "+experiment=cnn_digits", "norm=batchnorm,none", "logger=none",
         *QUIET, "trainer.max_epochs=1", "model.widths=[8]", f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test/acc") == 2 and proc.stdout.count("best/val/acc") == 2
    for job, target in (("0", "BatchNorm"), ("1", "IdentityNorm")):
        assert OmegaConf.load(tmp_path / job / "config_resolved.yaml").norm._target_.endswith(target)
