"""Domain-specific norms batched over the domains of a batch (segment reductions), float64.

``DomainLieBatchNorm`` (dsliebn_aim/lem/lcm) and ``DomainSPDBatchNorm`` (spddsmbn) compute every domain's
statistics at once. Tested against the per-domain loop (:class:`tests.nn.nn_helpers.PerDomainLoop`: the
undomained layer on each domain with that domain's statistics) to 1e-12 over several training steps, a refit and
an evaluation, and for a number of decompositions that does not depend on the number of domains.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import concentrated_spd, random_spd

from manifoldnorm import functional as mf
from manifoldnorm.functional._batch import Segments
from manifoldnorm.functional.profile import count_decompositions
from manifoldnorm.nn import DomainLieBatchNorm, DomainSPDBatchNorm, create_norm_layer, refit_domain_norms
from tests.nn.nn_helpers import F64, PerDomainLoop

TOL = {"atol": 1e-12, "rtol": 1e-12}

# layer: (class, options); LieBN under standard and deformed metrics, Kobler's SPDDSMBN
LAYERS = {
    "aim": (DomainLieBatchNorm, {"metric": "aim"}),
    "aim_deformed": (DomainLieBatchNorm, {"metric": "aim", "theta": 0.5, "alpha": 2.0, "beta": -0.1}),
    "lem": (DomainLieBatchNorm, {"metric": "lem", "alpha": 0.5, "beta": 0.3}),
    "lcm": (DomainLieBatchNorm, {"metric": "lcm"}),
    "lcm_deformed": (DomainLieBatchNorm, {"metric": "lcm", "theta": 1.5}),
    "spddsmbn": (DomainSPDBatchNorm, {}),
}
# option sets: default; two channels with momentum statistics; gradients through the unrolled means
VARIANTS = {
    "default": {},
    "channels_eta": {"channels": 2, "train_momentum": 0.7, "karcher_steps": 2, "momentum": 0.3},
    "unrolled": {"detach_mean": False, "detach_var": True, "karcher_steps": 2},
}
# domain id -> number of samples; "same" marks a domain whose samples are all equal (degenerate)
SCENARIOS = {
    "one_domain": {3: 10},
    "nine_domains": {k: 3 for k in range(9)},
    "uneven": {0: 9, 2: 1, 5: 4, "same": 2, 8: 3},  # a singleton, identical samples, gaps in the ids
}
N_MAT, STEPS, NUM_DOMAINS = 3, 3, 10


def _layer(key: str, variant: str, seed: int = 0) -> torch.nn.Module:
    cls, opts = LAYERS[key]
    kw = dict(VARIANTS[variant])
    if cls is DomainSPDBatchNorm:
        kw.pop("detach_var", None)
    layer = cls(N_MAT, num_domains=NUM_DOMAINS, **opts, **kw)
    with torch.no_grad():
        layer.weight.copy_(random_spd(layer.channels, n=N_MAT, seed=seed + 50, cond=5.0))
        layer.shift.copy_(0.7 + 0.1 * torch.arange(layer.channels, dtype=F64))
    return layer


def _batch(scenario: str, channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Domains concentrated around different points, samples shuffled (unsorted ids)."""
    xs, ids = [], []
    for j, (dom, size) in enumerate(SCENARIOS[scenario].items()):
        if dom == "same":  # all samples equal: degenerate
            dom = 6
            X = concentrated_spd(1, N_MAT * channels, sigma=0.4, seed=seed + 17 * j).expand(size, -1, -1)
        else:
            X = concentrated_spd(size, N_MAT * channels, sigma=0.2 + 0.1 * j, seed=seed + 17 * j)
        # channels: diagonal blocks of a larger SPD matrix
        X = torch.stack([X[:, c * N_MAT:(c + 1) * N_MAT, c * N_MAT:(c + 1) * N_MAT] for c in range(channels)], 1)
        xs.append(X)
        ids.append(torch.full((size,), dom, dtype=torch.long))
    X, d = torch.cat(xs), torch.cat(ids)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    X, d = X[perm], d[perm]
    return (X[:, 0] if channels == 1 else X).contiguous(), d


def _compare_stats(layer: torch.nn.Module, oracle: PerDomainLoop) -> None:
    for k in oracle.names:
        torch.testing.assert_close(getattr(layer, k), oracle.stats[k], **TOL, msg=k)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("key", list(LAYERS))
def test_batched_domains_match_the_per_domain_loop(key, scenario, variant):
    layer = _layer(key, variant)
    oracle = PerDomainLoop(layer)
    g = torch.Generator().manual_seed(5)
    for step in range(STEPS):
        X, d = _batch(scenario, layer.channels, seed=10 * step)
        G = mf.sym(torch.randn(X.shape, generator=g, dtype=F64))
        grads = []
        for model in (layer, oracle):
            params = (layer.weight, layer.shift) if model is layer else (oracle.base.weight, oracle.base.shift)
            for p in params:
                p.grad = None
            x = X.clone().requires_grad_()
            y = model(x, domain=d) if model is layer else model(x, d)
            (y * G).sum().backward()
            grads.append((y.detach(), x.grad, params[0].grad, params[1].grad))
        for name, a, b in zip(("output", "input grad", "weight grad", "shift grad"), *grads, strict=True):
            torch.testing.assert_close(a, b, **TOL, msg=f"step {step}: {name}")
        _compare_stats(layer, oracle)
    # refit (exact per-domain statistics), then evaluation with the refitted statistics
    X, d = _batch(scenario, layer.channels, seed=99)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mf.KarcherConvergenceWarning)
        y = refit_domain_norms(layer, X, d)
        oracle.base.eval()
        oracle.base.refitting = True
        with torch.no_grad():
            y_ref = oracle(X, d)
        oracle.base.refitting = False
    torch.testing.assert_close(y, y_ref, **TOL)
    _compare_stats(layer, oracle)
    layer.eval()  # on the refit batch: a refitted one-sample domain has dispersion 0 (scaling by 1/sqrt(eps))
    torch.testing.assert_close(layer(X, domain=d), oracle(X, d), **TOL)


