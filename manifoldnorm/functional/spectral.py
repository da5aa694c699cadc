r"""Spectral functions of symmetric matrices with a stable backward.

Every function here has the form :math:`F(X) = U\,\mathrm{diag}(f(\lambda))\,U^\top` for the eigendecomposition
:math:`X = U\,\mathrm{diag}(\lambda)\,U^\top` (``torch.linalg.eigh``, batched over all leading dimensions).

Backward (Daleckii–Krein / Loewner formula; Bhatia, *Matrix Analysis*, Thm. V.3.3; Ionescu et al., "Matrix
backpropagation for deep networks with structured layers", ICCV 2015, Eq. 11 in the eigen form):

.. math::

    \frac{\partial L}{\partial X} = U\,\big[\mathcal{L} \circ (U^\top \mathrm{sym}(G)\,U)\big]\,U^\top,\qquad
    \mathcal{L}_{ij} = \begin{cases} \dfrac{f(\lambda_i)-f(\lambda_j)}{\lambda_i-\lambda_j} & \lambda_i \ne \lambda_j\\
    f'(\lambda_i) & \lambda_i = \lambda_j \end{cases}

with :math:`G = \partial L/\partial F`. For log, exp, powers, square roots and the inverse the divided
differences are evaluated in closed forms free of cancellation (e.g. :math:`e^{b}\,\mathrm{expm1}(a-b)/(a-b)`,
:math:`\mathrm{log1p}(h)/(hb)` with :math:`h=(a-b)/b`, :math:`1/(\sqrt a+\sqrt b)`), exact also at ties and near
zero. For a user function (:func:`sym_funcm`) and the clamp of :func:`sym_reeig`, where two eigenvalues are closer
than a relative tolerance
``rtol = eps(dtype)**(1/3)`` the divided difference is replaced by :math:`f'` at their midpoint (a
second-order-accurate approximation that balances cancellation against truncation error), so the gradient is
exact at repeated eigenvalues (e.g. at :math:`X = 2I`, where ``torch.linalg.eigh``'s own backward divides by
zero).

For :func:`sym_powm` the gradient with respect to the exponent is returned as well,
:math:`\partial L/\partial p = \sum_i (U^\top \mathrm{sym}(G) U)_{ii}\,\lambda_i^p \log\lambda_i`.

Half-precision inputs are computed in float32 (``eigh`` has no float16/bfloat16 kernels) and cast back, and
``torch.autocast`` is switched off inside these functions (forward and backward), so an enclosing autocast region
never runs the reconstruction or the backward products in half precision.

:func:`sym_eig` exposes one decomposition to several consumers (eigenvalues for a dispersion, a power for the
scaling) so a layer pays for one ``eigh`` where the math needs one.

Every fast path has a plain-autograd ``*_ref`` twin (:mod:`.spectral_ref`) used by the tests; the eigenvalue
functions and their cancellation-free divided differences are in :mod:`._spectral_specs`.

**What is refused, what is returned** (no silent NaN):

* *Input triangle.* ``torch.linalg.eigh`` reads only the lower triangle, so every function here takes an
  asymmetric input as its lower triangle mirrored. This is not checked per call (a pass and a host
  synchronisation); inside ``with manifoldnorm.functional.strict_inputs():`` every call first runs
  :func:`~manifoldnorm.functional.check_symmetric` and refuses asymmetry above ``sqrt(eps)`` (ValueError). The
  norm layers validate their inputs (``validate=True``) with :func:`~manifoldnorm.functional.check_spd`.
* *Domain.* :func:`sym_logm`, :func:`sym_invsqrtm`, :func:`sym_invm`, :func:`sym_powm` need eigenvalues
  :math:`> 0`, :func:`sym_sqrtm` :math:`\ge 0`: a matrix with an eigenvalue outside (or NaN) raises a ValueError
  naming the function, how many matrices, the extreme eigenvalues, and what to do (float32 and half precision:
  compute in float64, ``compute_dtype=torch.float64`` on a layer; else regularize). The test is one reduction
  of the eigenvalues and one host synchronisation per call, next to the ``eigh``.
* *Overflow.* :func:`sym_expm` of an eigenvalue above :math:`\log(\text{max float})` (709.8 in float64,
  88.7 in float32) returns ``±inf`` in exactly the entries the overflowing eigenvectors reach (with their sign)
  and the finite value elsewhere, never NaN (the plain reconstruction gives ``inf - inf`` and ``0 * inf``).
* *Gradients.* If the input gradient is not finite while the incoming gradient is (a spectrum too close to
  singular for the precision, e.g. :math:`\lambda^{-3/2}` of :math:`\lambda = 10^{-30}` in float32), the
  backward raises a ValueError with the same advice instead of returning inf/NaN. float32 gradients are finite
  down to a relative spectrum of about ``eps`` (condition ~1e7), with the accuracy that precision allows.
* *Second derivatives.* The backward treats the eigendecomposition as a constant, so it is **once
  differentiable**: differentiating it (``create_graph=True`` then another ``grad``: Hessian-vector products,
  gradient penalties, ``gradgradcheck``) raises ``NotImplementedError`` that points to the ``*_ref`` twins, which
  are twice differentiable through ``torch.linalg.eigh`` (exact while the eigenvalues are distinct).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._autograd import anchor_inputs, once_differentiable
from ._spectral_checks import _advice, _all_finite, _check_domain, _reconstruct, _reconstruct_exp
from ._spectral_specs import (  # noqa: F401 - _dd_pow, _INV, _SQRT: imported from here by other modules
    _EXP,
    _INV,
    _INVSQRT,
    _LOG,
    _POW,
    _SQRT,
    PowFn,
    ScalarFn,
    _dd_pow,
    _reeig_log_spec,
    _reeig_spec,
    _Spec,
)
from .validation import check_symmetric, strict_inputs_enabled

__all__ = [
    "sym",
    "sym_funcm",
    "sym_logm",
    "sym_expm",
    "sym_sqrtm",
    "sym_invsqrtm",
    "sym_sqrtm_invsqrtm",
    "sym_invm",
    "sym_powm",
    "sym_reeig",
    "sym_reeig_logm",
    "sym_eig",
    "SymEig",
]


def sym(X: Tensor) -> Tensor:
    r"""Symmetric part :math:`\tfrac12 (X + X^\top)` of ``(..., n, n)`` matrices."""
    return 0.5 * (X + X.transpose(-1, -2))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _outputs(U: Tensor, lam: Tensor, flams: Sequence[Tensor], specs: Sequence[_Spec]) -> tuple[Tensor, ...]:
    return tuple(_reconstruct_exp(U, lam) if spec.overflows else _reconstruct(U, fl)
                 for spec, fl in zip(specs, flams, strict=True))


def _loewner_exact(li: Tensor, lj: Tensor, fi: Tensor, fj: Tensor, spec: _Spec, pp: Tensor) -> Tensor:
    """Divided differences of (gathered) eigenvalue pairs: closed form if known, else midpoint rule on ties."""
    if spec.dd is not None:
        return spec.dd(li, lj, pp)
    diff = li - lj
    rtol = torch.finfo(li.dtype).eps ** (1.0 / 3.0)
    scale = torch.maximum(li.abs(), lj.abs()).clamp_min(torch.finfo(li.dtype).tiny)
    tie = diff.abs() <= rtol * scale
    divided = (fi - fj) / torch.where(tie, torch.ones_like(diff), diff)
    return torch.where(tie, spec.df(0.5 * (li + lj), pp), divided)


#: pairs with |λ_i - λ_j| > _SPLIT * |λ_j| use the plain quotient (relative error <~ eps / _SPLIT); the others the
#: exact closed forms above, evaluated on the gathered pairs only
_SPLIT = {torch.float64: 1e-4, torch.float32: 5e-2}
#: up to this many Loewner entries the near pairs are evaluated on the whole grid (elementwise, then selected)
#: instead of being gathered: the same values with fewer, cheaper operations
_GRID_MAX = 4096


def _loewner(lam: Tensor, flam: Tensor, spec: _Spec, p: Tensor, scale: float = 1.0) -> Tensor:
    """Loewner matrix of divided differences, exact on (near) ties.

    Well separated pairs (the vast majority) take the quotient :math:`(f_i - f_j)/(\\lambda_i - \\lambda_j)`, three
    elementwise passes; the diagonal is the derivative :math:`f'(\\lambda_i)`; off-diagonal pairs closer than a
    relative gap (clusters, repeated eigenvalues) are gathered and evaluated with the cancellation-free closed form
    of the function (or the midpoint derivative for user functions). ``lam`` must be sorted ascending (as
    ``torch.linalg.eigh`` returns it): near pairs are first ruled out from the adjacent gaps.
    """
    li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
    sf = flam if scale == 1.0 else scale * flam
    fi, fj = sf.unsqueeze(-1), sf.unsqueeze(-2)
    pp = p.unsqueeze(-1).unsqueeze(-1) if p.dim() > 0 else p
    diff = li - lj
    out = fi - fj
    out.div_(diff)
    # the diagonal is the derivative itself: written directly, no gather
    pe = p.unsqueeze(-1) if p.dim() > 0 else p
    dfl = spec.df(lam, pe)
    out.diagonal(dim1=-2, dim2=-1).copy_(dfl if scale == 1.0 else scale * dfl)
    size = lam.abs() if spec.relative_gap else lam.abs().clamp_min(1.0)
    split = _SPLIT.get(lam.dtype, 1e-4)
    n = lam.shape[-1]
    # eigenvalues come sorted (eigh): a pair (i, j) is near iff |l_i - l_j| <= split * size_j, and every gap between
    # l_i and l_j is at most |l_i - l_j|, so some pair is near iff some adjacent pair is (with the size of either
    # end): an O(n) test rules out the n x n one in the common case
    if n < 2 or not bool((lam[..., 1:] - lam[..., :-1]
                          <= split * torch.maximum(size[..., 1:], size[..., :-1])).any()):
        return out
    near = diff.abs_() <= (split * size).unsqueeze(-2)
    near.diagonal(dim1=-2, dim2=-1).fill_(False)
    if out.numel() <= _GRID_MAX:  # a few small matrices (e.g. a bias at the identity): the closed form everywhere
        exact = _loewner_exact(li, lj, flam.unsqueeze(-1), flam.unsqueeze(-2), spec, pp)
        return torch.where(near, exact if scale == 1.0 else scale * exact, out)
    if bool(near.any()):
        idx = near.nonzero(as_tuple=True)
        shape = out.shape
        b = idx[:-2]
        i, j = idx[-2], idx[-1]
        lam_b = lam.expand(*shape[:-1])
        fl_b = flam.expand(*shape[:-1])
        pg = pp.expand(shape)[idx] if isinstance(pp, Tensor) and pp.dim() > 0 else pp
        exact = _loewner_exact(lam_b[(*b, i)], lam_b[(*b, j)], fl_b[(*b, i)], fl_b[(*b, j)], spec, pg)
        out[idx] = exact if scale == 1.0 else scale * exact
    return out


def _no_autocast(t: Tensor):
    if t.device.type in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(t.device.type):
        return torch.autocast(device_type=t.device.type, enabled=False)
    return contextlib.nullcontext()


def _spec_names(ctx) -> str:
    return "/".join(dict.fromkeys(spec.name for spec in ctx.specs))


_SPECTRAL_ADVICE = (
    "For second derivatives use the plain-autograd references (manifoldnorm.functional.sym_logm_ref, sym_expm_ref, "
    "sym_sqrtm_ref, sym_invsqrtm_ref, sym_powm_ref, sym_funcm_ref: differentiable twice through torch.linalg.eigh, "
    "exact while the eigenvalues are distinct), or keep create_graph=False."
)


class _SymEig(torch.autograd.Function):
    """One ``eigh``, several spectral functions of it, Daleckii–Krein backward for each."""

    @staticmethod
    def forward(ctx, X: Tensor, p: Tensor, specs: tuple[_Spec, ...]):  # type: ignore[override]
        lam, U = torch.linalg.eigh(X)
        _check_domain(lam, specs, X.dtype)
        anchor_inputs(ctx, X, p)
        return _SymEig._finish(ctx, lam, U, p, specs)

    @staticmethod
    def _finish(ctx, lam: Tensor, U: Tensor, p: Tensor, specs: tuple[_Spec, ...]):
        pe = p.unsqueeze(-1) if p.dim() > 0 else p
        flams = tuple(spec.f(lam, pe) for spec in specs)
        ctx.specs = specs
        ctx.save_for_backward(lam, U, p, *flams)
        return _outputs(U, lam, flams, specs)

    @staticmethod
    @once_differentiable(_spec_names, _SPECTRAL_ADVICE)
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        lam, U, p, *flams = ctx.saved_tensors
        with _no_autocast(U):
            return _SymEig._grad(ctx, lam, U, p, flams, grads)

    @staticmethod
    def _grad(ctx, lam, U, p, flams, grads):
        Ut = U.transpose(-1, -2)
        inner = None
        dp = None
        for spec, flam, G in zip(ctx.specs, flams, grads, strict=True):
            if G is None:
                continue
            Gt = Ut @ (G + G.transpose(-1, -2)) @ U  # 2 U^T sym(G) U; the 1/2 goes into the Loewner matrix
            term = _loewner(lam, flam, spec, p, scale=0.5).mul_(Gt)
            inner = term if inner is None else inner.add_(term)
            if ctx.needs_input_grad[1] and spec.dfdp is not None:
                pe = p.unsqueeze(-1) if p.dim() > 0 else p
                contrib = 0.5 * (torch.diagonal(Gt, dim1=-2, dim2=-1) * spec.dfdp(lam, pe)).sum(-1)
                dp = contrib if dp is None else dp + contrib
        dX = None if inner is None else U @ inner @ Ut
        if dX is not None and not _all_finite(dX) and all(_all_finite(G) for G in grads if G is not None):
            raise ValueError(
                f"{_spec_names(ctx)}: the gradient is not finite in {lam.dtype} although the incoming gradient is "
                f"(input eigenvalues in [{float(lam.min()):.3g}, {float(lam.max()):.3g}]): the spectrum is too "
                "close to singular, or too wide, for this precision. "
                + _advice(lam.dtype, "regularize the input (add eps * I, or sym_reeig)")
            )
        if dp is not None:
            dp = dp.sum_to_size(p.shape) if p.dim() > 0 else dp.sum()
        return dX, dp, None


class _FromEig(torch.autograd.Function):
    """Spectral functions of ``X`` from a decomposition ``(lam, U)`` computed beforehand (see :class:`SymEig`)."""

    @staticmethod
    def forward(ctx, X: Tensor, p: Tensor, lam: Tensor, U: Tensor, specs: tuple[_Spec, ...]):  # type: ignore[override]
        anchor_inputs(ctx, X, p)
        return _SymEig._finish(ctx, lam, U, p, specs)

    @staticmethod
    @once_differentiable(_spec_names, _SPECTRAL_ADVICE)
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        lam, U, p, *flams = ctx.saved_tensors
        with _no_autocast(U):
            dX, dp, _ = _SymEig._grad(ctx, lam, U, p, flams, grads)
        return dX, dp, None, None, None


class _EigvalsFromEig(torch.autograd.Function):
    r"""Eigenvalues of ``X`` from a decomposition computed beforehand; backward :math:`U\,\mathrm{diag}(g)\,U^\top`."""

    @staticmethod
    def forward(ctx, X: Tensor, lam: Tensor, U: Tensor):  # type: ignore[override]
        anchor_inputs(ctx, X)
        ctx.save_for_backward(U)
        return lam.clone()

    @staticmethod
    @once_differentiable("SymEig.eigvals", "For second derivatives use torch.linalg.eigvalsh (plain autograd).")
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (U,) = ctx.saved_tensors
        with _no_autocast(U):
            return _reconstruct(U, g), None, None


def _check_input(X: Tensor, name: str = "input") -> None:
    if not isinstance(X, Tensor):
        raise TypeError(f"expected a torch.Tensor of shape (..., n, n), got {type(X).__name__}")
    if X.dim() < 2 or X.shape[-1] != X.shape[-2]:
        raise ValueError(f"expected square matrices of shape (..., n, n), got shape {tuple(X.shape)}")
    if not X.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got dtype {X.dtype}")
    if strict_inputs_enabled():  # opt-in: eigh reads the lower triangle only, an asymmetric input is refused
        check_symmetric(X.detach(), name)


def _exponent(X: Tensor, p: Tensor | float | None, cdtype: torch.dtype) -> Tensor:
    if p is None:
        pt = torch.zeros((), dtype=cdtype, device=X.device)
    else:
        pt = p if isinstance(p, Tensor) else torch.tensor(float(p), dtype=cdtype, device=X.device)
        if pt.dim() > 0:
            batch = X.shape[:-2]
            try:
                torch.broadcast_shapes(pt.shape, batch)
            except RuntimeError as err:
                raise ValueError(
                    f"exponent of shape {tuple(pt.shape)} does not broadcast to the batch shape {tuple(batch)}"
                ) from err
            if len(pt.shape) > len(batch) or torch.broadcast_shapes(pt.shape, batch) != batch:
                raise ValueError(
                    f"exponent of shape {tuple(pt.shape)} must broadcast to the batch shape {tuple(batch)}"
                )
            pt = pt.expand(batch) if pt.shape != batch else pt
        pt = pt.to(cdtype)
    return pt


def _needs_graph(*ts: object) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in ts)


def _apply(X: Tensor, specs: Sequence[_Spec], p: Tensor | float | None = None) -> tuple[Tensor, ...]:
    _check_input(X, specs[0].name)
    dtype = X.dtype
    cdtype = _compute_dtype(dtype)
    with _no_autocast(X):
        if not _needs_graph(X, p):  # statistics, running averages: no autograd Function to build
            lam, U = torch.linalg.eigh(X.to(cdtype))
            _check_domain(lam, specs, dtype)
            pt = _exponent(X, p, cdtype)
            pe = pt.unsqueeze(-1) if pt.dim() > 0 else pt
            return tuple(o.to(dtype) for o in _outputs(U, lam, [spec.f(lam, pe) for spec in specs], specs))
        outs = _SymEig.apply(X.to(cdtype), _exponent(X, p, cdtype), tuple(specs))
    return tuple(o.to(dtype) for o in outs)


class SymEig:
    r"""One eigendecomposition of symmetric matrices shared by several differentiable consumers.

    ``E = sym_eig(X)`` runs ``torch.linalg.eigh`` once (outside autograd); :meth:`eigvals`, :meth:`powm`,
    :meth:`logm`, ... return functions of ``X`` that are differentiable with respect to ``X`` (and the exponent)
    through the same Daleckii–Krein backward as :func:`sym_powm` etc. Gradients from several consumers add up.
    A batch norm that needs the eigenvalues of the centred matrices for the dispersion and then a power of the
    same matrices for the scaling pays for one ``eigh`` instead of two.

    Computation runs in float32 for half-precision inputs and outside autocast; outputs have ``X``'s dtype.
    """

    def __init__(self, X: Tensor) -> None:
        _check_input(X, "sym_eig")
        self.X = X
        self.dtype = X.dtype
        self._cdtype = _compute_dtype(X.dtype)
        self._Xc = X.to(self._cdtype)
        with torch.no_grad(), _no_autocast(X):
            self.lam, self.U = torch.linalg.eigh(self._Xc.detach())
        self._domains_checked: set[str | None] = {None}  # one domain check (host sync) per domain, not per call

    def eigvals(self) -> Tensor:
        r"""Eigenvalues ``(..., n)`` in ascending order; backward :math:`U\,\mathrm{diag}(g)\,U^\top`."""
        return _EigvalsFromEig.apply(self._Xc, self.lam, self.U).to(self.dtype)

    def _apply(self, spec: _Spec, p: Tensor | float | None = None) -> Tensor:
        if spec.domain not in self._domains_checked:
            _check_domain(self.lam, (spec,), self.dtype)
            self._domains_checked.update(("pos", "nonneg") if spec.domain == "pos" else (spec.domain,))
        if not _needs_graph(self.X, p):
            pt = _exponent(self.X, p, self._cdtype)
            with _no_autocast(self.X):
                fl = spec.f(self.lam, pt.unsqueeze(-1) if pt.dim() > 0 else pt)
                return _outputs(self.U, self.lam, (fl,), (spec,))[0].to(self.dtype)
        with _no_autocast(self.X):
            out = _FromEig.apply(self._Xc, _exponent(self.X, p, self._cdtype), self.lam, self.U, (spec,))[0]
        return out.to(self.dtype)

    def powm(self, p: Tensor | float) -> Tensor:
        """:math:`X^p`, differentiable in ``X`` and ``p`` (see :func:`sym_powm`)."""
        return self._apply(_POW, p)

    def logm(self) -> Tensor:
        r""":math:`\log X` (see :func:`sym_logm`)."""
        return self._apply(_LOG)

    def expm(self) -> Tensor:
        r""":math:`\exp X` (see :func:`sym_expm`)."""
        return self._apply(_EXP)

    def sqrtm(self) -> Tensor:
        """:math:`X^{1/2}` (see :func:`sym_sqrtm`)."""
        return self._apply(_SQRT)

    def invsqrtm(self) -> Tensor:
        """:math:`X^{-1/2}` (see :func:`sym_invsqrtm`)."""
        return self._apply(_INVSQRT)


def sym_eig(X: Tensor) -> SymEig:
    """Decompose symmetric matrices ``(..., n, n)`` once for several spectral consumers (see :class:`SymEig`)."""
    return SymEig(X)


def sym_funcm(X: Tensor, f: ScalarFn, df: ScalarFn) -> Tensor:
    r"""Apply an eigenvalue function to symmetric matrices, :math:`U f(\Lambda) U^\top`.

    Parameters
    ----------
    X : Tensor, shape (..., n, n)
        Symmetric matrices (only the lower triangle is read, as by ``torch.linalg.eigh``).
    f, df : callable
        Elementwise function of the eigenvalues and its derivative (used by the Daleckii–Krein backward).

    Returns
    -------
    Tensor, shape (..., n, n)
    """
    return _apply(X, (_Spec(lambda l, p: f(l), lambda l, p: df(l)),))[0]


def sym_logm(X: Tensor) -> Tensor:
    r"""Matrix logarithm :math:`\log X = U \log(\Lambda) U^\top` of SPD matrices ``(..., n, n)``.

    Non-positive eigenvalues raise a ValueError (the logarithm is undefined there); rectify with
    :func:`sym_reeig` or regularize first.
    """
    return _apply(X, (_LOG,))[0]


def sym_expm(X: Tensor) -> Tensor:
    r"""Matrix exponential :math:`\exp X = U \exp(\Lambda) U^\top` of symmetric matrices ``(..., n, n)``.

    Overflow (an eigenvalue above :math:`\log` of the largest float: 709.8 in float64, 88.7 in float32; the
    float32 limit for half-precision inputs, then the cast) gives ``±inf`` entries with the right sign, never
    NaN; entries the overflowing eigenvectors do not reach keep their finite value.
    """
    return _apply(X, (_EXP,))[0]


def sym_sqrtm(X: Tensor) -> Tensor:
    r"""Principal square root :math:`X^{1/2}` of SPD matrices ``(..., n, n)``."""
    return _apply(X, (_SQRT,))[0]


def sym_invsqrtm(X: Tensor) -> Tensor:
    r"""Inverse square root :math:`X^{-1/2}` of SPD matrices ``(..., n, n)``."""
    return _apply(X, (_INVSQRT,))[0]


def sym_sqrtm_invsqrtm(X: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`(X^{1/2}, X^{-1/2})` from a single ``eigh``; gradients of both outputs are accumulated."""
    S, Si = _apply(X, (_SQRT, _INVSQRT))
    return S, Si


