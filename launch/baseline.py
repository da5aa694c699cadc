"""Reference accuracies of Riemannian baselines on the simulated motor-imagery data, your own arrays or a
time-series archive.

    python launch/baseline.py [--out outputs/baseline.json] [--seed 0] [--data-seed 0]
    python launch/baseline.py --experiment spd_eeg   # the data, band and split of an experiment config
    python launch/baseline.py data=arrays data.path=/abs/file.npz [seed=0 data.protocol=...]   # Hydra overrides
    python launch/baseline.py --experiment spd_ts    # a .ts archive (data=ts_archive), its train/test files

Your arrays (``data=arrays``) or a ``.ts`` archive (``data=ts_archive``): the data module of the training config
(``manifoldnorm.lit.EEGDataModule``, ``representation=cov``) is built and set up, and TangentSpace +
LogisticRegression and MDM are fitted on its ``train`` trials and scored on its ``test`` trials: the same
covariances and the same indices a network sees, including the file's own ``split`` array when it has one
(``protocol=auto``) and the test file of an archive.

8-30 Hz band-pass, OAS covariances, pyRiemann ``TangentSpace`` (affine-invariant mean) +
``LogisticRegression``; balanced accuracy on the test trials of the splits of
``manifoldnorm.data.split_indices`` (the ones the training system uses) for
``within_session``, ``cross_session`` and ``cross_session`` after per-domain re-centring
(``manifoldnorm.data.recenter``, unsupervised, every domain's own trials). Needs pyRiemann and
scikit-learn (``pip install "manifoldnorm[dev]"``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np
from pyriemann.classification import MDM
from pyriemann.tangentspace import TangentSpace
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from threadpoolctl import threadpool_limits

from manifoldnorm.data import bandpass, covariances, load_simulated, recenter, split_indices

ROOT = Path(__file__).resolve().parents[1]

SIM_KWARGS = {"n_subjects": 5, "n_sessions": 2, "trials_per_class": 40, "sfreq": 128.0}
SETTINGS = (  # name, protocol, re-centre
    ("within_session", "within_session", False),
    ("cross_session", "cross_session", False),
    ("cross_session_recentered", "cross_session", True),
)


def ts_lr_accuracy(covs: np.ndarray, y: np.ndarray, split: dict) -> float:
    """Fit TangentSpace + LogisticRegression on ``split['train']``, balanced accuracy on ``split['test']``."""
    clf = make_pipeline(TangentSpace(metric="riemann"), LogisticRegression(max_iter=2000))
    # Small dense problems: multi-threaded BLAS only adds overhead (and stalls on busy machines).
    with threadpool_limits(limits=1, user_api="blas"):
        clf.fit(covs[split["train"]], y[split["train"]])
        pred = clf.predict(covs[split["test"]])
    return float(balanced_accuracy_score(y[split["test"]], pred))


def mdm_accuracy(covs: np.ndarray, y: np.ndarray, split: dict) -> float:
    """Fit pyRiemann's minimum distance to the (affine-invariant) class means on ``split['train']``; balanced
    accuracy on ``split['test']``."""
    clf = MDM(metric="riemann")
    with threadpool_limits(limits=1, user_api="blas"):
        clf.fit(covs[split["train"]], y[split["train"]])
        pred = clf.predict(covs[split["test"]])
    return float(balanced_accuracy_score(y[split["test"]], pred))


def compose_config(experiment: str | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """The training config ``conf/train.yaml`` with ``+experiment=<experiment>`` and Hydra ``overrides``."""
    from hydra import compose, initialize_config_dir

    extra = [f"+experiment={experiment}"] if experiment else []
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[*extra, *overrides])


DATAMODULE_SOURCES = ("arrays", "ts")
"""Sources whose baselines are computed from the training config's data module (:func:`datamodule_report`)."""


def _data_description(dm) -> dict:
    """The ``data`` entry of a report: the file and kind of ``arrays``, the archive and files of ``ts``."""
    if dm.source == "ts":
        archive = dm.ts_archive
        return {"source": "ts", "archive": archive.name, "train_file": str(archive.files[0]),
                "test_file": str(archive.files[1]), "n_channels": archive.n_channels,
                "lengths": [int(archive.lengths.min()), int(archive.lengths.max())],
                "cov_estimator": dm.cov_estimator, "trace_norm": dm.trace_norm}
    return {"source": "arrays", "path": str(dm.path), "kind": dm.kind}


