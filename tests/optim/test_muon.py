"""Muon / NorMuon: Newton–Schulz spectrum, update formulas, parity with torch.optim.Muon, state.

Descent, checkpoints, dtypes and the manifold guard: tests/optim/test_contract.py (every registered optimizer).
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch

from manifoldnorm.optim import build_optimizer, get_optimizer
from manifoldnorm.optim.muon import Muon, NorMuon, adjust_lr, muon_update, newton_schulz, normuon_update

ABC = (3.4445, -4.7750, 2.0315)
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quintic_map(s: torch.Tensor, steps: int = 5, abc=ABC) -> torch.Tensor:
    """The scalar polynomial that Newton–Schulz applies to each normalized singular value."""
    a, b, c = abc
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


def _with_singular_values(shape, s: torch.Tensor, seed: int) -> torch.Tensor:
    m, n = shape
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=_gen(seed), dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=_gen(seed + 1), dtype=F64))
    return U @ torch.diag(s) @ V.mT, U, V


# ----------------------------------------------------------------------------------------------- Newton–Schulz
@pytest.mark.parametrize("shape", [(8, 5), (5, 8), (6, 6)])
def test_newton_schulz_maps_singular_values_by_the_scalar_polynomial(shape) -> None:
    k = min(shape)
    s = torch.linspace(0.05, 3.0, k, dtype=F64)
    G, U, V = _with_singular_values(shape, s, seed=k)
    expected = U @ torch.diag(_quintic_map(s / s.norm())) @ V.mT  # ||G||_F = ||s||_2
    torch.testing.assert_close(newton_schulz(G), expected, rtol=0, atol=1e-12)


def test_newton_schulz_singular_value_band() -> None:
    # Band of the 5-step quintic map over normalized singular values s in [0.01, 1], scanned on a fine grid:
    # the minimum 0.682 is reached at s = 1 and at the lower end, the maximum 1.134 just above the overshoot.
    grid = _quintic_map(torch.linspace(0.01, 1.0, 200_001, dtype=F64))
    lo, hi = grid.min().item(), grid.max().item()
    assert 0.68 < lo < 0.69 and 1.13 < hi < 1.14
    for seed, shape in enumerate([(16, 48), (48, 16), (20, 60), (2, 3, 32, 12)]):
        G = torch.randn(*shape, generator=_gen(seed), dtype=F64)
        s_in = torch.linalg.svdvals(G) / torch.linalg.matrix_norm(G, keepdim=False).unsqueeze(-1)
        assert s_in.min() >= 0.01  # rectangular Gaussian matrices are well conditioned: the band applies
        s_out = torch.linalg.svdvals(newton_schulz(G))
        assert s_out.min() >= lo - 1e-9 and s_out.max() <= hi + 1e-9
        # float32 input: same band up to rounding
        s32 = torch.linalg.svdvals(newton_schulz(G.float()).double())
        assert s32.min() >= lo - 1e-4 and s32.max() <= hi + 1e-4


def test_newton_schulz_orthogonal_ish_and_cubic_converges_to_polar_factor() -> None:
    G = torch.randn(7, 12, generator=_gen(3), dtype=F64) + 0.0
    O = newton_schulz(G)
    eig = torch.linalg.eigvalsh(O @ O.mT)  # (0.68^2, 1.14^2): rows nearly orthonormal
    assert eig.min() > 0.68**2 and eig.max() < 1.14**2
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = newton_schulz(G, steps=40, coefficients=(1.5, -0.5, 0.0))
    torch.testing.assert_close(polar, U @ Vh, rtol=0, atol=1e-10)


def test_newton_schulz_transpose_scale_zero_and_batch() -> None:
    G = torch.randn(3, 9, 4, generator=_gen(5), dtype=F64)
    O = newton_schulz(G)
    torch.testing.assert_close(newton_schulz(G.mT), O.mT, rtol=0, atol=1e-14)
    torch.testing.assert_close(newton_schulz(7.5 * G), O, rtol=0, atol=1e-12)
    for i in range(3):
        torch.testing.assert_close(newton_schulz(G[i]), O[i], rtol=0, atol=1e-13)
    assert torch.equal(newton_schulz(torch.zeros(4, 6, dtype=F64)), torch.zeros(4, 6, dtype=F64))
    assert newton_schulz(G.bfloat16()).dtype == torch.bfloat16


def test_newton_schulz_errors() -> None:
    with pytest.raises(ValueError, match=r"\(\.\.\., m, n\)"):
        newton_schulz(torch.ones(5))
    with pytest.raises(TypeError, match="floating"):
        newton_schulz(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="three numbers"):
        newton_schulz(torch.ones(3, 3), coefficients=(1.5, -0.5))
    with pytest.raises(ValueError, match="non-negative int"):
        newton_schulz(torch.ones(3, 3), steps=-1)


# --------------------------------------------------------------------------------------------- update formulas
def test_adjust_lr() -> None:
    assert adjust_lr(0.1, (8, 2), "original") == pytest.approx(0.2)
    assert adjust_lr(0.1, (2, 8), None) == pytest.approx(0.1)
    assert adjust_lr(0.1, (2, 8), "match_rms_adamw") == pytest.approx(0.1 * 0.2 * math.sqrt(8))
    assert adjust_lr(0.1, (64, 4, 3, 3), "original") == pytest.approx(0.1 * math.sqrt(64 / 36))  # (out, in*kh*kw)
    with pytest.raises(ValueError, match="'original', 'match_rms_adamw'"):
        adjust_lr(0.1, (4, 4), "spectral")


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("shape", [(6, 4), (4, 3, 2, 2)])
def test_muon_update_formula(nesterov, shape) -> None:
    beta = 0.9
    g = torch.randn(*shape, generator=_gen(0), dtype=F64)
    buf = torch.randn(*shape, generator=_gen(1), dtype=F64)
    g0, buf0 = g.clone(), buf.clone()
    O = muon_update(g, buf, beta=beta, nesterov=nesterov, ns_dtype=None)  # full (float64) precision
    m_new = beta * buf0 + (1 - beta) * g0
    u = (1 - beta) * g0 + beta * m_new if nesterov else m_new
    expected = newton_schulz(u.reshape(shape[0], -1)).reshape(shape)
    torch.testing.assert_close(buf, m_new, rtol=0, atol=1e-15)
    torch.testing.assert_close(O, expected, rtol=0, atol=1e-13)
    assert torch.equal(g, g0) and O.is_contiguous()
    # default: Newton–Schulz of the bfloat16-rounded direction, in bfloat16
    O16 = muon_update(g, buf0.clone(), beta=beta, nesterov=nesterov)
    assert O16.dtype == F64 and O16.is_contiguous()
    assert torch.equal(O16, newton_schulz(u.reshape(shape[0], -1).bfloat16()).reshape(shape).double())
    assert (O16 - expected).abs().max() > 1e-4  # bfloat16 rounding is visible: the default is not float64


@pytest.mark.parametrize("mode", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("shape", [(6, 4), (3, 8), (4, 2, 3)])
def test_normuon_update_formula(mode, shape) -> None:
    beta, beta2, eps = 0.9, 0.8, 1e-8
    buf = torch.zeros(*shape, dtype=F64)
    v = torch.zeros(shape[0], dtype=F64)
    buf_ref, v_ref = buf.clone(), v.clone()
    for t in range(3):
        g = torch.randn(*shape, generator=_gen(10 + t), dtype=F64)
        U = normuon_update(g, buf, v, beta=beta, beta2=beta2, eps=eps, adjust_lr_fn=mode, ns_dtype=None)
        buf_ref = beta * buf_ref + (1 - beta) * g
        O = newton_schulz(((1 - beta) * g + beta * buf_ref).reshape(shape[0], -1))
        m, n = O.shape
        v_ref = beta2 * v_ref + (1 - beta2) * (O**2).sum(dim=1) / n
        O_hat = O / (v_ref.sqrt()[:, None] + eps)
        if mode == "original":
            expected = O_hat * O.norm() / O_hat.norm() * math.sqrt(max(1, m / n))
        else:
            expected = O_hat * 0.2 * math.sqrt(m * n) / O_hat.norm()
        torch.testing.assert_close(v, v_ref, rtol=0, atol=1e-14)
        torch.testing.assert_close(U, expected.reshape(shape), rtol=0, atol=1e-12)
    if mode == "match_rms_adamw":
        assert U.pow(2).mean().sqrt().item() == pytest.approx(0.2, rel=1e-12)


@pytest.mark.parametrize("shape", [(10, 6), (6, 10)])
def test_normuon_equalizes_rows_and_restores_frobenius_norm(shape) -> None:
    # Constant gradient G: the Nesterov blend is a positive multiple of G, so O_t = NS(G) = O for all t and
    # v_t = (1 - beta2^t) r with r_i = mean_j O_ij^2. Row i of O / sqrt(v_t) then has norm sqrt(n / (1 - beta2^t))
    # for every i: all rows equal (up to eps), and after the norm restore each row has norm ||O||_F / sqrt(m)
    # (times the shape factor). Muon's own O has unequal rows for this ill-conditioned, row-scaled G.
    m, n = shape
    G = torch.randn(m, n, generator=_gen(2), dtype=F64) * torch.logspace(-1, 1, m, dtype=F64)[:, None]
    O = newton_schulz(G)
    ratio = O.norm(dim=1).max() / O.norm(dim=1).min()
    assert ratio > 1.1
    buf, v = torch.zeros(m, n, dtype=F64), torch.zeros(m, dtype=F64)
    scale = math.sqrt(max(1.0, m / n))
    for _ in range(4):
        U = normuon_update(G, buf, v, ns_dtype=None)
        torch.testing.assert_close(U.norm(), O.norm() * scale, rtol=1e-12, atol=0)
        torch.testing.assert_close(U.norm(dim=1), torch.full((m,), (O.norm() * scale / math.sqrt(m)).item(),
                                                             dtype=F64), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------- optimizers
def _run(opt_cls, w0: torch.Tensor, grads, **kwargs) -> torch.Tensor:
    p = torch.nn.Parameter(w0.clone())
    opt = opt_cls([p], **kwargs)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("mode", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(8, 5), (5, 8), (6, 6)])
def test_muon_matches_torch_muon(shape, wd, mode) -> None:
    w0 = torch.randn(*shape, generator=_gen(0))
    grads = [torch.randn(*shape, generator=_gen(1 + t)) for t in range(5)]
    kw = dict(lr=0.02, weight_decay=wd, adjust_lr_fn=mode)
    ref = _run(torch.optim.Muon, w0, grads, **kw)
    # torch iterates in bfloat16, as our default: the steps agree exactly
    assert torch.equal(_run(Muon, w0, grads, **kw), ref)
    assert torch.equal(_run(Muon, w0, grads, ns_dtype=torch.bfloat16, **kw), ref)
    # full precision (float32 here): differs by bfloat16 rounding of O (< 0.05 per entry) times 5 adjusted lrs
    full = _run(Muon, w0, grads, ns_dtype=None, **kw)
    torch.testing.assert_close(full, ref, rtol=0, atol=5 * adjust_lr(0.02, shape, mode) * 0.05)
    assert not torch.equal(full, ref)


def test_muon_matches_torch_without_nesterov_and_with_defaults() -> None:
    w0 = torch.randn(7, 4, generator=_gen(4))
    grads = [torch.randn(7, 4, generator=_gen(5 + t)) for t in range(5)]
    for kw in ({}, {"nesterov": False, "momentum": 0.8}):
        ref = _run(torch.optim.Muon, w0, grads, **kw)
        assert torch.equal(_run(Muon, w0, grads, **kw), ref)
        assert torch.equal(_run(Muon, w0, grads, ns_dtype="bfloat16", **kw), ref)


@pytest.mark.parametrize("shape", [(8, 5), (5, 8), (64, 16)])
def test_muon_matches_torch_muon_on_bfloat16_weights(shape) -> None:
    # bfloat16 weights take torch's rounding too: a tall O is added as the transposed view torch adds (a contiguous
    # copy is added with other bfloat16 roundings). Nesterov only: without it torch 2.13 normalizes its momentum
    # buffer in place (test_step_never_mutates_grad).
    w0 = torch.randn(*shape, generator=_gen(0)).bfloat16()
    grads = [torch.randn(*shape, generator=_gen(1 + t)).bfloat16() for t in range(4)]
    assert torch.equal(_run(Muon, w0, grads, lr=0.05), _run(torch.optim.Muon, w0, grads, lr=0.05))


def test_muon_defaults_are_torch_muons() -> None:
    # every keyword torch.optim.Muon takes has the same default here, and Newton–Schulz runs in bfloat16 as torch's
    ours, theirs = inspect.signature(Muon).parameters, inspect.signature(torch.optim.Muon).parameters
    shared = [k for k in theirs if k != "params"]
    assert shared == ["lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps",
                      "adjust_lr_fn"]
    for k in shared:
        assert ours[k].default == theirs[k].default, k
    w = torch.nn.Parameter(torch.randn(3, 4))
    for cls in (Muon, NorMuon):
        assert cls([w]).param_groups[0]["ns_dtype"] is torch.bfloat16
        assert cls([w], ns_dtype=None).param_groups[0]["ns_dtype"] is None


@pytest.mark.parametrize("cls", [Muon, NorMuon])
@pytest.mark.parametrize("ns_dtype", [None, "float32", "float64"])
def test_full_precision_newton_schulz_on_request(cls, ns_dtype) -> None:
    # float64 weights: ns_dtype=None or "float64" iterate in float64 (a float32 or bfloat16 iteration would leave
    # rounding errors >= 1e-8 in the step); "float32" in float32 (errors ~1e-7, not ~1e-3 as bfloat16)
    w0 = torch.randn(6, 4, generator=_gen(0), dtype=F64)
    grads = [torch.randn(6, 4, generator=_gen(1 + t), dtype=F64) for t in range(3)]
    exact = _run(cls, w0, grads, lr=0.05, ns_dtype=torch.float64)
    got = _run(cls, w0, grads, lr=0.05, ns_dtype=ns_dtype)
    default = _run(cls, w0, grads, lr=0.05)
    err, err_default = float((got - exact).abs().max()), float((default - exact).abs().max())
    assert err_default > 1e-4
    assert err == 0.0 if ns_dtype != "float32" else 0 < err < 1e-5


@pytest.mark.parametrize("ns_dtype", [None, "bfloat16"])
@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (8, 2, 1, 2)])  # flattened: wide (4, 12), tall (8, 4)
@pytest.mark.parametrize("cls", [Muon, NorMuon])
def test_conv_weights_are_flattened(cls, shape, ns_dtype) -> None:
    w0 = torch.randn(*shape, generator=_gen(0), dtype=F64)
    grads = [torch.randn(*shape, generator=_gen(1 + t), dtype=F64) for t in range(3)]
    conv = _run(cls, w0, grads, lr=0.05, ns_dtype=ns_dtype)
    flat = _run(cls, w0.reshape(shape[0], -1), [g.reshape(shape[0], -1) for g in grads], lr=0.05, ns_dtype=ns_dtype)
    assert conv.shape == shape
    torch.testing.assert_close(conv.reshape(shape[0], -1), flat, rtol=0, atol=0)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("cls", [Muon, NorMuon])
def test_step_never_mutates_grad(cls, nesterov) -> None:
    p = torch.nn.Parameter(torch.randn(5, 3, generator=_gen(0)).bfloat16())
    opt = cls([p], nesterov=nesterov)
    g = torch.randn(5, 3, generator=_gen(1)).bfloat16()
    for _ in range(2):
        p.grad = g.clone()
        opt.step()
        assert torch.equal(p.grad, g)
    # the momentum buffer is the EMA of the gradients, not normalized in place (torch 2.13 bf16 + nesterov=False)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"].float(), ((1 - 0.95**2) * g).float(),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_normuon_second_moment_is_float32(dtype) -> None:
    p = torch.nn.Parameter(torch.randn(6, 4, generator=_gen(0)).to(dtype))
    opt = NorMuon([p], lr=0.01, weight_decay=0.01)
    for t in range(3):
        p.grad = torch.randn(6, 4, generator=_gen(1 + t)).to(dtype)
        opt.step()
    v = opt.state[p]["second_moment"]
    assert v.dtype == torch.float32 and v.shape == (6,) and bool((v > 0).all())
    assert p.dtype == dtype and bool(torch.isfinite(p).all())


@pytest.mark.parametrize("mode", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("cls", [Muon, NorMuon])
def test_zero_gradient_is_safe(cls, mode) -> None:
    p = torch.nn.Parameter(torch.zeros(4, 6, dtype=F64))
    opt = cls([p], adjust_lr_fn=mode)
    for _ in range(3):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(4, 6, dtype=F64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [Muon, NorMuon])
def test_state_dict_round_trip_gives_identical_steps(cls, dtype) -> None:
    grads = [torch.randn(5, 7, generator=_gen(t)).to(dtype) for t in range(6)]
    p = torch.nn.Parameter(torch.randn(5, 7, generator=_gen(9)).to(dtype))
    opt = cls([p], lr=0.03, weight_decay=0.1)
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = cls([q], lr=1.0)
    opt2.load_state_dict(saved)
    if cls is NorMuon:
        assert opt2.state[q]["second_moment"].dtype == torch.float32
        assert torch.equal(opt2.state[q]["second_moment"], opt.state[p]["second_moment"])
    for g in grads[3:]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [Muon, NorMuon])
def test_rejects_vectors_and_bad_hyperparameters(cls) -> None:
    w, b = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="AdamW"):
        cls([w, b])
    opt = cls([w])
    with pytest.raises(ValueError, match="AdamW"):
        opt.add_param_group({"params": [b]})
    with pytest.raises(TypeError, match="complex"):
        cls([torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])
    for bad in ({"lr": -1.0}, {"weight_decay": -0.1}, {"momentum": 1.0}, {"ns_steps": 0}, {"ns_coefficients": (1, 2)}):
        with pytest.raises(ValueError):
            cls([w], **bad)
    with pytest.raises(ValueError, match="'original', 'match_rms_adamw'"):
        cls([w], adjust_lr_fn="spectral")
    with pytest.raises(ValueError, match="bfloat16"):
        cls([w], ns_dtype="bf16")
    with pytest.raises(ValueError, match="shape"):
        normuon_update(torch.ones(3, 4), torch.zeros(3, 4), torch.zeros(4))


def test_normuon_hyperparameter_errors_and_registry() -> None:
    w = torch.nn.Parameter(torch.randn(3, 3))
    for bad in ({"beta2": 1.0}, {"eps": 0.0}, {"ns_eps": -1.0}):
        with pytest.raises(ValueError):
            NorMuon([w], **bad)
    assert get_optimizer("muon").cls is Muon and get_optimizer("normuon").cls is NorMuon
    assert get_optimizer("muon").kind == "euclidean" == get_optimizer("normuon").kind
    opt = build_optimizer("normuon", [w], lr=0.01, beta2=0.9, adjust_lr_fn="match_rms_adamw", ns_dtype="float32")
    assert isinstance(opt, NorMuon) and opt.param_groups[0]["ns_dtype"] is torch.float32
    with pytest.raises(ValueError, match="valid"):
        build_optimizer("muon", [w], betas=(0.9, 0.95))


def test_params_without_grad_are_skipped() -> None:
    p, q = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4, 3))
    q0 = q.detach().clone()
    opt = Muon([p, q])
    p.grad = torch.randn(3, 4)
    opt.step()
    assert torch.equal(q.detach(), q0) and q not in opt.state
