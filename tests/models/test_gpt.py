"""GPT: every norm placement against a hand-written float64 forward, causality, training, nGPT, norm swaps, errors."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from manifoldnorm.models.gpt import GPT, PLACEMENTS, block_kinds, deepnorm_constants, mix_ln_post_layers
from manifoldnorm.nn import Derf, DyT, LayerNorm, QKNorm, RMSNorm

F64 = torch.float64
V, BLOCK, D, H, L = 11, 8, 16, 2, 2

# placement -> (block kinds for n_layer=2, input-embedding norm?, final norm?)
EXPECTED = {
    "pre": (("pre", "pre"), False, True),
    "post": (("post", "post"), False, False),
    "peri": (("peri", "peri"), True, True),
    "mix": (("post", "pre"), False, True),  # round(0.25 * 2) = round(0.5) -> 1 Post-LN block (halves round up)
    "hybrid": (("hybrid", "hybrid"), False, True),
    "hybrid_star": (("hybrid_first", "hybrid"), False, True),
    "deepnorm": (("deepnorm", "deepnorm"), False, False),
}
# norm children of a block, per kind
BLOCK_NORMS = {
    "pre": {"attn_norm", "mlp_norm"},
    "post": {"attn_norm", "mlp_norm"},
    "deepnorm": {"attn_norm", "mlp_norm"},
    "peri": {"attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm"},
    "hybrid": {"mlp_norm"},
    "hybrid_first": {"attn_norm", "mlp_norm"},
}


def tiny(**kw) -> GPT:
    cfg = dict(n_layer=L, n_head=H, d_model=D)
    cfg.update(kw)
    return GPT(V, BLOCK, **cfg)


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Move every parameter off its init (norm gains/biases included) so misplaced layers show up."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def idx_batch(B=3, T=BLOCK, seed=0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- hand-written reference
def ref_norm(layer, x):
    if isinstance(layer, LayerNorm):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + layer.eps) * layer.weight + layer.bias
    if isinstance(layer, RMSNorm):  # also QKNorm
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + layer.eps) * layer.weight
    if isinstance(layer, DyT):  # Zhu et al. 2025, Eq. (1)
        return torch.tanh(layer.alpha * x) * layer.weight + layer.bias
    if isinstance(layer, Derf):
        return torch.erf(layer.alpha * x + layer.shift) * layer.weight + layer.bias
    raise AssertionError(f"no reference for {type(layer).__name__}")


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def heads(y, n_head):
    B, T, C = y.shape
    return y.reshape(B, T, n_head, C // n_head).permute(0, 2, 1, 3)


def masked_softmax_mix(logits, v):
    T = logits.shape[-1]
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    p = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
    y = p @ v
    B, Hh, _, hd = y.shape
    return y.permute(0, 2, 1, 3).reshape(B, T, Hh * hd)


def ref_qk_logits(attn, x):
    q, k = heads(x @ attn.q_proj.weight.T, attn.n_head), heads(x @ attn.k_proj.weight.T, attn.n_head)
    if attn.q_norm is not None:
        q, k = ref_norm(attn.q_norm, q), ref_norm(attn.k_norm, k)
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


def ref_attn(attn, x):
    v = heads(x @ attn.v_proj.weight.T, attn.n_head)
    if attn.v_norm is not None:
        v = ref_norm(attn.v_norm, v)
    return masked_softmax_mix(ref_qk_logits(attn, x), v) @ attn.out_proj.weight.T


def ref_mlp(mlp, x):
    return gelu(x @ mlp.fc.weight.T) @ mlp.proj.weight.T


def ref_block(b, x, kind, alpha):
    def N(name, v):
        return ref_norm(getattr(b, name), v)

    A, M = (lambda v: ref_attn(b.attn, v)), (lambda v: ref_mlp(b.mlp, v))
    if kind in ("pre", "hybrid_first"):
        x = x + A(N("attn_norm", x))
        return x + M(N("mlp_norm", x))
    if kind == "post":
        x = N("attn_norm", x + A(x))
        return N("mlp_norm", x + M(x))
    if kind == "deepnorm":
        x = N("attn_norm", alpha * x + A(x))
        return N("mlp_norm", alpha * x + M(x))
    if kind == "peri":
        x = x + N("attn_out_norm", A(N("attn_norm", x)))
        return x + N("mlp_out_norm", M(N("mlp_norm", x)))
    assert kind == "hybrid"
    z = N("mlp_norm", x + A(x))
    return z + M(z)


def ref_forward(m, idx, placement):
    kinds, emb_norm, final_norm = EXPECTED[placement]
    alpha = (2 * L) ** 0.25
    x = m.wte.weight[idx] + m.wpe.weight[: idx.shape[1]]
    if m.embed_scale is not None:
        x = x * m.embed_scale
    if emb_norm:
        x = ref_norm(m.emb_norm, x)
    for b, kind in zip(m.blocks, kinds, strict=True):
        x = ref_block(b, x, kind, alpha)
    if final_norm:
        x = ref_norm(m.ln_f, x)
    return x @ m.wte.weight.T


def ref_ngpt_forward(m, idx):
    d, hd = m.d_model, m.d_model // m.n_head
    h = unit(m.wte.weight[idx] + m.wpe.weight[: idx.shape[1]])
    for b in m.blocks:
        a = b.attn
        s = (a.s_qk * math.sqrt(d)).reshape(m.n_head, 1, hd)
        q = s * unit(heads(h @ a.q_proj.weight.T, m.n_head))
        k = s * unit(heads(h @ a.k_proj.weight.T, m.n_head))
        v = heads(h @ a.v_proj.weight.T, m.n_head)
        h_att = masked_softmax_mix(math.sqrt(hd) * q @ k.transpose(-2, -1), v) @ a.out_proj.weight.T
        alpha_a = b.attn_alpha.alpha * 0.05 * math.sqrt(d)
        h = unit(h + alpha_a * (unit(h_att) - h))
        u = (h @ b.mlp.fc.weight.T) * b.mlp.s_u * math.sqrt(d)
        h_mlp = gelu(u) @ b.mlp.proj.weight.T
        alpha_m = b.mlp_alpha.alpha * 0.05 * math.sqrt(d)
        h = unit(h + alpha_m * (unit(h_mlp) - h))
    return (h @ m.wte.weight.T) * (m.s_z * math.sqrt(d))


# ----------------------------------------------------------------------------- structure and formulas
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_placement_matches_hand_written_forward(placement):
    torch.manual_seed(0)
    norm = "rmsnorm" if placement.startswith("hybrid") else "layernorm"
    m = tiny(placement=placement, norm_layer=norm).to(F64).eval()
    perturb_(m)
    kinds, emb_norm, final_norm = EXPECTED[placement]
    assert m.layer_kinds == kinds
    for b, kind in zip(m.blocks, kinds, strict=True):
        names = {n for n, _ in b.named_children() if n.endswith("norm")}
        assert names == BLOCK_NORMS[kind]
        hybrid = kind.startswith("hybrid")
        assert (b.attn.v_norm is not None) == hybrid and (b.attn.q_norm is not None) == hybrid
    assert isinstance(m.emb_norm, torch.nn.Identity) != emb_norm
    assert isinstance(m.ln_f, torch.nn.Identity) != final_norm
    idx = idx_batch()
    with torch.no_grad():
        torch.testing.assert_close(m(idx), ref_forward(m, idx, placement), rtol=1e-10, atol=1e-10)
        x = torch.randn(2, BLOCK, D, dtype=F64)
        for b, kind in zip(m.blocks, kinds, strict=True):
            torch.testing.assert_close(b(x), ref_block(b, x, kind, (2 * L) ** 0.25), rtol=1e-10, atol=1e-10)


def test_ngpt_matches_hand_written_forward():
    torch.manual_seed(1)
    m = tiny(mode="ngpt").to(F64).eval()
    perturb_(m, scale=0.05)
    m.normalize_weights_()
    idx = idx_batch()
    with torch.no_grad():
        torch.testing.assert_close(m(idx), ref_ngpt_forward(m, idx), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", [dict(placement=p) for p in PLACEMENTS] + [dict(qk_norm=True), dict(mode="ngpt"),
                                                                             dict(norm_layer="dyt")])
def test_causal(cfg):
    torch.manual_seed(2)
    m = tiny(**cfg).to(F64).eval()
    perturb_(m)
    idx = idx_batch(B=2)
    t = 5
    idx2 = idx.clone()
    idx2[:, t] = (idx2[:, t] + 1) % V
    with torch.no_grad():
        a, b = m(idx), m(idx2)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-12)
    assert (a[:, t:] - b[:, t:]).abs().amax(-1).min() > 1e-6  # every later position sees the change


def test_qk_norm_logits_follow_the_formula_and_are_scale_invariant():
    torch.manual_seed(3)
    m = tiny(qk_norm=True).to(F64)
    perturb_(m)
    attn = m.blocks[0].attn
    assert isinstance(attn.q_norm, QKNorm) and attn.q_norm.num_features == D // H
    x = torch.randn(2, BLOCK, D, dtype=F64)
    with torch.no_grad():
        logits = attn.attention_logits(x)
        # q_hat = q / rms(q) * g_q (same for k); logits = q_hat k_hat^T / sqrt(d_head)
        q = heads(x @ attn.q_proj.weight.T, H)
        k = heads(x @ attn.k_proj.weight.T, H)
        qh = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.q_norm.weight
        kh = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.k_norm.weight
        torch.testing.assert_close(logits, qh @ kh.mT / math.sqrt(D // H), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(attn(x), ref_attn(attn, x), rtol=1e-10, atol=1e-10)
        # normalized logits ignore the scale of W_q; plain ones grow with it
        plain = tiny().to(F64).blocks[0].attn
        plain.load_state_dict({k_: v_ for k_, v_ in attn.state_dict().items() if "norm" not in k_})
        before = plain.attention_logits(x)
        attn.q_proj.weight.mul_(100.0)
        plain.q_proj.weight.mul_(100.0)
        torch.testing.assert_close(attn.attention_logits(x), ref_qk_logits(attn, x), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(attn.attention_logits(x), logits, rtol=1e-3, atol=1e-4)  # eps is all that moves
        torch.testing.assert_close(plain.attention_logits(x), 100.0 * before)


def test_deepnorm_alpha_and_beta():
    n_layer, d = 3, 64
    alpha, beta = deepnorm_constants(n_layer)
    assert alpha == pytest.approx((2 * n_layer) ** 0.25) and beta == pytest.approx((8 * n_layer) ** -0.25)
    torch.manual_seed(4)
    m = GPT(V, BLOCK, n_layer=n_layer, n_head=4, d_model=d, placement="deepnorm")
    assert all(b.residual_scale == pytest.approx(alpha) for b in m.blocks)
    xavier = math.sqrt(2.0 / (d + d))
    for b in m.blocks:
        for lin, gain in [(b.attn.q_proj, 1.0), (b.attn.k_proj, 1.0), (b.attn.v_proj, beta), (b.attn.out_proj, beta),
                          (b.mlp.fc, beta), (b.mlp.proj, beta)]:
            fan_out, fan_in = lin.weight.shape
            expected = gain * math.sqrt(2.0 / (fan_in + fan_out))
            assert lin.weight.std().item() == pytest.approx(expected, rel=0.1)
        assert b.attn.v_proj.weight.std() < 0.7 * xavier  # beta < 1 really shrinks the value projection


@pytest.mark.parametrize("n_layer,ratio,n_post", [(4, 0.25, 1), (8, 0.25, 2), (2, 0.25, 1), (5, 0.5, 3),
                                                  (12, 0.25, 3), (4, 0.0, 0), (4, 1.0, 4)])
def test_mix_ln_layer_assignment(n_layer, ratio, n_post):
    assert mix_ln_post_layers(n_layer, ratio) == n_post
    kinds = block_kinds("mix", n_layer, ratio)
    assert kinds == ("post",) * n_post + ("pre",) * (n_layer - n_post)
    m = GPT(V, BLOCK, n_layer=n_layer, n_head=2, d_model=8, placement="mix", mix_ln_ratio=ratio)
    assert tuple(b.kind for b in m.blocks) == kinds
    assert isinstance(m.ln_f, torch.nn.Identity) == (n_post == n_layer)


def test_ngpt_hidden_states_on_the_sphere_and_weight_normalization():
    torch.manual_seed(5)
    m = tiny(mode="ngpt", n_layer=3)
    outs = []
    hooks = [b.register_forward_hook(lambda mod, inp, out: outs.append(out)) for b in m.blocks]
    idx = idx_batch()
    loss = F.cross_entropy(m(idx).flatten(0, 1), idx.roll(-1, 1).flatten())
    for hk in hooks:
        hk.remove()
    assert len(outs) == 3
    for h in outs:
        torch.testing.assert_close(h.norm(dim=-1), torch.ones(h.shape[:-1]), rtol=0, atol=1e-5)
    torch.testing.assert_close(m.hidden_states(idx).norm(dim=-1), torch.ones(idx.shape), rtol=0, atol=1e-5)

    def unit_norm_along_embedding(model):
        b0 = model.blocks[0]
        rows = [model.wte.weight, model.wpe.weight, b0.attn.q_proj.weight, b0.attn.v_proj.weight, b0.mlp.fc.weight]
        cols = [b0.attn.out_proj.weight, b0.mlp.proj.weight]  # (d_model, in): embedding dim is the output one
        return [w.norm(dim=1) for w in rows] + [w.norm(dim=0) for w in cols]

    for n in unit_norm_along_embedding(m):
        torch.testing.assert_close(n, torch.ones_like(n))
    opt = torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.0)
    loss.backward()
    opt.step()
    assert any((n - 1).abs().max() > 1e-3 for n in unit_norm_along_embedding(m))
    assert m.normalize_weights_() == 2 + 3 * 6  # wte (tied head), wpe, 6 matrices per block
    for n in unit_norm_along_embedding(m):
        torch.testing.assert_close(n, torch.ones_like(n))
    untied = tiny(mode="ngpt", tie_weights=False)
    assert untied.normalize_weights_() == 3 + 2 * 6
    torch.testing.assert_close(untied.lm_head.weight.norm(dim=1), torch.ones(V))


def test_normalize_weights_is_a_noop_in_standard_mode():
    m = tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert m.normalize_weights_() == 0
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# ----------------------------------------------------------------------------- training
def _train(model, steps=40, lr=1e-2, seed=0):
    g = torch.Generator().manual_seed(seed)
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    seq = pattern.repeat(8)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(seq) - BLOCK - 1, (8,), generator=g)
        x = torch.stack([seq[s:s + BLOCK] for s in starts])
        y = torch.stack([seq[s + 1:s + BLOCK + 1] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.normalize_weights_()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cfg", [dict(placement=p) for p in PLACEMENTS] + [dict(mode="ngpt"), dict(qk_norm=True)])
def test_adamw_reduces_loss_on_a_repeated_sequence(cfg):
    torch.manual_seed(6)
    model = tiny(**cfg)
    losses = _train(model, lr=3e-2 if cfg.get("mode") == "ngpt" else 1e-2)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3, losses


# ----------------------------------------------------------------------------- norm swap, tying, misc
@pytest.mark.parametrize("name,cls", [("layernorm", LayerNorm), ("rmsnorm", RMSNorm), ("dyt", DyT), ("derf", Derf)])
def test_norm_swap_by_name(name, cls):
    m = tiny(norm_layer=name, placement="peri")
    norms = [m.emb_norm, m.ln_f] + [getattr(b, n) for b in m.blocks for n in BLOCK_NORMS["peri"]]
    assert all(isinstance(n, cls) for n in norms)
    assert torch.isfinite(m(idx_batch())).all()
    h = tiny(norm_layer=name, placement="hybrid").blocks[0].attn
    assert all(isinstance(n, cls) and n.num_features == D // H for n in (h.q_norm, h.k_norm, h.v_norm))
    # the swapped norms sit where the placement puts them: the model is the hand-written forward with this norm
    for placement in ("peri", "hybrid"):
        torch.manual_seed(3)
        m = tiny(norm_layer=name, placement=placement).to(F64).eval()
        perturb_(m)
        idx = idx_batch()
        with torch.no_grad():
            torch.testing.assert_close(m(idx), ref_forward(m, idx, placement), rtol=1e-10, atol=1e-10)


def test_norm_swap_by_partial_and_class():
    m = tiny(norm_layer=functools.partial(DyT, alpha0=0.3))
    norms = [m.ln_f] + [n for b in m.blocks for n in (b.attn_norm, b.mlp_norm)]
    assert all(isinstance(n, DyT) and n.alpha.item() == pytest.approx(0.3) for n in norms)
    m = tiny(norm_layer=RMSNorm)
    assert isinstance(m.blocks[1].mlp_norm, RMSNorm)
    # a plain torch norm (forward without a domain argument) also fills the slot
    m = tiny(norm_layer=torch.nn.LayerNorm)
    assert m(idx_batch(), domain=torch.zeros(3, dtype=torch.long)).shape == (3, BLOCK, V)


def test_weight_tying_and_state_dict_round_trip():
    a, b = tiny(placement="peri", qk_norm=True), tiny(placement="peri", qk_norm=True, tie_weights=True)
    assert a.lm_head.weight is a.wte.weight
    assert tiny(tie_weights=False).lm_head.weight is not tiny(tie_weights=False).wte.weight
    b.load_state_dict(a.state_dict())
    idx = idx_batch()
    torch.testing.assert_close(a(idx), b(idx))


def test_dropout_only_in_training():
    m = tiny(dropout=0.3)
    idx = idx_batch()
    m.eval()
    torch.testing.assert_close(m(idx), m(idx))
    m.train()
    assert not torch.equal(m(idx), m(idx))


def test_errors():
    with pytest.raises(ValueError, match="divisible"):
        tiny(d_model=18, n_head=4)
    with pytest.raises(ValueError, match="valid placements: pre, post, peri, mix, hybrid"):
        tiny(placement="sandwich")
    with pytest.raises(ValueError, match="valid modes"):
        tiny(mode="normalized")
    with pytest.raises(ValueError, match="cannot fill"):
        tiny(norm_layer="spdbn")
    with pytest.raises(ValueError, match="unknown norm layer"):
        tiny(norm_layer="no_such_norm")
    with pytest.raises(ValueError, match="own placement"):
        tiny(mode="ngpt", placement="post")
    with pytest.raises(ValueError, match="no biases"):
        tiny(mode="ngpt", bias=True)
    with pytest.raises(ValueError, match="mix_ln_ratio"):
        tiny(placement="mix", mix_ln_ratio=1.5)
    with pytest.raises(ValueError, match="dropout"):
        tiny(dropout=1.0)
    with pytest.raises(TypeError, match="n_layer"):
        tiny(n_layer=2.0)
    m = tiny()
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, BLOCK + 1, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        m(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        m(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids must lie"):
        m(torch.full((1, 4), V))


def test_embed_scale_auto_for_statistics_free_norms() -> None:
    import functools

    from manifoldnorm.nn import DyT

    kw = dict(n_layer=1, n_head=2, d_model=8)
    for norm in ("dyt", "derf", functools.partial(DyT, alpha0=0.2), DyT):
        m = GPT(11, 6, norm_layer=norm, **kw)
        assert m.embed_scale is not None and float(m.embed_scale) == pytest.approx(50.0)
    assert GPT(11, 6, norm_layer="layernorm", **kw).embed_scale is None
    assert GPT(11, 6, norm_layer="dyt", embed_scale="none", **kw).embed_scale is None
    assert float(GPT(11, 6, norm_layer="layernorm", embed_scale=3.0, **kw).embed_scale) == 3.0
    assert GPT(11, 6, mode="ngpt", **kw).embed_scale is None
    for bad in ("sqrt", 0.0, -1.0, True, float("nan")):
        with pytest.raises(ValueError, match="embed_scale"):
            GPT(11, 6, embed_scale=bad, **kw)


def test_embed_scale_multiplies_the_embedding_and_learns() -> None:
    torch.manual_seed(0)
    m = GPT(11, 6, n_layer=1, n_head=2, d_model=8, norm_layer="dyt", embed_scale=2.5).double()
    ref = GPT(11, 6, n_layer=1, n_head=2, d_model=8, norm_layer="dyt", embed_scale="none").double()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if k != "embed_scale"})
    with torch.no_grad():
        ref.wte.weight.mul_(2.5)
        ref.wpe.weight.mul_(2.5)
    idx = torch.randint(0, 11, (2, 6))
    torch.testing.assert_close(m.hidden_states(idx), ref.hidden_states(idx))
    m(idx).sum().backward()
    assert m.embed_scale.grad is not None and m.embed_scale.grad.abs() > 0
