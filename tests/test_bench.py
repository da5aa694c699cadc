"""The benchmark script runs and reports correct gradients for our path (smoke run, no timing asserts)."""

from __future__ import annotations

import json
import math
import os
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


class _OnePart:
    """The reducer of a batch "split" into a single part: the sum over parts is the tensor itself."""

    active = True

    def sum(self, t):  # noqa: ANN001, ANN201
        return t

    def max(self, t):  # noqa: ANN001, ANN201
        return t.detach().clone()


@pytest.mark.parametrize("norm", ["liebn_aim", "liebn_lem", "spdbn"])
@pytest.mark.parametrize(("n", "karcher_steps"), [(4, 1), (6, 3)])
def test_scale_traffic_model_matches_the_reductions_of_the_layer(norm: str, n: int, karcher_steps: int) -> None:
    """``sync_stats_traffic`` = the all-reduces a synchronized layer really issues (counted on the split path)."""
    import torch

    sys.path.insert(0, str(ROOT / "launch"))
    from _bench_scale import count_sync_traffic, sync_stats_traffic

    from manifoldnorm.nn import create_norm_layer

    local = create_norm_layer(norm, n, karcher_steps=karcher_steps).double().train()
    split = create_norm_layer(norm, n, karcher_steps=karcher_steps).double().train()
    split.stats_reducer = _OnePart()
    counter = count_sync_traffic(split)
    assert counter is not None
    g = torch.Generator().manual_seed(0)
    A = torch.randn(7, n, n, generator=g, dtype=torch.float64)
    X = A @ A.mT / n + 0.1 * torch.eye(n, dtype=torch.float64)
    W = torch.randn(7, n, n, generator=g, dtype=torch.float64)
    xs = [X.clone().requires_grad_() for _ in range(2)]
    ys = [layer(x) for layer, x in zip((local, split), xs, strict=True)]
    for y in ys:
        (y * W).sum().backward()
    torch.testing.assert_close(ys[1], ys[0], rtol=0, atol=1e-12)  # one part: the local statistics
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=0, atol=1e-12)
    want = sync_stats_traffic(norm, n, karcher_steps=karcher_steps)
    assert counter.totals() == (want["calls"], want["bytes"])
    assert counter.counts["fwd"][0] == want["fwd_calls"] and counter.counts["bwd"][0] == want["bwd_calls"]
    assert counter.counts["max"] == [want["max_calls"], want["max_bytes"]]


def test_scale_ring_allreduce_volume() -> None:
    sys.path.insert(0, str(ROOT / "launch"))
    from _bench_scale import ring_allreduce_bytes

    assert ring_allreduce_bytes(1000, 1) == 0
    assert ring_allreduce_bytes(1000, 2) == 1000
    assert ring_allreduce_bytes(1000, 8) == 1750


@pytest.mark.slow
def test_scale_bench_quick(tmp_path: Path) -> None:
    """1 vs 2 gloo processes through launch/train.py, sync_norm on/off, one layer on 2 processes (smoke run)."""
    sys.path.insert(0, str(ROOT / "launch"))
    from _bench_scale import CONFIGS, sync_stats_traffic

    out = tmp_path / "scale.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "WANDB_", "SLURM_"))}
    env["MANIFOLDNORM_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "bench.py"), "scale", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| spd_eeg | 2p x 1t | 8 | 16 |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["suite"] == "scale" and report["quick"]
    rows = report["rows"]
    assert [(r["experiment"], r["config"]) for r in rows] == [("spd_eeg", "1p x 1t"), ("spd_eeg", "2p x 1t")]
    for r in rows:
        processes, threads, _ = CONFIGS[r["config"]]
        for key in ("samples_per_s", "samples_per_s_median_step"):
            assert math.isfinite(r[key]) and r[key] > 0
        assert r["torch_threads"] == threads and r["global_batch"] == 8 * processes
        assert r["steps_per_s"] == pytest.approx(r["samples_per_s"] / r["global_batch"])
    assert rows[0]["x_1p1t"] == 1.0
    # the timer's accounting: every counted step is a full batch on every process
    for run in report["runs"]:
        assert run["steps"] == 15 and run["total_steps"] == 20
        assert run["samples"] == run["steps"] * 8 * run["world_size"]
        assert run["world_size"] == (1 if run.get("config") == "1p x 1t" else 2)
        assert len(run["seconds_per_rank"]) == run["world_size"] and run["seconds"] > 0
    # synchronized LEM LieBN in a real DDP run: the counted all-reduces are the predicted ones
    (sync,) = report["sync_training"]
    assert sync["norm"] == "liebn_lem" and sync["local_calls_per_step"] == 0
    assert sync["local_samples_per_s"] > 0 and sync["sync_samples_per_s"] > 0
    want = sync_stats_traffic("liebn_lem", 16)
    assert (sync["sync_calls_per_step"], sync["sync_bytes_per_step"]) == (want["calls"], want["bytes"])
    layers = {r["norm"]: r for r in report["sync_layer"]}
    assert set(layers) == {"liebn_aim", "liebn_lem", "spdbn"}
    for name, r in layers.items():
        want = sync_stats_traffic(name, r["n"])
        assert (r["calls_per_step"], r["bytes_per_step"]) == (want["calls"], want["bytes"])
        assert r["local_ms"] > 0 and r["sync_ms"] > 0
    assert set(report["allreduce_latency_us"]) == {"16", str(8 * (8 * 8 + 1))}  # quick: 8 x 8 matrices
    assert all(us > 0 for us in report["allreduce_latency_us"].values())
    (volume,) = report["comm_volume"]
    assert volume["grad_bytes"] == rows[0]["param_bytes"] and 4 * volume["params"] <= volume["grad_bytes"]
    assert volume["ring_bytes_per_process"]["2"] == volume["grad_bytes"]
