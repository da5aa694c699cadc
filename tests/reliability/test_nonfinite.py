"""Divergence and non-finite values: NonFiniteGuard skips non-finite steps, a diverging run stops with one line.

Each non-finite class (NaN/inf gradient, NaN loss, NaN parameter, a layer's NaN output or LinAlgError) is injected
into a real Lightning run (tiny models, a few steps) and must give its own message; every registered optimizer
must leave weights and state untouched on a skipped step (and must corrupt them without the guard, which shows
the test can fail).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import geoopt
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from manifoldnorm.lit import ClassificationModule, NonFiniteError, NonFiniteGuard
from manifoldnorm.lit.guard import numerical_errors
from manifoldnorm.optim import (
    build_optimizer,
    create_optimizer,
    drop_grads,
    get_optimizer,
    grads_finite,
    list_optimizers,
)

ROOT = Path(__file__).resolve().parents[2]
NAN, INF = float("nan"), float("inf")


# ----------------------------------------------------------------------------- every optimizer, direct calls
class _Holder(pl.LightningModule):
    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        super().__init__()
        self.p = nn.ParameterDict(params)


def _setup(name: str) -> tuple[_Holder, torch.optim.Optimizer]:
    torch.manual_seed(0)
    params = {"weight": nn.Parameter(torch.randn(4, 3))}
    if get_optimizer(name).kind == "riemannian":
        params["stiefel"] = geoopt.ManifoldParameter(torch.linalg.qr(torch.randn(4, 3))[0], manifold=geoopt.Stiefel())
    holder = _Holder(params)
    opt = build_optimizer(name, list(holder.parameters()), lr=1e-2)
    for _ in range(2):  # populate the optimizer state
        for p in holder.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    for p in holder.parameters():
        p.grad = torch.randn_like(p)
    return holder, opt


def _snapshot(holder: _Holder, opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in holder.parameters()], copy.deepcopy(opt.state_dict())


def _same_state(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("bad", [NAN, INF])
@pytest.mark.parametrize("name", list_optimizers())
def test_guard_keeps_weights_and_state_of_every_optimizer(name: str, bad: float) -> None:
    holder, opt = _setup(name)
    last = list(holder.parameters())[-1]
    last.grad[1, 2] = bad
    params, state = _snapshot(holder, opt)
    guard = NonFiniteGuard(max_consecutive_skips=3)
    guard.on_before_optimizer_step(None, holder, opt)  # the trainer is not used on this path
    opt.step()
    assert guard.skipped == 1 and guard.consecutive == 1
    for before, p in zip(params, holder.parameters(), strict=True):
        assert torch.equal(before, p)
    after = opt.state_dict()
    if name == "riemannian_sgd":  # documented: geoopt counts the skipped step in its group step counter
        for g in after["param_groups"]:
            g["step"] -= 1
    assert _same_state(state, after)


@pytest.mark.parametrize("name", list_optimizers())
def test_without_guard_a_nan_gradient_corrupts_the_weights(name: str) -> None:
    holder, opt = _setup(name)
    list(holder.parameters())[-1].grad[1, 2] = NAN
    opt.step()
    assert not all(bool(torch.isfinite(p).all()) for p in holder.parameters())


def test_guard_on_composite_optimizer_and_finite_steps_reset_the_count() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    holder = _Holder({})
    holder.model = model
    opt = create_optimizer(model, matrix={"name": "muon", "lr": 1e-2}, rest={"name": "adamw", "lr": 1e-2})
    guard = NonFiniteGuard(max_consecutive_skips=2)
    for step in range(4):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        if step in (1, 3):
            model[1].bias.grad[0] = NAN
        params, state = _snapshot(holder, opt)
        guard.on_before_optimizer_step(None, holder, opt)
        opt.step()
        if step in (1, 3):
            assert all(torch.equal(a, p) for a, p in zip(params, holder.parameters(), strict=True))
            assert _same_state(state, opt.state_dict())
    assert guard.skipped == 2 and guard.consecutive == 1  # never two in a row: no error
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_library_helpers() -> None:
    w = nn.Parameter(torch.ones(3))
    assert grads_finite([w])  # no gradient at all: nothing to apply
    w.grad = torch.tensor([1.0, INF, 0.0])
    assert not grads_finite([w])
    w.grad = torch.full((3,), 1e30)  # finite entries, but the float32 sum of squares overflows
    assert not grads_finite([w])
    drop_grads([w])
    assert w.grad is None


def test_max_consecutive_skips_is_checked() -> None:
    for bad in (0, -1, 1.5, True, "5"):
        with pytest.raises(ValueError, match="max_consecutive_skips"):
            NonFiniteGuard(max_consecutive_skips=bad)


# ----------------------------------------------------------------------------- Lightning runs
class _Poison(nn.Module):
    """Identity; multiplies by NaN while ``on`` (a layer whose output goes non-finite)."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * NAN if self.on else x


