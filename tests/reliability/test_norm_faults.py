"""Riemannian norm layers under numerical corners and bad input (issue 14): the test matrix is the registry.

* Every batch of two or more distinct matrices is normalized by the paper's formula (output dispersion
  :math:`s^2 v^2/(v^2+\\epsilon)`), however small its dispersion :math:`v^2` or scale; only a degenerate batch
  (one matrix, or all equal to working precision) falls back to the running variance.
* float16 / bfloat16 inputs work in every SPD norm and SPD layer (computed in float32 or more, returned in the
  input dtype).
* GBWBN reports overflow / underflow / non-finite parameters as such, never as an ``eigh`` failure.
* Domain ids are checked against the declared number of domains.

Dispersions are measured with the layer's own *refit* path (exact Fréchet mean, full Karcher / fixed-point flow,
no degenerate-batch rule) on a fresh layer, so the measure is independent of the training code path under test.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from conftest import concentrated_spd

from manifoldnorm import functional as mf
from manifoldnorm.functional.so3 import so3_exp
from manifoldnorm.nn import BiMap, LogEig, ReEig, create_norm_layer, get_norm_info, list_norms, refit_domain_norms

F64 = torch.float64
N_MAT = 3
SHIFT = 0.7
RIEMANNIAN = sorted(k for kind in ("spd", "lie") for k in list_norms(kind))
SPD_NORMS = [k for k in RIEMANNIAN if "spd" in get_norm_info(k).inputs]
DOMAIN_AWARE = [k for k in RIEMANNIAN if get_norm_info(k).domain_aware]


def _is_so3(key: str) -> bool:
    return "so3" in get_norm_info(key).inputs


def _layer(key: str, **kwargs) -> torch.nn.Module:
    accepted = inspect.signature(get_norm_info(key).factory).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    return create_norm_layer(key, 1 if _is_so3(key) else N_MAT, **kwargs)


def _scales_variance(key: str) -> bool:
    return hasattr(_layer(key), "eps")


VARIANCE_NORMS = [k for k in RIEMANNIAN if _scales_variance(k)]


def _batch(key: str, sigma: float, N: int = 8, seed: int = 0) -> torch.Tensor:
    """``N`` distinct samples whose dispersion is of order ``sigma**2`` (rotations for the SO(3) norm)."""
    g = torch.Generator().manual_seed(seed)
    if _is_so3(key):
        base = so3_exp(torch.tensor([0.3, -0.5, 0.2], dtype=F64))
        return base @ so3_exp(sigma * torch.randn(N, 3, generator=g, dtype=F64))
    return concentrated_spd(N, N_MAT, sigma=sigma, seed=seed)


def _dispersion(key: str, X: torch.Tensor) -> float:
    """Exact dispersion of ``X`` under the layer's metric, from a refit of a fresh layer."""
    layer = _layer(key)
    refit_domain_norms(layer, X, None)
    return float(layer.running_var.reshape(-1)[0])


def _train_output(key: str, X: torch.Tensor, **kwargs) -> tuple[torch.nn.Module, torch.Tensor]:
    layer = _layer(key, momentum=1.0, **kwargs)
    with torch.no_grad():
        layer.shift.fill_(SHIFT)
        return layer, layer.train()(X)


# ------------------------------------------------------------------------------- 1. the degenerate-batch rule


@pytest.mark.parametrize("key", VARIANCE_NORMS)
@pytest.mark.parametrize("target", [1e-8, 1e-6])
def test_tiny_dispersion_batches_are_normalized_by_the_paper_formula(key: str, target: float) -> None:
    """v^2 far below eps: the output dispersion is s^2 v^2/(v^2+eps), not ~v^2 (old fallback to r = 1)."""
    X = _batch(key, sigma=1.0, seed=1)
    X = _batch(key, sigma=(target / _dispersion(key, X)) ** 0.5, seed=1)
    v2 = _dispersion(key, X)
    assert 0.1 * target < v2 < 10 * target
    layer, Y = _train_output(key, X)
    expected = SHIFT**2 * v2 / (v2 + layer.eps)
    assert _dispersion(key, Y) == pytest.approx(expected, rel=1e-3)
    assert float(layer.running_var.reshape(-1)[0]) == pytest.approx(v2, rel=1e-3)  # momentum 1: r <- v^2


