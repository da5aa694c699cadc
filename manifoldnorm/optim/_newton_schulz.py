"""Newton–Schulz orthogonalization and the matrix helpers shared by Muon-type optimizers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["NS_COEFFICIENTS", "ADJUST_LR_MODES", "NS_DTYPE", "newton_schulz", "adjust_lr", "as_matrix", "resolve_dtype"]

#: Quintic coefficients ``(a, b, c)`` of Jordan et al.'s Muon (maximal slope at zero, not convergent to 1).
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

#: Default precision of the Newton–Schulz iteration in the optimizers: bfloat16, as ``torch.optim.Muon``, Jordan et
#: al.'s and the NorMuon authors' code (on CPUs with bfloat16 matrix units about twice as fast as float32; on CPUs
#: without bfloat16 instructions, where it is emulated, about 3x slower: pass ``ns_dtype="float32"`` there).
NS_DTYPE: str = "bfloat16"

#: Valid learning-rate shape adjustments; ``None`` means ``"original"``.
ADJUST_LR_MODES: tuple[str, ...] = ("original", "match_rms_adamw")

_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64}


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    coefficients: Sequence[float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
) -> Tensor:
    r"""Approximate the orthogonal polar factor of a stack of matrices by a polynomial Newton–Schulz iteration.

    With :math:`X_0 = G / \max(\lVert G \rVert_F, \varepsilon)` (so the spectral norm is at most 1) the
    iteration

    .. math::

        A_k = X_k X_k^\top, \qquad X_{k+1} = a X_k + (b A_k + c A_k^2) X_k

    keeps the singular vectors of :math:`G` and maps every normalized singular value :math:`s` through the
    scalar polynomial :math:`p(s) = a s + b s^3 + c s^5`, ``steps`` times. Jordan et al. (2024, "Muon: an
    optimizer for hidden layers in neural networks") choose :math:`(a, b, c) = (3.4445, -4.7750, 2.0315)`: five
    steps send every :math:`s \in [0.01, 1]` into about :math:`[0.68, 1.13]` rather than to exactly 1, i.e. the
    result is :math:`U S' V^\top` with :math:`S' \approx I` where :math:`G = U S V^\top`. With the cubic
    :math:`(1.5, -0.5, 0)` the iteration converges to :math:`U V^\top` (slowly).

    Parameters
    ----------
    G : Tensor, shape (..., m, n)
        Real floating-point matrices. The iteration runs on the wide orientation: a tall matrix (m > n) is
        transposed, iterated with the smaller ``(n, n)`` Gram matrix, and transposed back.
    steps : int, default 5
        Number of polynomial steps (0 returns the normalized input).
    coefficients : sequence of three floats, default ``(3.4445, -4.7750, 2.0315)``
        The polynomial coefficients ``(a, b, c)``.
    eps : float, default 1e-7
        Lower bound of the Frobenius norm in the normalization; an all-zero matrix maps to zero.

    Returns
    -------
    Tensor, shape (..., m, n)
        Same dtype as ``G``: the iteration computes in the input dtype (cast ``G`` beforehand, e.g. to
        ``bfloat16``, to run it in lower precision).

    Notes
    -----
    Deviations: the normalization uses :math:`\max(\lVert G\rVert_F, \varepsilon)` as ``torch.optim.Muon`` does,
    not :math:`\lVert G\rVert_F + \varepsilon` as Jordan et al.'s reference; both agree except for matrices of
    norm below :math:`\varepsilon`. The references always iterate in ``bfloat16``; here the caller picks the
    precision.
    """
    check_newton_schulz_args(G, steps, coefficients)
    return _newton_schulz(G, steps, coefficients, eps, owned=False)


def check_newton_schulz_args(G: Tensor, steps: int, coefficients: Sequence[float]) -> None:
    """The argument checks of :func:`newton_schulz` (TypeError / ValueError naming the argument)."""
    if not isinstance(G, Tensor):
        raise TypeError(f"newton_schulz expects a Tensor, got {type(G).__name__}")
    if G.dim() < 2:
        raise ValueError(f"newton_schulz needs matrices of shape (..., m, n); got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise TypeError(f"newton_schulz needs a real floating-point tensor, got dtype {G.dtype}")
    if len(coefficients) != 3:
        raise ValueError(f"coefficients must be three numbers (a, b, c), got {tuple(coefficients)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")


def _newton_schulz(G: Tensor, steps: int, coefficients: Sequence[float], eps: float, owned: bool) -> Tensor:
    """:func:`newton_schulz` without the argument checks; ``owned``: ``G`` is a temporary of the caller's, so the
    normalization may divide it in place (as ``torch.optim.Muon`` does with its bfloat16 copy)."""
    a, b, c = (float(x) for x in coefficients)
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G
    batch = X.shape[:-2]
    if X.dim() > 3:
        X = X.reshape(-1, *X.shape[-2:])
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp_(min=eps)
    X = X.div_(norm) if owned else X / norm
    for _ in range(steps):
        X = _quintic_step(X, a, b, c)
    if len(batch) > 1:  # flattened above
        X = X.reshape(*batch, *X.shape[-2:])
    return X.mT if tall else X


def _quintic_step(X: Tensor, a: float, b: float, c: float) -> Tensor:
    """One step ``a X + (b A + c A A) X`` with ``A = X Xᵀ`` as two fused multiply-adds."""
    A = X @ X.mT
    if X.dim() == 2:
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        return torch.addmm(X, B, X, beta=a)
    B = torch.baddbmm(A, A, A, beta=b, alpha=c)
    return torch.baddbmm(X, B, X, beta=a)


def as_matrix(t: Tensor, what: str = "Muon") -> Tensor:
    """View a weight or gradient of shape ``(out, ...)`` as the matrix ``(out, prod(rest))``.

    Linear weights ``(out, in)`` are returned unchanged, conv weights ``(out, in, kh, kw)`` become
    ``(out, in·kh·kw)`` (row = output neuron). Vectors and scalars raise a ValueError that says where to send them.
    """
    if t.dim() < 2:
        raise ValueError(
            f"{what} updates matrices (ndim >= 2); got a tensor of shape {tuple(t.shape)}. Route biases, gains "
            "and other vectors to AdamW (the composite optimizer's `rest` rule)."
        )
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def _matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"a matrix shape (out, in, ...) is needed, got {tuple(shape)}")
    return int(shape[0]), math.prod(int(s) for s in shape[1:])


def adjust_lr(lr: float, shape: Sequence[int], mode: str | None = "original") -> float:
    r"""Muon's learning rate for a weight of ``shape`` (conv shapes counted as ``(out, in·kh·kw)``).

    .. math::

        \text{original: } \eta \sqrt{\max(1, m/n)}, \qquad
        \text{match\_rms\_adamw: } 0.2\,\eta \sqrt{\max(m, n)}

    ``original`` is Jordan et al.'s scaling (spectral-norm units), ``match_rms_adamw`` Liu et al. (2025,
    "Muon is scalable for LLM training", Sec. 2.2), which gives an orthogonal update the RMS 0.2 of a typical
    AdamW update so AdamW learning rates and weight decays carry over. ``None`` means ``original``.
    """
    m, n = _matrix_shape(shape)
    mode = check_adjust_mode(mode)
    if mode == "original":
        return lr * math.sqrt(max(1.0, m / n))
    return lr * 0.2 * math.sqrt(max(m, n))


def check_adjust_mode(mode: str | None) -> str:
    """Validate a learning-rate adjustment name; ``None`` becomes ``"original"``."""
    if mode is None:
        return "original"
    if mode not in ADJUST_LR_MODES:
        raise ValueError(f"unknown adjust_lr_fn {mode!r}; valid: None, {', '.join(map(repr, ADJUST_LR_MODES))}")
    return mode


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating dtype given as ``torch.dtype`` or name (``"bfloat16"``, ``"float32"``, ...); ``None`` stays."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in _DTYPE_NAMES:
            raise ValueError(f"unknown ns_dtype {dtype!r}; valid: None, {', '.join(_DTYPE_NAMES)}")
        return _DTYPE_NAMES[name]
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise TypeError(f"ns_dtype must be a floating torch.dtype, its name or None, got {dtype!r}")