class _Net(pl.LightningModule):
    """A two-layer regression; ``faults`` maps a global step to the fault injected in it."""

    def __init__(self, faults: dict[int, str] | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), _Poison(), nn.Linear(4, 1))
        self.faults = faults or {}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        fault = self.faults.get(self.global_step)
        self.net[1].on = fault == "layer"
        if fault == "param":
            with torch.no_grad():
                self.net[2].weight[0, 1] = NAN
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def on_after_backward(self) -> None:
        fault = self.faults.get(self.global_step)
        if fault in ("nan_grad", "inf_grad"):
            self.net[0].weight.grad[0, 0] = NAN if fault == "nan_grad" else INF

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 3, generator=g)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)  # 4 steps per epoch


class _Record(pl.Callback):
    """Weights before and after every training batch, by global step."""

    def __init__(self) -> None:
        self.before: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step - 1] = [p.detach().clone() for p in pl_module.parameters()]


def _fit(module: pl.LightningModule, tmp_path: Path, epochs: int, *callbacks: pl.Callback) -> pl.Trainer:
    last = ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[*callbacks, last], default_root_dir=tmp_path, gradient_clip_val=1.0)
    trainer.fit(module)
    return trainer


def test_skipped_steps_leave_weights_unchanged_and_are_counted(tmp_path: Path, caplog) -> None:
    module = _Net({2: "nan_grad", 5: "inf_grad", 6: "layer"})
    guard, record = NonFiniteGuard(max_consecutive_skips=3), _Record()
    trainer = _fit(module, tmp_path, 2, guard, record)
    for step in range(8):
        same = all(torch.equal(a, b) for a, b in zip(record.before[step], record.after[step], strict=True))
        assert same == (step in (2, 5, 6)), step
    assert guard.skipped == 3 and guard.consecutive == 0
    assert trainer.callback_metrics["train/skipped_steps"] == 3.0
    state = trainer.optimizers[0].state[module.net[0].weight]
    assert int(state["step"]) == 8 - 3  # AdamW counted only the steps it took
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())
    assert "skipped the optimizer step at training step 2 (epoch 0, batch 2): non-finite gradient in " \
           "'net.0.weight' (NaN)" in caplog.text


def test_consecutive_skips_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path: Path) -> None:
    module = _Net({s: "nan_grad" for s in range(5, 100)})
    record = _Record()
    with pytest.raises(NonFiniteError) as err:
        _fit(module, tmp_path, 5, NonFiniteGuard(max_consecutive_skips=3), record)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("training diverged at training step 7 (epoch 1, batch 3): non-finite gradient in "
                          "'net.0.weight' (NaN); 3 steps skipped in a row (max_consecutive_skips=3)")
    assert "gradient_clip_val" in msg and "lr" in msg
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 4  # written at the end of the first (good) epoch
    for (name, saved), now in zip(ckpt["state_dict"].items(), record.after[3], strict=True):
        assert torch.equal(saved, now), name
    assert ckpt["callbacks"]["NonFiniteGuard"] == {"skipped": 0, "consecutive": 0}