def sym_invm(X: Tensor) -> Tensor:
    r"""Inverse :math:`X^{-1} = U \Lambda^{-1} U^\top` of SPD matrices ``(..., n, n)``."""
    return _apply(X, (_INV,))[0]


def sym_powm(X: Tensor, p: Tensor | float) -> Tensor:
    r"""Matrix power :math:`X^p = U \Lambda^p U^\top` of SPD matrices, differentiable in ``X`` **and** ``p``.

    Parameters
    ----------
    X : Tensor, shape (..., n, n)
    p : float or Tensor
        Exponent; a tensor must broadcast to the batch shape ``X.shape[:-2]`` (one exponent per matrix).

    Notes
    -----
    :math:`\partial L/\partial p = \sum_i (U^\top \mathrm{sym}(G) U)_{ii} \lambda_i^p \log\lambda_i`. The
    learnable dispersion of Riemannian batch norms (scaling :math:`X \mapsto X^{s/\sqrt{v^2+\epsilon}}`) gets its
    gradient through this term.
    """
    return _apply(X, (_POW,), p)[0]


def sym_reeig(X: Tensor, threshold: float = 1e-4) -> Tensor:
    r"""Eigenvalue rectification :math:`U \max(\Lambda, \epsilon I) U^\top` (ReEig of SPDNet).

    Huang & Van Gool, "A Riemannian Network for SPD Matrix Learning", AAAI 2017, Eq. 6. The derivative of the
    clamp is :math:`\mathbb{1}[\lambda > \epsilon]`. ``threshold`` must be a positive finite number (NaN, inf,
    0 and negative values raise a ValueError: a NaN threshold would make every output NaN).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) and not (
        isinstance(threshold, Tensor) and threshold.numel() == 1
    ):
        raise TypeError(f"sym_reeig: threshold must be a positive number, got {type(threshold).__name__}")
    threshold = float(threshold)
    if not math.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"sym_reeig: threshold must be a positive finite number, got {threshold}")
    return _apply(X, (_reeig_spec(float(threshold)),))[0]


def sym_reeig_logm(X: Tensor, threshold: float = 1e-4) -> Tensor:
    r""":math:`\log(\mathrm{ReEig}(X)) = U \log\max(\Lambda, \epsilon I) U^\top`: ReEig and LogEig of SPDNet
    (Huang & Van Gool, AAAI 2017, Eqs. 6 and 8) from one eigendecomposition.

    ReEig keeps the eigenvectors, so the logarithm of its output is the spectral function
    :math:`\log\max(\lambda, \epsilon)` of the input. The backward is the Daleckii–Krein formula of that
    function, which equals the chain rule through :func:`sym_reeig` then :func:`sym_logm` (the product of their
    Loewner matrices is the composed function's divided difference); the derivative is 0 below the threshold,
    :math:`1/\lambda` above, as :func:`sym_reeig`'s indicator :math:`\mathbb{1}[\lambda > \epsilon]` times the
    logarithm's :math:`1/\lambda`. ``threshold`` as in :func:`sym_reeig`.

    At the kink, for two eigenvalues on either side of the threshold and closer than the tie tolerance, this
    function uses the exact divided difference of :math:`\log\max(\cdot, \epsilon)` where the two layers in
    turn use the derivative at the pair's midpoint for ReEig; the gradients then differ by the relative position of
    the threshold in the pair (both are valid generalized derivatives of the non-smooth map).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"sym_reeig_logm: threshold must be a positive number, got {type(threshold).__name__}")
    threshold = float(threshold)
    if not math.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"sym_reeig_logm: threshold must be a positive finite number, got {threshold}")
    return _apply(X, (_reeig_log_spec(threshold),))[0]
