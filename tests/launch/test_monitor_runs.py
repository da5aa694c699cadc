"""launch/train.py with monitor=norms end to end: an offline W&B run read back from its own log file (scalars,
eigenvalue histograms, per-domain test metrics, the confusion-matrix table), and the same scalars in metrics.csv."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from tests.launch._wandb_records import read_run
from tests.launch.test_train import TINY, train

LAYER = "monitor/stages.0.norm"
RIEMANNIAN = ("batch_var", "running_var", "dist_mean_bias", "dist_mean_identity", "bias_dist_identity", "shift_mean",
              "shift_min", "shift_max", "eig_min_in", "eig_max_in", "cond_in", "eig_min_out", "eig_max_out",
              "cond_out")
OPTIM = [f"monitor/optim/{g}/{k}" for g in ("manifold", "rest") for k in ("grad_norm", "update_rms", "update_rel")]
MONITOR = ["monitor=norms", "callbacks.norm_monitor.every_n_steps=2", "norm=dsliebn_aim", *TINY, "trainer.max_epochs=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _confusion(run_dir: Path) -> tuple[list[list[int]], dict[int, list[list[int]]]]:
    with open(run_dir / "test_confusion.csv") as f:
        total = [[int(v) for v in row[1:]] for row in list(csv.reader(f))[1:]]
    by_domain: dict[int, list[list[int]]] = {}
    with open(run_dir / "test_confusion_by_domain.csv") as f:
        for r in csv.DictReader(f):
            m = by_domain.setdefault(int(r["domain"]), [[0] * len(total) for _ in total])
            m[int(r["true"])][int(r["predicted"])] = int(r["count"])
    return total, by_domain


def _acc(m: list[list[int]]) -> float:
    return sum(m[i][i] for i in range(len(m))) / sum(map(sum, m))


def _bacc(m: list[list[int]]) -> float:
    recalls = [m[i][i] / sum(m[i]) for i in range(len(m)) if sum(m[i])]
    return sum(recalls) / len(recalls)


def test_wandb_run_holds_monitor_scalars_histograms_and_test_confusion(cache: Path, tmp_path: Path) -> None:
    proc = train("logger=wandb", *MONITOR, f"hydra.run.dir={tmp_path}", cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    (log_file,) = run.glob("run-*.wandb")
    history, summary = read_run(log_file)

    monitored = [row for row in history if (f"{LAYER}/cond_in",) in row]
    assert [row[("trainer/global_step",)] for row in monitored] == [0, 2]  # every 2nd of the 3 steps
    for row in monitored:
        for key in [f"{LAYER}/{k}" for k in RIEMANNIAN] + OPTIM:
            assert math.isfinite(row[(key,)]), key
        assert 1.0 <= row[(f"{LAYER}/cond_in",)] <= row[(f"{LAYER}/eig_max_in",)] / row[(f"{LAYER}/eig_min_in",)]
        for side in ("in", "out"):
            hist = f"{LAYER}/log10_eig_{side}"
            assert row[(hist, "_type")] == "histogram"
            bins, counts = row[(hist, "bins")], row[(hist, "values")]
            assert len(counts) == 64 and sum(counts) % 6 == 0  # 6 eigenvalues per 6x6 matrix of the batch
            assert bins[0] == pytest.approx(math.log10(row[(f"{LAYER}/eig_min_{side}",)]), rel=1e-6, abs=1e-9)
            assert bins[-1] == pytest.approx(math.log10(row[(f"{LAYER}/eig_max_{side}",)]), rel=1e-6, abs=1e-9)
    assert sum(monitored[0][(f"{LAYER}/log10_eig_in", "values")]) == 16 * 6  # the first batch: 16 matrices
    assert (f"{LAYER}/batch_var",) in summary

    total, by_domain = _confusion(tmp_path)
    assert len(by_domain) == 2  # cross-session: the second session of each of the 2 subjects
    tested = [row for row in history if ("test/acc",) in row]
    assert len(tested) == 1
    for d, m in by_domain.items():
        assert tested[0][(f"test/acc/domain={d}",)] == pytest.approx(_acc(m), abs=1e-6)
        assert tested[0][(f"test/bacc/domain={d}",)] == pytest.approx(_bacc(m), abs=1e-6)
        assert summary[(f"test/bacc/domain={d}",)] == pytest.approx(_bacc(m), abs=1e-6)
    assert tested[0][("test/acc",)] == pytest.approx(_acc(total), abs=1e-6)

    (table_row,) = [row for row in history if ("test/confusion_matrix_table", "_type") in row]
    assert table_row[("test/confusion_matrix_table", "_type")] == "table-file"
    table = json.loads((run / "files" / table_row[("test/confusion_matrix_table", "path")]).read_text())
    assert table["columns"] == ["Actual", "Predicted", "nPredictions"]
    assert {(int(a), int(p)): n for a, p, n in table["data"]} == {
        (i, j): total[i][j] for i in range(len(total)) for j in range(len(total))}


def test_csv_logger_gets_the_monitor_scalars(cache: Path, tmp_path: Path) -> None:
    proc = train("logger=csv", *MONITOR, f"hydra.run.dir={tmp_path}", cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    monitored = [r for r in rows if r.get(f"{LAYER}/cond_in")]
    assert [int(r["step"]) for r in monitored] == [0, 2]
    for r in monitored:
        for key in [f"{LAYER}/{k}" for k in RIEMANNIAN] + OPTIM:
            assert math.isfinite(float(r[key])), key
    assert not any("log10_eig" in k for k in rows[0])  # histograms go to W&B only
    _, by_domain = _confusion(tmp_path)
    (tested,) = [r for r in rows if r.get("test/acc")]
    for d, m in by_domain.items():
        assert float(tested[f"test/bacc/domain={d}"]) == pytest.approx(_bacc(m), abs=1e-6)