@pytest.mark.parametrize(("fault", "expected"), [
    ("nan_grad", "non-finite gradient in 'net.0.weight' (NaN); 1 steps skipped in a row (max_consecutive_skips=1)"),
    ("inf_grad", "non-finite gradient in 'net.0.weight' (inf); 1 steps skipped in a row (max_consecutive_skips=1)"),
    ("layer", "non-finite loss (NaN), hence non-finite gradient in 'net.0.weight' (NaN) and 3 more (first "
              "non-finite layer output: NaN in 'net.1' (_Poison)); 1 steps skipped in a row (max_consecutive_skips=1)"),
    ("param", "non-finite loss (NaN), hence non-finite gradient in 'net.0.weight' (NaN) and 3 more (non-finite "
              "parameter 'net.2.weight' (NaN); first non-finite layer output: NaN in 'net.2' (Linear)); a "
              "parameter is non-finite, skipping steps cannot repair it"),
])
def test_each_nonfinite_class_has_its_message(fault: str, expected: str, tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError) as err:
        _fit(_Net({1: fault}), tmp_path, 1, NonFiniteGuard(max_consecutive_skips=1))
    assert str(err.value).startswith(f"training diverged at training step 1 (epoch 0, batch 1): {expected}")


def test_float16_loss_scaling_overflow_is_left_to_the_grad_scaler(tmp_path: Path) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    def fit(faults: dict[int, str]) -> tuple[NonFiniteGuard, torch.amp.GradScaler]:
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        guard = NonFiniteGuard(max_consecutive_skips=1)
        trainer = pl.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[guard], default_root_dir=tmp_path, enable_checkpointing=False,
                             accelerator="cpu", plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
        trainer.fit(_Net(faults))
        return guard, scaler

    guard, scaler = fit({1: "inf_grad", 2: "inf_grad"})  # overflow after a finite loss: the scaler's skips
    assert guard.skipped == 0 and scaler.get_scale() == 1024.0 / 4
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(NaN\)"):  # a NaN loss still stops the run
        fit({1: "layer"})


