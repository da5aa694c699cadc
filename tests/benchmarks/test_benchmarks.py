"""The benchmark suites run (``python -m benchmarks <suite> --quick``) and write reports whose numbers hold together.

No timing targets here (they live in the suites): the tests check what a run must get right whatever the
machine's speed: the rows are the registry-derived lists, ratios are the quotients they claim to be, gradients
match their references, times are finite and positive.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks._traffic import modelled_norms

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str, timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m benchmarks <args>`` from the repository root; fails the test with its stderr on an error."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def report(path: Path, suite: str) -> dict:
    data = json.loads(path.read_text())
    assert data["suite"] == suite and data["torch"]
    return data


def positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_lists_the_suites_and_refuses_an_unknown_one() -> None:
    from benchmarks import suites

    assert suites() == ["flagship", "guard", "layers", "norms", "optim", "scale", "spectral", "step", "sweep"]
    listed = bench("--help").stdout
    assert all(f"  {name} " in listed for name in suites())
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "spectrall"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "unknown suite 'spectrall'" in proc.stderr


@pytest.mark.parametrize("suite", ["sweep", "optim", "scale", "guard", "step", "flagship"])
def test_long_suites_parse_their_options(suite: str) -> None:
    """The suites too long for a test start and know their options (each also runs as ``-m benchmarks.<suite>``)."""
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{suite}", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert f"usage: python -m benchmarks {suite}" in out and "--out" in out


# -------------------------------------------------------------------------------------------- spectral
def test_spectral_quick(tmp_path: Path) -> None:
    from benchmarks.spectral import IMPLS

    out = tmp_path / "spectral.json"
    proc = bench("spectral", "--quick", "--out", str(out))
    assert "| n | N | dtype | impl | fwd+bwd ms (median CPU) | × ours |" in proc.stdout
    rows = report(out, "spectral")["rows"]
    assert [r["impl"] for r in rows] == list(IMPLS) == ["ours", "eigh_autograd", "svd_loop"]
    for r in rows:
        assert (r["op"], r["n"], r["N"], r["dtype"], r["threads"]) == ("logm", 20, 32, "float64", 1)
        assert positive(r["ms"])
        assert r["grad_rel_err_vs_ours_f64"] < 1e-10, r  # every contender computes the same gradient
    finite = {r["impl"]: r["finite_grad_at_2I"] for r in rows}
    assert finite["ours"] and not finite["eigh_autograd"]  # the Daleckii–Krein backward survives ties


# ----------------------------------------------------------------------------------------------- norms
def ratio_of(row: dict, num: str, den: str, key: str) -> float:
    """``row[key]``, checked to be the positive, finite quotient of the row's own ``num`` and ``den`` times."""
    assert positive(row[num]) and positive(row[den]) and positive(row[key]), row
    assert row[key] == pytest.approx(row[num] / row[den], abs=2e-3)
    return row[key]


def test_norms_quick(tmp_path: Path) -> None:
    from benchmarks.norms import FLOOR_TARGET, default_norms
    from manifoldnorm.nn import create_norm_layer, get_norm_info, list_norms

    out = tmp_path / "norms.json"
    proc = bench("norms", "--quick", "--out", str(out))
    assert ("| norm | n | N | dtype | threads | ms | ref ms | ours/ref | bare ms | ours/bare | floor ms | ours/floor | "
            "decomp. calls / matrices | + products ms | ours/(+ products) | + dispatch ms | (+ dispatch)/floor | "
            "ours/(+ dispatch) | products / ATen ops | out rel err |") in proc.stdout
    assert "published ms, other day/machine (source)" in proc.stdout and "old ms" not in proc.stdout
    data = report(out, "norms")
    assert data["against"] is None and data["floor_target"] == FLOOR_TARGET
    rows = data["rows"]
    expected = {k for k in list_norms(kind="spd") + list_norms(kind="lie") if not get_norm_info(k).domain_aware}
    assert {r["norm"] for r in rows} == expected == set(default_norms())
    assert {"liebn_aim", "spdbn", "gbwbn", "liebn_so3"} <= expected and "spddsmbn" not in expected
    assert len(rows) == 2 * len(expected)  # float64 and float32, one size, one thread
    for r in rows:
        assert (r["n"], r["N"], r["threads"], r["domains"], r["rounds"]) == (16, 32, 1, None, 5)
        # every ratio is a quotient of two times of the same row of this run
        ratio_of(r, "ms", "ref_ms", "ours_over_ref")
        floor = ratio_of(r, "ms", "floor_ms", "ours_over_floor")
        assert r["floor_ok"] == (floor <= FLOOR_TARGET)
        ratio_of(r, "ms", "floor_prod_ms", "ours_over_floor_prod")
        ratio_of(r, "ms", "floor_eager_ms", "ours_over_floor_eager")
        ratio_of(r, "floor_eager_ms", "floor_ms", "floor_eager_over_floor")
        if r["norm"] in ("liebn_lcm", "liebn_lem", "liebn_aim"):  # the bare formula, timed in the same run
            ratio_of(r, "ms", "bare_ms", "ours_over_bare")
        else:
            assert r["bare_ms"] is r["ours_over_bare"] is None
        assert r["bare_over_old"] is None
        dec = r["decompositions"]
        # the higher floors replay more calls: decompositions <= + products <= + dispatch <= every ATen call
        assert dec["calls"] + r["products"] <= r["aten_ops"]
        assert dec["calls"] == sum(dec["by_kind"].values()) == sum(dec["shapes"].values()) > 0
        assert dec["matrices"] >= dec["calls"]
        assert r["old_ms"] is r["new_over_old"] is r["old_target"] is r["old_met"] is None
        assert r["published_ms"] is None and r["published_source"] is None  # nothing published at 16x32
        assert not {"ratio", "target", "met"} & set(r)  # no verdict against another day's numbers
    for name in ("liebn_aim", "liebn_lem", "spdbn", "spdmbn", "gbwbn"):  # eigh layers: eigh in forward+backward
        assert all(r["decompositions"]["by_kind"].get("eigh", 0) > 0 for r in rows if r["norm"] == name)
    assert {o["norm"] for o in data["overhead"]} == expected
    assert all(positive(o["ms_validate_false"]) and positive(o["ms_validate_true"]) for o in data["overhead"])
    # accuracy against forward_ref wherever a layer has one (required for LieBN)
    for name in sorted(expected):
        feats = 5 if "so3" in get_norm_info(name).inputs else 16
        has_ref = callable(getattr(create_norm_layer(name, feats), "forward_ref", None))
        assert has_ref or not name.startswith("liebn_"), f"{name} has no forward_ref"
        for r in (r for r in rows if r["norm"] == name):
            if not has_ref:
                assert r["out_rel_err"] is None and r["grad_rel_err"] is None
                continue
            tol = 1e-6 if r["dtype"] == "float64" else 1e-3
            assert r["out_rel_err"] < tol and r["grad_rel_err"] < tol, r


