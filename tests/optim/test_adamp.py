"""AdamP / SGDP: projection of the radial step on scale-invariant weights, update formulas, parity.

Descent, checkpoints, dtypes and the manifold guard: tests/optim/test_contract.py (every registered optimizer).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from manifoldnorm.optim import build_optimizer, get_optimizer
from manifoldnorm.optim.adamp import SGDP, AdamP, adamp_update, projection, sgdp_update

F64 = torch.float64
DELTA, EPS = 0.1, 1e-8


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ref_projection(w, g, x, delta=DELTA, eps=EPS):
    """Row-by-row cosine test (channel view, then whole tensor) and tangent projection; returns (x', projected)."""
    for rows in (w.shape[0], 1):
        W, G, X = w.reshape(rows, -1), g.reshape(rows, -1), x.reshape(rows, -1).clone()
        d = W.shape[1]
        cos = [abs(float(G[i] @ W[i])) / (max(float(G[i].norm()), eps) * max(float(W[i].norm()), eps))
               for i in range(rows)]
        if max(cos) < delta / math.sqrt(d):
            for i in range(rows):
                u = W[i] / (W[i].norm() + eps)
                X[i] = X[i] - u * (u @ X[i])
            return X.reshape(x.shape), True
    return x.clone(), False


def _standardized_loss(W, x, target):
    """Each output channel (row of W) feeds a batch standardization: the loss is invariant to each row's scale."""
    z = x @ W.reshape(W.shape[0], -1).T
    z = (z - z.mean(dim=0)) / z.std(dim=0)
    return ((z - target) ** 2 * torch.arange(1, z.shape[1] + 1, dtype=z.dtype)).sum()


def _normalized_weight_loss(W, x, target):
    """The whole weight is divided by its Frobenius norm: invariant to its overall scale, not to row scales."""
    z = x @ (W / W.norm()).reshape(W.shape[0], -1).T
    return ((z - target) ** 2).sum()


def _plain_loss(W, x, target):
    return ((x @ W.reshape(W.shape[0], -1).T - target) ** 2).sum()


def _grad(loss_fn, W, seed=0):
    d = W[0].numel()
    x = torch.randn(32, d, generator=_gen(seed), dtype=F64)
    target = torch.randn(32, W.shape[0], generator=_gen(seed + 1), dtype=F64)
    Wp = W.detach().clone().requires_grad_(True)
    loss_fn(Wp, x, target).backward()
    return Wp.grad


def _cos_rows(a, b, rows):
    a, b = a.reshape(rows, -1), b.reshape(rows, -1)
    return ((a * b).sum(1).abs() / (a.norm(dim=1) * b.norm(dim=1))).max().item()


# -------------------------------------------------------------------------------------------------- projection
@pytest.mark.parametrize("shape", [(4, 6), (3, 2, 3, 3)])
def test_channel_projection_for_weights_feeding_a_normalization(shape) -> None:
    W = torch.randn(*shape, generator=_gen(1), dtype=F64)
    g = _grad(_standardized_loss, W)
    assert _cos_rows(g, W, shape[0]) < 1e-12  # scale invariance makes every row's gradient orthogonal to the row
    x = torch.randn(*shape, generator=_gen(2), dtype=F64)
    out, factor = projection(W, g, x, DELTA, 0.1, EPS)
    ref, fired = _ref_projection(W, g, x)
    assert fired and factor == 0.1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)
    rows = out.reshape(shape[0], -1), W.reshape(shape[0], -1)
    # no radial component left in any channel (up to the eps in w / (|w| + eps): relative 2 eps / |w|)
    assert ((rows[0] * rows[1]).sum(1).abs() <= 1e-7 * rows[0].norm(dim=1) * rows[1].norm(dim=1)).all()
    # the tangential part is untouched: projecting twice changes nothing, and x - out is radial per row
    torch.testing.assert_close(projection(W, g, out)[0], out, rtol=1e-7, atol=1e-12)
    radial = (x - out).reshape(shape[0], -1)
    assert _cos_rows(radial, rows[1], shape[0]) == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(x, torch.randn(*shape, generator=_gen(2), dtype=F64))  # perturb not modified


