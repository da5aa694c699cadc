"""EEGDataModule: representations, protocols, sources, metadata for the model config, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from manifoldnorm.data import bandpass, covariances, load_simulated
from manifoldnorm.lit import EEGDataModule


def test_cov_representation_matches_bandpass_oas_and_cross_session_split(
    make_dm, sim_cache: Path, small_sim: dict
) -> None:
    dm = make_dm(representation="cov", protocol="cross_session", band=(8.0, 30.0))
    assert dm.info() == {"n_channels": 22, "n_times": 384, "num_classes": 4, "num_domains": 4}
    assert (dm.n_channels, dm.num_classes, dm.num_domains) == (22, 4, 4)
    train, val, test = (dm.datasets[k] for k in ("train", "val", "test"))
    assert len(train) + len(val) + len(test) == 2 * 2 * 4 * 8
    assert train.X.dtype == np.float64 and train.X.shape[1:] == (22, 22)
    assert np.linalg.eigvalsh(test.X).min() > 0
    # cross-session: train/val on the first session of each subject, test on the second (new domains)
    assert set(train.domain) == set(val.domain) and not set(train.domain) & set(test.domain)

    data = load_simulated(cache_dir=str(sim_cache), **small_sim)
    idx = np.asarray(dm.split["test"])[:5]
    expected = covariances(bandpass(data.X[idx], data.sfreq, 8.0, 30.0), estimator="oas")
    np.testing.assert_allclose(test.X[:5], expected, rtol=1e-10)

    x, y, d = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float64 and x.shape == (16, 22, 22)
    assert y.dtype == torch.int64 and d.dtype == torch.int64
    assert len(dm.train_dataloader()) == len(train) // 16  # drop_last


def test_raw_representation_and_other_protocols(make_dm) -> None:
    dm = make_dm(representation="raw", protocol="within_session", band=None)
    x, _, _ = next(iter(dm.test_dataloader()))
    assert x.dtype == torch.float32 and x.shape[1:] == (22, 384)
    assert set(dm.datasets["test"].domain) == set(dm.datasets["train"].domain) == {0, 1, 2, 3}

    cs = make_dm(protocol="cross_subject", split_kwargs={"test_subjects": [1]})
    assert set(cs.datasets["test"].domain) == {2, 3} and set(cs.datasets["train"].domain) == {0, 1}


def test_each_representation_caches_only_what_it_reads(tmp_path: Path, small_sim: dict) -> None:
    """representation=cov reads (and writes) the covariance entry only; raw the float32 trials only."""
    cov_dir, raw_dir = tmp_path / "cov", tmp_path / "raw"
    cov = EEGDataModule(cache_dir=str(cov_dir), source_kwargs=small_sim, batch_size=16)
    cov.setup("fit")
    assert [p.name.startswith("simulated_mi_cov_") for p in cov_dir.iterdir()] == [True]
    raw = EEGDataModule(cache_dir=str(raw_dir), source_kwargs=small_sim, representation="raw", batch_size=16)
    raw.setup("fit")
    (entry,) = raw_dir.iterdir()
    assert entry.name.startswith("simulated_mi_") and not entry.name.startswith("simulated_mi_cov_")
    assert raw.datasets["train"].X.dtype == np.float32
    # the covariances read from their entry equal those computed from the raw trials
    data = load_simulated(cache_dir=str(raw_dir), **small_sim)
    idx = np.asarray(cov.split["train"])
    np.testing.assert_allclose(cov.datasets["train"].X, covariances(bandpass(data.X[idx], data.sfreq, 8.0, 30.0)),
                               rtol=1e-12, atol=0)


def test_seeded_shuffling_is_reproducible(make_dm) -> None:
    a, b, c = make_dm(seed=3), make_dm(seed=3), make_dm(seed=4)
    ya, yb = next(iter(a.train_dataloader()))[1], next(iter(b.train_dataloader()))[1]
    assert torch.equal(ya, yb)
    assert not np.array_equal(np.asarray(a.split["val"]), np.asarray(c.split["val"]))


def test_arrays_source_raw_and_spd(tmp_path: Path, make_dm) -> None:
    rng = np.random.default_rng(0)
    n, c, t = 48, 4, 256
    X = rng.standard_normal((n, c, t)).astype(np.float32)
    y = np.tile(np.arange(2), n // 2)
    subject = np.repeat([0, 1], n // 2)
    session = np.tile(np.repeat([0, 1], n // 4), 2)
    raw_file = tmp_path / "raw.npz"
    np.savez(raw_file, X=X, y=y, subject=subject, session=session, sfreq=128.0)
    dm = EEGDataModule(source="arrays", path=str(raw_file), representation="cov", batch_size=8)
    dm.setup()
    assert dm.info() == {"n_channels": 4, "n_times": 256, "num_classes": 2, "num_domains": 4}
    expected = covariances(bandpass(X, 128.0, 8.0, 30.0))
    idx = np.asarray(dm.split["train"])
    np.testing.assert_allclose(dm.datasets["train"].X, expected[idx], rtol=1e-10)

    covs = covariances(X)
    spd_file = tmp_path / "spd.npz"
    np.savez(spd_file, X=covs, y=y, subject=subject, session=session)
    dm = EEGDataModule(source="arrays", path=str(spd_file), protocol="within_session", batch_size=8)
    dm.setup()
    np.testing.assert_allclose(dm.datasets["test"].X, covs[np.asarray(dm.split["test"])])

    with pytest.raises(ValueError, match="only representation='cov'"):
        EEGDataModule(source="arrays", path=str(spd_file), representation="raw").setup()
    np.savez(tmp_path / "nosfreq.npz", X=X, y=y, subject=subject, session=session)
    with pytest.raises(ValueError, match="needs 'sfreq'"):
        EEGDataModule(source="arrays", path=str(tmp_path / "nosfreq.npz")).setup()


def test_errors_list_valid_names(make_dm) -> None:
    with pytest.raises(ValueError, match="unknown data source 'csv'; valid: simulated, moabb, arrays, ts$"):
        EEGDataModule(source="csv")
    with pytest.raises(ValueError, match="unknown representation 'tangent'; valid: cov, raw"):
        EEGDataModule(representation="tangent")
    with pytest.raises(ValueError, match="needs path"):
        EEGDataModule(source="arrays")
    with pytest.raises(ValueError, match="valid protocols"):
        make_dm(protocol="leave_one_out")
    with pytest.raises(RuntimeError, match="after setup"):
        EEGDataModule().info()
