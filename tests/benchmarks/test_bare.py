"""The bare LieBN formulas of the norms benchmark equal the layers (float64: output, input and parameter gradients)."""

from __future__ import annotations

import pytest
import torch

from benchmarks._bare import BARE, bare_call
from benchmarks.norms import build_layer, make_case


def _grads(fn, layer, X: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, ...]:
    layer.zero_grad(set_to_none=True)
    x = X.clone().requires_grad_()
    y = fn(x)
    (y * G).sum().backward()
    return y.detach(), x.grad, layer.weight.grad, layer.shift.grad


def _sym(g: torch.Tensor) -> torch.Tensor:
    return 0.5 * (g + g.mT)


@pytest.mark.parametrize("name", sorted(BARE))
@pytest.mark.parametrize("size", [(5, 7), (20, 32)])
def test_bare_formula_equals_the_layer(name: str, size: tuple[int, int]) -> None:
    n, N = size
    feats, X, G = make_case(name, n, N)
    layer = build_layer(name, feats, None, torch.float64)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a bias away from the identity and a dispersion away from one
        A = torch.randn(n, n, generator=gen, dtype=torch.float64)
        layer.weight.copy_(A @ A.T / n + torch.eye(n, dtype=torch.float64))
        layer.shift.fill_(1.7)
    twin = bare_call(name, layer)
    assert twin is not None
    fn, stats = twin
    for step in range(2):  # the second step starts from the running statistics the first one left
        X2 = X if step == 0 else X.flip(0) @ X.flip(0) / n + torch.eye(n, dtype=X.dtype)
        bare = _grads(fn, layer, X2, G)
        ours = _grads(layer, layer, X2, G)
        for what, a, b in zip(("output", "input grad", "weight grad", "shift grad"), bare, ours, strict=True):
            a, b = (a, b) if what in ("output", "shift grad") else (_sym(a), _sym(b))
            err = float((a - b).norm() / b.norm())
            assert err < 1e-12, f"{name} step {step} {what}: relative error {err:.1e}"
        # the bare step keeps its running mean in the codomain, as the layer's running_mean_phi
        for what, a, b in (("running mean", stats["R"], layer.running_mean_phi), ("running var", stats["r"],
                                                                                  layer.running_var)):
            err = float((a - b).norm() / b.norm())
            assert err < 1e-12, f"{name} step {step} {what}: relative error {err:.1e}"


def test_bare_formula_declines_settings_it_does_not_cover() -> None:
    from manifoldnorm.nn import create_norm_layer

    assert bare_call("liebn_crim", create_norm_layer("liebn_crim", 4)) is None
    assert bare_call("liebn_aim", create_norm_layer("liebn_aim", 4, theta=0.5)) is None
    assert bare_call("liebn_lem", create_norm_layer("liebn_lem", 4, karcher_steps=2)) is None
    assert bare_call("liebn_lcm", create_norm_layer("liebn_lcm", 4, detach_var=True)) is None
    assert bare_call("liebn_lcm", create_norm_layer("liebn_lcm", 4)) is not None


def test_the_verdict_names_the_bare_formula_when_it_stops_a_target() -> None:
    from benchmarks.norms import _targets_cell

    row = {"floor_ok": False, "old_target": 0.6, "old_met": False, "bare_over_old": 0.8}
    assert _targets_cell(row) == "floor ≤1.5×: not met; new/old ≤0.6×: not met, below the bare formula (0.80× old)"
    row["bare_over_old"] = 0.5  # the formula alone would meet it: the layer's own overhead is what misses it
    assert _targets_cell(row) == "floor ≤1.5×: not met; new/old ≤0.6×: not met"
    row.update(old_met=True, bare_over_old=0.8)
    assert _targets_cell(row).endswith("new/old ≤0.6×: met")


def test_breakdown_times_each_variant_and_restores_every_safeguard() -> None:
    import time

    import manifoldnorm.functional as mf
    import manifoldnorm.functional._liebn_ops as ops
    import manifoldnorm.functional.spd_aim as spd_aim
    from benchmarks._breakdown import SWITCHES, breakdown

    before = (mf.check_finite, ops._check_domain, ops._check_grad, ops.anchor_inputs,
              ops._spread_rules_out_degenerate, spd_aim._check_domain)
    feats, X, G = make_case("liebn_aim", 5, 8)
    layer = build_layer("liebn_aim", feats, None, torch.float64)
    rows = breakdown("liebn_aim", layer, X, G, rounds=2, clock=time.process_time)
    assert [r["variant"] for r in rows] == ["layer", *SWITCHES, "bare formula"]
    by = {r["variant"]: r for r in rows}
    assert by["layer"]["saved_ms"] == 0.0 and by["bare formula"]["over_bare"] == 1.0
    for r in rows:
        assert r["ms"] > 0 and r["over_bare"] == pytest.approx(r["ms"] / by["bare formula"]["ms"], abs=2e-3)
    # every switched-off part is back: the same functions, no instance override, and the checks still fire
    assert before == (mf.check_finite, ops._check_domain, ops._check_grad, ops.anchor_inputs,
                      ops._spread_rules_out_degenerate, spd_aim._check_domain)
    assert "_update_stats" not in layer.__dict__
    bad = X.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer(bad)


def test_breakdown_command_writes_its_report(tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "bd.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "norms", "--breakdown", "--quick", "--norms",
                           "liebn_lcm", "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["mode"] == "breakdown" and {r["norm"] for r in data["rows"]} == {"liebn_lcm"}
    assert "| liebn_lcm | 16 | 32 | no statistics update |" in proc.stdout