@pytest.mark.parametrize("key", [k for k in VARIANCE_NORMS if not _is_so3(k)])
def test_train_momentum_does_not_switch_off_the_formula(key: str) -> None:
    """With momentum statistics (eta < 1) the scale (1-eta) t + eta v^2 is used and stored even when << eps."""
    X = _batch(key, sigma=1.0, seed=2)
    X = _batch(key, sigma=(1e-8 / _dispersion(key, X)) ** 0.5, seed=2)
    exact = _layer(key)
    refit_domain_norms(exact, X, None)
    v2 = float(exact.running_var.reshape(-1)[0])
    layer = _layer(key, train_momentum=0.5)
    with torch.no_grad():  # momentum centre = the batch mean, so the batch term is v^2 itself
        layer.train_mean.copy_(exact.running_mean)
        layer.train_var.fill_(1e-7)
    layer.train()(X)
    assert float(layer.train_var.reshape(-1)[0]) == pytest.approx(0.5e-7 + 0.5 * v2, rel=1e-3)


@pytest.mark.parametrize("scale", [1e-4, 1e-6, 1e-8])
def test_gbwbn_normalizes_batches_at_any_scale(scale: float) -> None:
    """BW dispersion scales with the batch: c * X must still get s^2 v^2/(v^2+eps) (old: left unnormalized)."""
    X = scale * _batch("gbwbn", sigma=0.3, seed=3)
    v2 = _dispersion("gbwbn", X)
    layer, Y = _train_output("gbwbn", X)
    assert torch.isfinite(Y).all()
    assert _dispersion("gbwbn", Y) == pytest.approx(SHIFT**2 * v2 / (v2 + layer.eps), rel=1e-3)


@pytest.mark.parametrize("key", VARIANCE_NORMS)
@pytest.mark.parametrize("case", ["one", "identical"])
def test_degenerate_batches_use_the_running_variance(key: str, case: str) -> None:
    X = _batch(key, sigma=0.3, seed=4)
    batch = X[:1] if case == "one" else X[:1].expand(6, *X.shape[1:]).clone()
    layer, Y = _train_output(key, batch)
    torch.testing.assert_close(layer.running_var, torch.ones_like(layer.running_var))  # not updated
    assert torch.isfinite(Y).all()
    if case == "identical":  # centred identical samples all land on the bias
        torch.testing.assert_close(Y, Y[:1].expand_as(Y), atol=1e-10, rtol=0)
    # a batch that differs from the identical one in a single sample is not degenerate any more
    other = batch.clone()
    other[-1] = X[1]
    if case == "identical":
        layer2, _ = _train_output(key, other)
        assert not torch.allclose(layer2.running_var, torch.ones_like(layer2.running_var))


# ------------------------------------------------------------------------------------------- 2. half precision


@pytest.mark.parametrize("key", RIEMANNIAN)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_inputs_work_in_every_riemannian_norm(key: str, dtype: torch.dtype) -> None:
    """Validated in float32, computed in float32 or more, returned in the input dtype; backward works too."""
    X = _batch(key, sigma=0.3, seed=5).to(dtype)
    layer = _layer(key)
    ref = _layer(key, validate=False)  # half-rounded rotations are orthogonal to half precision only
    xh = X.clone().requires_grad_(True)
    Y = layer(xh)
    assert Y.dtype == dtype and torch.isfinite(Y).all()
    Y.float().square().sum().backward()
    assert xh.grad is not None and xh.grad.dtype == dtype and torch.isfinite(xh.grad).all()
    expected = ref(X.double())  # same (half-rounded) input, computed in float64
    tol = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(Y.double(), expected, atol=tol * 4, rtol=tol)
    Ye = layer.eval()(X)  # evaluation path too
    assert Ye.dtype == dtype and torch.isfinite(Ye).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_inputs_work_in_the_spd_layers(dtype: torch.dtype) -> None:
    X = concentrated_spd(4, 4, sigma=0.3, seed=6).to(dtype).requires_grad_(True)
    for layer in (BiMap(4, 3), ReEig(), LogEig()):
        Y = layer(X)
        assert torch.isfinite(Y).all()
        Y.float().sum().backward()
        assert torch.isfinite(X.grad).all()
        X.grad = None