def test_norms_against_a_tree_and_with_domains(tmp_path: Path) -> None:
    """``--against <repository root>``: the same layers in a worker process; ``--domains 9``: domain-aware rows."""
    from benchmarks.norms import old_target

    out = tmp_path / "norms.json"
    proc = bench("norms", "--quick", "--dtypes", "float64", "--norms", "liebn_lcm", "liebn_aim", "dsliebn_lem",
                 "--domains", "9", "--against", str(ROOT), "--out", str(out))
    assert f"| old ms ({ROOT}) | new/old | bare/old | old decomp. |" in proc.stdout
    data = report(out, "norms")
    assert Path(data["against"]["tree"]) == ROOT and not data["against"]["worktree"]
    assert Path(data["against"]["manifoldnorm"]) == ROOT / "manifoldnorm"
    rows = {r["norm"]: r for r in data["rows"]}
    assert list(rows) == ["liebn_lcm", "liebn_aim", "dsliebn_lem"]
    assert rows["dsliebn_lem"]["domains"] == 9 and rows["liebn_aim"]["domains"] is None
    # one thread: this process and the worker share one CPU (none pinned where there is only one)
    assert all(r["cpus"] == ([min(os.sched_getaffinity(0))] if len(os.sched_getaffinity(0)) > 1 else None)
               for r in rows.values())
    for name, r in rows.items():
        ratio = ratio_of(r, "ms", "old_ms", "new_over_old")
        ratio_of(r, "ms", "ref_ms", "ours_over_ref")
        ratio_of(r, "ms", "floor_ms", "ours_over_floor")
        if name == "dsliebn_lem":  # no bare formula for a domain-aware layer
            assert r["bare_ms"] is r["bare_over_old"] is None
        else:
            ratio_of(r, "bare_ms", "old_ms", "bare_over_old")
        dec = r["decompositions"]  # the same tree: the worker counts the same decompositions
        assert r["old_decompositions"] == {"calls": dec["calls"], "matrices": dec["matrices"]} and r["old_note"] is None
        assert r["old_target"] == old_target(name, 16)
        assert r["old_met"] == (None if r["old_target"] is None else ratio <= r["old_target"])
        assert r["out_rel_err"] < 1e-6 and r["grad_rel_err"] < 1e-6, r  # dsliebn_lem: per-domain twin reference
    assert rows["liebn_lcm"]["old_target"] == 0.6 and rows["dsliebn_lem"]["old_target"] is None
    # 9 domains in one batched step: fewer decomposition calls than domains
    assert 0 < rows["dsliebn_lem"]["decompositions"]["calls"] < 9 and rows["liebn_aim"]["decompositions"]["calls"] > 0


def test_norms_tables_of_the_docs_are_the_saved_report(capsys: pytest.CaptureFixture) -> None:
    """docs/benchmarks.md shows the norms table and its per-norm summary as printed again from
    docs/bench/bench_norms.json (``--from-json``): a hand-edited cell or a stale table fails here."""
    from benchmarks.norms import main

    main(["--from-json", str(ROOT / "docs" / "bench" / "bench_norms.json")])
    stdout = capsys.readouterr().out
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| norm |")]
    assert len(lines) > 100 and any(ln.startswith("| liebn_lcm |") for ln in lines)
    missing = [ln for ln in lines if ln not in docs]
    assert not missing, f"{len(missing)} rows of the saved norms report not in docs/benchmarks.md: {missing[:3]}"
    assert "| norm | new/old | ours/bare | bare/old |" in stdout
    # and the breakdown of ours/bare (its per-size summary)
    main(["--from-json", str(ROOT / "docs" / "bench" / "bench_norms_breakdown.json")])
    pivot = capsys.readouterr().out.strip().split("\n\n")[-1].splitlines()[2:]
    assert len(pivot) == 6 and all(ln in docs for ln in pivot), pivot