class _PoisonAfterStep(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 3:  # the last step of the epoch: its update made a weight NaN
            with torch.no_grad():
                pl_module.net[2].bias[0] = NAN


def test_no_validation_and_no_checkpoint_with_nonfinite_weights(tmp_path: Path) -> None:
    module = _Net()
    module.val_dataloader = module.train_dataloader
    module.validation_step = lambda batch, batch_idx: None
    with pytest.raises(NonFiniteError, match=r"non-finite parameter 'net.2.bias' \(NaN\) before validation"):
        _fit(module, tmp_path, 2, NonFiniteGuard(), _PoisonAfterStep())
    assert not (tmp_path / "last.ckpt").exists()


def test_no_checkpoint_with_nonfinite_weights(tmp_path: Path) -> None:
    module = _Net()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[NonFiniteGuard()], default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.fit(module)
    with torch.no_grad():
        module.net[0].bias[1] = INF
    with pytest.raises(NonFiniteError, match=r"non-finite parameter 'net.0.bias' \(inf\) before writing a checkpoint"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


# ----------------------------------------------------------------------------- errors raised inside a layer
class _Chol(nn.Module):
    """Cholesky of ``x^T x + shift I``: raises LinAlgError once ``shift`` makes it indefinite."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.shift = 1.0

    def forward(self, x: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
        h = self.lin(x)
        L = torch.linalg.cholesky(h.mT @ h + self.shift * torch.eye(3))
        return h @ L


def _classifier(tmp_path: Path, model: nn.Module,
                steps: int = 3) -> tuple[ClassificationModule, pl.Trainer, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, generator=g), torch.randint(0, 3, (16,), generator=g)
    loader = DataLoader(TensorDataset(x, y, torch.zeros(16, dtype=torch.long)), batch_size=4)
    module = ClassificationModule(model, num_classes=3)
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[NonFiniteGuard()], default_root_dir=tmp_path, enable_checkpointing=False,
                         limit_val_batches=0)
    return module, trainer, loader


class _CholAt(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pl_module.model.shift = -1e6 if trainer.global_step == 2 else 1.0


def test_layer_linalg_error_becomes_one_line(tmp_path: Path) -> None:
    module, trainer, loader = _classifier(tmp_path, _Chol())
    trainer.callbacks.append(_CholAt())
    with pytest.raises(NonFiniteError) as err:
        trainer.fit(module, train_dataloaders=loader)
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value.__cause__, torch.linalg.LinAlgError)
    assert msg.startswith("training diverged at training step 2 (epoch 0, batch 2): 'model' (_Chol) raised "
                          "LinAlgError: linalg.cholesky:")
    assert "all parameters, the input and the layer outputs before it finite" in msg and "compute_dtype" in msg


def test_layer_error_from_nonfinite_weights_names_the_parameter(tmp_path: Path) -> None:
    model = _Chol()
    module, trainer, loader = _classifier(tmp_path, model, steps=1)
    with torch.no_grad():
        model.lin.weight[0, 0] = NAN
    with pytest.raises(NonFiniteError, match=r"at training step 0 \(epoch 0, batch 0\): 'model' \(_Chol\) raised "
                       r"LinAlgError: .*non-finite parameter 'model.lin.weight' \(NaN\); first non-finite layer "
                       r"output: NaN in 'model.lin' \(Linear\)"):
        trainer.fit(module, train_dataloaders=loader)
    assert model.shift == 1.0


def test_a_plain_value_error_passes_unchanged() -> None:
    module = ClassificationModule(nn.Linear(3, 3), num_classes=3)
    with pytest.raises(ValueError, match="^a user error$"), numerical_errors(module, None, 0):
        raise ValueError("a user error")


def test_diagnosis_rerun_restores_running_statistics(tmp_path: Path) -> None:
    class BNChol(_Chol):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
            return super().forward(self.bn(x), domain)

    model = BNChol()
    module, trainer, loader = _classifier(tmp_path, model)
    trainer.callbacks.append(_CholAt())
    seen: dict[str, torch.Tensor] = {}

    class Keep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen["mean"] = model.bn.running_mean.clone()

    trainer.callbacks.append(Keep())
    with pytest.raises(NonFiniteError):
        trainer.fit(module, train_dataloaders=loader)
    # the failing step updated the running mean once (its own forward), the diagnosis re-run did not again
    momentum, batch2 = model.bn.momentum, list(loader)[2][0]
    expected = (1 - momentum) * seen["mean"] + momentum * batch2.mean(0)
    torch.testing.assert_close(model.bn.running_mean, expected)


# ----------------------------------------------------------------------------- the flagship, diverging
TINY = [
    "+experiment=spd_eeg", "logger=csv", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null", "trainer.enable_model_summary=false", "data.source_kwargs.n_subjects=2",
    "data.source_kwargs.trials_per_class=8", "data.batch_size=16", "model.dims=[6]",
]


def test_diverging_flagship_run_ends_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "WANDB_", "SLURM_"))}
    env.update(MANIFOLDNORM_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "launch/train.py", *TINY, "optimizer.rest.lr=1e8",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("Error: training diverged at training step ")
    assert "optimizer.*.lr" in errors[0] and "gradient_clip_val" in errors[0]


# ----------------------------------------------------------------------------- DDP (2 gloo processes)
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes: ~15 s of CPU, longer on a loaded machine
def test_ddp_ranks_skip_the_same_step(tmp_path: Path) -> None:
    drop = ("SLURM_", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    script = Path(__file__).with_name("nonfinite_ddp_script.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for got in ranks:
        assert got["changed"] == [True, False, True, True] and got["skipped"] == 1  # rank 1's NaN loss, step 1
        assert all(bool(torch.isfinite(v).all()) for v in got["state"].values())
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