# --------------------------------------------------------------------------------------- 3. GBWBN range errors


def _stats(layer: torch.nn.Module) -> list[torch.Tensor]:
    return [b.clone() for b in layer.buffers()]


@pytest.mark.parametrize(("factor", "word"), [(1e30, "overflow"), (1e20, "overflow"), (1e-30, "underflow")])
def test_gbwbn_reports_float32_range_errors_clearly(factor: float, word: str) -> None:
    layer = create_norm_layer("gbwbn", N_MAT, dtype=torch.float32)
    X = (factor * concentrated_spd(8, N_MAT, sigma=0.3, seed=7)).float()
    if factor == 1e30:
        X = factor * torch.eye(N_MAT).expand(8, N_MAT, N_MAT).clone()
    before = _stats(layer)
    with pytest.raises(ValueError, match=word) as info:
        layer(X)
    message = str(info.value)
    assert "ill-conditioned" not in message and "compute_dtype=torch.float64" in message and "float32" in message
    for a, b in zip(before, _stats(layer), strict=True):
        assert torch.equal(a, b)  # no statistic was touched
    # and the advice works
    Y = create_norm_layer("gbwbn", N_MAT, dtype=torch.float32, compute_dtype="float64")(X)
    assert Y.dtype == torch.float32 and torch.isfinite(Y).all()


def test_gbwbn_names_non_finite_parameters() -> None:
    layer = create_norm_layer("gbwbn", N_MAT)
    with torch.no_grad():
        layer.metric_weight[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="metric_weight"):
        layer(concentrated_spd(8, N_MAT, seed=8))


# -------------------------------------------------------------------------------------------- 4. domain ids


@pytest.mark.parametrize("key", DOMAIN_AWARE)
@pytest.mark.parametrize("mode", ["train", "eval", "refit"])
def test_domain_ids_are_checked_against_the_declared_number(key: str, mode: str) -> None:
    layer = create_norm_layer(key, N_MAT, num_domains=3)
    X = concentrated_spd(6, N_MAT, sigma=0.3, seed=9)
    good = torch.tensor([0, 1, 2, 0, 1, 2])

    def run(d):
        if mode == "refit":
            return refit_domain_norms(layer, X, d)
        return layer.train(mode == "train")(X, domain=d)

    run(good)
    sizes = [tuple(b.shape) for b in layer.buffers()]
    for bad, seen in ((torch.tensor([0, 1, 3, 0, 1, 2]), "3"), (torch.tensor([0, 10**6, 0, 1, 1, 2]), "1000000"),
                      (torch.tensor([0, 1, -1, 0, 1, 2]), "2")):
        with pytest.raises(ValueError, match=rf"valid range 0\.\.2.*max id seen: {seen}"):
            run(bad)
    with pytest.raises(ValueError, match="valid range 0..2"):
        run(5)
    with pytest.raises(TypeError, match="integer"):
        run(good.float())
    assert [tuple(b.shape) for b in layer.buffers()] == sizes  # nothing was allocated


@pytest.mark.parametrize("key", DOMAIN_AWARE)
def test_declared_domains_unseen_in_training_can_be_refitted(key: str) -> None:
    layer = create_norm_layer(key, N_MAT, num_domains=4)
    X = concentrated_spd(8, N_MAT, sigma=0.3, seed=10)
    layer.train()(X, domain=torch.tensor([0, 1] * 4))
    target = concentrated_spd(6, N_MAT, sigma=0.4, seed=11)
    refit_domain_norms(layer, target, 3)  # a held-out domain within the declared count
    assert layer.num_domains == 4
    assert not torch.allclose(layer.running_mean[3], layer.running_mean[2])
    v = _dispersion(key, target)
    assert float(layer.running_var[3, 0]) == pytest.approx(v, rel=1e-6)


