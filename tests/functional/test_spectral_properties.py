"""Property-based checks of the spectral backward on spectra with clusters and exact ties (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from manifoldnorm import functional as mf

F64 = torch.float64
# eigenvalues drawn from a few values, so exact ties and tight clusters are common
EIGS = st.lists(
    st.sampled_from([1e-3, 0.5, 1.0, 1.0 + 1e-12, 1.0 + 1e-7, 2.0, 30.0]), min_size=2, max_size=6
)
# ours, and an independent general-matrix implementation from SciPy (Schur-based, no eigendecomposition)
FUNCS = {
    "logm": (mf.sym_logm, sla.logm),
    "sqrtm": (mf.sym_sqrtm, sla.sqrtm),
    "invsqrtm": (mf.sym_invsqrtm, lambda M: sla.fractional_matrix_power(M, -0.5)),
    "powm": (lambda X: mf.sym_powm(X, -0.7), lambda M: sla.fractional_matrix_power(M, -0.7)),
    "expm": (lambda X: mf.sym_expm(X - torch.eye(X.shape[-1], dtype=X.dtype)),
             lambda M: sla.expm(M - np.eye(M.shape[0]))),
}


def frechet_derivative(f_np, X: np.ndarray, H: np.ndarray) -> np.ndarray:
    """Df(X)[H] as the upper-right block of f([[X, H], [0, X]]) (Higham, Functions of Matrices, Thm 3.6)."""
    n = X.shape[0]
    big = np.block([[X, H], [np.zeros((n, n)), X]])
    return np.real(f_np(big))[:n, n:]


@pytest.mark.parametrize("name", sorted(FUNCS))
@settings(max_examples=25, deadline=None)
@given(eigs=EIGS, seed=st.integers(0, 2**16))
def test_gradient_matches_the_frechet_derivative_of_scipy(name: str, eigs: list[float], seed: int) -> None:
    fn, fn_np = FUNCS[name]
    n = len(eigs)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    X = (Q * torch.tensor(eigs, dtype=F64)) @ Q.T
    X = 0.5 * (X + X.T)
    H = torch.randn(n, n, dtype=F64, generator=g)
    H = 0.5 * (H + H.T)
    G = torch.randn(n, n, dtype=F64, generator=g)
    Xr = X.clone().requires_grad_()
    (fn(Xr) * G).sum().backward()
    analytic = (Xr.grad * H).sum()
    # <G, Df(X)[H]> from SciPy's general-matrix function of a block matrix: no eigenvalue ties involved
    expected = float((frechet_derivative(fn_np, X.numpy(), H.numpy()) * G.numpy()).sum())
    assert torch.isfinite(Xr.grad).all()
    assert abs(float(analytic) - expected) <= 1e-7 * max(1.0, abs(expected))
