"""Report of a Hydra multirun: mean ± std over seeds per configuration, as Markdown, CSV and a PNG.

    python launch/train.py -m +experiment=spd_eeg logger=csv seed=0,1,2 norm=liebn_lem,dsliebn_lem \
        hydra.sweep.dir=outputs/sweep_norms
    python launch/report.py outputs/sweep_norms [--metric val/bacc] [--mode max] [--out DIR] [--test GLOB ...]

A configuration is a job's overrides (``.hydra/overrides.yaml``) without ``seed``. For the validation metric
(default: the runs' ``optimized_metric``, its direction from the checkpoint callback that monitors it) the table
gives the final and the best value, and every ``test/*`` metric (``--test``: glob patterns; the per-domain
``test/<metric>/domain=<d>`` only when asked), as mean ± std over the configuration's seeds.
Runs without ``metrics.csv`` (failed, not started, W&B only) or without test metrics (failed, stopped or still
running) are listed under the table, not aggregated. Writes ``report.md``, ``report.csv`` and ``report.png`` into
``--out`` (default: the multirun directory) and prints the Markdown. Code: :mod:`manifoldnorm.lit.report`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from manifoldnorm.lit.report import (  # noqa: E402
    collect_runs,
    metric_mode,
    report_csv,
    report_markdown,
    report_plot,
    report_rows,
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir", type=Path, help="hydra.sweep.dir of a `launch/train.py -m` sweep")
    parser.add_argument("--metric", default=None, help="validation metric (default: the runs' optimized_metric)")
    parser.add_argument("--mode", choices=("min", "max"), default=None, help="direction of --metric")
    parser.add_argument("--out", type=Path, default=None, help="folder of report.md/.csv/.png (default: the sweep)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    parser.add_argument("--test", nargs="+", default=None, metavar="GLOB",
                        help="test metrics to tabulate (default: every test/* metric but the per-domain ones; "
                             "e.g. --test 'test/bacc*' adds test/bacc/domain=<d>)")
    args = parser.parse_args(argv)
    try:
        records = collect_runs(args.multirun_dir)
    except FileNotFoundError as err:
        parser.error(str(err))
    config = next((r.config for r in records if r.config), {})
    metric = args.metric or config.get("optimized_metric") or next(
        (k for r in records for k in r.curves), None)
    if metric is None:
        parser.error(f"no run under {args.multirun_dir} logged a validation metric; give --metric")
    mode = args.mode or metric_mode(metric, config)
    rows, common, varying = report_rows(records, metric, mode, args.test)
    out = args.out or args.multirun_dir
    out.mkdir(parents=True, exist_ok=True)
    text = report_markdown(rows, records, common, varying, mode)
    print(text, end="")
    (out / "report.md").write_text(text)
    files = [out / "report.md", report_csv(rows, varying, out / "report.csv")]
    if not args.no_plot and rows:
        files.append(report_plot(rows, records, metric, out / "report.png"))
    print("wrote " + ", ".join(str(f) for f in files))
    return {"metric": metric, "mode": mode, "rows": rows, "records": records, "files": files}


if __name__ == "__main__":
    main()
