"""Evaluation splits: disjoint, stratified, seeded, protocol semantics, errors."""

from __future__ import annotations

import numpy as np
import pytest

from manifoldnorm.data import PROTOCOLS, Split, split_indices, target_domains
from manifoldnorm.data.types import domain_ids


def _meta(n_subjects=4, n_sessions=3, per_class=10, n_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    subject, session, y = [], [], []
    for s in range(n_subjects):
        for r in range(n_sessions):
            labels = rng.permutation(np.repeat(np.arange(n_classes), per_class))
            y.append(labels)
            subject.append(np.full(len(labels), 10 + s))  # non-contiguous subject ids
            session.append(np.full(len(labels), r))
    return {"y": np.concatenate(y), "subject": np.concatenate(subject), "session": np.concatenate(session)}


def _check_partition(split, n):
    parts = [split["train"], split["val"], split["test"]]
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)  # sorted, unique
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)  # disjoint
    return set(allidx.tolist())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_disjoint_and_seeded(protocol):
    meta = _meta()
    a = split_indices(meta, protocol, seed=0)
    b = split_indices(meta, protocol, seed=0)
    c = split_indices(meta, protocol, seed=1)
    assert isinstance(a, Split) and set(a) == {"train", "val", "test"}
    covered = _check_partition(a, len(meta["y"]))
    if protocol != "cross_subject":
        assert covered == set(range(len(meta["y"])))  # every trial used once
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    np.testing.assert_array_equal(a.target_domains, target_domains(meta, a))


def test_within_session_stratified_per_domain():
    meta = _meta()
    dom = domain_ids(meta["subject"], meta["session"])
    sp = split_indices(meta, "within_session", seed=3, val_fraction=0.2, test_fraction=0.2)
    for d in np.unique(dom):
        for k in range(4):
            counts = [int(np.sum((dom[sp[p]] == d) & (meta["y"][sp[p]] == k))) for p in ("train", "val", "test")]
            assert counts == [6, 2, 2]
    assert np.array_equal(sp.target_domains, np.unique(dom))
    assert np.array_equal(sp.source_domains, np.unique(dom))


def test_cross_session_semantics():
    meta = _meta(n_sessions=3)
    sp = split_indices(meta, "cross_session", seed=0, val_fraction=0.25)
    assert np.all(meta["session"][sp["train"]] == 0) and np.all(meta["session"][sp["val"]] == 0)
    assert np.all(meta["session"][sp["test"]] > 0)
    assert len(sp["test"]) == 4 * 2 * 40
    # Validation is stratified per domain and class: 10 per cell -> 2.5 rounds to 2 or 3.
    counts = np.bincount(meta["y"][sp["val"]], minlength=4)
    assert np.all(counts >= 8) and np.all(counts <= 12)
    dom = domain_ids(meta["subject"], meta["session"])
    assert set(sp.target_domains.tolist()) == set(np.unique(dom[meta["session"] > 0]).tolist())
    assert not set(sp.target_domains.tolist()) & set(sp.source_domains.tolist())


def test_cross_session_first_session_per_subject():
    meta = _meta(n_subjects=2, n_sessions=2)
    meta["session"] = meta["session"] + np.where(meta["subject"] == 11, 5, 0)  # subject 11: sessions 5, 6
    sp = split_indices(meta, "cross_session")
    test_sessions = {(s, r) for s, r in zip(meta["subject"][sp["test"]], meta["session"][sp["test"]], strict=True)}
    assert test_sessions == {(10, 1), (11, 6)}


def test_cross_subject_semantics():
    meta = _meta()
    sp = split_indices(meta, "cross_subject", seed=0, n_test_subjects=2)
    held = np.unique(meta["subject"][sp["test"]])
    assert len(held) == 2
    assert not np.isin(meta["subject"][sp["train"]], held).any()
    assert not np.isin(meta["subject"][sp["val"]], held).any()
    fixed = split_indices(meta, "cross_subject", test_subjects=[12])
    assert set(meta["subject"][fixed["test"]].tolist()) == {12}
    assert len(fixed["test"]) == 3 * 40
    chosen = {tuple(np.unique(meta["subject"][split_indices(meta, "cross_subject", seed=s)["test"]]))
              for s in range(10)}
    assert len(chosen) > 1  # the held-out subject depends on the seed


def test_accepts_eegdata_like_objects_and_domain_only_meta():
    class Obj:
        pass

    meta = _meta(n_subjects=2, n_sessions=2)
    obj = Obj()
    obj.y, obj.subject, obj.session = meta["y"], meta["subject"], meta["session"]
    np.testing.assert_array_equal(split_indices(obj, "cross_session")["test"],
                                  split_indices(meta, "cross_session")["test"])
    dom_only = {"y": meta["y"], "domain": domain_ids(meta["subject"], meta["session"])}
    sp = split_indices(dom_only, "within_session")
    _check_partition(sp, len(meta["y"]))
    with pytest.raises(ValueError, match="needs subject and session"):
        split_indices(dom_only, "cross_session")


def test_errors():
    meta = _meta(n_subjects=2, n_sessions=1)
    with pytest.raises(ValueError, match="within_session.*cross_session.*cross_subject"):
        split_indices(meta, "leave_one_out")
    with pytest.raises(ValueError, match="two or more sessions"):
        split_indices(meta, "cross_session")
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(meta, "within_session", val_fraction=1.0)
    with pytest.raises(ValueError, match="proper subset"):
        split_indices(meta, "cross_subject", test_subjects=[99])
    with pytest.raises(ValueError, match="n_test_subjects"):
        split_indices(meta, "cross_subject", n_test_subjects=2)
    with pytest.raises(ValueError, match="'y'"):
        split_indices({"subject": meta["subject"]}, "within_session")
