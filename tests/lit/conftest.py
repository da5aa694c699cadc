"""Fixtures of the Lightning tests: a small cached simulation and data modules over it."""

from __future__ import annotations

from pathlib import Path

import pytest

from manifoldnorm.lit import EEGDataModule

SMALL_SIM = {"n_subjects": 2, "n_sessions": 2, "trials_per_class": 8, "sfreq": 128.0, "seed": 0}


@pytest.fixture(scope="session")
def small_sim() -> dict:
    return dict(SMALL_SIM)


@pytest.fixture(scope="session")
def sim_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sim_cache")


@pytest.fixture
def make_dm(sim_cache: Path):
    def make(**kwargs) -> EEGDataModule:
        kwargs.setdefault("source_kwargs", SMALL_SIM)
        kwargs.setdefault("batch_size", 16)
        dm = EEGDataModule(cache_dir=str(sim_cache), **kwargs)
        dm.setup("fit")
        return dm

    return make
