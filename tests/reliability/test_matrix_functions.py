"""Matrix functions never return a silent NaN or a silently wrong value (issue 14, "Matrix functions").

Covers: ``sym_expm`` overflow (signed inf, never NaN), a non-finite ``sym_reeig`` threshold, the mean of an empty
batch (every metric), spectra outside a function's domain and float32 gradients near a singular spectrum (refused
with the advice to compute in float64), asymmetric inputs (documented lower triangle; refused under
``strict_inputs``), the AIM Karcher mean on dispersed and ill-conditioned batches against pyRiemann, and second
derivatives through the custom autograd Functions (refused with a message that says what to use).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from manifoldnorm import functional as mf
from manifoldnorm.functional._bw_ops import exp_transport_op
from manifoldnorm.functional._lie_groups import _LCMFinish
from manifoldnorm.functional.spd_aim import congruence

F64, F32 = torch.float64, torch.float32


def _rotation(n: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0].to(dtype)


def _spd(lam: list[float] | torch.Tensor, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    lam = torch.as_tensor(lam, dtype=F64)
    Q = _rotation(lam.shape[-1], seed)
    return mf.sym((Q * lam) @ Q.T).to(dtype)


# ---- sym_expm overflow ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,big", [(F64, 800.0), (F32, 100.0)])
def test_expm_overflow_gives_signed_inf_never_nan(dtype: torch.dtype, big: float) -> None:
    # diagonal input: the exact result has zeros off the diagonal (old code: 0 * inf = NaN there)
    D = torch.diag(torch.tensor([big, 1.0], dtype=dtype))
    E = mf.sym_expm(D)
    assert not torch.isnan(E).any()
    assert E[0, 0] == math.inf and E[0, 1] == 0 and E[1, 0] == 0
    torch.testing.assert_close(E[1, 1], torch.tensor(math.e, dtype=dtype))
    # two overflowing eigenvalues in a rotated basis (old code: inf - inf = NaN); entries carry the right sign
    Q = _rotation(3, 1, dtype)
    X = mf.sym((Q * torch.tensor([big, big + 1.0, -2.0], dtype=dtype)) @ Q.T)
    for E in (mf.sym_expm(X), mf.sym_expm(X.clone().requires_grad_()), mf.sym_eig(X).expm()):
        assert not torch.isnan(E).any()
        expected_sign = torch.sign(Q[:, :2] @ torch.diag(torch.tensor([1.0, math.e], dtype=dtype)) @ Q[:, :2].T)
        assert torch.equal(torch.sign(E), expected_sign)
        assert torch.isinf(E).all()


def test_expm_below_overflow_is_unchanged() -> None:
    X = _spd([-3.0, 0.5, 2.0, 700.0])  # the largest exp (e^700) is finite in float64
    lam, U = torch.linalg.eigh(X)
    assert torch.equal(mf.sym_expm(X), (U * torch.exp(lam)) @ U.T)
    assert torch.isfinite(mf.sym_expm(X)).all()


def test_expm_overflow_in_half_precision_is_inf() -> None:
    X = torch.diag(torch.tensor([12.0, 0.0])).to(torch.float16)  # e^12 > float16 max
    E = mf.sym_expm(X)
    assert E.dtype == torch.float16 and E[0, 0] == math.inf and not torch.isnan(E).any()


# ---- sym_reeig threshold -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, 0.0])
def test_reeig_refuses_non_finite_or_non_positive_threshold(bad: float) -> None:
    with pytest.raises(ValueError, match="sym_reeig: threshold must be a positive finite number"):
        mf.sym_reeig(torch.eye(3, dtype=F64), bad)


def test_reeig_refuses_non_numeric_threshold() -> None:
    with pytest.raises(TypeError, match="threshold must be a positive number"):
        mf.sym_reeig(torch.eye(3, dtype=F64), "1e-4")  # type: ignore[arg-type]


# ---- empty batches -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", mf.METRICS)
def test_mean_of_an_empty_batch_is_a_value_error(metric: str) -> None:
    with pytest.raises(ValueError, match="needs at least one sample"):
        mf.mean(torch.empty(0, 3, 3, dtype=F64), metric=metric)


@pytest.mark.parametrize("fn", [mf.mean_so3, mf.mean_so3_chordal])
def test_rotation_mean_of_an_empty_batch_is_a_value_error(fn) -> None:
    with pytest.raises(ValueError, match="needs at least one sample"):
        fn(torch.empty(0, 3, 3, dtype=F64))


# ---- spectra outside the domain, float32 near a singular spectrum ---------------------------------------------

_POSITIVE_FUNCTIONS = {
    "sym_logm": mf.sym_logm,
    "sym_sqrtm": mf.sym_sqrtm,
    "sym_invsqrtm": mf.sym_invsqrtm,
    "sym_invm": mf.sym_invm,
    "sym_powm": lambda X: mf.sym_powm(X, 0.5),
    "sym_eig": lambda X: mf.sym_eig(X).logm(),
}


@pytest.mark.parametrize("name", list(_POSITIVE_FUNCTIONS))
@pytest.mark.parametrize("grad", [False, True])
def test_rank_deficient_float32_input_is_refused_with_float64_advice(name: str, grad: bool) -> None:
    # a PSD matrix of rank 5 in float32: eigh returns round-off (possibly negative) eigenvalues for the null space;
    # the old code returned NaN entries without a word
    A = torch.randn(8, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    X = mf.sym(A @ A.T).float()
    X[..., 0, 0] -= 1e-3  # make the smallest eigenvalue clearly negative
    if grad:
        X.requires_grad_()
    with pytest.raises(ValueError, match=r"eigenvalue .*compute in float64 \(compute_dtype=torch.float64"):
        _POSITIVE_FUNCTIONS[name](X)


def test_negative_eigenvalue_in_float64_is_refused_with_regularization_advice() -> None:
    with pytest.raises(ValueError, match=r"sym_logm: .*non-positive eigenvalue \(smallest -1.*Make them positive"):
        mf.sym_logm(_spd([-1.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"sym_sqrtm: .*negative eigenvalue"):
        mf.sym_sqrtm(_spd([-1e-3, 1.0, 2.0]))
    mf.sym_sqrtm(torch.diag(torch.tensor([0.0, 1.0], dtype=F64)))  # PSD: the square root is defined


@pytest.mark.parametrize("name", ["sym_logm", "sym_sqrtm", "sym_invsqrtm", "sym_invm", "sym_powm"])
def test_float32_gradients_near_singular_spectrum_are_finite(name: str) -> None:
    # eigenvalues down to 1e-7 relative (condition 1e7, the edge of float32) and a near tie at the bottom
    X = _spd([1e-7, 1.0001e-7, 1e-4, 1e-2, 1.0], seed=3, dtype=F32).requires_grad_()
    Y = _POSITIVE_FUNCTIONS[name](X)
    (g,) = torch.autograd.grad(Y.square().sum(), X)
    assert torch.isfinite(Y).all() and torch.isfinite(g).all()


def test_float32_gradient_overflow_is_refused_with_float64_advice() -> None:
    # X^{-1/2} at an eigenvalue of 1e-30: the derivative -lam^{-3/2}/2 ~ 5e44 overflows float32 (old code: inf/NaN
    # gradient without a word); the forward is finite
    X = torch.diag(torch.tensor([1e-30, 1.0], dtype=F32)).requires_grad_()
    Y = mf.sym_invsqrtm(X)
    assert torch.isfinite(Y).all()
    with pytest.raises(ValueError, match=r"sym_invsqrtm: the gradient is not finite in torch.float32.*float64"):
        Y.sum().backward()


# ---- asymmetric input ----------------------------------------------------------------------------------------


def test_spectral_functions_read_the_lower_triangle_and_strict_inputs_refuses_asymmetry() -> None:
    X = _spd([0.5, 1.0, 2.0, 3.0])
    Xa = X.clone()
    Xa[0, 3] += 0.3  # upper triangle: ignored by eigh, and documented so
    torch.testing.assert_close(mf.sym_logm(Xa), mf.sym_logm(X), rtol=0, atol=0)
    with mf.strict_inputs():
        for fn in (mf.sym_logm, mf.sym_expm, mf.sym_sqrtm, lambda Z: mf.sym_powm(Z, 0.3), mf.sym_eig):
            with pytest.raises(ValueError, match="must be symmetric"):
                fn(Xa)
        mf.sym_logm(X)  # a symmetric input passes
        with mf.strict_inputs(False):
            mf.sym_logm(Xa)
    mf.sym_logm(Xa)  # off again after the block


# ---- AIM Karcher mean ----------------------------------------------------------------------------------------

pyr_mean = pytest.importorskip("pyriemann.utils.mean", reason="pyriemann (dev extra) is the oracle")
pyr_base = pytest.importorskip("pyriemann.utils.base")


def _residual_np(M: np.ndarray, X: np.ndarray) -> float:
    """||mean_i log(M^{-1/2} X_i M^{-1/2})||_F computed by pyRiemann's own functions (independent of ours).

    It bounds the AIM distance of ``M`` to the true mean (the variance is 1-strongly geodesically convex)."""
    Mi = pyr_base.invsqrtm(M)
    return float(np.linalg.norm(np.mean(pyr_base.logm(Mi @ X @ Mi), axis=0)))


def _pyriemann_mean(X: torch.Tensor) -> tuple[np.ndarray, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pyr_mean.mean_riemann(X.numpy(), tol=1e-15, maxiter=3000)
    return ref, _residual_np(ref, X.numpy())


def _dispersed(kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "issue-2x2":  # three 2x2 matrices of condition 1000 (old code: distance 2.06 after 500 steps)
        Q = torch.linalg.qr(torch.randn(3, 2, 2, generator=g, dtype=F64))[0]
        return mf.sym(Q @ torch.diag(torch.tensor([1.0, 1e3], dtype=F64)) @ Q.mT)
    if kind.startswith("AAt"):  # A A^T + 1e-3 I, widely dispersed
        n = int(kind[3:])
        A = torch.randn(10, n, n, generator=g, dtype=F64)
        return mf.sym(A @ A.mT + 1e-3 * torch.eye(n, dtype=F64))
    cond = float(kind[4:])  # "cond1e5": eigenvalues log-uniform over [1, cond]
    Q = torch.linalg.qr(torch.randn(8, 4, 4, generator=g, dtype=F64))[0]
    lam = torch.exp(torch.rand(8, 4, generator=g, dtype=F64) * math.log(cond))
    return mf.sym((Q * lam.unsqueeze(-2)) @ Q.mT)


@pytest.mark.parametrize("kind", ["issue-2x2", "AAt3", "AAt5", "AAt8", "cond1e3", "cond1e5", "cond1e8"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_karcher_mean_converges_on_dispersed_and_ill_conditioned_batches(kind: str, seed: int) -> None:
    X = _dispersed(kind, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mf.KarcherConvergenceWarning)
        M = mf.mean_aim(X, karcher_steps=200, tol=1e-10)
    # certificate, computed by pyRiemann's matrix functions: our point is within 1e-9 of the true mean
    assert _residual_np(M.numpy(), X.numpy()) < 1e-9
    ref, ref_residual = _pyriemann_mean(X)
    if ref_residual < 1e-10:  # pyRiemann's flow does not converge on every such batch; compare where it does
        assert float(mf.distance_aim(M, torch.as_tensor(ref))) < 1e-8


def test_karcher_mean_of_the_issue_batch_was_wrong_with_unit_steps() -> None:
    """The fixed unit-step flow (tol=0, the batch-norm mode) is kept as it was: it does not converge here."""
    X = _dispersed("issue-2x2", 0)
    ref, ref_residual = _pyriemann_mean(X)
    assert ref_residual < 1e-10
    unit = mf.mean_aim(X, karcher_steps=500, tol=0.0)
    assert float(mf.distance_aim(unit, torch.as_tensor(ref))) > 0.1
    assert float(mf.distance_aim(mf.mean_aim(X, karcher_steps=500), torch.as_tensor(ref))) < 1e-8


def test_karcher_mean_not_converged_warns_or_raises() -> None:
    X = _dispersed("cond1e8", 0)
    with pytest.warns(mf.KarcherConvergenceWarning, match=r"residual .* > tol=1e-12 after 3 iterations"):
        M = mf.mean_aim(X, karcher_steps=3, tol=1e-12)
    assert torch.isfinite(M).all()
    with pytest.raises(mf.KarcherConvergenceError, match="not the mean to that tolerance"):
        mf.mean_aim(X, karcher_steps=3, tol=1e-12, on_fail="raise")
    with pytest.raises(ValueError, match="on_fail"):
        mf.mean_aim(X, on_fail="ignore")
    with pytest.raises(ValueError, match="tol"):
        mf.mean_aim(X, tol=math.nan)


def test_karcher_fixed_steps_are_the_plain_unit_step_flow_bit_for_bit() -> None:
    """tol=0 (what the norm layers call, karcher_steps=1..k) is exactly the unit-step flow of before."""
    g = torch.Generator().manual_seed(5)
    X = mf.sym(torch.linalg.matrix_exp(0.3 * mf.sym(torch.randn(16, 3, 4, 4, generator=g, dtype=F64))))
    for steps in (1, 2, 3):
        G = X.mean(0)
        for _ in range(steps):
            S, Si = mf.sym_sqrtm_invsqrtm(G)
            G = congruence(S, mf.sym_expm(mf.sym_logm(congruence(Si.unsqueeze(0), X)).mean(0)))
        assert torch.equal(mf.mean_aim(X, dim=0, karcher_steps=steps, tol=0.0), G)


def test_karcher_split_batch_and_per_channel_means_agree_with_the_whole_batch() -> None:
    X = torch.stack([_dispersed("AAt4", s) for s in range(3)], dim=1)  # (10, 3, 4, 4): three channels
    whole = mf.mean_aim(X, karcher_steps=200, tol=1e-11)
    split = mf.mean_aim(X, karcher_steps=200, tol=1e-11, reduce=lambda t: t)
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-12)
    for c in range(3):
        torch.testing.assert_close(whole[c], mf.mean_aim(X[:, c], karcher_steps=200, tol=1e-11), rtol=1e-9,
                                   atol=1e-9)


def test_karcher_mean_in_float32_converges_to_its_default_tolerance() -> None:
    g = torch.Generator().manual_seed(7)
    Q = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=F64))[0]
    Mh = (Q * torch.exp(torch.linspace(0.0, 0.5 * math.log(1e4), 20, dtype=F64))) @ Q.T  # M^{1/2}, cond(M) = 1e4
    S = torch.randn(32, 20, 20, generator=g, dtype=F64)
    X = mf.sym(Mh @ torch.linalg.matrix_exp(mf.sym(S) / math.sqrt(20)) @ Mh)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mf.KarcherConvergenceWarning)
        M32 = mf.mean_aim(X.float())
    # the residual bound of the float32 tolerance (1.2e-4), against the float64 mean of the same (rounded) data,
    # with a factor 2 for the round-off in the float32 residual itself
    assert float(mf.distance_aim(M32.double(), mf.mean_aim(X.float().double()))) < 2.4e-4


def test_karcher_mean_is_differentiable_on_a_dispersed_batch() -> None:
    X = _dispersed("AAt3", 1).requires_grad_()
    mf.mean_aim(X, karcher_steps=200, tol=1e-10).sum().backward()
    assert torch.isfinite(X.grad).all()


# ---- second derivatives --------------------------------------------------------------------------------------


def _first_order_cases() -> dict[str, tuple]:
    A, B = _spd([0.5, 1.0, 2.0], seed=1), _spd([0.3, 1.5, 4.0], seed=2)
    V = mf.sym(torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=F64))
    return {
        "sym_logm": (lambda X: mf.sym_logm(X), A, "sym_logm_ref"),
        "sym_expm": (lambda X: mf.sym_expm(X), V, "sym_expm_ref"),
        "sym_sqrtm": (lambda X: mf.sym_sqrtm(X), A, "sym_sqrtm_ref"),
        "sym_invsqrtm": (lambda X: mf.sym_invsqrtm(X), A, "sym_invsqrtm_ref"),
        "sym_powm": (lambda X: mf.sym_powm(X, 0.3), A, "sym_powm_ref"),
        "sym_reeig": (lambda X: mf.sym_reeig(X, 0.4), A, "sym_funcm_ref"),
        "sym_funcm": (lambda X: mf.sym_funcm(X, torch.sin, torch.cos), V, "sym_funcm_ref"),
        "SymEig.powm": (lambda X: mf.sym_eig(X).powm(0.7), A, "sym_powm_ref"),
        "SymEig.eigvals": (lambda X: mf.sym_eig(X).eigvals(), A, "eigvalsh"),
        "distance_aim": (lambda X: mf.distance_aim(B, X), A, "sym_logm_ref"),
        "lyapunov_solve": (lambda X: mf.lyapunov_solve(X, V), A, "_gbwbn_ref"),
        "transport_bw_to_identity": (lambda X: mf.transport_bw_to_identity(X, V), A, "_gbwbn_ref"),
        "exp_transport_op": (lambda X: exp_transport_op(X, V, B), A, "_gbwbn_ref"),
        "project_so": (lambda X: mf.project_so(X + 3 * torch.eye(3, dtype=F64)), V, "torch.linalg.svd"),
        "cholesky_log": (lambda X: mf.cholesky_log(X), A, "cholesky_log_ref"),
        "cholesky_exp": (lambda X: mf.cholesky_exp(torch.tril(X)), V, "cholesky_exp_ref"),
        "LieBN-LCM finish": (lambda X: _LCMFinish.apply(torch.tril(X), torch.ones(1, dtype=F64), torch.tril(V)), V,
                             "cholesky_exp_ref"),
    }


@pytest.mark.parametrize("name", list(_first_order_cases()))
def test_second_derivative_is_refused_with_advice(name: str) -> None:
    fn, X0, advice = _first_order_cases()[name]
    X = X0.clone().requires_grad_()
    (g_plain,) = torch.autograd.grad(fn(X).square().sum(), X)
    (g,) = torch.autograd.grad(fn(X).square().sum(), X, create_graph=True)
    torch.testing.assert_close(g, g_plain, rtol=0, atol=0)  # first derivatives unchanged by create_graph
    v = torch.randn_like(X)
    with pytest.raises(NotImplementedError, match=rf"once differentiable.*{advice}"):
        torch.autograd.grad((g * v).sum(), X)  # Hessian-vector product
    # also when the incoming gradient is a constant (the output enters the loss linearly)
    (g1,) = torch.autograd.grad(fn(X).sum(), X, create_graph=True)
    with pytest.raises(NotImplementedError, match="once differentiable"):
        torch.autograd.grad((g1 * v).sum(), X)


def test_the_advised_reference_gives_exact_second_derivatives() -> None:
    X = _spd([0.5, 1.0, 2.0], seed=4).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda Z: mf.sym_logm_ref(mf.sym(Z)).square().sum(), (X,))
