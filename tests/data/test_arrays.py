"""ArrayDataset / validate_arrays / load_arrays: canonical forms and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from manifoldnorm.data import ArrayDataset, load_arrays, split_indices, validate_arrays


def _raw(n=6, c=3, t=20, seed=0):
    return np.random.default_rng(seed).standard_normal((n, c, t))


def _spd(n=6, c=4, seed=0):
    A = np.random.default_rng(seed).standard_normal((n, c, 2 * c))
    return A @ np.swapaxes(A, -1, -2) / (2 * c) + 1e-3 * np.eye(c)


def test_raw_dataset_items_and_loader():
    ds = ArrayDataset(_raw(), [0, 1, 2, 0, 1, 2], domain=[0, 0, 0, 1, 1, 1])
    assert ds.kind == "raw" and len(ds) == 6 and ds.class_names == ["0", "1", "2"]
    x, y, d = ds[4]
    assert x.dtype == torch.float32 and x.shape == (3, 20)
    assert y.dtype == torch.long and int(y) == 1 and d.dtype == torch.long and int(d) == 1
    xb, yb, db = next(iter(DataLoader(ds, batch_size=4)))
    assert xb.shape == (4, 3, 20) and yb.shape == (4,) and db.tolist() == [0, 0, 0, 1]
    # the items are the given arrays, in order, cast to float32 / long
    raw = torch.from_numpy(_raw())
    torch.testing.assert_close(x, raw[4].float(), rtol=0, atol=0)
    torch.testing.assert_close(xb, raw[:4].float(), rtol=0, atol=0)
    assert yb.tolist() == [0, 1, 2, 0]


def test_spd_dataset_auto_and_declared():
    C = _spd()
    ds = ArrayDataset(C, np.arange(6) % 2)
    assert ds.kind == "spd" and ds[0][0].dtype == torch.float64
    assert torch.equal(ds[0][2], torch.tensor(0))  # default domain 0
    assert ArrayDataset(C, np.arange(6) % 2, kind="spd").kind == "spd"
    assert ArrayDataset(C, np.arange(6) % 2, kind="raw").kind == "raw"  # explicit wins


def test_string_labels_and_subject_session_domains():
    labels = np.array(["feet", "left_hand", "feet", "tongue", "left_hand", "tongue"])
    ds = ArrayDataset(_raw(), labels, subject=[1, 1, 1, 2, 2, 2], session=[0, 1, 0, 0, 0, 1])
    assert ds.class_names == ["feet", "left_hand", "tongue"]
    assert ds.y.tolist() == [0, 1, 0, 2, 1, 2]
    assert ds.domain.tolist() == [0, 1, 0, 2, 2, 3]
    named = ArrayDataset(_raw(), labels, class_names=["left_hand", "feet", "tongue"])
    assert named.y.tolist() == [1, 0, 1, 2, 0, 2]
    with pytest.raises(ValueError, match="not in class_names"):
        ArrayDataset(_raw(), labels, class_names=["feet"])


@pytest.mark.parametrize(
    "X, y, kwargs, err, match",
    [
        (np.zeros((6, 20)), np.zeros(6), {}, ValueError, r"\(N, C, T\)"),
        (np.zeros((6, 3, 20, 1)), np.zeros(6), {}, ValueError, r"\(N, C, T\)"),
        (_raw(), np.zeros(5), {}, ValueError, "6 trials but y has 5"),
        (_raw(), np.zeros((6, 1)), {}, ValueError, "1-D"),
        (_raw(), [0.5] * 6, {}, ValueError, "whole numbers"),
        (_raw(), [-1] * 6, {}, ValueError, "non-negative"),
        (_raw(), np.zeros(6), {"domain": [0, 1]}, ValueError, "domain must have shape"),
        (_raw(), np.zeros(6), {"kind": "cov"}, ValueError, "valid kinds"),
        (_raw(t=1), np.zeros(6), {}, ValueError, "2 time samples"),
        (_raw(c=4, t=5), np.zeros(6), {"kind": "spd"}, ValueError, r"\(N, n, n\)"),
        (np.array([[["a"]]]), np.zeros(1), {}, TypeError, "numeric"),
        (np.zeros((0, 3, 4)), np.zeros(0), {}, ValueError, "no trials"),
    ],
)
def test_validation_errors(X, y, kwargs, err, match):
    with pytest.raises(err, match=match):
        validate_arrays(X, y, **kwargs)


def test_nan_and_non_spd_errors():
    X = _raw()
    X[2, 1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf values \\(in 1 of 6 trials\\)"):
        ArrayDataset(X, np.zeros(6))
    C = _spd()
    C[3] = -C[3]
    with pytest.raises(ValueError, match="not positive definite"):
        ArrayDataset(C, np.zeros(6), kind="spd")
    with pytest.raises(ValueError, match="not positive definite"):
        ArrayDataset(C, np.zeros(6))  # auto: symmetric square input is treated as SPD
    C = _spd()
    C[0, 0, 1] += 1.0
    with pytest.raises(ValueError, match="not symmetric"):
        ArrayDataset(C, np.zeros(6), kind="spd")


def test_load_arrays_roundtrip_and_split(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((24, 3, 16)).astype(np.float32)
    y = np.tile(np.arange(2), 12)
    subject, session = np.repeat([0, 1], 12), np.tile(np.repeat([0, 1], 6), 2)
    path = tmp_path / "mine.npz"
    np.savez(path, X=X, y=y, subject=subject, session=session, sfreq=100.0, class_names=np.array(["a", "b"]))
    ds = load_arrays(path)
    np.testing.assert_array_equal(ds.X, X)
    assert ds.class_names == ["a", "b"] and ds.sfreq == 100.0
    assert ds.domain.tolist() == (np.repeat([0, 1], 6).tolist() + np.repeat([2, 3], 6).tolist())
    sp = split_indices(ds, "cross_session")
    assert np.all(session[sp["test"]] == 1)
    np.savez(tmp_path / "dom.npz", X=_spd(), y=np.arange(6) % 3, domain=[0, 0, 0, 1, 1, 1])
    dd = load_arrays(tmp_path / "dom.npz")
    assert dd.kind == "spd" and dd.domain.tolist() == [0, 0, 0, 1, 1, 1] and dd.subject is None


def test_load_arrays_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_arrays(tmp_path / "missing.npz")
    np.savez(tmp_path / "nolabels.npz", X=_raw())
    with pytest.raises(ValueError, match=r"lacks required keys \['y'\]"):
        load_arrays(tmp_path / "nolabels.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="could not read"):
        load_arrays(tmp_path / "junk.npz")
    np.savez(tmp_path / "pickled.npz", X=np.array([object()], dtype=object), y=np.zeros(1))
    with pytest.raises(ValueError, match="could not read"):
        load_arrays(tmp_path / "pickled.npz")


def test_batched_view_gives_the_batches_of_the_default_collation():
    """One gather per array and batch (``BatchedView``): the same list ``[x, y, domain]``, values, dtypes and
    strides as stacking the samples, for any sampler order and a short last batch; a plain loader still works."""
    from torch.utils.data import RandomSampler

    from manifoldnorm.data.arrays import BatchedView

    rng = np.random.default_rng(0)
    A = rng.standard_normal((23, 4, 8))
    ds = ArrayDataset(A @ np.swapaxes(A, -1, -2) / 8, rng.integers(0, 3, 23), rng.integers(0, 2, 23), kind="spd")
    plain = DataLoader(ds, batch_size=5, sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(1)))
    fast = DataLoader(ds.batched(), batch_size=5, collate_fn=BatchedView.collate,
                      sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(1)))
    pairs = list(zip(plain, fast, strict=True))
    assert len(pairs) == 5 and pairs[-1][1][0].shape[0] == 3
    for a, b in pairs:
        assert isinstance(b, list) and len(b) == 3
        for p, q in zip(a, b, strict=True):
            assert torch.equal(p, q) and p.dtype == q.dtype and p.stride() == q.stride()
    assert len(ds.batched()) == len(ds) and all(torch.equal(p, q) for p, q in zip(ds.batched()[3], ds[3], strict=True))
    assert BatchedView.collate([(torch.zeros(2), 1), (torch.ones(2), 2)])[1].tolist() == [1, 2]  # default_collate
