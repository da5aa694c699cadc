"""Spectral functions: values against torch built-ins, gradcheck (also at repeated eigenvalues), exponent grad."""

from __future__ import annotations

import pytest
import torch
from conftest import random_spd

from manifoldnorm import functional as mf

F64 = torch.float64

SPECTRAL = {
    "logm": (mf.sym_logm, mf.sym_logm_ref),
    "expm": (mf.sym_expm, mf.sym_expm_ref),
    "sqrtm": (mf.sym_sqrtm, mf.sym_sqrtm_ref),
    "invsqrtm": (mf.sym_invsqrtm, mf.sym_invsqrtm_ref),
    "powm": (lambda X: mf.sym_powm(X, 0.37), lambda X: mf.sym_powm_ref(X, 0.37)),
    "reeig": (lambda X: mf.sym_reeig(X, 0.5), lambda X: mf.sym_reeig_ref(X, 0.5)),
    "invm": (mf.sym_invm, lambda X: torch.linalg.inv(X)),
}


def test_values_match_independent_implementations(seed: int) -> None:
    X = random_spd(4, n=6, seed=seed)
    torch.testing.assert_close(mf.sym_expm(mf.sym_logm(X)), X, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mf.sym_expm(X), torch.linalg.matrix_exp(X), rtol=1e-12, atol=1e-12)
    S = mf.sym_sqrtm(X)
    torch.testing.assert_close(S @ S, X, rtol=1e-12, atol=1e-12)
    S2, Si = mf.sym_sqrtm_invsqrtm(X)
    torch.testing.assert_close(S2, S, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(Si @ X @ Si, torch.eye(6, dtype=F64).expand(4, 6, 6), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(mf.sym_invm(X), torch.linalg.inv(X), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(mf.sym_powm(X, 3.0), torch.linalg.matrix_power(X, 3), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(mf.sym_powm(X, -1.0), torch.linalg.inv(X), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("name", sorted(SPECTRAL))
def test_fast_path_matches_plain_autograd_reference(name: str, seed: int) -> None:
    fast, ref = SPECTRAL[name]
    X = random_spd(3, n=5, seed=seed)
    G = torch.randn(3, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(seed))
    Xa = X.clone().requires_grad_()
    Xb = X.clone().requires_grad_()
    ya, yb = fast(Xa), ref(Xb)
    torch.testing.assert_close(ya, yb, rtol=1e-11, atol=1e-11)
    (ya * G).sum().backward()
    (yb * G).sum().backward()
    # the reference differentiates only the lower triangle (eigh reads it); compare symmetrised gradients
    torch.testing.assert_close(mf.sym(Xa.grad), mf.sym(Xb.grad), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", sorted(SPECTRAL))
@pytest.mark.parametrize("spectrum", ["distinct", "repeated", "scaled_identity"])
def test_gradcheck(name: str, spectrum: str) -> None:
    fast, _ = SPECTRAL[name]
    n = 4
    if spectrum == "distinct":
        X = random_spd(2, n=n, seed=3)
    elif spectrum == "repeated":
        Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(1)))
        X = (Q * torch.tensor([0.7, 2.0, 2.0, 2.0], dtype=F64)) @ Q.T
        X = torch.stack([X, X])
    else:
        X = 2.0 * torch.eye(n, dtype=F64).expand(2, n, n)
    X = X.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda A: fast(mf.sym(A)), (X,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_exact_gradient_at_scaled_identity_where_eigh_autograd_fails() -> None:
    n = 5
    G = torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(0))
    X = (2.0 * torch.eye(n, dtype=F64)).requires_grad_()
    (mf.sym_logm(X) * G).sum().backward()
    # d log X at X = cI in direction H is H / c, so the gradient is sym(G) / c
    torch.testing.assert_close(X.grad, mf.sym(G) / 2.0, rtol=0, atol=1e-15)
    Xr = (2.0 * torch.eye(n, dtype=F64)).requires_grad_()
    (mf.sym_logm_ref(Xr) * G).sum().backward()
    assert not torch.isfinite(Xr.grad).all()


def test_powm_exponent_gradient() -> None:
    X = random_spd(3, n=4, seed=5)
    p = torch.tensor(0.6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda A, q: mf.sym_powm(mf.sym(A), q), (X.clone().requires_grad_(), p))
    # per-matrix exponents, broadcast over channels
    Xc = random_spd(3, 2, n=4, seed=6).requires_grad_()
    pc = torch.tensor([[0.5], [1.5], [-0.3]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda A, q: mf.sym_powm(mf.sym(A), q), (Xc, pc))
    # the exponent gradient is non-zero and equals sum_i (U^T G U)_ii lam_i^p log lam_i
    G = torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    p2 = torch.tensor(0.8, dtype=F64, requires_grad=True)
    (mf.sym_powm(X[0], p2) * G).sum().backward()
    lam, U = torch.linalg.eigh(X[0])
    expected = (torch.diagonal(U.T @ mf.sym(G) @ U) * lam**0.8 * lam.log()).sum()
    torch.testing.assert_close(p2.grad, expected, rtol=1e-12, atol=1e-14)


def test_reeig_clamps_and_passes_gradient_only_above_threshold() -> None:
    Q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(0)))
    X = (Q * torch.tensor([1e-6, 0.5, 2.0], dtype=F64)) @ Q.T
    Y = mf.sym_reeig(X, 1e-4)
    torch.testing.assert_close(torch.linalg.eigvalsh(Y), torch.tensor([1e-4, 0.5, 2.0], dtype=F64))
    with pytest.raises(ValueError, match="threshold"):
        mf.sym_reeig(X, 0.0)


def test_half_precision_inputs_run_in_float32() -> None:
    X = random_spd(2, n=4, seed=0)
    for dt in (torch.bfloat16, torch.float16):
        Y = mf.sym_logm(X.to(dt))
        assert Y.dtype == dt
        torch.testing.assert_close(Y.double(), mf.sym_logm(X), rtol=2e-2, atol=2e-2)


def test_float32_matches_float64() -> None:
    X = random_spd(8, n=10, seed=1, cond=100.0)
    torch.testing.assert_close(mf.sym_logm(X.float()).double(), mf.sym_logm(X), rtol=1e-4, atol=1e-5)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"\(\.\.\., n, n\)"):
        mf.sym_logm(torch.ones(3, 4, dtype=F64))
    with pytest.raises(TypeError, match="floating"):
        mf.sym_logm(torch.eye(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="broadcast"):
        mf.sym_powm(random_spd(3, n=2), torch.ones(4, dtype=F64))


@pytest.mark.parametrize("scale", [0.0, 1e-16, 1e-14, 1e-12, 1e-9, 1.0])
def test_expm_gradient_exact_near_zero_spectrum(scale: float) -> None:
    """Clustered eigenvalues near 0 (e.g. a log-domain bias at I): no cancellation in the divided differences."""
    g = torch.Generator().manual_seed(0)
    S = torch.randn(6, 6, dtype=F64, generator=g)
    S = S + S.T
    G = torch.randn(6, 6, dtype=F64, generator=g)
    Z = (scale * S).requires_grad_()
    (mf.sym_expm(Z) * G).sum().backward()
    Zr = (scale * S).requires_grad_()
    (torch.linalg.matrix_exp(mf.sym(Zr)) * G).sum().backward()
    err = torch.linalg.norm(mf.sym(Z.grad) - mf.sym(Zr.grad)) / torch.linalg.norm(mf.sym(Zr.grad))
    assert float(err) < 1e-13


@pytest.mark.parametrize("name", ["logm", "sqrtm", "invsqrtm", "powm", "invm"])
@pytest.mark.parametrize("scale", [1e-14, 1e-10, 1e-6])
def test_gradient_near_identity_matches_finite_differences(name: str, scale: float) -> None:
    fast, _ = SPECTRAL[name]
    g = torch.Generator().manual_seed(1)
    S = torch.randn(5, 5, dtype=F64, generator=g)
    H = torch.randn(5, 5, dtype=F64, generator=g)
    S, H = S + S.T, H + H.T
    G = torch.randn(5, 5, dtype=F64, generator=g)
    X = (torch.eye(5, dtype=F64) + scale * S).requires_grad_()
    (fast(X) * G).sum().backward()
    h = 1e-5
    fd = ((fast(X.detach() + h * H) - fast(X.detach() - h * H)) * G).sum() / (2 * h)
    torch.testing.assert_close((X.grad * H).sum(), fd, rtol=1e-8, atol=1e-9)


def test_no_grad_path_equals_autograd_path() -> None:
    """Without a graph to build, spectral functions skip the autograd Function; the values are the same."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    X = A @ A.mT + torch.eye(5, dtype=torch.float64)
    p = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    Xg = X.clone().requires_grad_()
    for fn in (mf.sym_logm, mf.sym_sqrtm, mf.sym_invsqrtm, lambda Y: mf.sym_powm(Y, p)):
        with torch.no_grad():
            fast = fn(X)
        assert fast.grad_fn is None
        slow = fn(Xg)
        assert slow.grad_fn is not None
        torch.testing.assert_close(fast, slow.detach(), rtol=1e-14, atol=1e-14)
    E = mf.sym_eig(X)
    torch.testing.assert_close(E.powm(p), mf.sym_eig(Xg).powm(p).detach(), rtol=1e-14, atol=1e-14)


def _loewner_by_definition(lam, flam, spec, p, scale):
    """Quotients, the derivative on the diagonal and the closed form on every near pair (no shortcut)."""
    from manifoldnorm.functional.spectral import _SPLIT, _loewner_exact

    li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
    out = (scale * flam).unsqueeze(-1) - (scale * flam).unsqueeze(-2)
    out = out / (li - lj)
    pe = p.unsqueeze(-1) if p.dim() > 0 else p
    out.diagonal(dim1=-2, dim2=-1).copy_(scale * spec.df(lam, pe))
    size = lam.abs() if spec.relative_gap else lam.abs().clamp_min(1.0)
    near = (li - lj).abs() <= (_SPLIT[lam.dtype] * size).unsqueeze(-2)
    near.diagonal(dim1=-2, dim2=-1).fill_(False)
    pp = p.unsqueeze(-1).unsqueeze(-1) if p.dim() > 0 else p
    exact = _loewner_exact(li.expand(out.shape), lj.expand(out.shape), flam.unsqueeze(-1).expand(out.shape),
                           flam.unsqueeze(-2).expand(out.shape), spec, pp)
    return torch.where(near, scale * exact, out)


@pytest.mark.parametrize("batch", [(1,), (40, 3)])  # a few entries (whole-grid closed forms) and many (gathered)
@pytest.mark.parametrize("name", ["log", "exp", "pow", "sqrt", "user"])
def test_loewner_shortcuts_equal_the_definition(batch: tuple[int, ...], name: str) -> None:
    """The O(n) adjacent-gap test and the whole-grid evaluation of near pairs change no entry of the Loewner
    matrix beyond round-off: separated, clustered, tied and (for exp) negative spectra."""
    from manifoldnorm.functional.spectral import _EXP, _LOG, _POW, _SQRT, _loewner, _Spec

    spec = {"log": _LOG, "exp": _EXP, "pow": _POW, "sqrt": _SQRT,
            "user": _Spec(lambda l, p: torch.tanh(l), lambda l, p: 1 - torch.tanh(l) ** 2)}[name]
    g = torch.Generator().manual_seed(0)
    n = 6
    for gap in (1.0, 1e-3, 1e-5, 1e-9, 0.0):
        lam = torch.rand(*batch, n, generator=g, dtype=torch.float64) * 3 + 0.2
        lam[..., 3] = lam[..., 2] * (1 + gap)  # a (near) tie
        if name == "exp":
            lam = lam - 2.0
        lam = torch.sort(lam, dim=-1).values
        p = (0.3 + torch.rand(batch, generator=g, dtype=torch.float64)) if name == "pow" else torch.zeros(
            (), dtype=torch.float64)
        flam = spec.f(lam, p.unsqueeze(-1) if p.dim() > 0 else p)
        for scale in (1.0, 0.5):
            got, expect = _loewner(lam, flam, spec, p, scale), _loewner_by_definition(lam, flam, spec, p, scale)
            if gap >= 1e-3:  # no near pair: the quotients, bit for bit
                assert torch.equal(got, expect), (gap, scale)
            else:  # closed forms gathered or on the grid: vectorized and scalar math may differ in the last bit
                torch.testing.assert_close(got, expect, rtol=1e-14, atol=0.0)


def test_exp_reconstruction_without_overflow_is_the_plain_one() -> None:
    from manifoldnorm.functional._spectral_checks import _reconstruct, _reconstruct_exp

    g = torch.Generator().manual_seed(0)
    lam = torch.randn(5, 4, generator=g, dtype=torch.float64) * 3
    U = torch.linalg.qr(torch.randn(5, 4, 4, generator=g, dtype=torch.float64))[0]
    assert torch.equal(_reconstruct_exp(U, lam), _reconstruct(U, torch.exp(lam)))
    lam[0, -1] = 800.0  # overflow: ±inf entries where that eigenvector reaches, never NaN
    Y = _reconstruct_exp(U, lam)
    assert torch.isinf(Y[0]).any() and not torch.isnan(Y).any()
    assert torch.equal(Y[1:], _reconstruct(U[1:], torch.exp(lam[1:])))


def _with_spectrum(lam: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(lam.shape[0], lam.shape[1], lam.shape[1], generator=g, dtype=F64))
    return mf.sym((Q * lam.unsqueeze(-2)) @ Q.mT)


@pytest.mark.parametrize("threshold", [1e-4, 1e-2, 0.5])
def test_reeig_logm_equals_reeig_then_logm(threshold: float) -> None:
    """One eigendecomposition for log(ReEig(X)): the values and the chain-rule gradient of the two layers,
    with eigenvalues below (also negative and zero) and above the threshold, clamped ties and near ties. (A pair
    straddling the threshold closer than round-off is a kink where the two conventions legitimately differ.)"""
    lam = torch.tensor([[-1.0, 1e-6, 1e-5, 0.5, 2.0],
                        [2e-4, 2e-4 * (1 + 1e-9), 0.3, 0.3, 3.0],
                        [0.0, 0.0, 0.0, 1.0, 1.0],
                        [2.0, 2.0, 2.0, 2.0, 2.0],
                        [1e-8, 2e-8, 3e-8, 4e-8, 5.0],
                        [0.01, 0.02, 0.5, 0.6, 0.7]], dtype=F64)
    X = _with_spectrum(lam, seed=3)
    G = mf.sym(torch.randn(X.shape, generator=torch.Generator().manual_seed(4), dtype=F64))
    a, b = X.clone().requires_grad_(), X.clone().requires_grad_()
    ya, yb = mf.sym_reeig_logm(a, threshold), mf.sym_logm(mf.sym_reeig(b, threshold))
    (ya * G).sum().backward()
    (yb * G).sum().backward()
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10 * float(b.grad.abs().max()))


def test_reeig_logm_gradcheck_and_errors() -> None:
    X = random_spd(3, n=4, seed=5) - 0.3 * torch.eye(4, dtype=F64)  # some eigenvalues below the threshold
    lam = torch.linalg.eigvalsh(X)
    assert int((lam < 0.5).sum()) >= 3 and float((lam - 0.5).abs().min()) > 0.05  # clamped ones, off the kink
    assert torch.autograd.gradcheck(lambda x: mf.sym_reeig_logm(mf.sym(x), 0.5), (X.clone().requires_grad_(),))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sym_reeig_logm: threshold"):
            mf.sym_reeig_logm(X, bad)
