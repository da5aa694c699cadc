"""Building blocks of :class:`manifoldnorm.models.gpt.GPT`: causal attention, MLP, and one block per norm placement.

A block's ``kind`` fixes where its norm layers sit (``x`` is the residual stream ``(B, T, C)``, ``A`` the attention
and ``M`` the MLP sub-layer):

==================  =====================================================================================
``pre``             ``x = x + A(N1(x));  x = x + M(N2(x))``
``post``            ``x = N1(x + A(x));  x = N2(x + M(x))``
``peri``            ``x = x + N1o(A(N1(x)));  x = x + N2o(M(N2(x)))``
``hybrid``          ``x = x + A_qkv(x);  z = N2(x);  x = z + M(z)``  (``A_qkv``: q, k, v normalized per head)
``hybrid_first``    ``x = x + A_qkv(N1(x));  x = x + M(N2(x))``  (first block of HybridNorm*)
``deepnorm``        ``x = N1(alpha x + A(x));  x = N2(alpha x + M(x))``
==================  =====================================================================================

:class:`NGPTBlock` is the normalized-transformer block of nGPT (no norm layers, hidden state on the sphere).
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from manifoldnorm.nn import EigenLR, create_norm_layer
from manifoldnorm.nn.euclidean.layout import adapt_layout
from manifoldnorm.nn.registry import NormSpec

__all__ = ["BLOCK_KINDS", "CausalSelfAttention", "MLP", "Block", "NGPTAttention", "NGPTMLP", "NGPTBlock",
           "make_norm", "apply_norm"]

BLOCK_KINDS: tuple[str, ...] = ("pre", "post", "peri", "hybrid", "hybrid_first", "deepnorm")
# block kinds whose output is already normalized (no final norm is needed after the last such block)
NORMALIZED_OUTPUT: frozenset[str] = frozenset({"post", "deepnorm"})


def make_norm(spec: NormSpec, num_features: int) -> nn.Module:
    """A Euclidean norm layer for features-last tensors ``(..., num_features)``."""
    return adapt_layout(create_norm_layer(spec, num_features, expect="euclidean"), -1)


@functools.cache
def _forward_takes_domain(cls: type) -> bool:
    try:
        return "domain" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def apply_norm(layer: nn.Module, x: Tensor, domain: Tensor | None) -> Tensor:
    """Call a norm layer, passing ``domain`` only to layers whose ``forward`` accepts it."""
    if domain is not None and _forward_takes_domain(type(layer)):
        return layer(x, domain=domain)
    return layer(x)


def _unit(x: Tensor, eps: float = 1e-12) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


class CausalSelfAttention(nn.Module):
    r"""Multi-head causal self-attention with optional per-head q/k/v normalization.

    .. math::
        \operatorname{A}(x) = W_o\,\big[\operatorname{softmax}\big(s\,\hat q_h \hat k_h^\top + \text{mask}\big)
        \hat v_h\big]_{h=1}^{H},\qquad \hat q = N_q(x W_q^\top),\ \hat k = N_k(x W_k^\top),\ \hat v = N_v(x W_v^\top)

    with ``N_q, N_k, N_v`` acting on each head's ``head_dim`` features (identity when absent), ``s = 1/sqrt(head_dim)``
    unless ``scale`` is given, and the causal mask ``-inf`` above the diagonal. Uses
    :func:`torch.nn.functional.scaled_dot_product_attention` with ``is_causal=True``.

    Shapes: ``x`` ``(B, T, C)`` -> ``(B, T, C)``.
    """

    def __init__(self, d_model: int, n_head: int, *, bias: bool = False, dropout: float = 0.0,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None,
                 v_norm: nn.Module | None = None, scale: float | None = None) -> None:
        super().__init__()
        self.d_model, self.n_head, self.head_dim = d_model, n_head, d_model // n_head
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.q_norm, self.k_norm, self.v_norm = q_norm, k_norm, v_norm
        self.scale = 1.0 / math.sqrt(self.head_dim) if scale is None else float(scale)
        self.dropout = float(dropout)
        self.resid_drop = nn.Dropout(dropout)

    def _heads(self, y: Tensor) -> Tensor:
        B, T, _ = y.shape
        return y.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    def _normalize_qk(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return q, k

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head queries, keys and values ``(B, H, T, head_dim)`` after their norms."""
        q, k = self._normalize_qk(self._heads(self.q_proj(x)), self._heads(self.k_proj(x)))
        v = self._heads(self.v_proj(x))
        if self.v_norm is not None:
            v = self.v_norm(v)
        return q, k, v

    def attention_logits(self, x: Tensor) -> Tensor:
        """Pre-softmax attention logits ``s q k^T`` of shape ``(B, H, T, T)``, before the causal mask."""
        q, k, _ = self.qkv(x)
        return self.scale * (q @ k.transpose(-2, -1))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True, scale=self.scale)
        B, _, T, _ = y.shape
        return self.resid_drop(self.out_proj(y.transpose(1, 2).reshape(B, T, self.d_model)))


