"""Read training runs' CSV logs and aggregate them over seeds: the code behind ``launch/report.py`` and the
``sweep``/``optim`` benchmark suites.

A run directory is what ``launch/train.py`` writes with ``logger=csv``: ``csv/version_*/metrics.csv`` (Lightning's
``CSVLogger``: one row per logging call, columns ``epoch``, ``step`` and every metric, empty where a row does not
log it) and, inside a Hydra sweep, ``.hydra/overrides.yaml`` (the job's command-line overrides) and
``.hydra/config.yaml`` (the composed config). A configuration is a run's overrides without ``seed``; its rows hold
the mean and the sample standard deviation over its seeds (0 for one seed).

No Lightning import here; PyYAML reads the ``.hydra`` files, matplotlib (the ``bench`` extra) draws the plot.
"""

from __future__ import annotations

import csv
import fnmatch
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunRecord", "aggregate", "collect_runs", "mean_std", "metric_mode", "read_metrics", "report_csv",
           "report_rows",
           "report_markdown", "report_plot"]

SEED_KEYS: tuple[str, ...] = ("seed", "+seed", "++seed")
"""Override keys that name the seed: dropped from a run's configuration."""

_MIN_HINTS = ("loss", "bpc", "ppl", "perplexity", "err", "nll")


def read_metrics(run_dir: Path, curve_keys: tuple[str, ...] | None = None) -> dict:
    """Validation curves ``{metric: [(step, value), ...]}`` and last-logged values of a run's CSV log.

    Reads the newest ``csv/version_*/metrics.csv`` under ``run_dir``; ``curves`` holds the ``val/*`` metrics
    (or exactly the columns ``curve_keys`` when given),
    ``last`` the last non-empty value of every column except ``epoch``/``step``. Raises ``FileNotFoundError``
    when there is no such file.
    """
    files = sorted(Path(run_dir).glob("csv/version_*/metrics.csv"), key=lambda p: _version(p.parent.name))
    if not files:
        raise FileNotFoundError(f"no csv/version_*/metrics.csv under {run_dir}")
    curves: dict[str, list[tuple[int, float]]] = {}
    last: dict[str, float] = {}
    with files[-1].open() as fh:
        for row in csv.DictReader(fh):
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                v = float(value)
                last[key] = v
                if (key in curve_keys) if curve_keys is not None else key.startswith("val/"):
                    curves.setdefault(key, []).append((int(float(row["step"])), v))
    return {"curves": curves, "last": last}