def datamodule_report(cfg) -> tuple[dict, object]:
    """Baselines on a ``data=arrays`` or ``data=ts_archive`` config: its :class:`~manifoldnorm.lit.EEGDataModule`
    (as covariances) gives the trials and the split. Returns the report and the set-up data module."""
    from hydra.utils import instantiate

    dm = instantiate(cfg.data, representation="cov")
    dm.setup()
    parts = {name: dm.datasets[name] for name in ("train", "test")}
    covs = np.concatenate([parts["train"].X, parts["test"].X])
    y = np.concatenate([parts["train"].y, parts["test"].y])
    local = {"train": np.arange(len(parts["train"])), "test": len(parts["train"]) + np.arange(len(parts["test"]))}
    results = {}
    for name, score in (("ts_lr", ts_lr_accuracy), ("mdm", mdm_accuracy)):
        acc = score(covs, y, local)
        results[name] = {"balanced_accuracy": round(acc, 4), "n_train": len(local["train"]),
                         "n_test": len(local["test"])}
        print(f"{name:<8s} balanced accuracy {acc:.3f}  (train {len(local['train'])}, test {len(local['test'])}; "
              f"split {dm.split.protocol})")
    report = {
        "pipeline": "EEGDataModule covariances -> TangentSpace(riemann) + LogisticRegression | MDM(riemann)",
        "data": _data_description(dm),
        "band": None if dm.band is None else list(dm.band),
        "split": {"protocol": dm.split.protocol, "seed": dm.seed,
                  **{f"n_{name}": len(idx) for name, idx in dm.split.items()}},
        "chance": 1.0 / dm.num_classes,
        "results": results,
    }
    return report, dm


def experiment_settings(name: str | None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Data set, band, split seed and validation fraction of ``conf/`` + ``+experiment=<name>`` + overrides."""
    from omegaconf import OmegaConf

    cfg = compose_config(name, overrides)
    data = cfg.data
    if data.source != "simulated":
        raise SystemExit(f"experiment {name!r} with {list(overrides)} uses neither the simulated data nor data=arrays "
                         f"nor data=ts_archive (source={data.source})")
    sim = OmegaConf.to_container(data.source_kwargs, resolve=True)
    return {"sim": {k: v for k, v in sim.items() if k != "seed"}, "data_seed": sim.get("seed", 0),
            "seed": int(cfg.seed), "band": tuple(data.band), "val_fraction": float(data.val_fraction)}


def _write(report: dict, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['elapsed_s']} s)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/baseline.json", help="JSON file to write")
    parser.add_argument("--seed", type=int, default=0, help="split seed (the training config's `seed`)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the simulated data set")
    parser.add_argument("--cache-dir", default=None, help="simulation cache (default $MANIFOLDNORM_CACHE)")
    parser.add_argument("--experiment", default=None,
                        help="take data set, band, split seed and val fraction from conf/experiment/<name>.yaml")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides of the training config, e.g. data=arrays data.path=/abs/file.npz")
    args = parser.parse_args(argv)

    settings = {"sim": SIM_KWARGS, "data_seed": args.data_seed, "seed": args.seed, "band": (8.0, 30.0),
                "val_fraction": 0.2}
    start = time.perf_counter()
    if args.experiment or args.overrides:
        cfg = compose_config(args.experiment, args.overrides)
        if cfg.data.source in DATAMODULE_SOURCES:
            report, _ = datamodule_report(cfg)
            report.update(experiment=args.experiment, overrides=args.overrides,
                          elapsed_s=round(time.perf_counter() - start, 2))
            _write(report, args.out)
            return report
        settings = experiment_settings(args.experiment, args.overrides)
    data = load_simulated(cache_dir=args.cache_dir, seed=settings["data_seed"], **settings["sim"])
    covs = covariances(bandpass(data.X, data.sfreq, *settings["band"]), estimator="oas")
    aligned = recenter(covs, data.domain)
    results = {}
    for name, protocol, recentre in SETTINGS:
        split = split_indices(data, protocol=protocol, seed=settings["seed"], val_fraction=settings["val_fraction"])
        acc = ts_lr_accuracy(aligned if recentre else covs, data.y, split)
        results[name] = {"balanced_accuracy": round(acc, 4), "n_train": len(split["train"]),
                         "n_test": len(split["test"])}
        print(f"{name:<26s} balanced accuracy {acc:.3f}  (train {len(split['train'])}, "
              f"test {len(split['test'])})")
    report = {
        "pipeline": "bandpass 8-30 Hz (Butterworth 4, zero phase) -> OAS covariances -> "
                    "TangentSpace(riemann) -> LogisticRegression",
        "experiment": args.experiment,
        "data": {"source": "simulated", "seed": settings["data_seed"], **settings["sim"]},
        "band": list(settings["band"]),
        "split_seed": settings["seed"],
        "chance": 1.0 / data.n_classes,
        "results": results,
        "elapsed_s": round(time.perf_counter() - start, 2),
    }
    _write(report, args.out)
    return report


if __name__ == "__main__":
    main()
