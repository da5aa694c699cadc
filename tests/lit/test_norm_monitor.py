"""NormMonitor and the test-time confusion matrices under a real Lightning Trainer with a CSV logger: logged values
against independent computations, the logging period, hooks only on logging steps, per-domain test metrics,
the confusion CSV, options and config."""

from __future__ import annotations

import csv
import functools
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import random_spd
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from manifoldnorm.lit import ClassificationModule, ConfusionReport, NormMonitor, run
from manifoldnorm.lit.confusion import DomainConfusion
from manifoldnorm.lit.monitor import param_group_names
from manifoldnorm.models import SPDNet
from manifoldnorm.nn import DomainLieBatchNorm, LayerNorm
from manifoldnorm.optim import create_optimizer

CONF = Path(__file__).resolve().parents[2] / "conf"
LR = 0.1


class Net(nn.Module):
    """A two-layer perceptron with a LayerNorm, called as ``model(x, domain=...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(6, 8), LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(torch.relu(self.ln(self.fc1(x))))


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    body = [*model.fc1.parameters(), *model.ln.parameters()]
    return torch.optim.SGD([{"params": body, "name": "body"}, {"params": model.fc2.parameters()}], lr=LR)


def _loader(n: int = 48, seed: int = 0, batch_size: int = 8, domains: int = 3) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(n, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    d = torch.arange(n) % domains
    return DataLoader(TensorDataset(x, y, d), batch_size=batch_size, shuffle=False)


def _trainer(tmp_path: Path, callbacks: list, epochs: int = 2, logger: object = True, **kw) -> pl.Trainer:
    if logger is True:
        logger = CSVLogger(tmp_path, name="csv")
    return pl.Trainer(max_epochs=epochs, logger=logger, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu", devices=1,
                      num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks, **kw)


def _rows(trainer: pl.Trainer) -> list[dict[str, str]]:
    trainer.logger.save()
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


class Inspector(pl.Callback):
    """The test's own view: hooks on the layer at each batch start/end, the layer's input/output and the gradient
    norm of each parameter group at each step (own hooks, own arithmetic)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.hooks_at_start: dict[int, int] = {}
        self.hooks_at_end: dict[int, int] = {}
        self.io: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.grad_norms: dict[int, list[float]] = {}
        self.params_before: dict[int, list[torch.Tensor]] = {}
        self._step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._step = trainer.global_step
        self.hooks_at_start[self._step] = len(self.layer._forward_hooks)
        self._own = self.layer.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.io.setdefault(self._step, (args[0].detach().clone(), output.detach().clone()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        self.grad_norms[self._step] = [
            float(torch.cat([p.grad.double().reshape(-1) for p in g["params"]]).norm()) for g in optimizer.param_groups]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self._own.remove()
        self.hooks_at_end[self._step] = len(self.layer._forward_hooks)


def test_monitor_logs_every_n_steps_only_with_hooks_on_those_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = Net()
    module = ClassificationModule(net, num_classes=3, optimizer=_sgd)
    monitor, inspector = NormMonitor(every_n_steps=4), Inspector(net.ln)
    trainer = _trainer(tmp_path, [monitor, inspector])
    trainer.fit(module, train_dataloaders=_loader())  # 6 batches x 2 epochs = 12 steps
    logged = {int(r["step"]): r for r in _rows(trainer) if r.get("monitor/ln/rms_in")}
    assert sorted(logged) == [0, 4, 8]
    assert {s for s, n in inspector.hooks_at_start.items() if n > 0} == {0, 4, 8}  # ours: only on logging steps
    assert set(inspector.hooks_at_end.values()) == {0}  # and removed before the batch ends
    for step, row in logged.items():
        x, y = inspector.io[step]
        assert float(row["monitor/ln/rms_in"]) == pytest.approx(float(x.double().square().mean().sqrt()), rel=1e-6)
        assert float(row["monitor/ln/rms_out"]) == pytest.approx(float(y.double().square().mean().sqrt()), rel=1e-6)
        for i, group in enumerate(("body", "group1")):
            g = inspector.grad_norms[step][i]
            assert float(row[f"monitor/optim/{group}/grad_norm"]) == pytest.approx(g, rel=1e-5)
            # plain SGD: the update is -lr * gradient, so its RMS is lr * |g| / sqrt(#params)
            count = sum(p.numel() for p in trainer.optimizers[0].param_groups[i]["params"])
            assert float(row[f"monitor/optim/{group}/update_rms"]) == pytest.approx(LR * g / math.sqrt(count),
                                                                                    rel=1e-3)
            assert 0.0 < float(row[f"monitor/optim/{group}/update_rel"]) < 1.0


def test_riemannian_layers_logged_values_match_eigvalsh(tmp_path: Path) -> None:
    torch.manual_seed(0)
    n, N = 8, 32
    x = random_spd(N, n=n, cond=30.0, seed=4)
    y, d = torch.arange(N) % 3, (torch.arange(N) // 2) % 2
    loader = DataLoader(TensorDataset(x, y, d), batch_size=8)
    model = SPDNet(n, [5, 4], 3, norm_layer=functools.partial(DomainLieBatchNorm, num_domains=2, metric="lem"))
    opt = functools.partial(create_optimizer, manifold={"name": "riemannian_adam", "lr": 1e-2},
                            rest={"name": "adamw", "lr": 1e-2})
    module = ClassificationModule(model, num_classes=3, optimizer=opt)
    inspector = Inspector(model.stages[1].norm)
    trainer = _trainer(tmp_path, [NormMonitor(every_n_steps=3), inspector], epochs=1)
    trainer.fit(module, train_dataloaders=loader)
    rows = {int(r["step"]): r for r in _rows(trainer) if r.get("monitor/stages.1.norm/cond_in")}
    assert sorted(rows) == [0, 3]
    for step, row in rows.items():
        for side, t in zip(("in", "out"), inspector.io[step], strict=True):
            lam = torch.linalg.eigvalsh(t.double())
            assert float(row[f"monitor/stages.1.norm/eig_min_{side}"]) == pytest.approx(float(lam.min()), rel=1e-9)
            assert float(row[f"monitor/stages.1.norm/eig_max_{side}"]) == pytest.approx(float(lam.max()), rel=1e-9)
            cond = (lam[:, -1] / lam[:, 0]).max()
            assert float(row[f"monitor/stages.1.norm/cond_{side}"]) == pytest.approx(float(cond), rel=1e-9)
        for key in ("batch_var", "running_var", "dist_mean_bias", "dist_mean_identity", "shift_mean"):
            assert math.isfinite(float(row[f"monitor/stages.0.norm/{key}"]))
        for group in ("manifold", "rest"):
            assert float(row[f"monitor/optim/{group}/update_rms"]) > 0.0


def test_no_logger_no_hooks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = Net()
    inspector = Inspector(net.ln)
    trainer = _trainer(tmp_path, [NormMonitor(every_n_steps=1), inspector], epochs=1, logger=False)
    trainer.fit(ClassificationModule(net, num_classes=3, optimizer=_sgd), train_dataloaders=_loader())
    assert set(inspector.hooks_at_start.values()) == {0}


def _predict(module: ClassificationModule, loader: DataLoader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y, d = (t.numpy() for t in loader.dataset.tensors)
    module.eval()
    with torch.no_grad():
        pred = module(torch.as_tensor(x)).argmax(-1).numpy()
    return y, pred, d


def test_per_domain_test_metrics_and_confusion_csv_match_sklearn(tmp_path: Path) -> None:
    torch.manual_seed(1)
    module = ClassificationModule(Net(), num_classes=3, optimizer=_sgd, num_domains=4)
    trainer = _trainer(tmp_path, [ConfusionReport(tmp_path / "run")], epochs=1)
    trainer.fit(module, train_dataloaders=_loader())
    test = _loader(n=60, seed=5, batch_size=16, domains=3)  # domain 3 has no test sample
    (results,) = trainer.test(module, dataloaders=test, verbose=False)
    y, pred, d = _predict(module, test)
    for dom in range(3):
        m = d == dom
        assert results[f"test/acc/domain={dom}"] == pytest.approx(accuracy_score(y[m], pred[m]), abs=1e-6)
        assert results[f"test/bacc/domain={dom}"] == pytest.approx(balanced_accuracy_score(y[m], pred[m]), abs=1e-6)
    assert "test/acc/domain=3" not in results
    with open(tmp_path / "run" / "test_confusion.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == ["true\\predicted", "0", "1", "2"]
    assert np.array_equal(np.array([[int(v) for v in r[1:]] for r in table[1:]]),
                          confusion_matrix(y, pred, labels=[0, 1, 2]))
    with open(tmp_path / "run" / "test_confusion_by_domain.csv") as f:
        rows = list(csv.DictReader(f))
    assert {int(r["domain"]) for r in rows} == {0, 1, 2}
    for dom in range(3):
        m = d == dom
        got = np.zeros((3, 3), dtype=int)
        for r in rows:
            if int(r["domain"]) == dom:
                got[int(r["true"]), int(r["predicted"])] = int(r["count"])
        assert np.array_equal(got, confusion_matrix(y[m], pred[m], labels=[0, 1, 2]))
    logged = {k for r in _rows(trainer) for k, v in r.items() if v}
    assert {"test/acc/domain=0", "test/bacc/domain=2"} <= logged  # through the logger too


def test_without_num_domains_no_per_domain_metrics(tmp_path: Path) -> None:
    module = ClassificationModule(Net(), num_classes=3, optimizer=_sgd)
    trainer = _trainer(tmp_path, [ConfusionReport()], epochs=1, logger=False)
    (results,) = trainer.test(module, dataloaders=_loader(), verbose=False)
    assert not any("domain=" in k for k in results)
    assert module.last_test_confusion.shape == (1, 3, 3) and int(module.last_test_confusion.sum()) == 48
    assert (tmp_path / "test_confusion.csv").is_file() and not (tmp_path / "test_confusion_by_domain.csv").exists()


def test_a_domain_id_out_of_range_is_one_clear_error(tmp_path: Path) -> None:
    module = ClassificationModule(Net(), num_classes=3, optimizer=_sgd, num_domains=2)
    trainer = _trainer(tmp_path, [], epochs=1, logger=False)
    with pytest.raises(ValueError, match=r"domain id 2 is outside 0\.\.1 \(num_domains=2\)"):
        trainer.test(module, dataloaders=_loader(domains=3), verbose=False)
    with pytest.raises(ValueError, match="num_domains must be"):
        DomainConfusion(3, 0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"every_n_steps": 0}, "every_n_steps must be an int >= 1, got 0"),
    ({"every_n_steps": 2.5}, "every_n_steps must be an int >= 1"),
    ({"histograms": "yes"}, "histograms must be true or false"),
    ({"prefix": ""}, "prefix must be a non-empty name"),
])
def test_invalid_options_name_the_option(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NormMonitor(**kwargs)


def test_group_names_of_the_composite_optimizer() -> None:
    model = SPDNet(6, [4], 3, norm_layer="liebn_aim")
    assert param_group_names(create_optimizer(model)) == ["manifold", "rest"]
    assert param_group_names(_sgd(Net())) == ["body", "group1"]


def test_monitor_config_adds_to_any_callbacks_choice(tmp_path: Path) -> None:
    assert {p.stem for p in (CONF / "monitor").glob("*.yaml")} == {"norms"}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        plain = compose("train", overrides=[f"paths.output_dir={tmp_path}"])
        both = compose("train", overrides=[f"paths.output_dir={tmp_path}", "monitor=norms",
                                           "callbacks=early_stopping", "callbacks.norm_monitor.every_n_steps=7"])
    assert "norm_monitor" not in plain.callbacks
    cbs = run.build_callbacks(both)
    (mon,) = [cb for cb in cbs if isinstance(cb, NormMonitor)]
    assert mon.every_n_steps == 7 and any(isinstance(cb, EarlyStopping) for cb in cbs)
    assert any(isinstance(cb, ConfusionReport) for cb in cbs)
