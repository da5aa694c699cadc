"""Train and test a classifier from the Hydra config in ``conf/``.

    python launch/train.py +experiment=spd_eeg
    python launch/train.py -m norm=liebn_aim,liebn_lem logger=csv

Composes ``conf/train.yaml``, seeds everything, instantiates data module, model, Lightning module, callbacks,
loggers and trainer, fits, tests the best checkpoint, prints the metrics and returns ``optimized_metric``.

Before torch is imported, ``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` (an explicit setting is kept): idle OpenMP
threads sleep instead of spinning. The SPD layers run many tiny parallel regions; on a machine shared with other
programs, spinning threads burned several times the CPU of the work itself (the 3-epoch flagship: 2.4-6.7x the
wall time). The policy does not change which thread computes what, so results are bitwise the same.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch's OpenMP runtime starts
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hydra  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from manifoldnorm.lit import run  # noqa: E402
from manifoldnorm.lit.guard import NonFiniteError  # noqa: E402


def train(cfg: DictConfig) -> float | None:
    if cfg.ckpt_path is not None:  # a damaged checkpoint is refused before the data is built
        run.check_resume_checkpoint(cfg.ckpt_path)
    run.set_threads(cfg.get("threads"))
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = run.build_datamodule(cfg)
    module = run.build_module(cfg)
    loggers = run.build_loggers(cfg)
    callbacks = run.build_callbacks(cfg)
    trainer = run.build_trainer(cfg, callbacks, loggers)
    run.save_config(cfg, loggers, cfg.paths.output_dir)

    metrics = run.fit_and_test(trainer, module, datamodule, ckpt_path=cfg.ckpt_path, test=cfg.test)
    print(run.format_metrics(metrics), flush=True)
    print(f"run directory: {cfg.paths.output_dir}", flush=True)
    key = cfg.get("optimized_metric")
    value = metrics.get(f"best/{key}", metrics.get(key)) if key else None
    return None if value is None else float(value)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    except (run.ConfigError, run.CheckpointError, NonFiniteError) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(f"Error: {err}\n(Set the environment variable HYDRA_FULL_ERROR=1 for the full traceback.)")


if __name__ == "__main__":
    main()
