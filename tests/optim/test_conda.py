"""Conda: update formula, SVD refresh schedule, orthonormal basis, equivalence with Adam in the rotated basis."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from manifoldnorm.optim import build_optimizer, get_optimizer
from manifoldnorm.optim.conda import Conda, conda_basis, conda_update

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_conda(grads, betas, eps, gap, scale):
    """Conda's directions written out with explicit left/right singular vectors (float64)."""
    b1, b2 = betas
    shape = grads[0].shape
    m_, n_ = shape[0], grads[0][0].numel()
    M = torch.zeros(m_, n_, dtype=F64)
    V = torch.zeros(m_, n_, dtype=F64)
    out = []
    for t, g in enumerate(grads, start=1):
        G = g.reshape(m_, -1)
        M = b1 * M + (1 - b1) * G
        if (t - 1) % gap == 0:
            U, _, Vh = torch.linalg.svd(M, full_matrices=False)
            left = m_ < n_  # the authors' rule: right basis when rows >= cols
            Q = U if left else Vh.T
        Gr = Q.T @ G if left else G @ Q
        Mr = Q.T @ M if left else M @ Q
        V = b2 * V + (1 - b2) * Gr**2
        N = (Mr / (1 - b1**t)) / (torch.sqrt(V / (1 - b2**t)) + eps)
        D = Q @ N if left else N @ Q.T
        out.append(scale * D.reshape(shape))
    return out


@pytest.mark.parametrize("shape", [(4, 7), (7, 4), (5, 5), (4, 2, 3, 2)])
def test_conda_update_matches_formula(shape) -> None:
    betas, eps, gap, scale = (0.8, 0.95), 1e-8, 2, 0.25
    grads = [torch.randn(*shape, generator=_gen(t), dtype=F64) for t in range(5)]
    expected = _reference_conda(grads, betas, eps, gap, scale)
    m_, n_ = shape[0], grads[0][0].numel()
    exp_avg, exp_avg_sq, basis = torch.zeros(*shape, dtype=F64), torch.zeros(m_, n_, dtype=F64), None
    for t, (g, ref) in enumerate(zip(grads, expected, strict=True), start=1):
        g0 = g.clone()
        D, basis = conda_update(g, exp_avg, exp_avg_sq, basis, t, betas=betas, eps=eps, update_proj_gap=gap,
                                scale=scale)
        assert torch.equal(g, g0) and D.shape == shape and D.dtype == F64
        torch.testing.assert_close(D, ref, rtol=1e-10, atol=1e-12)


def test_first_step_is_sign_descent_in_the_singular_basis() -> None:
    # t = 1: M = (1-b1) G, V = (1-b2) (Q^T G)^2, so N = sign(Q^T G) up to eps and D = s Q sign(Q^T G).
    G = torch.randn(3, 8, generator=_gen(0), dtype=F64)
    D, Q = conda_update(G, torch.zeros_like(G), torch.zeros_like(G), None, 1, scale=0.5, eps=1e-12)
    U = torch.linalg.svd(G, full_matrices=False)[0]
    torch.testing.assert_close(D, 0.5 * U @ torch.sign(U.T @ G), rtol=0, atol=1e-9)