@pytest.mark.parametrize("key", DOMAIN_AWARE)
def test_undeclared_domains_grow_with_a_warning(key: str) -> None:
    layer = create_norm_layer(key, N_MAT)  # num_domains not given: grows on demand, as before, but says so
    X = concentrated_spd(4, N_MAT, sigma=0.3, seed=12)
    with pytest.warns(UserWarning, match="grows the statistics from 1 to 3"):
        layer(X, domain=torch.tensor([0, 2, 0, 2]))
    assert layer.num_domains == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(X, domain=torch.tensor([0, 2, 1, 2]))  # within the grown slots: silent
    with pytest.raises(ValueError, match="non-negative"):
        layer(X, domain=torch.tensor([0, -2, 0, 2]))


def test_config_norms_declare_the_number_of_domains() -> None:
    """conf/norm/<domain-aware norm>.yaml passes data_info.num_domains, so the configs get the check."""
    from pathlib import Path

    conf = Path(__file__).resolve().parents[2] / "conf" / "norm"
    for key in DOMAIN_AWARE:
        text = (conf / f"{key}.yaml").read_text()
        assert "num_domains: ${data_info.num_domains}" in text, key
    assert mf is not None


# ------------------------------------------------------------------------ 5. the same rules across processes


def _sync_worker(rank: int, rdv: str, out_dir: str) -> None:
    """Two gloo processes: degeneracy and the domain range are decided on the union of the parts."""
    import datetime
    import os

    import torch.distributed as dist

    from manifoldnorm.distributed.sync_norm import convert_sync_norm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdv, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    results: dict = {}
    try:
        for key in VARIANCE_NORMS:
            X = _batch(key, sigma=1e-4, N=2, seed=13)
            for case, part in (("identical", X[:1]), ("distinct", X[rank:rank + 1])):
                layer = convert_sync_norm(_layer(key, momentum=1.0))
                layer.train()(part.clone())
                results[key, case] = layer.running_var.clone()
        for key in DOMAIN_AWARE:  # an out-of-range id on one process: the same error on both, no hang
            layer = convert_sync_norm(create_norm_layer(key, N_MAT, num_domains=2))
            d = torch.tensor([0, 1]) if rank == 0 else torch.tensor([1, 7])
            try:
                layer.train()(concentrated_spd(2, N_MAT, seed=14 + rank), domain=d)
                results[key, "range"] = None
            except ValueError as exc:
                results[key, "range"] = str(exc)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_degeneracy_and_domain_range_are_decided_over_all_processes(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_sync_worker, args=(f"file://{tmp_path / 'rdv'}", str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for key in VARIANCE_NORMS:
        X = _batch(key, sigma=1e-4, N=2, seed=13)
        single = _layer(key, momentum=1.0)
        single.train()(X)  # the union of the two one-sample parts: a normal (tiny) batch
        for r in range(2):
            # one sample on each process, equal: degenerate, the running variance stays 1
            torch.testing.assert_close(got[r][key, "identical"], torch.ones_like(single.running_var))
            # one sample on each process, distinct: normalized by the formula, as one process on both. The
            # absolute tolerance is the round-off of a distance computed as a difference of O(n) terms (the
            # Bures-Wasserstein d^2 = tr A + tr B - 2 tr (A^1/2 B A^1/2)^1/2): about n eps whatever the distance,
            # i.e. 5e-7 relative to this batch's variance of 3.5e-9 (one sample per process rounds differently from
            # two batched on some CPUs); a degenerate verdict (variance 1) or a one-sample variance (0) is far off
            torch.testing.assert_close(got[r][key, "distinct"], single.running_var, rtol=1e-9,
                                       atol=64 * N_MAT * torch.finfo(torch.float64).eps,
                                       msg=lambda m, key=key: f"{key}: {m}")
    for key in DOMAIN_AWARE:
        assert got[0][key, "range"] == got[1][key, "range"]
        assert got[0][key, "range"] is not None and "max id seen: 7" in got[0][key, "range"]