def test_layer_projection_when_only_the_whole_tensor_is_scale_invariant() -> None:
    W = torch.randn(4, 6, generator=_gen(3), dtype=F64)
    g = _grad(_normalized_weight_loss, W, seed=4)
    assert _cos_rows(g, W, 1) < 1e-12
    assert _cos_rows(g, W, 4) > DELTA / math.sqrt(6)  # rows are not individually invariant: channel test fails
    x = torch.randn(4, 6, generator=_gen(5), dtype=F64)
    out, factor = projection(W, g, x, DELTA, 0.25, EPS)
    assert factor == 0.25
    u = W / (W.norm() + EPS)
    torch.testing.assert_close(out, x - u * (u * x).sum(), rtol=0, atol=1e-13)
    assert abs(float((out * W).sum())) <= 1e-7 * float(out.norm() * W.norm())


@pytest.mark.parametrize("shape", [(4, 6), (3, 2, 3, 3)])
def test_no_projection_for_weights_that_are_not_scale_invariant(shape) -> None:
    W = torch.randn(*shape, generator=_gen(6), dtype=F64)
    g = _grad(_plain_loss, W, seed=7)
    assert _cos_rows(g, W, shape[0]) >= DELTA / math.sqrt(W[0].numel())
    assert _cos_rows(g, W, 1) >= DELTA / math.sqrt(W.numel())
    x = torch.randn(*shape, generator=_gen(8), dtype=F64)
    out, factor = projection(W, g, x)
    assert factor == 1.0 and torch.equal(out, x) and out is not x


def test_projection_errors() -> None:
    with pytest.raises(ValueError, match="ndim >= 2"):
        projection(torch.ones(3), torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="one shape"):
        projection(torch.ones(3, 2), torch.ones(2, 3), torch.ones(3, 2))