@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (3, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_basis_is_orthonormal_on_the_smaller_side(shape, dtype) -> None:
    p = torch.nn.Parameter(torch.randn(*shape, generator=_gen(0)).to(dtype))
    opt = Conda([p], update_proj_gap=1)
    for t in range(2):
        p.grad = torch.randn(*shape, generator=_gen(1 + t)).to(dtype)
        opt.step()
        Q = opt.state[p]["basis"]
        k = min(shape[0], p[0].numel())
        assert Q.shape == (k, k) and Q.dtype == torch.promote_types(dtype, torch.float32)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(Q.T @ Q, torch.eye(k, dtype=Q.dtype), rtol=0, atol=tol)
        torch.testing.assert_close(Q @ Q.T, torch.eye(k, dtype=Q.dtype), rtol=0, atol=tol)
    assert opt.state[p]["exp_avg_sq"].shape == (shape[0], p[0].numel()) and p.dtype == dtype
    # the basis spans the first moment's singular vectors: the rotated moment is diagonal-like (Q^T M = S V^T)
    M = opt.state[p]["exp_avg"].reshape(shape[0], -1).to(Q.dtype)
    R = Q.T @ M if shape[0] < M.shape[1] else M @ Q
    gram = R @ R.T if shape[0] < M.shape[1] else R.T @ R  # = S^2, diagonal
    off = gram - torch.diag(torch.diagonal(gram))
    assert off.abs().max() <= (1e-10 if dtype == torch.float64 else 1e-3) * gram.abs().max()


def test_svd_refresh_only_at_the_gap(monkeypatch) -> None:
    calls = []
    real_svd = torch.linalg.svd

    def counting_svd(*args, **kwargs):
        calls.append(1)
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    p = torch.nn.Parameter(torch.randn(5, 4, generator=_gen(0), dtype=F64))
    opt = Conda([p], update_proj_gap=3)
    bases, counts = [], []
    for t in range(10):
        p.grad = torch.randn(5, 4, generator=_gen(1 + t), dtype=F64)
        opt.step()
        bases.append(opt.state[p]["basis"].clone())
        counts.append(len(calls))
    assert counts == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4]  # refreshes at steps 1, 4, 7, 10
    changed = [not torch.equal(bases[i], bases[i - 1]) for i in range(1, 10)]
    assert changed == [False, False, True, False, False, True, False, False, True]


def _adam_in_rotated_basis(Q, wide, w0, grads, **kw):
    X = torch.nn.Parameter((Q.T @ w0 if wide else w0 @ Q).clone())
    opt = torch.optim.AdamW([X], **kw)
    for g in grads:
        X.grad = Q.T @ g if wide else g @ Q
        opt.step()
    return Q @ X.detach() if wide else X.detach() @ Q.T


def _run(opt_cls, w0, grads, **kw):
    p = torch.nn.Parameter(w0.clone())
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def test_square_gap_one_equals_adam_in_the_rotated_basis() -> None:
    # Gradients U diag(d_t) V^T with a fixed order of d_t: every first moment has the right singular vectors V (up
    # to signs, which Conda's direction does not see), so a refresh at every step keeps the basis V (square
    # matrices take the right basis, as the authors' code) and Conda is AdamW run on W V with gradients G_t V,
    # rotated back. The left basis U would give another update (element-wise normalization is basis dependent).
    n = 5
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(0), dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(1), dtype=F64))
    base = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=F64)
    # entry-wise factors in [0.9, 1.1] keep d_t strictly decreasing (4.5 > 4.4, 3.6 > 3.3, ...)
    grads = [U @ torch.diag(base * (0.9 + 0.2 * torch.rand(n, generator=_gen(10 + t), dtype=F64))) @ V.T
             for t in range(8)]
    w0 = torch.randn(n, n, generator=_gen(2), dtype=F64)
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    conda = _run(Conda, w0, grads, update_proj_gap=1, scale=1.0, **kw)
    torch.testing.assert_close(conda, _adam_in_rotated_basis(V, False, w0, grads, **kw), rtol=0, atol=1e-12)
    left = _adam_in_rotated_basis(U, True, w0, grads, **kw)
    assert (conda - left).norm() > 0.1 * (conda - w0).norm()


