"""SinkGD: Sinkhorn normalization formula and fixed point, scale invariance, statelessness.

Descent, checkpoints, dtypes and the manifold guard: tests/optim/test_contract.py (every registered optimizer).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from manifoldnorm.optim import build_optimizer, get_optimizer
from manifoldnorm.optim.sinkgd import SinkGD, sinkgd_update, sinkhorn_normalize

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(G: torch.Tensor, iters: int) -> torch.Tensor:
    """Row/column passes written with explicit diagonal matrices: X <- sqrt(n) Q^-1 X, X <- sqrt(m) X R^-1."""
    m, n = G.shape
    X = G.clone()
    for _ in range(iters):
        Q = torch.diag(torch.sqrt((X**2).sum(dim=1)))
        X = math.sqrt(n) * torch.linalg.solve(Q, X)
        R = torch.diag(torch.sqrt((X**2).sum(dim=0)))
        X = math.sqrt(m) * torch.linalg.solve(R, X.T).T
    return X


@pytest.mark.parametrize("iters", [1, 2, 5])
@pytest.mark.parametrize("shape", [(6, 4), (3, 9), (5, 5)])
def test_sinkhorn_matches_formula(shape, iters) -> None:
    G = torch.randn(*shape, generator=_gen(iters), dtype=F64) * torch.logspace(-2, 2, shape[1], dtype=F64)
    X = sinkhorn_normalize(G, iters=iters)
    torch.testing.assert_close(X, _reference(G, iters), rtol=1e-12, atol=1e-12)
    # a positive diagonal rescaling D_r G D_c: signs and rank-one structure of the ratio X / G
    assert torch.equal(torch.sign(X), torch.sign(G))
    ratio = X / G
    assert torch.linalg.matrix_rank(ratio).item() == 1


@pytest.mark.parametrize("shape", [(8, 5), (5, 8), (16, 16), (40, 7)])
def test_fixed_point_rows_sqrt_in_columns_sqrt_out_rms_one(shape) -> None:
    m, n = shape
    G = torch.randn(m, n, generator=_gen(m * n), dtype=F64) * torch.logspace(-1, 1, m, dtype=F64)[:, None]
    # after any number of passes the last (column) step fixes the columns, hence the Frobenius norm and RMS 1
    X5 = sinkhorn_normalize(G)
    torch.testing.assert_close(X5.norm(dim=0), torch.full((n,), math.sqrt(m), dtype=F64), rtol=1e-13, atol=0)
    assert X5.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-13)
    # the rows approach sqrt(n): enough passes reach the fixed point where both hold
    X = sinkhorn_normalize(G, iters=200)
    torch.testing.assert_close(X.norm(dim=1), torch.full((m,), math.sqrt(n), dtype=F64), rtol=1e-9, atol=0)
    torch.testing.assert_close(X.norm(dim=0), torch.full((n,), math.sqrt(m), dtype=F64), rtol=1e-12, atol=0)
    # and the fixed point is fixed: one more pass changes nothing
    torch.testing.assert_close(sinkhorn_normalize(X, iters=1), X, rtol=1e-9, atol=1e-12)
    # row-norm error shrinks with the number of passes (5 is already far better than 1)
    err = [(sinkhorn_normalize(G, iters=k).norm(dim=1) - math.sqrt(n)).abs().max().item() for k in (1, 5, 20)]
    assert err[0] > err[1] > err[2]


def test_scale_invariance_batch_and_zero_rows() -> None:
    G = torch.randn(3, 7, 5, generator=_gen(0), dtype=F64)
    X = sinkhorn_normalize(G)
    for c in (1e-3, 7.0, 1e4):
        torch.testing.assert_close(sinkhorn_normalize(c * G), X, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(sinkhorn_normalize(-G), -X, rtol=0, atol=0)
    for i in range(3):
        torch.testing.assert_close(sinkhorn_normalize(G[i]), X[i], rtol=1e-14, atol=1e-14)
    H = G[0].clone()
    H[2] = 0.0
    Y = sinkhorn_normalize(H)
    assert torch.equal(Y[2], torch.zeros(5, dtype=F64)) and bool(torch.isfinite(Y).all())
    assert torch.equal(sinkhorn_normalize(torch.zeros(4, 3, dtype=F64)), torch.zeros(4, 3, dtype=F64))
    assert sinkhorn_normalize(G.bfloat16()).dtype == torch.bfloat16


def test_update_is_invariant_to_gradient_scale() -> None:
    w0 = torch.randn(6, 4, generator=_gen(1), dtype=F64)
    g = torch.randn(6, 4, generator=_gen(2), dtype=F64)
    out = []
    for c in (1e-4, 1.0, 300.0):
        p = torch.nn.Parameter(w0.clone())
        p.grad = c * g
        SinkGD([p], lr=0.01).step()
        out.append(p.detach())
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-15)
    torch.testing.assert_close(out[2], out[1], rtol=0, atol=1e-15)
    torch.testing.assert_close(out[1], w0 - 0.01 * sinkhorn_normalize(g), rtol=0, atol=1e-15)


def test_optimizer_step_formula_with_weight_decay_and_conv() -> None:
    shape = (4, 3, 2, 2)
    w0 = torch.randn(*shape, generator=_gen(0), dtype=F64)
    p = torch.nn.Parameter(w0.clone())
    opt = SinkGD([p], lr=0.05, iters=3, weight_decay=0.1)
    W = w0.clone()
    for t in range(3):
        g = torch.randn(*shape, generator=_gen(1 + t), dtype=F64)
        p.grad = g.clone()
        opt.step()
        W = W * (1 - 0.05 * 0.1) - 0.05 * _reference(g.reshape(4, -1), 3).reshape(shape)
        torch.testing.assert_close(p.detach(), W, rtol=0, atol=1e-14)
        assert torch.equal(p.grad, g)  # never mutated
    torch.testing.assert_close(sinkgd_update(g), sinkhorn_normalize(g.reshape(4, -1)).reshape(shape), rtol=0, atol=0)


def test_stateless() -> None:
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=_gen(0))),
              torch.nn.Parameter(torch.randn(2, 3, 3, 3, generator=_gen(1)))]
    opt = SinkGD(params, lr=0.01, weight_decay=0.01)
    for t in range(4):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=_gen(10 * t + i))
        opt.step()
    assert len(opt.state) == 0
    assert len(opt.state_dict()["state"]) == 0


def test_state_dict_round_trip_gives_identical_steps() -> None:
    grads = [torch.randn(5, 7, generator=_gen(t)) for t in range(5)]
    p = torch.nn.Parameter(torch.randn(5, 7, generator=_gen(9)))
    opt = SinkGD([p], lr=0.03, iters=4, weight_decay=0.1)
    p.grad = grads[0].clone()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = SinkGD([q], lr=1.0)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["iters"] == 4 and opt2.param_groups[0]["lr"] == 0.03
    for g in grads[1:]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
        assert torch.equal(p, q)


def test_errors_and_registry() -> None:
    w, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="AdamW"):
        SinkGD([w, b])
    opt = SinkGD([w])
    with pytest.raises(ValueError, match="AdamW"):
        opt.add_param_group({"params": [b]})
    for bad in ({"lr": -1.0}, {"iters": 0}, {"iters": 2.0}, {"weight_decay": -0.1}, {"eps": 0.0}):
        with pytest.raises(ValueError):
            SinkGD([w], **bad)
    with pytest.raises(ValueError, match=r"\(\.\.\., m, n\)"):
        sinkhorn_normalize(torch.ones(4))
    with pytest.raises(TypeError, match="floating"):
        sinkhorn_normalize(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="AdamW"):
        sinkgd_update(torch.ones(4))
    assert get_optimizer("sinkgd").cls is SinkGD and get_optimizer("sinkgd").kind == "euclidean"
    assert isinstance(build_optimizer("sinkgd", [w], lr=0.01, iters=3), SinkGD)
    with pytest.raises(ValueError, match="valid"):
        build_optimizer("sinkgd", [w], momentum=0.9)