def test_norms_from_json_refuses_what_is_not_a_norms_report(tmp_path: Path) -> None:
    for text, what in (('{"suite": "optim", "rows": []}', "not a report of the norms suite"),
                       ("not json", "cannot read a JSON report")):
        path = tmp_path / "r.json"
        path.write_text(text)
        proc = subprocess.run([sys.executable, "-m", "benchmarks", "norms", "--from-json", str(path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and what in proc.stderr and "Traceback" not in proc.stderr


def test_norms_other_tree_answers_n_a_for_what_it_lacks() -> None:
    """A norm the other tree does not know, or a keyword its layer does not take, is an answer, not a crash."""
    import torch

    from benchmarks.norms import OtherTree, make_case

    feats, X, G = make_case("liebn_lem", 4, 6)
    with OtherTree(str(ROOT)) as other:
        missing = other.setup("no_such_norm", feats, X, G, None, None, torch.float64, 1)
        assert not missing["ok"] and "no_such_norm" in missing["error"]
        ok = other.setup("liebn_lem", feats, X, G, None, None, torch.float64, 1)
        assert ok["ok"] and ok["dropped"] == [] and ok["calls"] > 0 and positive(other.step())
        req = {"op": "setup", "norm": "liebn_lem", "features": feats, "inputs": str(other.tmp / "inputs.pt"),
               "dtype": "float64", "threads": 1, "seed": 0, "kwargs": {"validate": False, "no_such_kw": 1}}
        assert not other.request(req)["ok"]
        assert other.request({**req, "optional": ["no_such_kw"]})["dropped"] == ["no_such_kw"]


def test_norms_floor_replays_the_recorded_decompositions() -> None:
    """The floor replays each recorded call with its kind, shape and dtype (values-only calls as values only)."""
    import torch

    from benchmarks.norms import floor_calls, record_decompositions, summarize_decompositions

    A = torch.randn(5, 4, 4, dtype=torch.float64)
    A = A @ A.mT + torch.eye(4, dtype=torch.float64)

    def step() -> None:
        torch.linalg.eigh(A)
        torch.linalg.eigvalsh(A[:2])
        torch.linalg.cholesky(A.float())
        torch.linalg.svd(A[0, :3])
        torch.linalg.det(A)

    calls = record_decompositions(step)
    assert [(c["kind"], c["shape"], c["dtype"], c["values_only"]) for c in calls] == [
        ("eigh", [5, 4, 4], "float64", False), ("eigh", [2, 4, 4], "float64", True),
        ("cholesky", [5, 4, 4], "float32", False), ("svd", [3, 4], "float64", False),
        ("lu", [5, 4, 4], "float64", False)]
    assert summarize_decompositions(calls)["matrices"] == 5 + 2 + 5 + 1 + 5
    replay = floor_calls(calls)
    assert [f.func for f in replay] == [torch.linalg.eigh, torch.linalg.eigvalsh, torch.linalg.cholesky_ex,
                                        torch.linalg.svd, torch.linalg.lu_factor_ex]
    assert [tuple(f.args[0].shape) for f in replay] == [tuple(c["shape"]) for c in calls]
    assert replay[2].args[0].dtype == torch.float32
    for f in replay:
        f()


def test_norms_published_times_are_only_shown_beside() -> None:
    import torch

    from benchmarks.norms import PUBLISHED, PUBLISHED_SOURCES, published

    assert set(PUBLISHED_SOURCES) == {k for sizes in PUBLISHED.values() for k in sizes}
    assert published("liebn_lcm", 20, 32, torch.float64, 1) == (1.2, "LieBN toolbox (Chen et al. 2024)")
    assert published("liebn_lcm", 20, 32, torch.float32, 1) == (None, None)
    assert published("liebn_lcm", 20, 32, torch.float64, 2) == (None, None)
    assert published("liebn_lcm", 16, 32, torch.float64, 1) == (None, None)


# ---------------------------------------------------------------------------------------------- layers
def test_layer_norms_are_the_parametrized_activation_norms() -> None:
    from benchmarks.layers import layer_norms
    from manifoldnorm.nn import get_norm_info, list_norms

    names = layer_norms()
    assert names == sorted(names) and {"layernorm", "rmsnorm", "dyt", "batchnorm"} <= set(names)
    left_out = set(list_norms(kind="euclidean")) - set(names)
    assert left_out == {"none", "ngpt_norm", "weight_norm", "weight_std", "spectral_norm"}
    assert all("euclidean" in get_norm_info(k).inputs for k in names)


def test_layers_quick(tmp_path: Path) -> None:
    from benchmarks.layers import BASELINES, layer_norms

    out = tmp_path / "layers.json"
    proc = bench("layers", "--quick", "--out", str(out))
    assert "| torch_layer_norm | " in proc.stdout
    data = report(out, "layers")
    assert data["threads"] == 1
    rows = data["rows"]
    assert [r["norm"] for r in rows] == [*BASELINES, *layer_norms()]
    base = {b: next(r["ms"] for r in rows if r["norm"] == b) for b in BASELINES}
    for r in rows:
        assert (r["width"], r["tokens"], r["dtype"]) == (64, 256, "float32") and positive(r["ms"])
        assert r["x_layernorm"] == pytest.approx(r["ms"] / base["torch_layer_norm"], rel=1e-12)
        assert r["x_rmsnorm"] == pytest.approx(r["ms"] / base["torch_rms_norm"], rel=1e-12)


# ----------------------------------------------------------------------------------------------- sweep
@pytest.mark.slow  # long: CI runs it in the bounded `-m slow` step
def test_sweep_quick(tmp_path: Path) -> None:
    """The sweep pipeline end to end (seconds-long runs: a smoke test, not a result)."""
    from benchmarks.sweep import EXPERIMENTS, SWEEP_NORMS
    from manifoldnorm.nn import list_norms

    assert {n for ns in SWEEP_NORMS.values() for n in ns} <= set(list_norms(kind="euclidean"))
    out = tmp_path / "sweep.json"
    bench("sweep", "--quick", "--norms", "layernorm", "none", "--out", str(out), timeout=600)
    data = report(out, "sweep")
    assert data["seeds"] == [0] and data["quick"]
    rows = data["rows"]
    assert [(r["experiment"], r["norm"]) for r in rows] == [
        (e, n) for e in ("lm_char", "cnn_digits") for n in ("layernorm", "none")]
    for r in rows:
        metric, _, test_metric = EXPERIMENTS[r["experiment"]]
        high = 8.0 if r["experiment"] == "lm_char" else 1.0
        assert (r["metric"], r["test_metric"], r["seeds"]) == (metric, test_metric, 1)
        assert 0.0 < r["final"][0] <= high and r["final"][1] == 0.0 and r["test"] is not None and r["steps"] > 0
        runs = [x for x in data["runs"] if (x["experiment"], x["norm"]) == (r["experiment"], r["norm"])]
        assert r["final"][0] == runs[0]["curves"][metric][-1][1]  # the row summarizes its run
    for run in data["runs"]:  # the curves the plot is drawn from
        key = EXPERIMENTS[run["experiment"]][0]
        assert len(run["curves"][key]) == 2  # two validation epochs
    png = tmp_path / "sweep.png"
    assert data["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------- optim
def test_optim_compares_adamw_and_every_matrix_optimizer() -> None:
    from benchmarks.optim import VARIANTS, compared_optimizers, matrix_optimizers
    from manifoldnorm.optim import list_optimizers

    assert compared_optimizers() == ["adamw", "muon", "normuon_original", "normuon_match_rms", "conda", "sinkgd",
                                     "adamp"]
    assert set(matrix_optimizers()) <= set(list_optimizers())
    assert set(matrix_optimizers()) | {"adamw", "adamp"} == {v.config for v in VARIANTS}
    for v in VARIANTS:
        assert (ROOT / "conf" / "optimizer" / f"{v.config}.yaml").is_file()
        assert v.group in ("matrix", "rest") and len(v.lrs) == 3
    rows = {v.name: v for v in VARIANTS}
    assert rows["normuon_original"].extra == ("optimizer.matrix.adjust_lr_fn=original",)
    assert rows["normuon_match_rms"].extra == ("optimizer.matrix.adjust_lr_fn=match_rms_adamw",)


def test_optim_step_only_reports_side_by_side_ratios(tmp_path: Path) -> None:
    """``--step-only --quick``: every (matrix set, precision, optimizer) row once, ratios are the quotients of the
    same run's medians (ours / torch.optim.Muon's bf16 step, NorMuon / our Muon at the same precision)."""
    from benchmarks.optim import NS_OPTIMIZERS, NS_PRECISIONS, SYNTHETIC_SHAPES, TORCH_MUON

    out = tmp_path / "step.json"
    proc = bench("optim", "--step-only", "--quick", "--out", str(out))
    data = report(out, "optim")
    assert data["mode"] == "step_only" and data["rounds"] == 3
    sets = list(dict.fromkeys(r["matrices"] for r in data["rows"]))
    assert len(sets) == 2 and len(data["rows"]) == 2 * (2 * len(NS_OPTIMIZERS) - 1)
    synthetic = next(r for r in data["rows"] if r["matrices"] == sets[0])
    assert [tuple(s) for s in synthetic["shapes"]] == list(SYNTHETIC_SHAPES)
    for label in sets:
        rows = {(r["ns_dtype"], r["optimizer"]): r for r in data["rows"] if r["matrices"] == label}
        assert set(rows) == {(d, n) for d in NS_PRECISIONS for n in NS_OPTIMIZERS
                             if n != TORCH_MUON or d == "bfloat16"}
        torch_ms = rows[("bfloat16", TORCH_MUON)]["step_ms"]
        for (dtype, _), r in rows.items():
            assert positive(r["step_ms"])
            assert math.isclose(r["vs_torch"], r["step_ms"] / torch_ms, rel_tol=1e-12)
            assert math.isclose(r["vs_muon"], r["step_ms"] / rows[(dtype, "Muon")]["step_ms"], rel_tol=1e-12)
    assert "vs torch.optim.Muon (bf16)" in proc.stdout and "NorMuon (match_rms_adamw)" in proc.stdout



def test_optim_lr_ladder_and_bracketing_rule() -> None:
    from benchmarks.optim import bracket, ladder_index, ladder_value

    assert [ladder_value(i) for i in range(-6, -2)] == [1e-3, 3e-3, 1e-2, 3e-2]
    assert all(ladder_value(ladder_index(x)) == x for x in (1e-5, 3e-4, 1e-3, 0.3, 1.0, 3.0))
    grid = (1e-3, 3e-3, 1e-2)
    assert bracket({}, grid).needed == grid
    assert bracket({1e-3: 2.0}, grid).needed == (3e-3, 1e-2)
    inside = bracket({1e-3: 2.0, 3e-3: 1.5, 1e-2: 1.7}, grid)
    assert (inside.needed, inside.best, inside.bracketed, inside.below, inside.above) == ((), 3e-3, True, 1e-3, 1e-2)
    edge = bracket({1e-3: 2.0, 3e-3: 1.8, 1e-2: 1.7}, grid)  # best at the upper edge: extended upwards
    assert (edge.needed, edge.best, edge.bracketed) == ((3e-2,), 1e-2, False)
    diverged = bracket({1e-3: 2.0, 3e-3: 1.8, 1e-2: 1.7, 3e-2: float("inf")}, grid)  # diverging is worse
    assert (diverged.needed, diverged.best, diverged.bracketed, diverged.above) == ((), 1e-2, True, 3e-2)
    falling = {1e-3: 2.0, 3e-3: 1.9, 1e-2: 1.8, 3e-2: 1.7, 0.1: 1.6}
    capped = bracket(falling, grid, max_extend=2)  # 2 points beyond the grid at most: not bracketed
    assert (capped.needed, capped.best, capped.bracketed, capped.below, capped.above) == ((), 0.1, False, 3e-2, None)
    assert bracket(falling, grid, max_extend=3).needed == (0.3,)


def _simulate(best_lr: float, best_wd: float, seeds=(0, 1, 2)) -> tuple[dict, dict]:  # noqa: ANN001
    """The study's plan to its end with a made-up loss: a parabola in log10(lr) per weight decay."""
    import math

    from benchmarks.optim import BY_NAME, Key, plan

    results: dict = {}
    while True:
        needed, choice = plan(BY_NAME["muon"], results, list(seeds))
        if choice is not None:
            return results, choice
        assert needed and not set(needed) & set(results)
        for k in needed:
            shift = 0.0 if k.wd == best_wd else 0.05
            loss = 1.5 + (math.log10(k.lr) - math.log10(best_lr)) ** 2 + shift + 0.001 * k.seed
            assert isinstance(k, Key)
            results[k] = {"curves": {"val/loss": [(10, 3.0), (20, loss)]}, "diverged": False}


def test_optim_plan_brackets_then_searches_weight_decay_then_seeds() -> None:
    from benchmarks.optim import WD_GRID, WD_LR_SEARCH, Key

    results, choice = _simulate(best_lr=0.3, best_wd=WD_LR_SEARCH)  # far above muon's grid 3e-3..3e-2
    assert (choice["lr"], choice["weight_decay"], choice["bracketed"]) == (0.3, WD_LR_SEARCH, True)
    assert (choice["lr_bracket"]["below"], choice["lr_bracket"]["above"]) == (0.1, 1.0)
    assert set(choice["wd_search"]) == {f"{w:g}" for w in WD_GRID} and choice["lr_search_at_wd"] is None
    assert len(results) == 3 + 3 + (len(WD_GRID) - 1) + 2  # grid, 3 extensions, other decays, seeds 1 and 2
    assert {k.seed for k in results if (k.lr, k.wd) == (0.3, WD_LR_SEARCH)} == {0, 1, 2}
    # another weight decay wins: the lr bracket is searched again at it, the seeds run there
    results, choice = _simulate(best_lr=1e-2, best_wd=0.1)
    assert (choice["lr"], choice["weight_decay"], choice["bracketed"]) == (1e-2, 0.1, True)
    assert choice["lr_search_at_wd"] == {"0.003": choice["lr_bracket"]["below_loss"], "0.01": choice["lr_bracket"][
        "chosen_loss"], "0.03": choice["lr_bracket"]["above_loss"]}
    assert len(results) == 3 + (len(WD_GRID) - 1) + 2 + 2
    assert Key("muon", 1e-2, 0.1, 2) in results


@pytest.mark.slow  # long: CI runs it in the bounded `-m slow` step
def test_optim_quick_runs_resumes_and_resummarizes(tmp_path: Path) -> None:
    """Two rows through launch/train.py (seconds-long runs), run again from the cache, re-summarized from JSON."""
    from benchmarks.optim import THRESHOLDS

    out = tmp_path / "optim.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "WANDB_", "SLURM_"))}
    env["MANIFOLDNORM_CACHE"] = str(tmp_path / "cache")
    args = ("optim", "--quick", "--optimizers", "adamw", "normuon_original", "--repeats", "2", "--out", str(out))
    proc = bench(*args, env=env)
    assert "| optimizer | lr: below / **chosen** / above" in proc.stdout
    data = report(out, "optim")
    assert data["quick"] and data["experiment"] == "lm_corpus" and data["cached_runs"] == 0
    assert data["tokens_per_step"] == 4 * 16 and data["corpus"]["source"] == "pydoc"
    rows = {r["optimizer"]: r for r in data["rows"]}
    assert list(rows) == ["adamw", "normuon_original"]
    for name, r in rows.items():
        assert (r["lr"], r["weight_decay"], r["seeds"]) == ({"adamw": 3e-3, "normuon_original": 3e-2}[name], 0.01, 1)
        assert 0 < r["final_val_loss"] < 8 and 0 < r["final_train_loss"] < 8 and r["total_steps"] == 7
        assert set(r["to_threshold"]) == {f"{t:g}" for t in THRESHOLDS}
        assert positive(r["step_ms"]) and positive(r["fwd_bwd_ms"]) and 0 < r["step_share"] < 1
    assert rows["adamw"]["step_ratio"] == pytest.approx(1.0)
    assert rows["adamw"]["speedup"] == pytest.approx(1.0)  # AdamW against its own final loss
    assert rows["adamw"]["reference_final_val"] == pytest.approx(rows["adamw"]["final_val_loss"])
    assert rows["normuon_original"]["matrix_state_bytes_per_param"] > 0
    runs = {(r["optimizer"], r["seed"]): r for r in data["runs"]}
    assert runs[("adamw", 0)]["overrides"][:4] == ["optimizer=adamw", "optimizer.rest.lr=0.003",
                                                   "optimizer.rest.weight_decay=0.01", "data.source=pydoc"]
    assert all(len(r["curves"]["val/loss"]) == 2 and len(r["curves"]["train/loss_epoch"]) == 2 for r in data["runs"])
    assert Path(data["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "again.json"  # the same runs directory: nothing is trained again
    bench(*args[:-1], str(tmp_path / "optim.json"), env=env)
    data2 = report(out, "optim")
    assert data2["cached_runs"] == 2 and data2["runs"] == data["runs"]
    bench("optim", "--from-json", str(out), "--out", str(again), env=env)
    for r, old in zip(report(again, "optim")["rows"], data2["rows"], strict=True):
        for key in ("optimizer", "lr", "weight_decay", "final_val_loss", "to_threshold", "speedup", "step_ratio"):
            assert r[key] == old[key], key


def test_optim_a_failing_run_stops_the_study_and_is_not_cached(tmp_path: Path) -> None:
    from benchmarks.optim import Key, run_dir, run_one

    key = Key("adamw", 3e-3, 0.01, 0)
    with pytest.raises(RuntimeError, match=r"run Key\(name='adamw'.*failed"):
        run_one(key, tmp_path, ["optimizer=no_such_optimizer"], threads=1)
    assert not (run_dir(tmp_path, key) / "result.json").exists()


@pytest.mark.parametrize("report_name", ["bench_optim_corpus.json", "bench_optim_small.json"])
def test_optim_tables_of_the_docs_are_the_saved_reports(report_name: str) -> None:
    """docs/benchmarks.md shows each study's table as summarized again from its saved report (runs, choices,
    step costs): a changed summary or a hand-edited cell fails here."""
    from benchmarks.optim import _resummarize, markdown

    report = ROOT / "docs" / "bench" / report_name
    rows = _resummarize(report, {})
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    lines = [ln for ln in markdown(rows).splitlines() if ln.startswith("| ") and not ln.startswith("| optimizer")]
    assert len(lines) == 7
    missing = [ln for ln in lines if ln not in docs]
    assert not missing, f"rows of {report_name} not in docs/benchmarks.md: {missing}"
    saved = json.loads(report.read_text())
    for r, old in zip(rows, saved["rows"], strict=True):
        assert r["final_val_loss"] == old["final_val_loss"] and r["speedup"] == old["speedup"], r["optimizer"]


def test_optim_cost_only_measures_both_newton_schulz_precisions_in_one_run(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    proc = bench("optim", "--cost-only", "--quick", "--optimizers", "adamw", "muon", "sinkgd",
                 "--ns-dtypes", "bfloat16", "float32", "--out", str(out))
    data = report(out, "optim")
    assert data["mode"] == "cost_only" and data["ns_dtypes"] == ["bfloat16", "float32"]
    assert set(data["cpu"]) == {"model", "logical_cores", "capability", "bf16_instructions"}
    rows = {r["optimizer"]: r for r in data["rows"]}
    # only the Newton-Schulz row is split by precision; AdamW is the denominator of the same run
    assert list(rows) == ["adamw", "muon (ns bfloat16)", "muon (ns float32)", "sinkgd"]
    assert rows["adamw"]["step_ratio"] == 1.0
    for r in rows.values():
        assert positive(r["step_ms"]) and 0.0 < r["step_share"] < 1.0
        assert math.isclose(r["step_ratio"], r["step_ms"] / rows["adamw"]["step_ms"])
    assert rows["muon (ns float32)"]["matrix_state_bytes_per_param"] == pytest.approx(4.0, rel=0.01)
    assert "| muon (ns float32) |" in proc.stdout


def test_optim_ns_dtypes_outside_cost_only_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "optim", "--dry-run", "--ns-dtypes", "float32",
                           "--out", str(tmp_path / "o.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--ns-dtypes applies to --cost-only only" in proc.stderr


def test_optim_refuses_the_old_lm_char_report(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "optim", "--from-json",
                           str(ROOT / "docs" / "bench" / "bench_optim.json"), "--out", str(tmp_path / "o.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "not a report of this study" in proc.stderr


def test_optim_dry_run_counts_the_runs(tmp_path: Path) -> None:
    proc = bench("optim", "--dry-run", "--out", str(tmp_path / "o.json"))
    assert "7 rows" in proc.stdout and "runs: at least 49, typically ~70" in proc.stdout
    assert "0 already finished" in proc.stdout and " h, typically" in proc.stdout


def test_optim_dry_run_counts_the_finished_runs_of_runs_dir(tmp_path: Path) -> None:
    runs = tmp_path / "kept_runs"
    (runs / "adamw" / "lr0.003_wd0.01" / "seed0").mkdir(parents=True)
    (runs / "adamw" / "lr0.003_wd0.01" / "seed0" / "result.json").write_text("{}")
    proc = bench("optim", "--dry-run", "--runs-dir", str(runs), "--out", str(tmp_path / "o.json"))
    assert f"1 already finished in {runs}" in proc.stdout


# ----------------------------------------------------------------------------------------------- scale
class _OnePart:
    """The reducer of a batch "split" into a single part: the sum over parts is the tensor itself."""

    active = True

    def sum(self, t):  # noqa: ANN001, ANN201
        return t

    def max(self, t):  # noqa: ANN001, ANN201
        return t.detach().clone()


def test_scale_traffic_model_covers_synchronized_norms() -> None:
    from benchmarks._traffic import representative_norms, synchronized_norms
    from benchmarks.scale import SYNC_NORMS

    assert set(modelled_norms()) <= set(synchronized_norms())
    assert set(modelled_norms()) == {"liebn_aim", "liebn_crim", "liebn_lem", "liebn_lcm", "spdbn"}
    assert SYNC_NORMS == representative_norms() == ("liebn_aim", "liebn_lem", "spdbn")


@pytest.mark.parametrize("norm", modelled_norms())
@pytest.mark.parametrize(("n", "karcher_steps"), [(4, 1), (6, 3)])
def test_scale_traffic_model_matches_the_reductions_of_the_layer(norm: str, n: int, karcher_steps: int) -> None:
    """``sync_stats_traffic`` = the all-reduces a synchronized layer really issues (counted on the split path)."""
    import torch

    from benchmarks._traffic import count_sync_traffic, sync_stats_traffic
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
    from benchmarks._traffic import ring_allreduce_bytes

    assert ring_allreduce_bytes(1000, 1) == 0
    assert ring_allreduce_bytes(1000, 2) == 1000
    assert ring_allreduce_bytes(1000, 8) == 1750


@pytest.mark.slow
def test_scale_quick(tmp_path: Path) -> None:
    """1 vs 2 gloo processes through launch/train.py, sync_norm on/off, one layer on 2 processes (smoke run)."""
    from benchmarks._traffic import sync_stats_traffic
    from benchmarks.scale import CONFIGS, SYNC_NORMS

    out = tmp_path / "scale.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "WANDB_", "SLURM_"))}
    env["MANIFOLDNORM_CACHE"] = str(tmp_path / "cache")
    bench("scale", "--quick", "--out", str(out), timeout=600, env=env)
    data = report(out, "scale")
    assert data["quick"]
    rows = data["rows"]
    assert [(r["experiment"], r["config"]) for r in rows] == [("spd_eeg", "1p x 1t"), ("spd_eeg", "2p x 1t")]
    for r in rows:
        processes, threads, _ = CONFIGS[r["config"]]
        assert positive(r["samples_per_s"]) and positive(r["samples_per_s_median_step"])
        assert r["torch_threads"] == threads and r["global_batch"] == 8 * processes
        assert r["steps_per_s"] == pytest.approx(r["samples_per_s"] / r["global_batch"])
        assert r["x_1p1t"] == pytest.approx(r["samples_per_s_median_step"] / rows[0]["samples_per_s_median_step"])
    # the timer's accounting: every counted step is a full batch on every process
    for run in data["runs"]:
        assert run["steps"] == 15 and run["total_steps"] == 20
        assert run["samples"] == run["steps"] * 8 * run["world_size"]
        assert run["world_size"] == (1 if run.get("config") == "1p x 1t" else 2)
        assert len(run["seconds_per_rank"]) == run["world_size"] and run["seconds"] > 0
    # synchronized LEM LieBN in a real DDP run: the counted all-reduces are the predicted ones
    (sync,) = data["sync_training"]
    assert sync["norm"] == "liebn_lem" and sync["local_calls_per_step"] == 0
    assert positive(sync["local_samples_per_s"]) and positive(sync["sync_samples_per_s"])
    assert sync["sync_over_local"] == pytest.approx(sync["sync_samples_per_s"] / sync["local_samples_per_s"])
    want = sync_stats_traffic("liebn_lem", 16)
    assert (sync["sync_calls_per_step"], sync["sync_bytes_per_step"]) == (want["calls"], want["bytes"])
    layers = {r["norm"]: r for r in data["sync_layer"]}
    assert list(layers) == list(SYNC_NORMS)
    for name, r in layers.items():
        want = sync_stats_traffic(name, r["n"])
        assert (r["calls_per_step"], r["bytes_per_step"]) == (want["calls"], want["bytes"]) and r["predicted"] == want
        assert positive(r["local_ms"]) and positive(r["sync_ms"])
        assert r["overhead_ms"] == pytest.approx(r["sync_ms"] - r["local_ms"])
    assert set(data["allreduce_latency_us"]) == {"16", str(8 * (8 * 8 + 1))}  # quick: 8 x 8 matrices
    assert all(positive(us) for us in data["allreduce_latency_us"].values())
    (volume,) = data["comm_volume"]
    assert volume["grad_bytes"] == rows[0]["param_bytes"] and 4 * volume["params"] <= volume["grad_bytes"]
    assert volume["ring_bytes_per_process"]["2"] == volume["grad_bytes"]


# ----------------------------------------------------------------------------------------------- guard
@pytest.mark.slow
def test_guard_quick(tmp_path: Path) -> None:
    out = tmp_path / "guard.json"
    bench("guard", "--quick", "--out", str(out), timeout=600)
    data = json.loads(out.read_text())
    assert (data["experiment"], data["threads"], data["rounds"]) == ("spd_eeg", 1, 2)
    assert data["steps_per_arm"] == 2 * 18  # 2 rounds of 20 steps, the first 2 of each left out
    for arm in ("off", "on"):
        assert positive(data[f"step_ms_{arm}"]) and positive(data[f"cpu_step_ms_{arm}"])
    assert data["overhead_pct"] == pytest.approx(100 * (data["step_ms_on"] / data["step_ms_off"] - 1))
    assert positive(data["guard_check_us"])
    hook_s = data["guard_check_us"] / 1e6
    assert data["guard_check_pct_of_step"] == pytest.approx(1e5 * hook_s / data["cpu_step_ms_off"])


# ------------------------------------------------------------------------------------------------ step
@pytest.mark.slow
def test_step_quick(tmp_path: Path) -> None:
    """Bare vs Lightning step on a small flagship, interleaved, with the profiled breakdown (a smoke run)."""
    out = tmp_path / "step.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "WANDB_", "SLURM_"))}
    env["MANIFOLDNORM_CACHE"] = str(tmp_path / "cache")
    proc = bench("step", "--quick", "--override", "logger=none", "--out", str(out), timeout=600, env=env)
    assert "| arm | median step, wall (ms) |" in proc.stdout and "Lightning / bare" in proc.stdout
    data = report(out, "step")
    assert (data["threads"], data["epochs"], data["quick"], data["tree"]) == (1, 2, True, str(ROOT))
    rows = {r["arm"]: r for r in data["rows"]}
    assert set(rows) == {"bare", "lightning"} and rows["bare"]["steps"] == rows["lightning"]["steps"] > 0
    assert all(positive(r["wall_ms"]) and positive(r["cpu_ms"]) for r in rows.values())
    assert data["ratio_wall"] == pytest.approx(rows["lightning"]["wall_ms"] / rows["bare"]["wall_ms"])
    items = {r["item"]: r for r in data["breakdown"]}
    for work in ("model forward", "optimizer.step (the update itself)"):  # the model's work is attributed
        assert items[work]["model_work"] and positive(items[work]["ms_per_step"])
        assert items[work]["calls_per_step"] == pytest.approx(1.0)
    assert any(k.startswith("[Callback]NonFiniteGuard") for k in items)
    assert not any("_StepClock" in k for k in items)  # the measurement's own callback is left out
    assert sum(r["ms_per_step"] for r in data["breakdown"]) == pytest.approx(data["profiled_mean_ms"], rel=0.05)


# -------------------------------------------------------------------------------------------- flagship
def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_flagship_compares_with_a_worktree_or_a_path(tmp_path: Path, monkeypatch) -> None:
    """``--against``: a commit becomes a detached worktree in the temp dir (made once, then reused); a checkout
    path is used as it is; anything else is refused with one line."""
    from benchmarks import flagship

    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    (repo / "manifoldnorm").mkdir()
    (repo / "launch" / "train.py").write_text("print('old')\n")
    _git(tmp_path, "init", "-q", str(repo))
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "-m", "old")
    sha = _git(repo, "rev-parse", "HEAD")
    monkeypatch.setattr(flagship, "worktree_root", lambda: tmp_path / "worktrees")
    tree, what = flagship.resolve_tree(sha[:7], repo)
    assert what == sha and tree == tmp_path / "worktrees" / sha[:12]
    assert (tree / "launch" / "train.py").read_text() == "print('old')\n"
    assert flagship.resolve_tree(sha, repo) == (tree, sha)  # reused
    assert flagship.resolve_tree(str(repo), repo) == (repo.resolve(), str(repo.resolve()))
    with pytest.raises(SystemExit, match="neither a directory nor a commit"):
        flagship.resolve_tree("no-such-rev", repo)
    with pytest.raises(SystemExit, match="not a manifoldnorm checkout"):
        flagship.resolve_tree(str(tmp_path / "worktrees"), repo)
    assert flagship.FirstStepTimer.__name__ == "FirstStepTimer"  # the probe, by its documented name too


def test_flagship_table_is_the_median_of_each_tree() -> None:
    from benchmarks.flagship import LABELS, summarize

    runs = [{"arm": arm, "wall_s": w, "cpu_s": 2 * w, "peak_rss_mb": m, "startup_s": 4.0,
             "stack_import_s": 3.0, "test_bacc": 0.784}
            for arm, w, m in (("old", 90.0, 2100.0), ("old", 100.0, 2200.0), ("old", 200.0, 2100.0),
                              ("new", 40.0, 500.0), ("new", 50.0, 520.0), ("new", 45.0, 510.0))]
    rows = {r["measure"]: r for r in summarize(runs)}
    assert list(rows) == list(LABELS)
    assert (rows["wall_s"]["old"], rows["wall_s"]["new"]) == (100.0, 45.0)
    assert rows["wall_s"]["ratio"] == pytest.approx(0.45) and rows["wall_s"]["met"] is True
    assert rows["peak_rss_mb"]["met"] is True and rows["startup_s"]["met"] is True
    assert rows["test_bacc"]["ratio"] == 1.0 and rows["test_bacc"]["met"] is True
    assert rows["cpu_s"]["target"] is None and rows["cpu_s"]["met"] is None


@pytest.mark.slow
def test_flagship_quick(tmp_path: Path) -> None:
    """Two-epoch flagship runs of this checkout against itself (``--against`` a path: no worktree): the machinery
    end to end, the probe's start-up, and equal accuracy and bitwise equal weights of identical code."""
    out = tmp_path / "flagship.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "WANDB_", "SLURM_"))}
    proc = bench("flagship", "--quick", "--against", str(ROOT), "--cache-dir", str(tmp_path / "cache"),
                 "--override", "data.source_kwargs.n_subjects=3", "--out", str(out), timeout=1200, env=env)
    assert "| measure | old (median) | new (median) | new / old | target | met |" in proc.stdout
    data = report(out, "flagship")
    assert data["quick"] and data["runs"] == 1 and data["old_tree"] == data["new_tree"] == str(ROOT)
    assert data["overrides"] == ["trainer.max_epochs=2", "data.source_kwargs.n_subjects=3"]
    assert data["weights_identical"] == [True]
    runs = {r["arm"]: r for r in data["runs_detail"]}
    for r in runs.values():
        assert positive(r["wall_s"]) and positive(r["cpu_s"]) and positive(r["peak_rss_mb"])
        assert 0 < r["startup_s"] < r["wall_s"] and positive(r["train_s"]) and positive(r["test_s"])
        assert 0.25 < r["test_bacc"] <= 1.0
    rows = {r["measure"]: r for r in data["rows"]}
    assert rows["test_bacc"]["old"] == rows["test_bacc"]["new"] and rows["test_bacc"]["met"] is True
    assert rows["wall_s"]["ratio"] == pytest.approx(runs["new"]["wall_s"] / runs["old"]["wall_s"])