@pytest.mark.parametrize("shape", [(4, 9), (9, 4)])
def test_fixed_basis_equals_adam_in_the_rotated_basis(shape) -> None:
    # With a long gap the basis is the SVD basis of M_1 = (1-b1) G_1 for good; Conda is then exactly AdamW in it.
    grads = [torch.randn(*shape, generator=_gen(t), dtype=F64) for t in range(6)]
    w0 = torch.randn(*shape, generator=_gen(20), dtype=F64)
    wide = shape[0] < shape[1]
    U, _, Vh = torch.linalg.svd(grads[0], full_matrices=False)
    Q = U if wide else Vh.T
    kw = dict(lr=0.02, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.05)
    conda = _run(Conda, w0, grads, scale=1.0, **kw)
    torch.testing.assert_close(conda, _adam_in_rotated_basis(Q, wide, w0, grads, **kw), rtol=0, atol=1e-12)
    # scale multiplies the direction only (not the weight decay)
    half = _run(Conda, w0, grads, scale=0.5, lr=0.02, betas=(0.8, 0.9))
    full = _run(Conda, w0, grads, scale=1.0, lr=0.01, betas=(0.8, 0.9))
    torch.testing.assert_close(half, full, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------- the authors' code, written out
def _authors_conda(w0, grads, *, lr, betas, eps, weight_decay, gap, scale, eps_at=None, decay_first=False,
                   square_basis="right"):
    """The authors' ``conda_torch`` step (REFERENCES.md 3.1), written out in float64 on the ``(m, n)`` matrix.

    State m, v, P; at refresh steps P is ``Vh`` (rows >= cols) or ``U`` (rows < cols) of the SVD of the updated
    first moment; g' = g P^T (tall/square) or P^T g (wide); v accumulates g'^2; alpha = lr sqrt(1-b2^t)/(1-b1^t);
    N = m' / (sqrt(v) + eps); the step is -alpha scale (N P | P N), then decoupled weight decay ``p -= lr wd p``.

    Knobs that switch off the reference's own behaviour, to isolate our documented deviations:
    ``eps_at(t)`` replaces the constant eps, ``decay_first`` decays before the update, ``square_basis="left"``
    uses U on square matrices.
    """
    b1, b2 = betas
    shape = w0.shape
    W = w0.reshape(shape[0], -1).clone()
    rows, cols = W.shape
    right = rows > cols or (rows == cols and square_basis == "right")
    m = torch.zeros_like(W)
    v = torch.zeros_like(W)
    P = None
    for t0, g in enumerate(grads):
        g = g.reshape(rows, cols)
        m = b1 * m + (1 - b1) * g
        if P is None or t0 % gap == 0:
            U, _, Vh = torch.linalg.svd(m, full_matrices=False)
            P = Vh if right else U
        g_rot = g @ P.T if right else P.T @ g
        m_rot = m @ P.T if right else P.T @ m
        v = b2 * v + (1 - b2) * g_rot**2
        t = t0 + 1
        alpha = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        N = m_rot / (v.sqrt() + (eps if eps_at is None else eps_at(t)))
        delta = scale * (N @ P if right else P @ N)
        if decay_first:
            W = W - lr * weight_decay * W
        W = W - alpha * delta
        if not decay_first:
            W = W - lr * weight_decay * W
    return W.reshape(shape)


PARITY_SHAPES = [(6, 6), (8, 5), (5, 8), (6, 3, 1, 2), (8, 2, 2, 1)]  # square, tall, wide, conv (6, 6), conv (8, 4)


def _parity_problem(shape, steps=7):
    w0 = torch.randn(*shape, generator=_gen(30), dtype=F64)
    grads = [torch.randn(*shape, generator=_gen(31 + t), dtype=F64) for t in range(steps)]
    return w0, grads


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_matches_the_authors_code_with_deviations_neutralised(shape) -> None:
    # 7 steps with refreshes at steps 1, 4, 7. Our two documented deviations are switched off: no weight decay
    # (ours decays before the update, theirs after) and an eps far below sqrt(v) (ours adds eps to the
    # bias-corrected sqrt(v), theirs eps sqrt(1-b2^t)); test_eps_deviation / test_weight_decay_deviation below
    # measure each one.
    w0, grads = _parity_problem(shape)
    kw = dict(lr=0.02, betas=(0.8, 0.9), eps=1e-30)
    ours = _run(Conda, w0, grads, weight_decay=0.0, update_proj_gap=3, scale=0.25, **kw)
    ref = _authors_conda(w0, grads, weight_decay=0.0, gap=3, scale=0.25, **kw)
    assert ours.shape == shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-13)
    m, n = shape[0], math.prod(shape[1:])
    if m == n:  # the square case follows the right basis: the left one is far off (the test can fail)
        left = _authors_conda(w0, grads, weight_decay=0.0, gap=3, scale=0.25, square_basis="left", **kw)
        assert (left - ours).norm() > 0.1 * (ours - w0).norm()


