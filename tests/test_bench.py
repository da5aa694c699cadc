"""The benchmark script runs and reports correct gradients for our path (smoke run, no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
