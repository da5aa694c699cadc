"""count_decompositions records every batched decomposition, forward and backward, inside autograd functions."""

import torch

from manifoldnorm.functional import sym_logm
from manifoldnorm.functional.profile import count_decompositions


def _spd(N: int, n: int) -> torch.Tensor:
    A = torch.randn(N, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return A @ A.mT / n + torch.eye(n, dtype=torch.float64)


def test_counts_calls_and_matrices_by_kind():
    X = _spd(5, 4)
    with count_decompositions() as log:
        torch.linalg.eigh(X)
        torch.linalg.cholesky(X[:3])
        torch.linalg.svd(X[0])
        torch.linalg.qr(X)
    assert log.by_kind() == {"eigh": 1, "cholesky": 1, "svd": 1, "qr": 1}
    assert log.count() == 4 and log.count("eigh") == 1
    assert log.matrices() == 5 + 3 + 1 + 5
    assert [c.shape for c in log.calls][:2] == [(5, 4, 4), (3, 4, 4)]


def test_sees_calls_inside_custom_autograd_functions_and_nothing_outside():
    X = _spd(7, 4).requires_grad_()
    with count_decompositions() as log:
        sym_logm(X).sum().backward()
    assert log.count("eigh") >= 1 and log.matrices("eigh") % 7 == 0
    with count_decompositions() as empty:
        (X @ X).sum()
    assert empty.count() == 0
