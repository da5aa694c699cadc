"""User ``.npz`` files with near-symmetric, non-symmetric or ambiguous square matrices are never silently misread.

Covariances with a small asymmetry (1e-4, e.g. from float32 arithmetic or a rounded export) are read as SPD
matrices and symmetrized; a clearly non-symmetric matrix declared SPD is refused, naming the file and the matrix;
square data whose kind is inferred says what it chose and why. Every file is written by the test into tmp_path.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from manifoldnorm.data import load_arrays
from manifoldnorm.data.arrays import SYMMETRY_RTOL
from manifoldnorm.lit import run

CONF = Path(__file__).resolve().parents[2] / "conf"
N, C = 24, 4


def _spd(n: int = N, c: int = C, seed: int = 0) -> np.ndarray:
    A = np.random.default_rng(seed).standard_normal((n, c, 3 * c))
    return A @ np.swapaxes(A, -1, -2) / (3 * c) + 0.1 * np.eye(c)


def _skew(n: int = N, c: int = C, seed: int = 1) -> np.ndarray:
    B = np.random.default_rng(seed).standard_normal((n, c, c))
    return B - np.swapaxes(B, -1, -2)


def _relative_asymmetry(X: np.ndarray) -> np.ndarray:
    return np.abs(X - np.swapaxes(X, -1, -2)).max(axis=(1, 2)) / np.abs(X).max(axis=(1, 2))


def _save(path: Path, X: np.ndarray) -> Path:
    y = np.tile([0, 1], len(X) // 2)
    subject = np.repeat([0, 1], len(X) // 2)
    session = np.tile(np.repeat([0, 1], len(X) // 4), 2)
    np.savez(path, X=X, y=y, subject=subject, session=session, sfreq=128.0)
    return path


def _asymmetric(scale: float) -> tuple[np.ndarray, np.ndarray]:
    """SPD matrices plus a skew part with an absolute asymmetry ``max|X - X^T|`` of ``scale`` in every matrix."""
    S, K = _spd(), _skew()
    K = K / np.abs(K).max(axis=(1, 2), keepdims=True) * scale / 2
    return S + K, S


def test_small_asymmetry_is_read_as_covariances_and_symmetrized(tmp_path: Path, caplog) -> None:
    X, S = _asymmetric(1e-4)
    assert np.all(_relative_asymmetry(X) > 1e-5)  # well above the old 1e-6 tolerance
    path = _save(tmp_path / "cov.npz", X)
    for kind in ("auto", "spd"):
        with caplog.at_level(logging.INFO, logger="manifoldnorm.data.arrays"), \
                pytest.warns(UserWarning, match="symmetrized as \\(X \\+ X\\^T\\) / 2"):
            ds = load_arrays(path, kind=kind)
        assert ds.kind == "spd" and ds.X.dtype == np.float64
        np.testing.assert_array_equal(ds.X, np.swapaxes(ds.X, -1, -2))  # exactly symmetric
        np.testing.assert_allclose(ds.X, S, rtol=0, atol=1e-12)  # the symmetric part, nothing else
    assert any("read as SPD matrices" in r.getMessage() and "kind='auto'" in r.getMessage() for r in caplog.records)


def test_round_off_is_symmetrized_without_a_warning(tmp_path: Path) -> None:
    X = _spd().astype(np.float32)  # float32 round-off: relative asymmetry ~1e-8 at most
    X = X + _skew().astype(np.float32) * 1e-8
    path = _save(tmp_path / "f32.npz", X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_arrays(path)
    assert ds.kind == "spd"


def test_tolerance_boundary_with_kind_spd(tmp_path: Path) -> None:
    S = _spd()
    scale = np.abs(S).max(axis=(1, 2))[:, None, None]
    K = _skew() / np.abs(_skew()).max(axis=(1, 2), keepdims=True)
    inside = _save(tmp_path / "inside.npz", S + K * 0.4 * SYMMETRY_RTOL * scale)  # relative 0.8e-3
    assert load_arrays(inside, kind="spd").kind == "spd"
    outside = S + K * 1.5 * SYMMETRY_RTOL * scale  # relative 3e-3
    outside[:5] = S[:5]
    path = _save(tmp_path / "outside.npz", outside)
    with pytest.raises(ValueError, match=r"outside\.npz: X was declared SPD \(kind='spd'\) but is not symmetric: "
                                         r"19 of 24 matrices .* above 0\.001 \(worst: index \d+, 0\.003\).*kind='raw'"):
        load_arrays(path, kind="spd")


def test_clearly_non_symmetric_declared_spd_is_refused(tmp_path: Path) -> None:
    raw = np.random.default_rng(3).standard_normal((N, C, C))  # square raw trials: asymmetry of order 1
    path = _save(tmp_path / "square.npz", raw)
    with pytest.raises(ValueError, match="square.npz: X was declared SPD .* not symmetric: 24 of 24"):
        load_arrays(path, kind="spd")


def test_auto_on_square_non_symmetric_trials_warns_and_reads_raw(tmp_path: Path) -> None:
    raw = np.random.default_rng(3).standard_normal((N, C, C))
    path = _save(tmp_path / "square.npz", raw)
    with pytest.warns(UserWarning, match=r"square but non-symmetric trials .* read as raw trials with 4 channels "
                                         r"and 4 samples \(kind='auto'\); set kind='raw' to confirm, or kind='spd'"):
        ds = load_arrays(path)
    assert ds.kind == "raw"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_arrays(path, kind="raw").kind == "raw"  # explicit: no warning


def test_auto_on_a_mix_is_ambiguous(tmp_path: Path) -> None:
    X = _spd()
    X[::2] = np.random.default_rng(4).standard_normal((N // 2, C, C))
    path = _save(tmp_path / "mix.npz", X)
    with pytest.raises(ValueError, match=r"mix\.npz: X \(24, 4, 4\) is ambiguous: 12 of 24 .* set kind='spd'"):
        load_arrays(path)


def test_raw_on_covariance_like_data_warns(tmp_path: Path) -> None:
    path = _save(tmp_path / "cov.npz", _spd())
    with pytest.warns(UserWarning, match="like covariance matrices, but kind='raw': read as raw trials as asked"):
        ds = load_arrays(path, kind="raw")
    assert ds.kind == "raw" and ds.X.dtype == np.float32


def test_auto_logs_why_it_reads_raw(tmp_path: Path, caplog) -> None:
    rng = np.random.default_rng(5)
    path = _save(tmp_path / "raw.npz", rng.standard_normal((N, C, 32)))
    with caplog.at_level(logging.INFO, logger="manifoldnorm.data.arrays"):
        assert load_arrays(path).kind == "raw"
    assert any("is not square: read as raw trials" in r.getMessage() for r in caplog.records)


def _datamodule_cfg(tmp_path: Path, path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", "data=arrays", f"data.path={path}",
                                          "data.batch_size=4", *overrides])
    with open_dict(cfg):
        cfg.data_info = {}
    return cfg


def test_data_config_kind_reaches_the_loader(tmp_path: Path) -> None:
    X, _ = _asymmetric(1e-4)
    path = _save(tmp_path / "cov.npz", X)
    cfg = _datamodule_cfg(tmp_path, path)
    assert cfg.data.kind == "auto"  # explicit in conf/data/arrays.yaml
    with pytest.warns(UserWarning, match="symmetrized"):
        dm = run.build_datamodule(_datamodule_cfg(tmp_path, path, "data.kind=spd"))
    assert dm.info()["n_times"] == 0 and dm.info()["n_channels"] == C  # used as covariances, not as raw trials
    x, _, _ = dm.datasets["train"][0]
    assert (x == x.T).all()
    with pytest.raises(run.ConfigError, match="unknown kind 'covariance'; valid: auto, raw, spd"):
        run.build_datamodule(_datamodule_cfg(tmp_path, path, "data.kind=covariance"))
    bad = _save(tmp_path / "square.npz", np.random.default_rng(3).standard_normal((N, C, C)))
    with pytest.raises(run.ConfigError, match="square.npz: X was declared SPD"):
        run.build_datamodule(_datamodule_cfg(tmp_path, bad, "data.kind=spd"))