def test_degenerate_domains_keep_their_running_variance():
    """A one-sample domain and a domain of identical samples: scaled with, and leaving, their running variance."""
    layer = _layer("aim", "default")
    X, d = _batch("uneven", 1, seed=0)
    with torch.no_grad():
        layer.running_var[2].fill_(2.0)
        layer.running_var[6].fill_(3.0)
    layer(X, domain=d)
    assert float(layer.running_var[2]) == 2.0 and float(layer.running_var[6]) == 3.0
    assert float(layer.train_var[2]) == 1.0 and float(layer.train_var[6]) == 1.0
    assert float((layer.running_var[0] - 1.0).abs()) > 1e-3  # a regular domain moved


def test_segment_mean_aim_stops_each_segment_on_its_own():
    """Per-segment Karcher flow = mean_aim on each segment; a converged segment keeps its iterate."""
    Xa = concentrated_spd(6, 4, sigma=0.05, seed=1)  # converges in 3 iterations
    Xb = concentrated_spd(5, 4, sigma=1.2, seed=2)  # needs about a dozen
    X = torch.cat([Xb[:2], Xa, Xb[2:]])
    seg = Segments.from_ids(torch.tensor([1, 1] + [0] * 6 + [1] * 3))
    M = mf.segment_mean_aim(X, seg, karcher_steps=50)
    torch.testing.assert_close(M[0], mf.mean_aim(Xa, karcher_steps=50), atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(M[1], mf.mean_aim(Xb, karcher_steps=50), atol=1e-13, rtol=1e-13)
    with pytest.warns(mf.KarcherConvergenceWarning, match=r"segment\(s\) \[1\]"):
        M4 = mf.segment_mean_aim(X, seg, karcher_steps=4)
    with pytest.warns(mf.KarcherConvergenceWarning):
        ref = mf.mean_aim(Xb, karcher_steps=4)
    torch.testing.assert_close(M4[1], ref, atol=1e-13, rtol=1e-13)
    assert torch.equal(M4[0], M[0])  # converged after 3 iterations: frozen while segment 1 went on
    with pytest.raises(mf.KarcherConvergenceError):
        mf.segment_mean_aim(X, seg, karcher_steps=4, on_fail="raise")


# Batched decomposition calls (eigh, Cholesky; the input validation's Cholesky included) per layer call, for 1 and
# for 9 domains of the same data up to one congruence per domain (the AIM Karcher flow of the refit then takes the
# same number of iterations, 10 here):
#   key            train fwd+bwd   eval   refit      per-domain loop before, 9 domains (1 domain: as now)
#   dsliebn_aim          9           4      33        65 / 4 / 281
#   dsliebn_lem          7           5       5        31 / 5 / 13
#   dsliebn_lcm          4           4       3        12 / 4 / 3
#   spddsmbn            11           4      33        91 / 4 / 307 (1 domain: 11 / 4 / 35)
COUNTS = {  # key: (train fwd+bwd, eval, refit), the same for 1 and 9 domains
    "dsliebn_aim": (9, 4, 33),
    "dsliebn_lem": (7, 5, 5),
    "dsliebn_lcm": (4, 4, 3),
    "spddsmbn": (11, 4, 33),
}


def _congruent_domains(num: int, per: int = 4, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    X0 = concentrated_spd(per, n, sigma=0.5, seed=3)
    g = torch.Generator().manual_seed(4)
    A = torch.eye(n, dtype=F64) + 0.3 * torch.randn(num, n, n, generator=g, dtype=F64)
    A[0] = torch.eye(n, dtype=F64)
    X = mf.sym(A.unsqueeze(1) @ X0 @ A.mT.unsqueeze(1)).reshape(num * per, n, n)
    return X, torch.arange(num).repeat_interleave(per)


@pytest.mark.parametrize("key", list(COUNTS), ids=[f"{k}-train{t}-eval{e}-refit{r}" for k, (t, e, r) in COUNTS.items()])
def test_decompositions_do_not_grow_with_the_number_of_domains(key):
    counts = {}
    for num in (1, 9):
        X, d = _congruent_domains(num)
        layer = create_norm_layer(key, X.shape[-1], num_domains=9)
        x = X.clone().requires_grad_()
        with count_decompositions() as train:
            layer(x, domain=d).sum().backward()
        layer.eval()
        with torch.no_grad(), count_decompositions() as ev:
            layer(X, domain=d)
        with count_decompositions() as refit:
            refit_domain_norms(layer, X, d)
        counts[num] = (train.count(), ev.count(), refit.count())
    assert counts[1] == counts[9], counts
    assert all(c <= bound for c, bound in zip(counts[9], COUNTS[key], strict=True)), (counts, COUNTS[key])