def _version(name: str) -> int:
    tail = name.rpartition("_")[2]
    return int(tail) if tail.isdigit() else -1


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of a non-empty sequence."""
    if not values:
        raise ValueError("mean_std of no values")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def metric_mode(metric: str, config: Mapping[str, Any] | None = None) -> str:
    """``"min"`` or ``"max"``: the mode of the checkpoint callback that monitors ``metric`` in ``config``, else
    ``"min"`` for losses, bits per character, perplexities and errors and ``"max"`` for everything else."""
    for cb in ((config or {}).get("callbacks") or {}).values():
        if isinstance(cb, Mapping) and cb.get("monitor") == metric and cb.get("mode") in ("min", "max"):
            return str(cb["mode"])
    return "min" if any(h in metric.lower() for h in _MIN_HINTS) else "max"


def aggregate(runs: Sequence[Mapping[str, Any]], group_of: Callable[[Mapping[str, Any]], Any], val_key: str,
              mode: str, test_keys: Sequence[str] | None = None, scalars: Sequence[str] = ()) -> list[dict]:
    """One row per group of runs (in order of first appearance): mean ± std over the group's runs.

    Parameters
    ----------
    runs : sequence of mappings
        Each with ``curves`` and ``last`` as :func:`read_metrics` returns them, plus anything ``group_of`` and
        ``scalars`` read.
    group_of : callable
        A run's group (hashable), e.g. its configuration.
    val_key, mode : str
        Validation metric and its direction (``"min"``/``"max"``) for ``final`` (the last value) and ``best``.
    test_keys : sequence of str, optional
        Test metrics to aggregate (default: every ``test/*`` key of the group's runs).
    scalars : sequence of str
        Further per-run numbers to aggregate (e.g. ``wall_s``).

    Returns
    -------
    list of dict
        ``{"group", "seeds", "metric", "final", "best", "steps", "test": {key: (mean, std)}, <scalar>: (mean,
        std)}``; ``final``/``best`` are ``None`` when no run of the group logged ``val_key``, a test key is missing
        when none logged it, and each mean is over the runs that have the value.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    pick = min if mode == "min" else max
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault(group_of(run), []).append(run)
    rows = []
    for group, members in groups.items():
        curves = [r["curves"][val_key] for r in members if r["curves"].get(val_key)]
        keys = test_keys if test_keys is not None else sorted(
            {k for r in members for k in r["last"] if k.startswith("test/")})
        test = {k: mean_std(vals) for k in keys if (vals := [r["last"][k] for r in members if k in r["last"]])}
        row = {"group": group, "seeds": len(members), "metric": val_key,
               "final": mean_std([c[-1][1] for c in curves]) if curves else None,
               "best": mean_std([pick(v for _, v in c) for c in curves]) if curves else None,
               "steps": curves[0][-1][0] if curves else None, "test": test}
        for name in scalars:
            row[name] = mean_std([float(r[name]) for r in members])
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- Hydra multiruns
@dataclass
class RunRecord:
    """One job directory of a Hydra multirun: its overrides, config and metrics, and whether it finished."""

    path: Path
    overrides: list[str]
    config: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    last: dict = field(default_factory=dict)
    problem: str | None = None  # why the run is not aggregated (None: finished)

    @property
    def configuration(self) -> tuple[str, ...]:
        """The overrides without the seed: the runs of one configuration differ only in their seed."""
        return tuple(o for o in self.overrides if o.split("=", 1)[0] not in SEED_KEYS)

    @property
    def seed(self) -> str | None:
        found = [o.split("=", 1)[1] for o in self.overrides if "=" in o and o.split("=", 1)[0] in SEED_KEYS]
        return found[0] if found else (None if "seed" not in self.config else str(self.config["seed"]))


def _yaml(path: Path) -> Any:
    import yaml

    with path.open() as fh:
        return yaml.safe_load(fh)


def collect_runs(multirun_dir: str | Path) -> list[RunRecord]:
    """Every job directory of a multirun (a sub-directory holding ``.hydra/overrides.yaml``), in job order.

    A run without ``metrics.csv`` (it failed before logging, or logs only to W&B) or without a ``test/*`` metric
    (it failed or stopped before testing, or is still running) is kept with its ``problem`` set, so that a report
    lists it rather than dropping it. Raises ``FileNotFoundError`` when the directory holds no job at all.
    """
    root = Path(multirun_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no such directory: {root}")
    jobs = sorted({p.parent.parent for p in root.rglob(".hydra/overrides.yaml")},
                  key=lambda p: [int(t) if t.isdigit() else t for t in p.relative_to(root).parts])
    if not jobs:
        raise FileNotFoundError(f"{root} holds no Hydra job (no */.hydra/overrides.yaml); give the multirun "
                                f"directory of `python launch/train.py -m ... logger=csv` (hydra.sweep.dir)")
    records = []
    for job in jobs:
        overrides = [str(o) for o in (_yaml(job / ".hydra" / "overrides.yaml") or [])]
        cfg_file = job / ".hydra" / "config.yaml"
        rec = RunRecord(job, overrides, config=(_yaml(cfg_file) or {}) if cfg_file.is_file() else {})
        try:
            metrics = read_metrics(job)
        except FileNotFoundError:
            wandb = any(job.glob("wandb/offline-run-*"))
            rec.problem = ("no metrics.csv (a W&B offline run only: rerun with logger=csv)" if wandb
                           else "no metrics.csv (failed before logging, or not started)")
        else:
            rec.curves, rec.last = metrics["curves"], metrics["last"]
            if not any(k.startswith("test/") for k in rec.last):
                rec.problem = "no test metrics (failed or stopped before testing, or still running)"
        records.append(rec)
    return records


def _fmt(ms: tuple[float, float] | None) -> str:
    return "n/a" if ms is None or any(math.isnan(v) for v in ms) else f"{ms[0]:.4f} ± {ms[1]:.4f}"


def _split_overrides(records: Sequence[RunRecord]) -> tuple[list[str], list[str]]:
    """Overrides common to every configuration, and the keys that vary between configurations (in order)."""
    configs = [dict(o.split("=", 1) if "=" in o else (o, "") for o in r.configuration) for r in records]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    common = [k for k in keys if all(k in c for c in configs) and len({c[k] for c in configs}) == 1]
    return [f"{k}={configs[0][k]}" for k in common], [k for k in keys if k not in common]


def test_keys_of(records: Sequence[RunRecord], patterns: Sequence[str] | None = None) -> list[str]:
    """The ``test/*`` metrics of the finished runs that match one of the glob ``patterns`` (``fnmatch``); default:
    all but the per-domain breakdown (``test/<metric>/domain=<d>``, one column per domain and metric)."""
    keys = sorted({k for r in records if r.problem is None for k in r.last if k.startswith("test/")})
    if patterns is None:
        return [k for k in keys if "/domain=" not in k]
    return [k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in patterns)]