# ------------------------------------------------------------------------------------------- update formulas
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("loss_fn", [_standardized_loss, _plain_loss, None])
def test_adamp_update_formula(loss_fn, nesterov) -> None:
    shape = (4, 5) if loss_fn is not None else (5,)
    b1, b2 = 0.8, 0.95
    W = torch.randn(*shape, generator=_gen(0), dtype=F64)
    m, v = torch.zeros(*shape, dtype=F64), torch.zeros(*shape, dtype=F64)
    m_ref, v_ref = m.clone(), v.clone()
    fired_any = False
    for t in range(1, 5):
        g = _grad(loss_fn, W, seed=t) if loss_fn is not None else torch.randn(5, generator=_gen(t), dtype=F64)
        g0 = g.clone()
        q, factor = adamp_update(g, m, v, W, t, betas=(b1, b2), eps=EPS, delta=DELTA, wd_ratio=0.1,
                                 nesterov=nesterov)
        m_ref = b1 * m_ref + (1 - b1) * g
        v_ref = b2 * v_ref + (1 - b2) * g * g
        num = b1 * m_ref + (1 - b1) * g if nesterov else m_ref
        p_t = num / (torch.sqrt(v_ref / (1 - b2**t)) + EPS)
        fired = False
        if W.dim() > 1:
            p_t, fired = _ref_projection(W, g, p_t)
        fired_any |= fired
        torch.testing.assert_close(q, p_t / (1 - b1**t), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(m, m_ref, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(v, v_ref, rtol=1e-14, atol=1e-15)
        assert factor == (0.1 if fired else 1.0) and torch.equal(g, g0)
        W = W - 0.05 * q
    assert fired_any == (loss_fn is _standardized_loss)


@pytest.mark.parametrize(("momentum", "dampening", "nesterov"), [(0.0, 0.0, False), (0.9, 0.1, False),
                                                                  (0.9, 0.0, True)])
@pytest.mark.parametrize("loss_fn", [_standardized_loss, _plain_loss])
def test_sgdp_update_formula(loss_fn, momentum, dampening, nesterov) -> None:
    W = torch.randn(3, 2, 2, generator=_gen(0), dtype=F64)
    buf = torch.zeros_like(W) if momentum else None
    b_ref = torch.zeros_like(W)
    for t in range(1, 4):
        g = _grad(loss_fn, W, seed=t)
        q, factor = sgdp_update(g, buf, W, momentum=momentum, dampening=dampening, nesterov=nesterov,
                                delta=DELTA, wd_ratio=0.1, eps=EPS)
        b_ref = momentum * b_ref + (1 - dampening) * g
        d = g + momentum * b_ref if nesterov else (b_ref if momentum else g)
        ref, fired = _ref_projection(W, g, d)
        torch.testing.assert_close(q, ref, rtol=1e-12, atol=1e-14)
        if buf is not None:  # the buffer keeps the unprojected momentum
            torch.testing.assert_close(buf, b_ref, rtol=1e-14, atol=1e-15)
        assert fired == (loss_fn is _standardized_loss) and factor == (0.1 if fired else 1.0)
        W = W - 0.05 * q


# ----------------------------------------------------------------------------- SGDP: the authors' code, written out
def _authors_sgdp(w0, loss_fn, steps, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                  delta=DELTA, wd_ratio=0.1, eps=EPS):
    """clovaai/AdamP ``sgdp.py``, ``SGDP.step`` for one weight, written out in float64 (gradient at the current w).

    buf = momentum buf + (1 - dampening) g (buf starts at 0 and exists even with momentum 0); d_p = g + momentum buf
    with Nesterov, else d_p IS buf; for ndim > 1 the projection tries the channel view (rows of w.view(out, -1)),
    then the layer view (w.view(1, -1)): if max |cosine_similarity(g, w)| < delta / sqrt(row length), then
    p_n = w / (|w_row| + eps) and ``d_p -= p_n * sum(p_n * d_p)`` IN PLACE (so without Nesterov the buffer is
    projected), and wd = wd_ratio; then w *= 1 - lr weight_decay wd / (1 - momentum); w -= lr d_p.
    """
    w = w0.clone()
    buf = torch.zeros_like(w)
    for t in range(steps):
        g = _grad(loss_fn, w, seed=10 + t)
        buf.mul_(momentum).add_(g, alpha=1 - dampening)
        d_p = g + momentum * buf if nesterov else buf
        wd = 1.0
        if w.dim() > 1:
            expand = [-1] + [1] * (w.dim() - 1)
            for view in (lambda x: x.reshape(x.shape[0], -1), lambda x: x.reshape(1, -1)):
                cosine = torch.nn.functional.cosine_similarity(view(g), view(w), dim=1, eps=eps).abs()
                if cosine.max() < delta / math.sqrt(view(w).shape[1]):
                    p_n = w / view(w).norm(dim=1).view(expand).add(eps)
                    d_p -= p_n * view(p_n * d_p).sum(dim=1).view(expand)
                    wd = wd_ratio
                    break
        if weight_decay != 0:
            w = w * (1 - lr * weight_decay * wd / (1 - momentum))
        w = w - lr * d_p
    return w


def _run_sgdp(w0, loss_fn, steps, **kw):
    p = torch.nn.Parameter(w0.clone())
    opt = SGDP([p], **kw)
    for t in range(steps):
        p.grad = _grad(loss_fn, p.detach(), seed=10 + t)
        opt.step()
    return p.detach()


SGDP_SETTINGS = [dict(momentum=0.9), dict(momentum=0.9, dampening=0.2, weight_decay=0.1),
                 dict(momentum=0.9, nesterov=True, weight_decay=0.1), dict(momentum=0.0, dampening=0.3)]


@pytest.mark.parametrize("kw", SGDP_SETTINGS, ids=["mom", "mom-damp-wd", "nesterov-wd", "no-mom-damp"])
@pytest.mark.parametrize(("shape", "loss_fn"), [((3, 2, 3, 3), _standardized_loss),  # conv-like, channel view
                                                ((4, 6), _standardized_loss),  # linear-like, channel view
                                                ((4, 6), _normalized_weight_loss)],  # layer view
                         ids=["conv-channel", "linear-channel", "linear-layer"])
def test_sgdp_code_variant_equals_the_authors_code(shape, loss_fn, kw) -> None:
    w0 = torch.randn(*shape, generator=_gen(0), dtype=F64)
    steps, lr = 6, 0.2
    ref = _authors_sgdp(w0, loss_fn, steps, lr=lr, **kw)
    code = _run_sgdp(w0, loss_fn, steps, lr=lr, momentum_variant="code", **kw)
    paper = _run_sgdp(w0, loss_fn, steps, lr=lr, **kw)
    torch.testing.assert_close(code, ref, rtol=0, atol=1e-13)
    moved = float((ref - w0).norm())
    if kw.get("nesterov"):  # the code projects a new tensor, not the buffer: both variants are the paper's
        torch.testing.assert_close(paper, code, rtol=0, atol=1e-13)
    else:  # momentum of projected steps (or, without momentum, the code's (1 - dampening) g) differs
        assert float((paper - code).norm()) > 1e-3 * moved


def test_sgdp_code_variant_stores_the_projected_buffer() -> None:
    # A buffer with a radial part (momentum gathered at earlier weights); the gradient of a scale-invariant loss is
    # tangent, so only the buffer's radial part tells the variants apart.
    W = torch.randn(4, 6, generator=_gen(0), dtype=F64)
    g = _grad(_standardized_loss, W)
    buf0 = torch.randn(4, 6, generator=_gen(1), dtype=F64)
    buf_paper, buf_code = buf0.clone(), buf0.clone()
    q_paper, _ = sgdp_update(g, buf_paper, W, momentum=0.9)
    q_code, f = sgdp_update(g, buf_code, W, momentum=0.9, momentum_variant="code")
    assert f == 0.1 and torch.equal(q_paper, q_code)  # this step's direction agrees, the stored buffers do not
    torch.testing.assert_close(buf_paper, 0.9 * buf0 + g, rtol=0, atol=1e-15)
    assert torch.equal(buf_code, q_code)
    assert ((buf_code * W).sum(1).abs() <= 1e-7 * buf_code.norm(dim=1) * W.norm(dim=1)).all()  # tangent rows
    u = W / (W.norm(dim=1, keepdim=True) + EPS)
    radial = u * (u * buf_paper).sum(1, keepdim=True)  # what the code variant drops: the buffer's radial part
    torch.testing.assert_close(buf_paper - buf_code, radial, rtol=0, atol=1e-12)
    assert float(radial.norm()) > 0.5


def test_sgdp_momentum_variant_option_errors_and_checkpoint() -> None:
    w = torch.nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match="momentum_variant.*valid: 'paper', 'code'"):
        SGDP([w], lr=0.1, momentum_variant="authors")
    with pytest.raises(TypeError, match="momentum_variant"):
        SGDP([w], lr=0.1, momentum_variant=True)
    with pytest.raises(ValueError, match="momentum_variant"):
        sgdp_update(torch.ones(3, 4), None, torch.ones(3, 4), momentum_variant="Code")
    opt = build_optimizer("sgdp", [w], lr=0.1, momentum=0.9, momentum_variant="code")
    assert opt.param_groups[0]["momentum_variant"] == "code"
    with pytest.raises(ValueError, match="momentum_variant"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, 2))], "momentum_variant": "x"})
    saved = copy.deepcopy(opt.state_dict())
    del saved["param_groups"][0]["momentum_variant"]  # a checkpoint from before the option: the paper's variant
    opt2 = SGDP([torch.nn.Parameter(torch.randn(3, 4))], lr=0.1, momentum_variant="code")
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["momentum_variant"] == "paper"


