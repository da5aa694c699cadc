"""MOABB loader, exercised offline with MOABB's FakeDataset (generated locally, no network)."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

pytest.importorskip("moabb")  # optional dependency ("manifoldnorm[eeg]"); installed in the dev environment
from moabb.datasets.fake import FakeDataset  # noqa: E402

from manifoldnorm.data import EEGData, load_moabb  # noqa: E402

EVENTS = ("right_hand", "left_hand", "feet", "tongue")


def _fake(**kw):
    args = {"event_list": EVENTS, "n_subjects": 2, "n_sessions": 2, "n_runs": 1,
            "channels": ("C3", "Cz", "C4"), "seed": 7, "duration": 40, "n_events": 12}
    args.update(kw)
    return FakeDataset(**args)


def test_fake_dataset_to_eegdata(caplog):
    with caplog.at_level(logging.INFO):
        d = load_moabb(_fake(), subjects=[1, 2], fmin=8.0, fmax=30.0, tmin=0.5, tmax=2.5)
    assert not [r for r in caplog.records if r.levelno < logging.ERROR and r.name.startswith(("moabb", "mne"))]
    assert isinstance(d, EEGData)
    assert d.ch_names == ["C3", "Cz", "C4"] and d.sfreq == 128.0
    assert d.X.dtype == np.float32 and d.X.shape[1:] == (3, 257)  # 2 s at 128 Hz, both ends included
    assert d.class_names == ["left_hand", "right_hand", "feet", "tongue"]  # canonical order
    assert set(np.unique(d.subject)) == {1, 2} and set(np.unique(d.session)) == {0, 1}
    assert len(np.unique(d.domain)) == 4
    assert set(np.unique(d.y)) == {0, 1, 2, 3}
    assert np.all(np.isfinite(d.X)) and d.X.std() > 0
    assert d.info["source"] == "moabb" and d.info["session_names"] == ["0", "1"]


def test_events_subjects_and_resample():
    d = load_moabb(_fake(), subjects=[2], events=["feet", "tongue"], resample=64.0)
    assert d.class_names == ["feet", "tongue"] and set(np.unique(d.subject)) == {2}
    assert d.sfreq == 64.0 and abs(d.X.shape[-1] - 3 * 64) <= 1  # 3 s at 64 Hz


def test_bad_arguments():
    with pytest.raises(ValueError, match="not in dataset"):
        load_moabb(_fake(), subjects=[5])
    with pytest.raises(ValueError, match="valid names are .*BNCI2014_001"):
        load_moabb("NoSuchDataset")
    with pytest.raises(TypeError, match="dataset must be"):
        load_moabb(3.0)
    with pytest.raises(ValueError, match="tmin < tmax"):
        load_moabb(_fake(), tmin=2.0, tmax=1.0)


class _Unreachable(FakeDataset):
    """A dataset whose files cannot be fetched (as without network access)."""

    def _get_single_subject_data(self, subject):
        raise ConnectionError("Failed to resolve host")


def test_download_failure_is_a_clear_runtime_error():
    ds = _Unreachable(event_list=EVENTS, n_subjects=1, n_sessions=1, n_runs=1, channels=("C3", "C4"))
    with pytest.raises(RuntimeError, match="could not download.*MNE_DATA") as info:
        load_moabb(ds)
    assert isinstance(info.value.__cause__, ConnectionError)


def test_missing_moabb_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "moabb", None)  # makes `import moabb` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "manifoldnorm\[eeg\]"'):
        load_moabb()