def report_rows(records: Sequence[RunRecord], val_key: str, mode: str,
                test: Sequence[str] | None = None) -> tuple[list[dict], list[str], list[str]]:
    """Aggregated rows of the finished runs, the common overrides and the varying override keys; ``test``: glob
    patterns of the test metrics to aggregate (:func:`test_keys_of`)."""
    done = [r for r in records if r.problem is None]
    common, varying = _split_overrides(records)
    runs = [{"curves": r.curves, "last": r.last, "config": r.configuration} for r in done]
    rows = aggregate(runs, lambda r: r["config"], val_key, mode, test_keys=test_keys_of(records, test))
    for row in rows:
        values = dict(o.split("=", 1) if "=" in o else (o, "") for o in row["group"])
        row["params"] = {k: values.get(k, "") for k in varying}
    return rows, common, varying


def report_markdown(rows: Sequence[dict], records: Sequence[RunRecord], common: Sequence[str],
                    varying: Sequence[str], mode: str) -> str:
    """The report as Markdown: common overrides, one table row per configuration, the unfinished runs."""
    test_keys = list(dict.fromkeys(k for r in rows for k in r["test"]))
    head = [*(varying or ["configuration"]), "seeds", f"final {rows[0]['metric'] if rows else 'val'}",
            f"best ({mode})", *test_keys]
    lines = [f"Runs: {len(records)} ({sum(r.problem is None for r in records)} finished); common overrides: "
             f"{' '.join(common) or '(none)'}; mean ± std over seeds.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        params = list(r["params"].values()) if varying else [" ".join(r["group"]) or "(no overrides)"]
        cells = [*params, r["seeds"], _fmt(r["final"]), _fmt(r["best"]), *(_fmt(r["test"].get(k)) for k in test_keys)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    unfinished = [r for r in records if r.problem is not None]
    if unfinished:
        lines += ["", f"Not aggregated ({len(unfinished)}):", ""]
        lines += [f"- `{r.path.name}` {' '.join(r.overrides)}: {r.problem}" for r in unfinished]
    return "\n".join(lines) + "\n"


def report_csv(rows: Sequence[dict], varying: Sequence[str], path: Path) -> Path:
    """One line per configuration: the varying overrides, seeds, ``<stat>_mean``/``<stat>_std`` columns."""
    test_keys = list(dict.fromkeys(k for r in rows for k in r["test"]))
    head = [*varying, "configuration", "seeds", "metric", "final_mean", "final_std", "best_mean", "best_std"]
    head += [f"{k}_{s}" for k in test_keys for s in ("mean", "std")]
    with Path(path).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(head)
        for r in rows:
            stats = [*(r["final"] or ("", "")), *(r["best"] or ("", ""))]
            tests = [v for k in test_keys for v in (r["test"].get(k) or ("", ""))]
            writer.writerow([*r["params"].values(), " ".join(r["group"]), r["seeds"], r["metric"], *stats, *tests])
    return Path(path)


def report_plot(rows: Sequence[dict], records: Sequence[RunRecord], val_key: str, path: Path) -> Path:
    """Left: final and best validation metric per configuration (bars, error bars = std over seeds); right: the
    validation curves against the optimizer step (mean over seeds, band = min..max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [" ".join(f"{v}" for v in r["params"].values()) or " ".join(r["group"]) for r in rows]
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(rows))
    for offset, stat in ((-0.2, "final"), (0.2, "best")):
        ms = [r[stat] or (np.nan, 0.0) for r in rows]
        bars.bar(x + offset, [m for m, _ in ms], 0.4, yerr=[s for _, s in ms], capsize=4, label=stat)
    bars.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    bars.set(ylabel=val_key, title=f"{val_key}: mean ± std over seeds")
    bars.legend()
    done = [r for r in records if r.problem is None]
    for row, label in zip(rows, labels, strict=True):
        curves = [r.curves[val_key] for r in done if r.configuration == row["group"] and r.curves.get(val_key)]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        steps = [s for s, _ in curves[0][:n]]
        vals = np.array([[v for _, v in c[:n]] for c in curves])
        lines.plot(steps, vals.mean(0), marker=".", label=label)
        lines.fill_between(steps, vals.min(0), vals.max(0), alpha=0.2)
    lines.set(xlabel="optimizer step", ylabel=val_key, title="validation (mean over seeds, band = min..max)")
    lines.grid(alpha=0.3)
    lines.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