def test_square_basis_choice_changes_the_step() -> None:
    # One step on a 48x48 matrix is sign descent in the singular basis: right and left bases give steps of equal
    # norm that differ by 83% of it for this gradient (basis-dependent element-wise normalization).
    w0, grads = torch.zeros(48, 48, dtype=F64), [torch.randn(48, 48, generator=_gen(40), dtype=F64)]
    kw = dict(lr=1.0, betas=(0.9, 0.999), eps=1e-30, weight_decay=0.0, gap=10, scale=1.0)
    right, left = _authors_conda(w0, grads, **kw), _authors_conda(w0, grads, square_basis="left", **kw)
    ours = _run(Conda, w0, grads, lr=1.0, eps=1e-30, scale=1.0)
    torch.testing.assert_close(ours, right, rtol=0, atol=1e-12)
    assert 0.7 < float((right - left).norm() / right.norm()) < 0.95


@pytest.mark.parametrize("shape", [(6, 6), (8, 5), (5, 8)])
def test_eps_deviation(shape) -> None:
    # Ours adds eps to the bias-corrected sqrt(v / (1 - b2^t)); the authors' code adds it to sqrt(v) and folds
    # sqrt(1 - b2^t) into the step size: ours equals theirs with eps_t = eps sqrt(1 - b2^t), and differs from
    # theirs with a constant eps large enough to matter.
    w0, grads = _parity_problem(shape, steps=5)
    b2, eps = 0.9, 0.05
    kw = dict(lr=0.02, betas=(0.8, b2), weight_decay=0.0, scale=1.0)
    ours = _run(Conda, w0, grads, eps=eps, update_proj_gap=2, **kw)
    rescaled = _authors_conda(w0, grads, eps=eps, eps_at=lambda t: eps * math.sqrt(1 - b2**t), gap=2, **kw)
    torch.testing.assert_close(ours, rescaled, rtol=0, atol=1e-13)
    constant = _authors_conda(w0, grads, eps=eps, gap=2, **kw)
    assert (constant - ours).abs().max() > 1e-4


@pytest.mark.parametrize("shape", [(6, 6), (8, 5), (5, 8)])
def test_weight_decay_deviation(shape) -> None:
    # Ours decays before the update (AdamW), the authors' code after it: ours equals theirs with the decay moved
    # first; after one step the two differ by exactly lr wd (lr D_1), D_1 our direction.
    w0, grads = _parity_problem(shape, steps=5)
    lr, wd = 0.05, 0.3
    kw = dict(lr=lr, betas=(0.8, 0.9), eps=1e-30, weight_decay=wd, scale=0.5)
    ours = _run(Conda, w0, grads, update_proj_gap=2, **kw)
    first = _authors_conda(w0, grads, gap=2, decay_first=True, **kw)
    torch.testing.assert_close(ours, first, rtol=0, atol=1e-13)
    one = _run(Conda, w0, grads[:1], update_proj_gap=2, **kw)
    lr_D = w0 * (1 - lr * wd) - one
    theirs = _authors_conda(w0, grads[:1], gap=2, **kw)
    torch.testing.assert_close(theirs - one, lr * wd * lr_D, rtol=0, atol=1e-14)
    assert (theirs - one).abs().max() > 1e-4