# ------------------------------------------------------------------------------------------------- optimizers
def _run(opt_cls, w0, grads, **kw):
    p = torch.nn.Parameter(w0.clone())
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("shape", [(7,), (4, 6)])
def test_equals_torch_adamw_and_sgd_without_projection(shape) -> None:
    w0 = torch.randn(*shape, generator=_gen(0), dtype=F64)
    # gradients strongly aligned with the weight: the cosine test never fires
    grads = [2 * w0 + torch.randn(*shape, generator=_gen(1 + t), dtype=F64) for t in range(6)]
    if len(shape) > 1:
        assert all(projection(w0, g, g)[1] == 1.0 for g in grads)
    for wd in (0.0, 0.1):
        kw = dict(lr=0.01, betas=(0.9, 0.99), weight_decay=wd)
        torch.testing.assert_close(_run(AdamP, w0, grads, **kw), _run(torch.optim.AdamW, w0, grads, **kw),
                                   rtol=0, atol=1e-14)
    for kw in ({"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}, {}):
        torch.testing.assert_close(_run(SGDP, w0, grads, lr=0.01, **kw),
                                   _run(torch.optim.SGD, w0, grads, lr=0.01, **kw), rtol=0, atol=1e-14)


@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_projected_steps_are_tangent_and_slow_the_norm_growth(cls) -> None:
    # A weight feeding a per-channel normalization: AdamP/SGDP's steps have no radial part, so the row norms grow
    # only at second order, while plain Adam/SGD's momentum pushes them outward.
    plain = torch.optim.Adam if cls is AdamP else torch.optim.SGD
    kw = dict(lr=0.05) if cls is AdamP else dict(lr=0.05, momentum=0.9)
    x = torch.randn(64, 6, generator=_gen(0), dtype=F64)
    target = torch.randn(64, 4, generator=_gen(1), dtype=F64)
    norms = {}
    for opt_cls in (cls, plain):
        W = torch.nn.Parameter(torch.randn(4, 6, generator=_gen(2), dtype=F64))
        opt = opt_cls([W], **kw)
        for _ in range(30):
            opt.zero_grad()
            _standardized_loss(W, x, target).backward()
            before = W.detach().clone()
            opt.step()
            if opt_cls is cls:
                step = W.detach() - before
                # cosine(step, w) per row: ~1e-6 (the eps of w / (|w| + eps) times the radial part removed),
                # against 0.5-1 for Adam/SGD
                assert ((step * before).sum(1).abs() <= 1e-5 * before.norm(dim=1) * step.norm(dim=1)).all()
        norms[opt_cls] = W.detach().norm(dim=1)
    w0 = torch.randn(4, 6, generator=_gen(2), dtype=F64).norm(dim=1)
    growth, growth_plain = norms[cls] - w0, norms[plain] - w0
    assert (growth >= -1e-12).all() and growth.sum() < 0.5 * growth_plain.sum()


@pytest.mark.parametrize(("cls", "kw"), [(AdamP, {"lr": 0.03, "weight_decay": 0.1, "nesterov": True}),
                                         (SGDP, {"lr": 0.03, "momentum": 0.9, "weight_decay": 0.1})])
def test_state_dict_round_trip_and_grad_untouched(cls, kw) -> None:
    x = torch.randn(16, 5, generator=_gen(0), dtype=F64)
    target = torch.randn(16, 3, generator=_gen(1), dtype=F64)
    p = torch.nn.Parameter(torch.randn(3, 5, generator=_gen(2), dtype=F64))
    b = torch.nn.Parameter(torch.randn(3, generator=_gen(3), dtype=F64))
    opt = cls([p, b], **kw)

    def grads(W, bias):
        W, bias = W.detach().requires_grad_(True), bias.detach().requires_grad_(True)
        (_standardized_loss(W, x, target) + (bias**2).sum()).backward()
        return W.grad, bias.grad

    for _ in range(3):
        p.grad, b.grad = grads(p, b)
        g0 = p.grad.clone()
        opt.step()
        assert torch.equal(p.grad, g0)
    saved = copy.deepcopy(opt.state_dict())
    p2, b2 = torch.nn.Parameter(p.detach().clone()), torch.nn.Parameter(b.detach().clone())
    opt2 = cls([p2, b2], lr=1.0)
    opt2.load_state_dict(saved)
    for _ in range(3):
        p.grad, b.grad = grads(p, b)
        p2.grad, b2.grad = grads(p2, b2)
        opt.step()
        opt2.step()
        assert torch.equal(p, p2) and torch.equal(b, b2)


def test_weight_decay_is_scaled_where_projected() -> None:
    W = torch.randn(4, 6, generator=_gen(0), dtype=F64)
    g = _grad(_standardized_loss, W)
    lr, wd = 0.1, 0.5
    for cls, extra, denom in ((AdamP, {}, 1.0), (SGDP, {"momentum": 0.5}, 0.5)):
        zero_lr = _run(cls, W, [g], lr=lr, weight_decay=wd, **extra)
        no_wd = _run(cls, W, [g], lr=lr, **extra)
        # one step: (W (1 - lr wd r / denom)) - lr q  vs  W - lr q, with r = wd_ratio = 0.1
        torch.testing.assert_close(zero_lr - no_wd, -W * lr * wd * 0.1 / denom, rtol=0, atol=1e-14)


def test_errors_and_registry() -> None:
    w = torch.nn.Parameter(torch.randn(3, 4))
    for bad in ({"lr": -1.0}, {"betas": (0.9, 1.0)}, {"eps": 0.0}, {"weight_decay": -1.0}, {"delta": -0.1},
                {"wd_ratio": 1.5}):
        with pytest.raises(ValueError):
            AdamP([w], **bad)
    for bad in ({"momentum": 1.0}, {"nesterov": True}, {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
                {"lr": -0.1}):
        with pytest.raises(ValueError):
            SGDP([w], **{"lr": 0.1, **bad})
    with pytest.raises(TypeError):
        SGDP([w])  # lr is required
    with pytest.raises(ValueError, match="step"):
        adamp_update(torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3), 0)
    c = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    c.grad = torch.ones_like(c)
    with pytest.raises(TypeError, match="complex"):
        AdamP([c]).step()
    for name, cls in (("adamp", AdamP), ("sgdp", SGDP)):
        assert get_optimizer(name).cls is cls and get_optimizer(name).kind == "euclidean"
    assert isinstance(build_optimizer("adamp", [w], lr=0.01, betas=[0.9, 0.95], delta=0.2), AdamP)
    assert isinstance(build_optimizer("sgdp", [w], lr=0.01, momentum=0.9, nesterov=True), SGDP)
    with pytest.raises(ValueError, match="valid"):
        build_optimizer("adamp", [w], momentum=0.9)
