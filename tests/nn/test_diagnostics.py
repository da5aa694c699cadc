"""Norm-layer diagnostics (manifoldnorm.nn.diagnostics): values against independent float64 computations, hooks
attached only while recording, the layers found, the layers' distances."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import concentrated_spd, random_spd
from torch import nn

from manifoldnorm import functional as mf
from manifoldnorm.models import SPDNet
from manifoldnorm.nn import (
    DomainLieBatchNorm,
    DomainSPDBatchNorm,
    GBWBatchNorm,
    IdentityNorm,
    LayerNorm,
    LieBatchNorm,
    NormRecorder,
    RMSNorm,
    SO3BatchNorm,
    SPDBatchNorm,
    SPDMomentumBatchNorm,
    create_norm_layer,
    list_norms,
)
from manifoldnorm.nn.diagnostics import EUCLIDEAN_KEYS, RIEMANNIAN_KEYS, is_euclidean_norm, norm_layers, spectrum_stats

F64 = torch.float64


class Capture:
    """A forward hook of the test's own that keeps the input and output of each call."""

    def __init__(self, layer: nn.Module) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handle = layer.register_forward_hook(lambda m, a, y: self.calls.append((a[0].detach(), y.detach())))


def _cond_ref(X: torch.Tensor) -> tuple[float, float, float]:
    lam = torch.linalg.eigvalsh(X.to(F64).reshape(-1, X.shape[-2], X.shape[-1]))
    return float(lam.min()), float(lam.max()), float((lam[:, -1] / lam[:, 0]).max())


def _spd_input(N: int = 16, n: int = 10, seed: int = 0) -> torch.Tensor:
    return random_spd(N, n=n, cond=50.0, seed=seed)


@pytest.mark.parametrize("norm", ["liebn_aim", "liebn_lem", "liebn_lcm", "liebn_crim", "spdbn", "spdmbn", "gbwbn",
                                  "dsliebn_aim", "spddsmbn"])
def test_spectra_equal_eigvalsh_of_what_the_layer_saw(norm: str) -> None:
    torch.manual_seed(0)
    kw = {"num_domains": 3} if norm.startswith(("ds", "spdds")) else {}
    model = SPDNet(10, [6, 4], 3, norm_layer=functools.partial(create_norm_layer, norm, **kw))
    cap = Capture(model.stages[1].norm)
    rec = NormRecorder(model)
    rec.start()
    model(_spd_input(), domain=torch.arange(16) % 3)
    stats = rec.stop()
    assert set(stats) == {"stages.0.norm", "stages.1.norm"}
    (x, y), = cap.calls
    got = stats["stages.1.norm"]
    for side, t in (("in", x), ("out", y)):
        lo, hi, cond = _cond_ref(t)
        assert float(got[f"eig_min_{side}"]) == pytest.approx(lo, rel=1e-10)
        assert float(got[f"eig_max_{side}"]) == pytest.approx(hi, rel=1e-10)
        assert float(got[f"cond_{side}"]) == pytest.approx(cond, rel=1e-10)
    assert set(got) <= set(RIEMANNIAN_KEYS) and all(v.dtype == F64 and v.dim() == 0 for v in got.values())


def test_spectrum_of_a_singular_or_nonfinite_stack() -> None:
    X = torch.diag_embed(torch.tensor([[1.0, 2.0], [0.0, 3.0]], dtype=F64))  # second matrix singular
    stats, lam = spectrum_stats(X)
    assert float(stats["eig_min"]) == 0.0 and float(stats["cond"]) == math.inf and lam.shape == (2, 2)
    stats, lam = spectrum_stats(torch.full((2, 3, 3), math.nan))
    assert lam is None and all(math.isnan(float(v)) for v in stats.values())