def test_conv_weights_are_flattened() -> None:
    shape = (4, 3, 2, 2)
    w0 = torch.randn(*shape, generator=_gen(0), dtype=F64)
    grads = [torch.randn(*shape, generator=_gen(1 + t), dtype=F64) for t in range(3)]
    conv = _run(Conda, w0, grads, lr=0.05, update_proj_gap=2)
    flat = _run(Conda, w0.reshape(4, -1), [g.reshape(4, -1) for g in grads], lr=0.05, update_proj_gap=2)
    assert conv.shape == shape
    torch.testing.assert_close(conv.reshape(4, -1), flat, rtol=0, atol=0)


def test_step_never_mutates_grad_and_zero_gradient_is_safe() -> None:
    p = torch.nn.Parameter(torch.randn(5, 3, generator=_gen(0)))
    opt = Conda([p], update_proj_gap=1)
    g = torch.randn(5, 3, generator=_gen(1))
    for _ in range(2):
        p.grad = g.clone()
        opt.step()
        assert torch.equal(p.grad, g)
    q = torch.nn.Parameter(torch.zeros(4, 6, dtype=F64))
    opt = Conda([q], update_proj_gap=1)
    for _ in range(3):
        q.grad = torch.zeros_like(q)
        opt.step()
    assert torch.equal(q.detach(), torch.zeros(4, 6, dtype=F64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_state_dict_round_trip_gives_identical_steps(dtype) -> None:
    grads = [torch.randn(5, 7, generator=_gen(t)).to(dtype) for t in range(7)]
    p = torch.nn.Parameter(torch.randn(5, 7, generator=_gen(9)).to(dtype))
    opt = Conda([p], lr=0.03, weight_decay=0.1, update_proj_gap=3)
    for g in grads[:2]:
        p.grad = g.clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = Conda([q], lr=1.0, update_proj_gap=50)
    opt2.load_state_dict(saved)
    assert opt2.state[q]["step"] == 2 and type(opt2.state[q]["step"]) is int
    assert opt2.state[q]["basis"].dtype == opt.state[p]["basis"].dtype
    assert torch.equal(opt2.state[q]["basis"], opt.state[p]["basis"])
    for g in grads[2:]:  # crosses the refresh at step 4 with the restored gap 3
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
        assert torch.equal(p, q)


def test_errors_and_registry() -> None:
    w, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="AdamW"):
        Conda([w, b])
    opt = Conda([w])
    with pytest.raises(ValueError, match="AdamW"):
        opt.add_param_group({"params": [b]})
    with pytest.raises(TypeError, match="complex"):
        Conda([torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])
    for bad in ({"lr": -1.0}, {"betas": (0.9, 1.0)}, {"eps": 0.0}, {"weight_decay": -0.1},
                {"update_proj_gap": 0}, {"update_proj_gap": 2.5}, {"scale": 0.0}):
        with pytest.raises(ValueError):
            Conda([w], **bad)
    g = torch.ones(3, 4)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        conda_update(g, torch.zeros(3, 4), torch.zeros(4, 3), None, 1)
    with pytest.raises(ValueError, match="basis"):
        conda_update(g, torch.zeros(3, 4), torch.zeros(3, 4), torch.eye(4), 1)
    with pytest.raises(ValueError, match="step"):
        conda_update(g, torch.zeros(3, 4), torch.zeros(3, 4), None, 0)
    with pytest.raises(ValueError, match="NaN"):
        conda_basis(torch.full((3, 4), float("nan")))
    w.grad = torch.full((3, 4), float("inf"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        opt.step()
    assert get_optimizer("conda").cls is Conda and get_optimizer("conda").kind == "euclidean"
    built = build_optimizer("conda", [torch.nn.Parameter(torch.randn(3, 3))], lr=0.01, betas=[0.9, 0.95],
                            update_proj_gap=100)
    assert isinstance(built, Conda) and built.param_groups[0]["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError, match="valid"):
        build_optimizer("conda", [w], momentum=0.9)
