"""Simulated motor-imagery data: determinism, shapes, montage, class-specific ERD, cache."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.signal import welch

from manifoldnorm.data import (
    BCI2A_CHANNELS,
    CLASS_NAMES,
    EEGCovariances,
    EEGData,
    bandpass,
    channel_positions,
    channel_positions_2d,
    covariances,
    load_simulated,
    load_simulated_covariances,
    simulate_motor_imagery,
)
from manifoldnorm.data import simulate as sim_module
from manifoldnorm.data.montage import HEAD_RADIUS_MM

SMALL = {"n_subjects": 2, "n_sessions": 2, "trials_per_class": 5}


def test_shapes_dtypes_and_metadata():
    d = simulate_motor_imagery(**SMALL, seed=3)
    assert isinstance(d, EEGData)
    assert d.X.shape == (2 * 2 * 4 * 5, 22, 384) and d.X.dtype == np.float32
    for arr in (d.y, d.subject, d.session, d.domain):
        assert arr.dtype == np.int64 and arr.shape == (len(d),)
    assert d.ch_names == list(BCI2A_CHANNELS) and d.class_names == list(CLASS_NAMES)
    assert d.sfreq == 128.0 and np.all(np.isfinite(d.X))
    assert set(np.unique(d.domain)) == {0, 1, 2, 3}
    for dom in range(4):  # balanced classes in every domain
        assert np.bincount(d.y[d.domain == dom], minlength=4).tolist() == [5, 5, 5, 5]
    assert 2.0 < float(d.X.std()) < 100.0  # microvolt-like scale
    assert d.info["params"]["seed"] == 3
    sub = d.subset(d.subject == 1)
    assert len(sub) == 40 and set(sub.domain.tolist()) == {0, 1}


def test_determinism_by_seed_and_subject_independence():
    a = simulate_motor_imagery(**SMALL, seed=0)
    b = simulate_motor_imagery(**SMALL, seed=0)
    c = simulate_motor_imagery(**SMALL, seed=1)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.allclose(a.X, c.X)
    # A subject's data do not depend on how many subjects are generated.
    one = simulate_motor_imagery(n_subjects=1, n_sessions=2, trials_per_class=5, seed=0)
    np.testing.assert_array_equal(one.X, a.X[a.subject == 0])


def test_other_sampling_rate_and_duration():
    d = simulate_motor_imagery(n_subjects=1, n_sessions=1, trials_per_class=2, sfreq=250, duration=2.0)
    assert d.X.shape == (8, 22, 500) and d.sfreq == 250.0
    assert np.bincount(d.y).tolist() == [2, 2, 2, 2]
    # the rhythms are placed in Hz, not in samples: at 250 Hz the mu peak is still at 9-12 Hz above the floor
    f, pxx = welch(d.X[:, d.ch_names.index("C3")].astype(np.float64), fs=d.sfreq, nperseg=250)
    pxx = pxx.mean(0)

    def band(lo, hi):
        return pxx[(f >= lo) & (f <= hi)].mean()

    assert band(9, 12) > 1.5 * band(5, 6)
    assert band(9, 12) > 10 * band(60, 120)  # far above the simulated rhythms the spectrum is only the floor


@pytest.mark.parametrize(
    "kwargs, err",
    [({"n_subjects": 0}, ValueError), ({"sfreq": 40.0}, ValueError), ({"erd_range": (0.5, 1.2)}, ValueError),
     ({"trials_per_class": 2.5}, ValueError), ({"bogus": 1}, TypeError), ({"drift_std": -1.0}, ValueError)],
)
def test_bad_parameters(kwargs, err):
    with pytest.raises(err):
        simulate_motor_imagery(**kwargs)


def test_montage_geometry():
    pos = channel_positions()
    assert pos.shape == (22, 3)
    np.testing.assert_allclose(np.linalg.norm(pos, axis=1), HEAD_RADIUS_MM)
    names = list(BCI2A_CHANNELS)
    assert pos[names.index("C3"), 0] < 0 < pos[names.index("C4"), 0]  # left/right
    assert pos[names.index("Fz"), 1] > 0 > pos[names.index("POz"), 1]  # front/back
    np.testing.assert_allclose(pos[names.index("Cz")], [0, 0, HEAD_RADIUS_MM], atol=1e-9)
    step = np.linalg.norm(pos[names.index("C1")] - pos[names.index("C3")])
    assert 25.0 < step < 32.0  # neighbouring electrodes about 28 mm apart
    np.testing.assert_allclose(np.linalg.norm(channel_positions(unit="unit"), axis=1), 1.0)
    assert channel_positions_2d(["C3", "Cz"]).shape == (2, 2)
    with pytest.raises(ValueError, match="valid names"):
        channel_positions(["C3", "T7"])


@pytest.fixture(scope="module")
def erd_data():
    return simulate_motor_imagery(n_subjects=3, n_sessions=1, trials_per_class=20, seed=0)


def test_class_specific_erd(erd_data):
    """8-30 Hz power is lower over the hemisphere contralateral to the imagined hand, and at Cz for feet."""
    d = erd_data
    logp = np.log((bandpass(d.X, d.sfreq, 8.0, 30.0).astype(np.float64) ** 2).mean(-1))
    ch = {c: i for i, c in enumerate(d.ch_names)}
    left, right, feet = (CLASS_NAMES.index(c) for c in ("left_hand", "right_hand", "feet"))
    for s in range(3):
        m = d.subject == s

        def mean(k, c, m=m):
            return logp[m & (d.y == k), ch[c]].mean()

        # right-hand imagery: desynchronisation over the left hand area (C3), and vice versa
        assert mean(right, "C3") - mean(right, "C4") < mean(left, "C3") - mean(left, "C4") - 0.2
        assert mean(right, "C3") < mean(left, "C3")
        assert mean(left, "C4") < mean(right, "C4")
        assert mean(feet, "Cz") < min(mean(left, "Cz"), mean(right, "Cz"))


def test_mu_and_beta_peaks(erd_data):
    """The sensorimotor channels show spectral peaks in the mu and beta bands above a 1/f floor."""
    d = erd_data
    f, pxx = welch(d.X[:, d.ch_names.index("C3")].astype(np.float64), fs=d.sfreq, nperseg=128)
    psd = pxx.mean(0)

    def band(lo, hi):
        return psd[(f >= lo) & (f <= hi)].mean()

    assert band(9, 12) > 1.5 * band(5, 6)  # a 1/f floor alone would fall from 5 Hz to 10 Hz
    assert band(18, 24) > band(14, 15.5) or band(18, 24) > band(27, 30)


def test_cache_hit_and_key(tmp_path, monkeypatch):
    direct = simulate_motor_imagery(**SMALL)
    calls = []
    real = sim_module._simulate
    monkeypatch.setattr(sim_module, "_simulate", lambda p: calls.append(p) or real(p))
    a = load_simulated(cache_dir=tmp_path, **SMALL)
    files = sorted(tmp_path.glob("*.npz"))
    assert len(files) == 1 and len(calls) == 1
    b = load_simulated(cache_dir=tmp_path, **SMALL)
    assert len(calls) == 1  # served from disk
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.y, b.y)
    assert b.ch_names == a.ch_names and b.info == a.info
    np.testing.assert_array_equal(direct.X, b.X)
    load_simulated(cache_dir=tmp_path, **{**SMALL, "seed": 1})  # other parameters -> other entry
    assert len(list(tmp_path.glob("*.npz"))) == 2 and len(calls) == 2
    load_simulated(cache_dir=tmp_path, **{**SMALL, "sfreq": 128})  # int vs float: same entry
    assert len(calls) == 2
    load_simulated(cache_dir=tmp_path, refresh=True, **SMALL)
    assert len(calls) == 3
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".npz"]  # no temporary files left


def _damage(path, damage):
    if damage == "garbage":
        path.write_bytes(b"not an npz file")
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        np.savez(path.open("wb"), X=np.zeros((1, 2, 3)))


@pytest.mark.parametrize("damage", ["garbage", "truncate", "wrong_content"])
def test_corrupted_cache_is_regenerated(tmp_path, damage, caplog):
    fresh = load_simulated(cache_dir=tmp_path, **SMALL)
    (path,) = tmp_path.glob("*.npz")
    _damage(path, damage)
    with caplog.at_level(logging.WARNING, logger="manifoldnorm.data.cache"):
        again = load_simulated(cache_dir=tmp_path, **SMALL)
    assert any(str(path) in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(again.X, fresh.X)
    third = load_simulated(cache_dir=tmp_path, **SMALL)  # the entry was rewritten and is readable
    np.testing.assert_array_equal(third.X, fresh.X)


def _count_sessions(monkeypatch):
    calls = []
    real = sim_module._sessions
    monkeypatch.setattr(sim_module, "_sessions", lambda p: calls.append(p) or real(p))
    return calls


def test_covariance_cache_holds_only_the_matrices(tmp_path, monkeypatch):
    """A covariance run's cache entry: the (N, C, C) matrices and labels, equal value for value to filtering and
    reducing the simulated trials; no raw trials written; the second read served from disk."""
    raw = simulate_motor_imagery(**SMALL)
    expected = covariances(bandpass(raw.X, raw.sfreq, 8.0, 30.0), "oas")
    calls = _count_sessions(monkeypatch)
    cov = load_simulated_covariances(band=(8.0, 30.0), cache_dir=tmp_path, **SMALL)
    (path,) = tmp_path.glob("*.npz")
    assert path.name.startswith("simulated_mi_cov_") and len(calls) == 1
    assert isinstance(cov, EEGCovariances) and cov.X.dtype == np.float64 and cov.X.shape == (80, 22, 22)
    np.testing.assert_allclose(cov.X, expected, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(cov.y, raw.y)
    np.testing.assert_array_equal(cov.domain, raw.domain)
    assert (cov.n_times, cov.n_classes, cov.sfreq) == (raw.n_times, 4, raw.sfreq)
    again = load_simulated_covariances(band=(8.0, 30.0), cache_dir=tmp_path, **SMALL)
    assert len(calls) == 1  # served from disk
    np.testing.assert_array_equal(again.X, cov.X)
    assert again.info == cov.info and again.info["features"]["estimator"] == "oas"
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".npz"]  # no temporary files left


def test_covariance_cache_reads_a_cached_raw_entry_instead_of_simulating(tmp_path, monkeypatch):
    raw = load_simulated(cache_dir=tmp_path, **SMALL)
    calls = _count_sessions(monkeypatch)
    cov = load_simulated_covariances(band=None, estimator="scm", cache_dir=tmp_path, **SMALL)
    assert calls == []
    np.testing.assert_allclose(cov.X, covariances(raw.X, "scm"), rtol=1e-12, atol=0)


def test_covariance_cache_key_covers_the_preprocessing_and_the_format(tmp_path, monkeypatch):
    """Another band, filter order, estimator or cache format is another entry: a stale one is never read."""
    load_simulated_covariances(cache_dir=tmp_path, **SMALL)
    load_simulated_covariances(band=(8.0, 30.0), cache_dir=tmp_path, **SMALL)  # the default band: same entry
    assert len(list(tmp_path.glob("simulated_mi_cov_*.npz"))) == 1
    for kwargs in ({"band": (4.0, 40.0)}, {"filter_order": 2}, {"estimator": "lwf"}, {"band": None}):
        load_simulated_covariances(cache_dir=tmp_path, **kwargs, **SMALL)
    assert len(list(tmp_path.glob("simulated_mi_cov_*.npz"))) == 5
    calls = _count_sessions(monkeypatch)
    monkeypatch.setattr(sim_module, "COVARIANCE_CACHE_FORMAT", sim_module.COVARIANCE_CACHE_FORMAT + 1)
    load_simulated_covariances(cache_dir=tmp_path, **SMALL)
    assert len(calls) == 1 and len(list(tmp_path.glob("simulated_mi_cov_*.npz"))) == 6
    with pytest.raises(ValueError, match="valid names are"):
        load_simulated_covariances(estimator="mcd", cache_dir=tmp_path, **SMALL)
    with pytest.raises(ValueError, match="filter_order"):
        load_simulated_covariances(filter_order=0, cache_dir=tmp_path, **SMALL)


@pytest.mark.parametrize("damage", ["garbage", "truncate", "wrong_content", "other_data"])
def test_damaged_covariance_cache_is_rebuilt_with_a_logged_warning(tmp_path, damage, caplog):
    fresh = load_simulated_covariances(cache_dir=tmp_path, **SMALL)
    (path,) = tmp_path.glob("*.npz")
    if damage == "other_data":  # a readable entry describing other parameters (e.g. copied under this name)
        other_dir = tmp_path / "other"
        load_simulated_covariances(cache_dir=other_dir, **{**SMALL, "seed": 1})
        (other,) = other_dir.glob("*.npz")
        path.write_bytes(other.read_bytes())
    else:
        _damage(path, damage)
    with caplog.at_level(logging.WARNING, logger="manifoldnorm.data.cache"):
        again = load_simulated_covariances(cache_dir=tmp_path, **SMALL)
    (record,) = [r for r in caplog.records if str(path) in r.getMessage()]
    assert "rebuilding it" in record.getMessage()
    np.testing.assert_array_equal(again.X, fresh.X)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="manifoldnorm.data.cache"):
        third = load_simulated_covariances(cache_dir=tmp_path, **SMALL)  # rewritten: read without a word
    assert not caplog.records
    np.testing.assert_array_equal(third.X, fresh.X)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MANIFOLDNORM_CACHE", str(tmp_path / "env_cache"))
    load_simulated(**SMALL)
    assert len(list((tmp_path / "env_cache").glob("simulated_mi_*.npz"))) == 1


def test_unwritable_cache_warns_and_returns_data(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the cache folder should be
    with pytest.warns(RuntimeWarning, match="could not write"):
        d = load_simulated(cache_dir=blocker / "sub", **SMALL)
    assert len(d) == 80


def test_data_package_imports_no_training_stack():
    code = (
        "import sys, manifoldnorm.data; "
        "bad = [m for m in ('lightning', 'hydra', 'pyriemann', 'sklearn', 'moabb', 'mne', 'scipy') "
        "if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert res.returncode == 0, res.stdout + res.stderr


def test_source_building_blocks():
    from manifoldnorm.data.sources import colored_noise, peak, pink, spectrum_norm

    n, fs = 256, 128.0
    freqs = np.fft.rfftfreq(n, 1 / fs)
    amp = spectrum_norm(np.concatenate([peak(freqs, np.array([10.0]), 1.0), pink(freqs, np.array([1.5]))]), n)
    x = colored_noise(np.random.default_rng(0), amp, 400, n)
    np.testing.assert_allclose(x.var(axis=(0, 2)), 1.0, rtol=0.05)  # unit variance by construction
    psd = (np.abs(np.fft.rfft(x, axis=-1)) ** 2).mean(0)
    assert abs(freqs[np.argmax(psd[0])] - 10.0) <= 0.5
    assert psd[1, 2] > psd[1, 20] > psd[1, 100]  # 1/f decay
