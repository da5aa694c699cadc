"""Sweep reports: a fake Hydra multirun in Lightning CSVLogger's format -> mean ± std per configuration."""

from __future__ import annotations

import csv
import importlib.util
import statistics
from pathlib import Path

import pytest
import yaml

from manifoldnorm.lit.report import aggregate, collect_runs, metric_mode, read_metrics

REPORT = Path(__file__).resolve().parents[2] / "launch" / "report.py"
HEADER = ["epoch", "lr-CompositeOptimizer/pg1", "step", "test/acc", "test/loss", "train/loss", "val/acc", "val/loss"]
CONFIG = {"optimized_metric": "val/acc", "seed": 0,
          "callbacks": {"model_checkpoint": {"monitor": "val/acc", "mode": "max"}}}
# (norm, seed) -> validation accuracies per epoch, test accuracy
RUNS = {("liebn_lem", 0): ([0.5, 0.7, 0.6], 0.65), ("liebn_lem", 1): ([0.4, 0.5, 0.6], 0.55),
        ("dsliebn_lem", 0): ([0.6, 0.8, 0.7], 0.75), ("dsliebn_lem", 1): ([0.7, 0.9, 0.9], 0.85)}


def _write_run(job: Path, overrides: list[str], val: list[float] | None, test: float | None) -> None:
    """A job directory as `launch/train.py -m ... logger=csv` leaves it (rows as CSVLogger writes them)."""
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    if val is None:
        return
    rows, step = [{"lr-CompositeOptimizer/pg1": 0.01, "step": 0}], 0
    for epoch, v in enumerate(val):
        step += 5
        rows.append({"epoch": epoch, "step": step, "val/acc": v, "val/loss": 1 - v})
        rows.append({"epoch": epoch, "step": step, "train/loss": 1.2})
    if test is not None:
        rows.append({"epoch": len(val), "step": step + 1, "test/acc": test, "test/loss": 1 - test})
    (job / "csv" / "version_0").mkdir(parents=True)
    with (job / "csv" / "version_0" / "metrics.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, HEADER, restval="")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def multirun(tmp_path: Path) -> Path:
    root = tmp_path / "multirun"
    common = ["+experiment=spd_eeg", "logger=csv"]
    for num, ((norm, seed), (val, test)) in enumerate(RUNS.items()):
        _write_run(root / str(num), [*common, f"seed={seed}", f"norm={norm}"], val, test)
    _write_run(root / "4", [*common, "seed=2", "norm=liebn_lem"], None, None)  # failed before logging
    _write_run(root / "5", [*common, "seed=2", "norm=dsliebn_lem"], [0.1, 0.2], None)  # stopped before testing
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def _expected(norm: str) -> dict:
    runs = [RUNS[(norm, s)] for s in (0, 1)]
    def ms(values):
        return statistics.fmean(values), statistics.stdev(values)
    return {"final": ms([v[-1] for v, _ in runs]), "best": ms([max(v) for v, _ in runs]),
            "test": ms([t for _, t in runs])}


def test_collect_runs_flags_failed_and_unfinished(multirun: Path) -> None:
    records = collect_runs(multirun)
    assert [r.path.name for r in records] == ["0", "1", "2", "3", "4", "5"]
    assert [r.problem is None for r in records] == [True] * 4 + [False, False]
    assert "no metrics.csv" in records[4].problem and "no test metrics" in records[5].problem
    assert records[1].configuration == ("+experiment=spd_eeg", "logger=csv", "norm=liebn_lem")
    assert records[1].seed == "1"
    with pytest.raises(FileNotFoundError, match="holds no Hydra job"):
        collect_runs(multirun / "4" / ".hydra")


def test_report_cli_tables_and_plot(multirun: Path, tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("report_script", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "out"
    result = module.main([str(multirun), "--out", str(out)])
    assert result["metric"] == "val/acc" and result["mode"] == "max"
    rows = {r["params"]["norm"]: r for r in result["rows"]}
    assert list(rows) == ["liebn_lem", "dsliebn_lem"] and all(r["seeds"] == 2 for r in rows.values())
    for norm, row in rows.items():
        exp = _expected(norm)
        assert row["final"] == pytest.approx(exp["final"]) and row["best"] == pytest.approx(exp["best"])
        assert row["test"]["test/acc"] == pytest.approx(exp["test"])
    # CSV: one line per configuration, numbers at full precision
    with (out / "report.csv").open() as fh:
        lines = list(csv.DictReader(fh))
    assert [line["norm"] for line in lines] == ["liebn_lem", "dsliebn_lem"]
    assert float(lines[1]["best_mean"]) == pytest.approx(0.85) and float(lines[1]["best_std"]) == pytest.approx(
        statistics.stdev([0.8, 0.9]))
    assert float(lines[0]["test/acc_mean"]) == pytest.approx(0.6)
    # Markdown on stdout and in the file: common overrides, the rows, the runs left out and why
    md = (out / "report.md").read_text()
    assert md == capsys.readouterr().out.split("wrote ")[0]
    assert "common overrides: +experiment=spd_eeg logger=csv" in md and "Runs: 6 (4 finished)" in md
    assert "| dsliebn_lem | 2 | 0.8000 ± 0.1414 | 0.8500 ± 0.0707 | 0.8000 ± 0.0707 |" in md
    assert "- `4` +experiment=spd_eeg logger=csv seed=2 norm=liebn_lem: no metrics.csv" in md
    assert "- `5` " in md and "no test metrics" in md
    assert (out / "report.png").stat().st_size > 1000
    # another metric and mode from the command line
    loss = module.main([str(multirun), "--out", str(out), "--metric", "val/loss", "--no-plot"])
    assert loss["mode"] == "min"
    assert {r["params"]["norm"]: r["best"][0] for r in loss["rows"]} == pytest.approx(
        {"liebn_lem": statistics.fmean([0.3, 0.4]), "dsliebn_lem": statistics.fmean([0.2, 0.1])})


def test_aggregate_and_read_metrics_details(tmp_path: Path) -> None:
    job = tmp_path / "job"
    _write_run(job, ["seed=0"], [0.2, 0.3], 0.4)
    newer = job / "csv" / "version_10"  # version_10 is newer than version_2 (numeric order, not text order)
    newer.mkdir(parents=True)
    (job / "csv" / "version_2").mkdir()
    for folder, v in ((newer, "0.9"), (job / "csv" / "version_2", "0.1")):
        (folder / "metrics.csv").write_text(f"epoch,step,val/acc\n0,3,{v}\n")
    assert read_metrics(job)["curves"] == {"val/acc": [(3, 0.9)]}
    runs = [{"curves": {"val/loss": [(1, 2.0), (2, 1.0), (3, 1.5)]}, "last": {"test/x": 1.0}, "g": "a", "w": 1.0},
            {"curves": {}, "last": {}, "g": "b", "w": 3.0}]
    rows = aggregate(runs, lambda r: r["g"], "val/loss", "min", scalars=("w",))
    assert rows[0]["final"] == (1.5, 0.0) and rows[0]["best"] == (1.0, 0.0) and rows[0]["steps"] == 3
    assert rows[1]["final"] is None and rows[1]["test"] == {} and rows[1]["w"] == (3.0, 0.0)
    with pytest.raises(ValueError, match="mode must be"):
        aggregate(runs, lambda r: r["g"], "val/loss", "down")
    assert metric_mode("val/bpc") == "min" and metric_mode("val/acc") == "max"
    assert metric_mode("val/loss", {"callbacks": {"ckpt": {"monitor": "val/loss", "mode": "max"}}}) == "max"


def test_per_domain_test_metrics_only_when_asked(multirun: Path, tmp_path: Path) -> None:
    """``test/<metric>/domain=<d>`` (one column per domain) stay out of the table unless ``--test`` names them."""
    from manifoldnorm.lit.report import report_rows, test_keys_of

    job = multirun / "0" / "csv" / "version_0" / "metrics.csv"
    with job.open() as fh:
        rows = list(csv.DictReader(fh))
    header = [*HEADER, "test/acc/domain=3"]
    rows[-1]["test/acc/domain=3"] = 0.5
    with job.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, header, restval="")
        writer.writeheader()
        writer.writerows(rows)
    records = collect_runs(multirun)
    assert test_keys_of(records) == ["test/acc", "test/loss"]
    assert test_keys_of(records, ["test/acc*"]) == ["test/acc", "test/acc/domain=3"]
    table, _, _ = report_rows(records, "val/acc", "max", ["test/acc*"])
    assert table[0]["test"]["test/acc/domain=3"] == (0.5, 0.0) and "test/loss" not in table[0]["test"]
    assert all("test/acc/domain=3" not in r["test"] for r in report_rows(records, "val/acc", "max")[0])
