"""The benchmark script runs and reports correct gradients for our path (smoke run, no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_spectral_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "bench.py"), "spectral", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert "| ours |" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    ours = [r for r in rows if r["impl"] == "ours"]
    assert ours and all(r["finite_grad_at_2I"] for r in ours)
    assert not any(r["finite_grad_at_2I"] for r in rows if r["impl"] == "eigh_autograd")
    assert all(r["grad_rel_err_vs_ours_f64"] < 1e-10 for r in rows if r["dtype"] == "float64")


def test_norms_bench_quick(tmp_path: Path) -> None:
    from manifoldnorm.nn import create_norm_layer, get_norm_info, list_norms

    out = tmp_path / "norms.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "bench.py"), "norms", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert "| norm | n | N | dtype | threads | ms | published ms |" in proc.stdout
    report = json.loads(out.read_text())
    rows = report["rows"]
    expected = {k for k in list_norms(kind="spd") + list_norms(kind="lie")
                if k not in ("none", "spddsmbn") and not k.startswith("dsliebn_")}
    assert {r["norm"] for r in rows} == expected
    fields = {"norm", "n", "N", "dtype", "threads", "ms", "wall_ms", "published_ms", "ratio", "target", "met",
              "out_rel_err", "grad_rel_err"}
    for r in rows:
        assert fields <= set(r) and (r["n"], r["N"], r["threads"]) == (20, 32, 1) and r["ms"] > 0
        if r["published_ms"] is not None:
            assert r["dtype"] == "float64" and r["ratio"] == pytest.approx(r["ms"] / r["published_ms"], abs=2e-3)
            assert r["met"] == (r["ratio"] <= r["target"])
        else:
            assert r["met"] is None
    assert {r["norm"] for r in report["overhead"]} == expected
    # accuracy against forward_ref wherever a layer has one (required for LieBN)
    for name in sorted(expected):
        feats = 6 if "so3" in get_norm_info(name).inputs else 20
        has_ref = callable(getattr(create_norm_layer(name, feats), "forward_ref", None))
        assert has_ref or not name.startswith("liebn_"), f"{name} has no forward_ref"
        for r in (r for r in rows if r["norm"] == name):
            if not has_ref:
                assert r["out_rel_err"] is None and r["grad_rel_err"] is None
                continue
            tol = 1e-6 if r["dtype"] == "float64" else 1e-3
            assert r["out_rel_err"] < tol and r["grad_rel_err"] < tol, r


def test_layers_bench_quick(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "launch"))
    from _bench_euclid import layer_norms

    out = tmp_path / "layers.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "bench.py"), "layers", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert "| torch_layer_norm |" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["norm"] for r in rows} == {*layer_norms(), "torch_layer_norm", "torch_rms_norm"}
    assert "layernorm" in layer_norms() and "none" not in layer_norms()
    for r in rows:
        assert r["ms"] > 0 and r["x_layernorm"] == pytest.approx(
            r["ms"] / next(b["ms"] for b in rows if b["norm"] == "torch_layer_norm"), rel=1e-9)


def test_sweep_bench_quick(tmp_path: Path) -> None:
    """The sweep pipeline end to end (seconds-long runs: a smoke test, not a result)."""
    sys.path.insert(0, str(ROOT / "launch"))
    from _bench_euclid import SWEEP_NORMS

    out = tmp_path / "sweep.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "bench.py"), "sweep", "--quick", "--norms", "layernorm", "none",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=True,
    )
    assert "| lm_char | layernorm | 1 |" in proc.stdout and "| cnn_digits | none | 1 |" in proc.stdout
    report = json.loads(out.read_text())
    assert {(r["experiment"], r["norm"]) for r in report["rows"]} == {
        (e, n) for e in ("lm_char", "cnn_digits") for n in ("layernorm", "none")}
    assert set(SWEEP_NORMS["lm_char"]) == {"layernorm", "rmsnorm", "dyt", "derf"}
    for r in report["rows"]:
        low, high = (0.0, 8.0) if r["experiment"] == "lm_char" else (0.0, 1.0)
        assert low < r["final"][0] <= high and r["test"] is not None and r["steps"] > 0
    for run in report["runs"]:  # the curves the plot is drawn from
        key = "val/bpc" if run["experiment"] == "lm_char" else "val/acc"
        assert len(run["curves"][key]) == 2  # two validation epochs
    png = tmp_path / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
