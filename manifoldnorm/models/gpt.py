"""A small GPT-style decoder whose norm layer, norm placement and normalization mode are configuration."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from manifoldnorm.nn import normalize_weights_ as _normalize_along
from manifoldnorm.nn.registry import NormSpec, get_norm_layer

from ._gpt_blocks import NORMALIZED_OUTPUT, Block, NGPTBlock, apply_norm, make_norm

__all__ = ["GPT", "PLACEMENTS", "MODES", "block_kinds", "mix_ln_post_layers", "deepnorm_constants"]

PLACEMENTS: tuple[str, ...] = ("pre", "post", "peri", "mix", "hybrid", "hybrid_star", "deepnorm")
MODES: tuple[str, ...] = ("standard", "ngpt")
_INIT_STD = 0.02
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def mix_ln_post_layers(n_layer: int, ratio: float) -> int:
    """Number of leading Post-LN layers of Mix-LN: ``round(ratio * n_layer)``, halves rounded up."""
    return min(n_layer, int(math.floor(ratio * n_layer + 0.5)))


def block_kinds(placement: str, n_layer: int, mix_ln_ratio: float = 0.25) -> tuple[str, ...]:
    """The block kind (see :mod:`manifoldnorm.models._gpt_blocks`) of each of the ``n_layer`` blocks."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; valid placements: {', '.join(PLACEMENTS)}")
    if placement == "mix":
        n_post = mix_ln_post_layers(n_layer, mix_ln_ratio)
        return ("post",) * n_post + ("pre",) * (n_layer - n_post)
    if placement == "hybrid_star":
        return ("hybrid_first",) + ("hybrid",) * (n_layer - 1)
    return (placement,) * n_layer


def deepnorm_constants(n_layer: int) -> tuple[float, float]:
    r"""DeepNorm's residual scale and init gain of a decoder-only model with ``N`` layers.

    .. math:: \alpha = (2N)^{1/4},\qquad \beta = (8N)^{-1/4}

    Wang et al., "DeepNet: Scaling Transformers to 1,000 Layers", IEEE TPAMI 2024 (arXiv:2203.00555), Sec. 3,
    constants of the decoder-only architecture.
    """
    return (2.0 * n_layer) ** 0.25, (8.0 * n_layer) ** -0.25


def _positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"GPT: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"GPT: {name} must be >= 1, got {value}")
    return value


def _flag(value: bool, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"GPT: {name} must be a bool, got {type(value).__name__}")
    return value