class MLP(nn.Module):
    r"""Position-wise feed-forward network :math:`M(x) = W_2\,\operatorname{GELU}(W_1 x + b_1) + b_2`.

    Shapes: ``(B, T, C)`` -> ``(B, T, C)``; hidden width ``int(mlp_ratio * C)``.
    """

    def __init__(self, d_model: int, hidden: int, *, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, hidden, bias=bias)
        self.proj = nn.Linear(hidden, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """One transformer block whose norm placement is ``kind`` (see the module docstring for the formulas).

    Norm attributes (present only where the placement uses them): ``attn_norm`` (``N1``), ``mlp_norm`` (``N2``),
    ``attn_out_norm`` / ``mlp_out_norm`` (Peri-LN output norms ``N1o``, ``N2o``); the attention's
    ``q_norm``/``k_norm``/``v_norm`` hold the per-head norms. ``residual_scale`` is DeepNorm's ``alpha``
    (``1.0`` otherwise).
    """

    def __init__(self, kind: str, d_model: int, n_head: int, hidden: int, *, norm_layer: NormSpec,
                 qk_norm: bool = False, bias: bool = False, dropout: float = 0.0,
                 residual_scale: float = 1.0) -> None:
        super().__init__()
        if kind not in BLOCK_KINDS:
            raise ValueError(f"unknown block kind {kind!r}; valid kinds: {', '.join(BLOCK_KINDS)}")
        self.kind = kind
        head_dim = d_model // n_head
        hybrid = kind in ("hybrid", "hybrid_first")
        q_norm = k_norm = v_norm = None
        if qk_norm:
            q_norm, k_norm = make_norm("qknorm", head_dim), make_norm("qknorm", head_dim)
        elif hybrid:
            q_norm, k_norm = make_norm(norm_layer, head_dim), make_norm(norm_layer, head_dim)
        if hybrid:
            v_norm = make_norm(norm_layer, head_dim)
        self.attn = CausalSelfAttention(d_model, n_head, bias=bias, dropout=dropout,
                                        q_norm=q_norm, k_norm=k_norm, v_norm=v_norm)
        self.mlp = MLP(d_model, hidden, bias=bias, dropout=dropout)
        if kind != "hybrid":
            self.attn_norm = make_norm(norm_layer, d_model)
        self.mlp_norm = make_norm(norm_layer, d_model)
        if kind == "peri":
            self.attn_out_norm = make_norm(norm_layer, d_model)
            self.mlp_out_norm = make_norm(norm_layer, d_model)
        self.residual_scale = float(residual_scale)

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        kind = self.kind
        if kind in ("pre", "hybrid_first"):
            x = x + self.attn(apply_norm(self.attn_norm, x, domain))
            return x + self.mlp(apply_norm(self.mlp_norm, x, domain))
        if kind in ("post", "deepnorm"):
            a = self.residual_scale
            x = apply_norm(self.attn_norm, a * x + self.attn(x), domain)
            return apply_norm(self.mlp_norm, a * x + self.mlp(x), domain)
        if kind == "peri":
            x = x + apply_norm(self.attn_out_norm, self.attn(apply_norm(self.attn_norm, x, domain)), domain)
            return x + apply_norm(self.mlp_out_norm, self.mlp(apply_norm(self.mlp_norm, x, domain)), domain)
        # hybrid: QKV-normalized attention on the raw stream, then the FFN residual taken after the norm
        z = apply_norm(self.mlp_norm, x + self.attn(x), domain)
        return z + self.mlp(z)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}" + (f", residual_scale={self.residual_scale:.4g}" if self.kind == "deepnorm"
                                         else "")