@pytest.mark.parametrize("metric", ["aim", "lem", "lcm"])
def test_statistics_and_distances_against_functional(metric: str, seed: int) -> None:
    n, N = 5, 12
    bn = LieBatchNorm(n, metric=metric, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(random_spd(1, n=n, seed=seed + 7, cond=4.0))
        bn.shift.copy_(torch.tensor([0.7]))
    X = concentrated_spd(N, n, sigma=0.5, seed=seed)
    rec = NormRecorder(nn.Sequential(bn))
    rec.start()
    bn(X)
    got = rec.stop()["0"]
    # the batch's Fréchet variance, recomputed with the functional metrics (one Karcher step for AIM, as the layer)
    G = mf.mean(X, metric, karcher_steps=1, tol=0.0) if metric == "aim" else mf.mean(X, metric)
    var = mf.distance(G.expand_as(X), X, metric).square().mean()
    assert float(got["batch_var"]) == pytest.approx(float(var), rel=1e-9)
    assert float(got["running_var"]) == pytest.approx(0.7 * 1.0 + 0.3 * float(var), rel=1e-9)
    R, B, eye = bn.running_mean[0], bn.weight[0].detach(), torch.eye(n, dtype=F64)
    assert float(got["dist_mean_bias"]) == pytest.approx(float(mf.distance(R, B, metric)), rel=1e-9)
    assert float(got["dist_mean_identity"]) == pytest.approx(float(mf.distance(R, eye, metric)), rel=1e-9)
    assert float(got["bias_dist_identity"]) == pytest.approx(float(mf.distance(B, eye, metric)), rel=1e-9)
    assert float(got["shift_mean"]) == float(got["shift_min"]) == float(got["shift_max"]) == pytest.approx(0.7)
    assert float(got["dist_mean_bias"]) != pytest.approx(float(got["dist_mean_identity"]))


def test_domain_aware_layer_averages_the_domains_of_the_batch() -> None:
    n = 4
    bn = DomainLieBatchNorm(n, num_domains=4, metric="lem", momentum=1.0)
    X = torch.cat([concentrated_spd(6, n, sigma=0.3, seed=1), concentrated_spd(6, n, sigma=0.8, seed=2)])
    domain = torch.tensor([0] * 6 + [2] * 6)
    rec = NormRecorder(nn.ModuleDict({"bn": bn}))
    rec.start()
    bn(X, domain=domain)
    got = rec.stop()["bn"]
    L = mf.sym_logm(X)
    per_domain = [(L[domain == d] - L[domain == d].mean(0)).square().sum((-2, -1)).mean() for d in (0, 2)]
    assert float(got["batch_var"]) == pytest.approx(float(sum(per_domain) / 2), rel=1e-9)
    assert float(got["running_var"]) == pytest.approx(float(sum(per_domain) / 2), rel=1e-9)  # momentum 1
    means = [mf.sym_expm(L[domain == d].mean(0)) for d in (0, 2)]
    dist = sum(float(mf.distance_lem(M, torch.eye(n, dtype=F64))) for M in means) / 2
    assert float(got["dist_mean_identity"]) == pytest.approx(dist, rel=1e-9)  # domains 1 and 3 (unseen) left out


def test_spdbn_batch_var_is_the_dispersion_about_its_centre() -> None:
    bn = SPDBatchNorm(4)
    X = concentrated_spd(10, 4, seed=3)
    rec = NormRecorder(nn.Sequential(bn))
    rec.start()
    bn(X)
    got = rec.stop()["0"]
    G = mf.mean_aim(X, karcher_steps=1, tol=0.0)
    assert float(got["batch_var"]) == pytest.approx(float(mf.distance_aim(G, X).square().mean()), rel=1e-9)
    assert "running_var" not in got and "shift_mean" not in got


def test_gbwbn_and_so3_use_their_own_distances() -> None:
    A, B = random_spd(3, n=4, seed=1), random_spd(3, n=4, seed=2)
    gb = GBWBatchNorm(4)
    assert torch.allclose(gb.distance(A, B), mf.distance_bw(A, B), atol=1e-10)  # metric weight I: plain BW
    gb2 = GBWBatchNorm(4, theta=0.5)
    want = mf.distance_bw(mf.sym_powm(A, 0.5), mf.sym_powm(B, 0.5)) / 0.5
    assert torch.allclose(gb2.distance(A, B), want, atol=1e-10)
    for layer in (SPDBatchNorm(4), SPDMomentumBatchNorm(4), DomainSPDBatchNorm(4, num_domains=2)):
        assert torch.allclose(layer.distance(A, B), mf.distance_aim(A, B), atol=1e-10)
    so3 = SO3BatchNorm(2)
    R = mf.so3_exp(0.4 * torch.randn(8, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(0)))
    rec = NormRecorder(nn.Sequential(so3))
    rec.start()
    so3(R)
    got = rec.stop()["0"]
    assert not any(k.startswith(("eig", "cond")) for k in got)  # rotations: no spectra
    want = mf.distance_so3(so3.running_mean, torch.eye(3, dtype=F64)).mean()
    assert float(got["dist_mean_identity"]) == pytest.approx(float(want), rel=1e-9)
    assert float(got["batch_var"]) == pytest.approx(float(so3.train_var.mean()), rel=1e-12)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.ln = LayerNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.rms = RMSNorm(8)
        self.skip = IdentityNorm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(self.rms(self.bn(self.ln(self.fc(x)))))


def test_euclidean_rms_and_hooks_only_while_recording() -> None:
    torch.manual_seed(0)
    model = _MLP()
    found = [(name, kind) for name, _, kind in norm_layers(model)]
    assert found == [("ln", "euclidean"), ("bn", "euclidean"), ("rms", "euclidean")]
    caps = {name: Capture(getattr(model, name)) for name in ("ln", "bn", "rms")}
    rec = NormRecorder(model)
    x = 3.0 * torch.randn(20, 6)
    model(x)
    assert not rec.stats and all(not m._forward_hooks.keys() - {c.handle.id} for m, c in
                                 ((getattr(model, k), caps[k]) for k in caps))  # only the test's own hooks
    rec.start()
    assert rec.recording and all(len(getattr(model, k)._forward_hooks) == 2 for k in caps)
    model(x)
    model(2 * x)  # a second forward while recording: only the first is kept
    stats = rec.stop()
    assert not rec.recording and all(len(getattr(model, k)._forward_hooks) == 1 for k in caps)
    for name, cap in caps.items():
        xin, yout = cap.calls[1]
        assert set(stats[name]) == set(EUCLIDEAN_KEYS)
        assert float(stats[name]["rms_in"]) == pytest.approx(float(xin.double().square().mean().sqrt()), rel=1e-12)
        assert float(stats[name]["rms_out"]) == pytest.approx(float(yout.double().square().mean().sqrt()), rel=1e-12)


def test_eval_forwards_and_refits_are_not_recorded() -> None:
    bn = LieBatchNorm(4)
    rec = NormRecorder(nn.Sequential(bn))
    rec.start()
    bn.eval()
    bn(random_spd(6, n=4))
    assert rec.stop() == {}


def test_every_registered_norm_is_found_with_its_kind() -> None:
    for name in list_norms():
        layer = create_norm_layer(name, 4) if name != "weight_norm" and name not in ("weight_std", "spectral_norm") \
            else None
        if layer is None:
            continue
        kinds = [kind for _, _, kind in norm_layers(nn.Sequential(layer))]
        if name == "none":
            assert kinds == []
        else:
            assert kinds == ["euclidean" if name in list_norms("euclidean") else "riemannian"], name
    assert is_euclidean_norm(nn.LayerNorm(3)) and is_euclidean_norm(nn.GroupNorm(1, 3))
    assert not is_euclidean_norm(nn.Linear(3, 3))


def test_recorder_rejects_a_non_module() -> None:
    with pytest.raises(TypeError, match="NormRecorder: model must be an nn.Module"):
        NormRecorder("stages.0.norm")  # type: ignore[arg-type]