def _fraction(value: float, name: str, *, upper_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"GPT: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if not ok:
        raise ValueError(f"GPT: {name} must lie in [0, 1{')' if upper_open else ']'}, got {value}")
    return value


def _embed_scale(spec: str | float, norm_layer: NormSpec | None) -> float | None:
    """Initial value of the embedding scalar, or None for no scalar (see ``GPT``'s ``embed_scale``)."""
    if isinstance(spec, str):
        if spec == "none":
            return None
        if spec != "auto":
            raise ValueError(f"GPT: embed_scale must be 'auto', 'none' or a positive number, got {spec!r}")
        if norm_layer is None:
            return None
        factory = get_norm_layer(norm_layer)
        while isinstance(factory, functools.partial):
            factory = factory.func
        return 1.0 / _INIT_STD if getattr(factory, "normalization_free", False) else None
    if isinstance(spec, bool) or not isinstance(spec, (int, float)) or not (math.isfinite(spec) and spec > 0):
        raise ValueError(f"GPT: embed_scale must be 'auto', 'none' or a positive number, got {spec!r}")
    return float(spec)


class GPT(nn.Module):
    r"""Decoder-only transformer language model with a configurable norm layer and norm placement.

    Token and learned position embeddings, ``n_layer`` blocks of causal multi-head self-attention and a GELU MLP,
    a final norm, and a linear head (tied to the token embedding by default). ``forward(idx)`` maps token ids
    ``(B, T)`` to next-token logits ``(B, T, vocab_size)``.

    Placements (``x`` the residual stream, ``A`` attention, ``M`` MLP, ``N`` a norm layer):

    * ``"pre"``: :math:`x \leftarrow x + F(N(x))` for ``F`` in ``A, M`` (Xiong et al., "On Layer Normalization in
      the Transformer Architecture", ICML 2020).
    * ``"post"``: :math:`x \leftarrow N(x + F(x))` (Vaswani et al., NeurIPS 2017); no final norm.
    * ``"peri"``: :math:`x \leftarrow x + N_\text{out}(F(N_\text{in}(x)))`, plus a norm of the input embedding
      (Kim et al., "Peri-LN: Revisiting Normalization Layer in the Transformer Architecture", ICML 2025, Sec. 3).
    * ``"mix"``: Post-LN in the first ``round(mix_ln_ratio * n_layer)`` blocks (halves rounded up), Pre-LN after
      (Li, Yin, Liu, "Mix-LN: Unleashing the Power of Deeper Layers by Combining Pre-LN and Post-LN", ICLR 2025).
    * ``"hybrid"``: HybridNorm (Zhuo et al., "HybridNorm: Towards Stable and Efficient Transformer Training via
      Hybrid Normalization", NeurIPS 2025, Sec. 3): per-head norms of q, k and v inside attention, no norm on the
      attention input, and a Post-Norm FFN with the residual taken after the norm,
      :math:`y = x + A_{qkv}(x),\ z = N(y),\ x \leftarrow z + M(z)`.
    * ``"hybrid_star"``: HybridNorm*, the same with a Pre-Norm first block (norms on the attention and FFN
      inputs, q/k/v norms kept), as in the authors' released configuration.
    * ``"deepnorm"``: :math:`x \leftarrow N(\alpha x + F(x))` with :math:`\alpha = (2N)^{1/4}` and Xavier-normal
      init of the value, output and FFN matrices with gain :math:`\beta = (8N)^{-1/4}` (q, k: gain 1); Wang et al.,
      "DeepNet: Scaling Transformers to 1,000 Layers", IEEE TPAMI 2024, Sec. 3 (decoder-only). No final norm.

    ``mode="ngpt"`` builds the normalized transformer of Loshchilov, Hsieh, Sun, Ginsburg, "nGPT: Normalized
    Transformer with Representation Learning on the Hypersphere", ICLR 2025: hidden states on the unit sphere,
    :math:`h \leftarrow \operatorname{Norm}(h + \alpha_A (\operatorname{Norm}(h_A) - h))` with learned eigen
    learning rates, unit-norm q/k scaled by :math:`s_{qk}` with softmax scale :math:`\sqrt{d_k}`, logits scaled by
    :math:`s_z` (stored as ``s_z`` initialised to ``1/sqrt(d_model)``, used as ``s_z * sqrt(d_model)``), and no
    norm layers (``norm_layer`` is not used). Its embeddings and matrices are kept unit-norm along the
    embedding dimension by :meth:`normalize_weights_`, which the training loop must call after every optimizer
    step (it is a no-op in ``"standard"`` mode, so a loop may call it unconditionally).

    Parameters
    ----------
    vocab_size, block_size : int
        Number of token ids and the longest sequence (size of the position table).
    n_layer, n_head, d_model : int
        Depth, heads and width (``d_model`` must be divisible by ``n_head``).
    mlp_ratio : float, default 4
        MLP hidden width ``int(mlp_ratio * d_model)``.
    dropout : float, default 0
        Dropout on the embeddings, attention probabilities and sub-layer outputs.
    norm_layer : str, class, functools.partial or None, default "layernorm"
        Any Euclidean norm of :func:`manifoldnorm.nn.list_norms` (``"dyt"``/``"derf"`` give the
        normalization-free variants), built by ``create_norm_layer(spec, d_model, expect="euclidean")``.
    placement : str, default "pre"
        One of :data:`PLACEMENTS`.
    qk_norm : bool, default False
        Normalize queries and keys per head with the registry's ``qknorm`` layer (RMS norm over ``head_dim``
        with a learned gain) before the dot product (Henry et al., Findings of EMNLP 2020; Dehghani et al.,
        "Scaling Vision Transformers to 22 Billion Parameters", ICML 2023). With HybridNorm it replaces the
        q/k norms (v keeps ``norm_layer``). nGPT always normalizes q and k.
    mix_ln_ratio : float, default 0.25
        Fraction of Post-LN blocks of ``placement="mix"``.
    mode : {"standard", "ngpt"}
    bias : bool, default False
        Biases in the linear layers (not allowed with nGPT).
    tie_weights : bool, default True
        Share the token embedding and the head's weight.
    embed_scale : "auto", "none" or float, default "auto"
        A learnable scalar multiplying the summed token + position embedding. A float gives its initial value;
        ``"none"`` leaves the embedding unscaled; ``"auto"`` uses ``1 / 0.02`` (unit-scale hidden states at
        init) when the norm is statistics-free (its class sets ``normalization_free = True``: DyT, Derf) and no
        scalar otherwise. Reason: a statistics-free norm sees the raw scale of the residual stream, and its
        ``alpha0`` is set for unit-scale inputs (what a LayerNorm would hand on). With the 0.02 embedding init
        the inputs are 50x smaller, DyT/Derf act as tiny linear maps, and Adam inflates the residual stream until
        the final norm saturates: on ``lm_char`` such a model stays at the unigram loss (3.3 nats, measured),
        while with the scalar it trains (see the README's sweep).

    Notes
    -----
    Init: GPT-2 style normal(0, 0.02), residual output projections 0.02/sqrt(2 n_layer) (DeepNorm and nGPT use
    their own). Norm layers that use batch statistics (``batchnorm``, ...) pool over all positions in training
    mode and so break causality; per-token norms keep it.

    Deviations
    ----------
    Learned absolute position embeddings everywhere (nGPT uses RoPE; its input state is the normalized sum of
    token and position embedding). nGPT: a GELU MLP whose input is scaled by ``s_u * sqrt(d_model)`` instead of
    SwiGLU with ``s_u, s_nu``; optional weight tying (the paper unties). HybridNorm/DeepNorm use the GPT-2 init
    above for the matrices they do not rescale (the papers use Megatron / Xavier defaults).
    """

    def __init__(self, vocab_size: int, block_size: int, *, n_layer: int = 4, n_head: int = 4, d_model: int = 128,
                 mlp_ratio: float = 4, dropout: float = 0.0, norm_layer: NormSpec = "layernorm",
                 placement: str = "pre", qk_norm: bool = False, mix_ln_ratio: float = 0.25,
                 mode: str = "standard", bias: bool = False, tie_weights: bool = True,
                 embed_scale: str | float = "auto") -> None:
        super().__init__()
        self.vocab_size = _positive_int(vocab_size, "vocab_size")
        self.block_size = _positive_int(block_size, "block_size")
        self.n_layer = _positive_int(n_layer, "n_layer")
        self.n_head = _positive_int(n_head, "n_head")
        self.d_model = _positive_int(d_model, "d_model")
        if d_model % n_head:
            raise ValueError(f"GPT: d_model ({d_model}) must be divisible by n_head ({n_head})")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise ValueError(f"GPT: mlp_ratio must be a positive number, got {mlp_ratio!r}")
        hidden = int(mlp_ratio * d_model)
        if hidden < 1:
            raise ValueError(f"GPT: mlp_ratio * d_model must be >= 1, got {mlp_ratio} * {d_model}")
        dropout = _fraction(dropout, "dropout", upper_open=True)
        self.mix_ln_ratio = _fraction(mix_ln_ratio, "mix_ln_ratio", upper_open=False)
        self.qk_norm, self.bias = _flag(qk_norm, "qk_norm"), _flag(bias, "bias")
        self.tie_weights = _flag(tie_weights, "tie_weights")
        if mode not in MODES:
            raise ValueError(f"GPT: unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
        if placement not in PLACEMENTS:
            raise ValueError(f"GPT: unknown placement {placement!r}; valid placements: {', '.join(PLACEMENTS)}")
        self.mode, self.placement = mode, placement
        init_scale = _embed_scale(embed_scale, norm_layer if mode == "standard" else None)
        self.embed_scale = None if init_scale is None else nn.Parameter(torch.tensor(float(init_scale)))

        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        if mode == "ngpt":
            if placement != "pre":
                raise ValueError(f"GPT: mode='ngpt' has its own placement (no norm layers); leave placement at "
                                 f"'pre', got {placement!r}")
            if bias:
                raise ValueError("GPT: mode='ngpt' has no biases; use bias=False")
            self.layer_kinds: tuple[str, ...] = ("ngpt",) * n_layer
            self.blocks = nn.ModuleList(NGPTBlock(d_model, n_head, hidden, dropout=dropout) for _ in range(n_layer))
            self.emb_norm: nn.Module = nn.Identity()
            self.ln_f: nn.Module = nn.Identity()
            self.sz_scale = 1.0 / math.sqrt(d_model)
            self.s_z = nn.Parameter(torch.full((vocab_size,), self.sz_scale))
        else:
            self.layer_kinds = block_kinds(placement, n_layer, self.mix_ln_ratio)
            alpha = deepnorm_constants(n_layer)[0] if placement == "deepnorm" else 1.0
            self.blocks = nn.ModuleList(
                Block(kind, d_model, n_head, hidden, norm_layer=norm_layer, qk_norm=qk_norm, bias=bias,
                      dropout=dropout, residual_scale=alpha)
                for kind in self.layer_kinds)
            self.emb_norm = make_norm(norm_layer, d_model) if placement == "peri" else nn.Identity()
            needs_final = self.layer_kinds[-1] not in NORMALIZED_OUTPUT
            self.ln_f = make_norm(norm_layer, d_model) if needs_final else nn.Identity()
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise embeddings and matrices (norm-layer parameters keep their own init)."""
        if self.mode == "ngpt":
            std = 1.0 / math.sqrt(self.d_model)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, 0.0, std)
            self.normalize_weights_()
            return
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, _INIT_STD)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        if self.placement == "deepnorm":
            beta = deepnorm_constants(self.n_layer)[1]
            for blk in self.blocks:
                nn.init.xavier_normal_(blk.attn.q_proj.weight, gain=1.0)
                nn.init.xavier_normal_(blk.attn.k_proj.weight, gain=1.0)
                for lin in (blk.attn.v_proj, blk.attn.out_proj, blk.mlp.fc, blk.mlp.proj):
                    nn.init.xavier_normal_(lin.weight, gain=beta)
            return
        for blk in self.blocks:
            for lin in (blk.attn.out_proj, blk.mlp.proj):
                nn.init.normal_(lin.weight, 0.0, _INIT_STD / math.sqrt(2 * self.n_layer))

    @torch.no_grad()
    def normalize_weights_(self) -> int:
        r"""Put every embedding and matrix back on the unit sphere along the embedding dimension (nGPT).

        Call after every optimizer step when ``mode="ngpt"`` (Loshchilov et al., ICLR 2025, Sec. 2.6); a no-op
        returning 0 in ``"standard"`` mode. Embedding vectors and the rows of the head, q/k/v and MLP input
        matrices (``(out, d_model)``) get unit norm; so do the columns of the attention output and MLP output
        matrices (``(d_model, in)``), whose embedding dimension is the output one.

        Returns
        -------
        int
            Number of weight tensors renormalized (a tied head counts once).
        """
        if self.mode != "ngpt":
            return 0
        count = _normalize_along(self.wte, dim=-1) + _normalize_along(self.wpe, dim=-1)
        if not self.tie_weights:
            count += _normalize_along(self.lm_head, dim=-1)
        for blk in self.blocks:
            for lin in (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj, blk.mlp.fc):
                count += _normalize_along(lin, dim=-1)
            for lin in (blk.attn.out_proj, blk.mlp.proj):
                count += _normalize_along(lin, dim=0)
        return count

    # --------------------------------------------------------------- forward
    def _check_idx(self, idx: Tensor) -> None:
        if not isinstance(idx, Tensor):
            raise TypeError(f"GPT: idx must be a LongTensor of token ids (B, T), got {type(idx).__name__}")
        if idx.dtype not in _INT_DTYPES:
            raise TypeError(f"GPT: idx must hold integer token ids (torch.long), got dtype {idx.dtype}")
        if idx.ndim != 2:
            raise ValueError(f"GPT: idx must have shape (B, T), got {tuple(idx.shape)}")
        T = idx.shape[1]
        if T < 1 or T > self.block_size:
            raise ValueError(f"GPT: sequence length must be in [1, block_size={self.block_size}], got {T}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.vocab_size):
            raise ValueError(f"GPT: token ids must lie in [0, {self.vocab_size}), got range "
                             f"[{int(idx.min())}, {int(idx.max())}]")

    def hidden_states(self, idx: Tensor, domain: Tensor | None = None) -> Tensor:
        """Final hidden states ``(B, T, d_model)`` (after the final norm), the input of the head."""
        self._check_idx(idx)
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        if self.embed_scale is not None:
            x = x * self.embed_scale.to(x.dtype)
        x = self.drop(x)
        if self.mode == "ngpt":
            x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
        else:
            x = apply_norm(self.emb_norm, x, domain)
        for blk in self.blocks:
            x = blk(x, domain)
        return apply_norm(self.ln_f, x, domain)

    def forward(self, idx: Tensor, domain: Tensor | None = None) -> Tensor:
        """Next-token logits ``(B, T, vocab_size)`` for token ids ``idx`` ``(B, T)``; ``domain`` goes to the norms."""
        logits = self.lm_head(self.hidden_states(idx, domain))
        if self.mode == "ngpt":
            logits = logits * (self.s_z / self.sz_scale).to(logits.dtype)
        return logits

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, block_size={self.block_size}, mode={self.mode!r}, "
                f"placement={self.placement!r}, qk_norm={self.qk_norm}")