class NGPTAttention(CausalSelfAttention):
    r"""nGPT attention: unit-norm queries and keys per head, scaled by the learned :math:`s_{qk}`.

    .. math::
        q \leftarrow s_{qk} \odot \operatorname{Norm}(q),\quad k \leftarrow s_{qk} \odot \operatorname{Norm}(k),\quad
        \text{logits} = \sqrt{d_k}\; q k^\top

    Loshchilov et al., "nGPT", ICLR 2025, Sec. 2.3.2 (normalized attention): ``s_qk`` (one entry per feature, shared by
    q and k) is stored as ``s_qk_param`` initialised to ``1/sqrt(d_model)`` and used as
    ``s_qk_param * sqrt(d_model)`` (so ``s_qk = 1`` at start), and the softmax scale is ``sqrt(d_k)``.
    """

    def __init__(self, d_model: int, n_head: int, *, dropout: float = 0.0) -> None:
        super().__init__(d_model, n_head, bias=False, dropout=dropout, scale=math.sqrt(d_model // n_head))
        self.sqk_scale = 1.0 / math.sqrt(d_model)
        self.s_qk = nn.Parameter(torch.full((d_model,), self.sqk_scale))

    def effective_sqk(self) -> Tensor:
        """``s_qk`` of shape ``(n_head, 1, head_dim)`` (broadcasts over ``(B, H, T, head_dim)``)."""
        return (self.s_qk / self.sqk_scale).view(self.n_head, 1, self.head_dim)

    def _normalize_qk(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        s = self.effective_sqk().to(q.dtype)
        return s * _unit(q), s * _unit(k)


class NGPTMLP(MLP):
    r"""nGPT feed-forward sub-layer with the learned input scaling :math:`s_u`.

    .. math::
        M(h) = W_2\,\operatorname{GELU}\big(s_u \odot (W_1 h)\,\sqrt{d_\text{model}}\big)

    Loshchilov et al., "nGPT", ICLR 2025, Sec. 2.4.2 (normalized MLP) (``s_u`` initialised to 1, scale 1, the
    ``sqrt(d_model)`` factor restoring the variance of the unit-norm ``h``). Deviation: a GELU MLP with one scaling
    vector instead of the paper's SwiGLU with ``s_u`` and ``s_nu``.
    """

    def __init__(self, d_model: int, hidden: int, *, dropout: float = 0.0) -> None:
        super().__init__(d_model, hidden, bias=False, dropout=dropout)
        self.input_scale = math.sqrt(d_model)
        self.s_u = nn.Parameter(torch.ones(hidden))

    def forward(self, x: Tensor) -> Tensor:
        u = self.fc(x) * (self.s_u.to(x.dtype) * self.input_scale)
        return self.drop(self.proj(F.gelu(u)))


class NGPTBlock(nn.Module):
    r"""nGPT block: attention and MLP steps on the unit hypersphere with learned eigen learning rates.

    .. math::
        h \leftarrow \operatorname{Norm}\big(h + \alpha_A \odot (\operatorname{Norm}(A(h)) - h)\big),\qquad
        h \leftarrow \operatorname{Norm}\big(h + \alpha_M \odot (\operatorname{Norm}(M(h)) - h)\big)

    Loshchilov et al., "nGPT", ICLR 2025, Eqs. (10)-(11); :class:`~manifoldnorm.nn.EigenLR` holds
    :math:`\alpha_A, \alpha_M` (initial value 0.05, stored scale ``1/sqrt(d_model)``).
    """

    kind = "ngpt"

    def __init__(self, d_model: int, n_head: int, hidden: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = NGPTAttention(d_model, n_head, dropout=dropout)
        self.mlp = NGPTMLP(d_model, hidden, dropout=dropout)
        self.attn_alpha = EigenLR(d_model)
        self.mlp_alpha = EigenLR(d_model)

    def forward(self, h: Tensor, domain: Tensor | None = None) -> Tensor:
        h = self.attn_alpha(h, self.attn(h))
        return self.mlp_alpha(h, self.mlp(h))
