r"""Affine-invariant metric (AIM) on the SPD manifold.

Pennec, Fillard & Ayache, "A Riemannian framework for tensor computing", IJCV 2006:

.. math::

    d(A, B) = \|\log(A^{-1/2} B A^{-1/2})\|_F,\qquad
    \mathrm{Log}_P X = P^{1/2}\log(P^{-1/2} X P^{-1/2}) P^{1/2},\qquad
    \mathrm{Exp}_P V = P^{1/2}\exp(P^{-1/2} V P^{-1/2}) P^{1/2},

    \gamma(t) = A^{1/2}(A^{-1/2} B A^{-1/2})^t A^{1/2}.

The Fréchet (Karcher) mean is computed by the Karcher flow (Pennec 2006, Eq. 8):
:math:`G \leftarrow G^{1/2}\exp\big(\nu\sum_i w_i \log(G^{-1/2} X_i G^{-1/2})\big) G^{1/2}`, Riemannian
gradient descent on :math:`\tfrac12\sum_i w_i d^2(G, X_i)` with step :math:`\nu`: unit steps for the fixed
iteration count of the batch norms, a controlled step size when a tolerance is asked for (see :func:`mean_aim`).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ._batch import (
    BatchSum,
    Segments,
    SplitBatchMean,
    batch_dim,
    default_tol,
    normalized_weights,
    raw_weights,
    weighted_sum,
)
from ._spectral_checks import _check_domain, _reconstruct, _reconstruct_exp
from .spectral import (
    _INVSQRT,
    _LOG,
    _POW,
    _needs_graph,
    _no_autocast,
    sym,
    sym_expm,
    sym_logm,
    sym_powm,
    sym_sqrtm_invsqrtm,
)

__all__ = [
    "distance_aim", "mean_aim", "segment_mean_aim", "geodesic_aim", "logmap_aim", "expmap_aim", "congruence",
    "KarcherConvergenceError", "KarcherConvergenceWarning",
]

_ON_FAIL = ("warn", "raise")


def _default_tol(dtype: torch.dtype) -> float:
    """Default residual tolerance of the Karcher flow: reachable above the round-off floor of ``dtype``."""
    return max(default_tol(dtype), 1e3 * float(torch.finfo(dtype).eps))


def congruence(W: Tensor, X: Tensor) -> Tensor:
    r""":math:`W X W^\top` for broadcastable stacks ``(..., n, n)``, symmetrised against round-off."""
    return sym(W @ X @ W.transpose(-1, -2))


def _whiten(A: Tensor, B: Tensor) -> Tensor:
    r""":math:`L^{-1} B L^{-\top}` with :math:`L = \mathrm{chol}(A)`: same spectrum as :math:`A^{-1/2}BA^{-1/2}`."""
    L = torch.linalg.cholesky(A)
    shape = torch.broadcast_shapes(L.shape, B.shape)
    L = L.expand(shape)
    Y = torch.linalg.solve_triangular(L, B.expand(shape), upper=False)
    Z = torch.linalg.solve_triangular(L, Y.transpose(-1, -2), upper=False)
    return sym(Z)


def distance_aim(A: Tensor, B: Tensor) -> Tensor:
    r"""Affine-invariant Riemannian distance :math:`\|\log(A^{-1/2} B A^{-1/2})\|_F`.

    Parameters
    ----------
    A, B : Tensor, shape (..., n, n)
        SPD matrices (broadcastable).

    Returns
    -------
    Tensor, shape (...)

    Notes
    -----
    The congruence uses the Cholesky factor of ``A`` (:math:`L^{-1} B L^{-\top}` has the eigenvalues of
    :math:`A^{-1}B`), which is cheaper than :math:`A^{-1/2}` and gives the same distance. Once differentiable
    (through :func:`~manifoldnorm.functional.sym_logm`): a second derivative raises ``NotImplementedError``.
    """
    return torch.linalg.matrix_norm(sym_logm(_whiten(A, B)))


def logmap_aim(P: Tensor, X: Tensor) -> Tensor:
    r"""Riemannian logarithm :math:`\mathrm{Log}_P X = P^{1/2}\log(P^{-1/2} X P^{-1/2})P^{1/2}`, ``(..., n, n)``."""
    S, Si = sym_sqrtm_invsqrtm(P)
    return congruence(S, sym_logm(congruence(Si, X)))


def expmap_aim(P: Tensor, V: Tensor) -> Tensor:
    r"""Riemannian exponential :math:`\mathrm{Exp}_P V = P^{1/2}\exp(P^{-1/2} V P^{-1/2})P^{1/2}`, ``(..., n, n)``."""
    S, Si = sym_sqrtm_invsqrtm(P)
    return congruence(S, sym_expm(congruence(Si, V)))


def geodesic_aim(A: Tensor, B: Tensor, t: Tensor | float) -> Tensor:
    r"""Point :math:`A^{1/2}(A^{-1/2} B A^{-1/2})^t A^{1/2}` of the AIM geodesic from ``A`` (t=0) to ``B`` (t=1).

    ``t`` may be a float or a tensor broadcastable to the batch shape (differentiable).
    """
    if not (A.dtype in (torch.float16, torch.bfloat16) or _needs_graph(A, B, t)):
        return _geodesic_aim_values(A, B, t)
    S, Si = sym_sqrtm_invsqrtm(A)
    C = congruence(Si, B)
    if isinstance(t, Tensor) and t.dim() > 0:
        t = t.expand(C.shape[:-2])
    return congruence(S, sym_powm(C, t))


def _geodesic_aim_values(A: Tensor, B: Tensor, t: Tensor | float) -> Tensor:
    r""":func:`geodesic_aim` without an autograd graph (statistics, running means): the same operations, with the
    spectral functions' domain checks, without their autograd plumbing."""
    with _no_autocast(A), torch.no_grad():
        lam, U = torch.linalg.eigh(A)
        _check_domain(lam, (_INVSQRT,), A.dtype)
        S, Si = _reconstruct(U, torch.sqrt(lam)), _reconstruct(U, torch.rsqrt(lam))
        C = congruence(Si, B)
        mu, V = torch.linalg.eigh(C)
        _check_domain(mu, (_POW,), C.dtype)
        if isinstance(t, Tensor):
            t = t.to(C.dtype)
            if t.dim() > 0:
                t = t.expand(C.shape[:-2]).unsqueeze(-1)
        return congruence(S, _reconstruct(V, torch.pow(mu, t)))


class KarcherConvergenceWarning(RuntimeWarning):
    """The Karcher flow of :func:`mean_aim` stopped before its residual reached the tolerance asked for."""


class KarcherConvergenceError(RuntimeError):
    """As :class:`KarcherConvergenceWarning`, raised instead with ``mean_aim(..., on_fail="raise")``."""


def mean_aim(
    X: Tensor,
    dim: int = 0,
    weights: Tensor | None = None,
    karcher_steps: int = 50,
    tol: float | None = None,
    init: Tensor | None = None,
    *,
    reduce: BatchSum | None = None,
    on_fail: str = "warn",
) -> Tensor:
    r"""Weighted Fréchet (Karcher) mean under the affine-invariant metric.

    Parameters
    ----------
    X : Tensor, shape (..., N, ..., n, n)
        SPD matrices; the mean is taken over the batch dimension ``dim``.
    dim : int
        Batch dimension to reduce (not one of the last two).
    weights : Tensor, optional
        Non-negative weights, shape ``(N,)`` or broadcastable to ``X.shape[:-2]``; normalised to sum to one.
    karcher_steps : int
        Number of Karcher-flow iterations: exactly this many unit steps with ``tol=0``, at most this many
        (step-size controlled) iterations with ``tol > 0``. ``karcher_steps=1, tol=0`` is the single step used by
        Riemannian batch norms (Brooks et al. 2019; Chen et al. 2024).
    tol : float, optional
        Tolerance on the residual :math:`r(G) = \|\sum_i w_i\log(G^{-1/2}X_iG^{-1/2})\|_F` (the norm of the
        Riemannian gradient of :math:`\tfrac12\sum_i w_i d^2(G, X_i)`, zero exactly at the mean), tested at the
        returned point (the largest over the means computed at once). Default ``max(1e-10, 1000 eps)``: 1e-10 in
        float64, 1.2e-4 in float32 (about the round-off floor of the residual there, for n ~ 20 and condition
        numbers up to 1e4; the float32 mean itself is only accurate to ~1e-5 in AIM distance).
        ``tol > 0``: the flow with step-size control (Notes) stops as soon as :math:`r \le` ``tol``; if the
        budget ``karcher_steps`` runs out first, ``on_fail`` says what happens. ``tol=0``: the plain flow, exactly
        ``karcher_steps`` unit steps, no convergence test and no host synchronisation (the batch-norm mode;
        accurate only for concentrated batches, see Notes).
    init : Tensor, optional
        Starting point (default: the weighted arithmetic mean).
    reduce : callable, optional
        For a batch split into parts (e.g. one per process), ``X`` being this part: ``reduce(t)`` returns the sum
        of ``t`` over all parts (differentiably, called in the same order by every part). The arithmetic mean
        and each Karcher step then use the weighted sums over the union, so every part computes the same mean
        of the whole batch: one ``reduce`` per iteration plus one for the starting point (which also carries
        the total weight), and with ``tol > 0`` one more for the residual at the start; the step-size decisions
        depend on reduced quantities only, so every part takes the same steps. A part may be empty. ``None``:
        ``X`` is the whole batch.
    on_fail : {"warn", "raise"}
        With ``tol > 0``, when the residual is still above ``tol`` after ``karcher_steps`` iterations (or the
        step size collapsed): emit a :class:`KarcherConvergenceWarning` and return the last (best) iterate, or
        raise a :class:`KarcherConvergenceError`. The message gives the residual reached.

    Returns
    -------
    Tensor
        The mean, with ``dim`` removed.

    Notes
    -----
    The Karcher flow is Riemannian gradient descent on :math:`f(G) = \tfrac12\sum_i w_i d^2(G, X_i)`, which is
    geodesically strongly convex (Hessian :math:`\succeq I`), so the mean exists, is unique, and the residual
    bounds the distance to it: :math:`d(G, \bar X) \le r(G)`. With unit steps
    it converges only while the batch is concentrated (Pennec 2006; it diverges or oscillates on dispersed or
    ill-conditioned batches, e.g. three 2x2 matrices of condition 1e3). With ``tol > 0`` the step size
    :math:`\nu` is controlled, in the spirit of pyRiemann's ``mean_riemann`` and Kobler's TSMNet flow (which
    shrink :math:`\nu` when the gradient norm fails to decrease), here as follows:

    * the first step is the unit step; the next step size is the secant (Barzilai–Borwein) estimate of the
      inverse curvature of :math:`f` along the last step, :math:`\nu\,\|T\|^2/(\|T\|^2 - \langle T, T'\rangle)`,
      clipped to :math:`(0, 1]` (:math:`T, T'` the mean logarithms before and after the step, in the same
      coordinates), which is the exact line minimiser when :math:`f` is quadratic along the geodesic;
    * a step is accepted when it decreases the residual :math:`r` (which, unlike :math:`f`, stays measurable
      down to round-off, and whose decrease tightens the bound above), or reaches ``tol``; otherwise it is
      discarded and :math:`\nu` halved (or set to the secant estimate if smaller). Small enough steps always
      decrease :math:`r` (:math:`\tfrac{d}{dt}\tfrac12 r^2 = -\mathrm{Hess} f(T, T) \le -r^2`).

    The iterate is kept as a factor :math:`G = WW^\top`, :math:`W \leftarrow W\exp(\nu T/2)`, so each iteration
    costs one batched ``eigh`` of the :math:`N` whitened matrices plus two of :math:`n\times n`, as the plain
    flow. Differentiable by unrolling the iterations (the accept decisions are constants).
    """
    if karcher_steps < 1:
        raise ValueError(f"karcher_steps must be >= 1, got {karcher_steps}")
    if on_fail not in _ON_FAIL:
        raise ValueError(f"on_fail must be one of {', '.join(_ON_FAIL)}, got {on_fail!r}")
    d = batch_dim(X, dim)
    if reduce is None:
        w = normalized_weights(X, d, weights)

        def average(T: Tensor) -> Tensor:
            return weighted_sum(T, d, w)
    else:
        average = SplitBatchMean(raw_weights(X, d, weights), d, reduce)
    tol = _default_tol(X.dtype) if tol is None else float(tol)
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    G = average(X) if init is None else init
    if tol == 0 and not (X.dtype in (torch.float16, torch.bfloat16) or _needs_graph(X, G, weights)):
        return _karcher_values(X, d, G, average, karcher_steps)  # the same steps without autograd plumbing
    if tol == 0:  # the batch-norm mode: exactly karcher_steps unit steps (kept bit-identical)
        for _ in range(karcher_steps):
            S, Si = sym_sqrtm_invsqrtm(G)
            T = average(sym_logm(congruence(Si.unsqueeze(d), X)))
            G = congruence(S, sym_expm(T))
        return G
    return _karcher_controlled(X, d, G, average, karcher_steps, tol, on_fail)


def _karcher_values(X: Tensor, d: int, G: Tensor, average, steps: int, keep: bool = False):
    r"""The unit-step Karcher flow of :func:`mean_aim` (``tol=0``) without an autograd graph: the operations of
    ``sym_sqrtm_invsqrtm``, ``sym_logm`` and ``sym_expm`` with their domain checks, bit-identical results.
    ``keep``: also return the last base point's :math:`G^{-1/2}` and tangent vectors
    :math:`\log(G^{-1/2}X_iG^{-1/2})`."""
    Si = T = None
    with _no_autocast(X), torch.no_grad():
        for _ in range(steps):
            lam, U = torch.linalg.eigh(G)
            _check_domain(lam, (_INVSQRT,), G.dtype)
            S, Si = _reconstruct(U, torch.sqrt(lam)), _reconstruct(U, torch.rsqrt(lam))
            mu, V = torch.linalg.eigh(congruence(Si.unsqueeze(d), X))
            _check_domain(mu, (_LOG,), X.dtype)
            T = _reconstruct(V, torch.log(mu))
            nu, Q = torch.linalg.eigh(average(T))
            G = congruence(S, _reconstruct_exp(Q, nu))
    return (G, Si, T) if keep else G


def karcher_step_tangents(X: Tensor, karcher_steps: int, reduce: BatchSum | None = None,
                          ) -> tuple[Tensor, Tensor, Tensor]:
    r"""The batch-norm Karcher flow over dim 0 (:func:`mean_aim` with ``tol=0``, no autograd graph) and what its last
    step computed: ``(G, Si, T)`` with the mean ``G``, the last base point's :math:`G_{K-1}^{-1/2}` and the tangent
    vectors :math:`T_i = \log(G_{K-1}^{-1/2} X_i G_{K-1}^{-1/2})` (Kobler et al.'s tangent-space dispersion reads
    them)."""
    if reduce is None:
        w = normalized_weights(X, 0, None)

        def average(T: Tensor) -> Tensor:
            return weighted_sum(T, 0, w)
    else:
        average = SplitBatchMean(raw_weights(X, 0, None), 0, reduce)
    return _karcher_values(X, 0, average(X), average, karcher_steps, keep=True)


def _tangent(X: Tensor, d: int, Wi: Tensor, average) -> Tensor:
    r"""Mean logarithm :math:`\sum_i w_i \log(W^{-1} X_i W^{-\top})` in the coordinates of the factor ``W``."""
    return average(sym_logm(congruence(Wi.unsqueeze(d), X)))


def _karcher_controlled(X: Tensor, d: int, G: Tensor, average, steps: int, tol: float, on_fail: str) -> Tensor:
    """Karcher flow with step-size control and a convergence test (see :func:`mean_aim`, Notes)."""
    W, Wi = sym_sqrtm_invsqrtm(G)
    T = _tangent(X, d, Wi, average)
    r = torch.linalg.matrix_norm(T)
    nu = torch.ones_like(r)
    tiny = torch.finfo(r.dtype).tiny
    converged, done = False, 0  # at least one step, as the plain flow (a step within tol is always accepted)
    while not converged and done < steps:
        done += 1
        half = (0.5 * nu).unsqueeze(-1).unsqueeze(-1) * T
        Wc, Wci = W @ sym_expm(half), sym_expm(-half) @ Wi  # G_c = W exp(nu T) W^T; the step's direction stays T
        Tc = _tangent(X, d, Wci, average)
        rc = torch.linalg.matrix_norm(Tc)
        with torch.no_grad():
            accept = (rc < r) | (rc <= tol)
            # secant (Barzilai-Borwein) estimate of the inverse curvature along the step: nu |T|^2 / <T, T - T_c>
            r2 = r.square()
            denom = r2 - (T * Tc).sum(dim=(-2, -1))
            secant = torch.where(denom > 0, nu * r2 / denom.clamp_min(tiny), nu)
            nu = torch.where(accept, secant, torch.minimum(0.5 * nu, secant)).clamp(max=1.0)
        a = accept.unsqueeze(-1).unsqueeze(-1)
        W, Wi, T = torch.where(a, Wc, W), torch.where(a, Wci, Wi), torch.where(a, Tc, T)
        r = torch.where(accept, rc, r)
        converged = float(r.detach().max()) <= tol
        if not converged and float(nu.max()) < torch.finfo(r.dtype).eps:
            break  # no step size decreases the residual any more: round-off floor
    if not converged:
        msg = (f"mean_aim: the Karcher flow stopped at residual {float(r.detach().max()):.3g} > tol={tol:.3g} after "
               f"{done} iterations (karcher_steps={steps}); the result is not the mean to that tolerance (its AIM "
               "distance to the mean is at most the residual). Raise karcher_steps, loosen tol, or compute in "
               "float64 (the residual cannot go below round-off, about eps times the condition number)")
        if on_fail == "raise":
            raise KarcherConvergenceError(msg)
        warnings.warn(msg, KarcherConvergenceWarning, stacklevel=3)
    return sym(W @ W.transpose(-1, -2))


def segment_mean_aim(
    X: Tensor,
    segments: Segments,
    karcher_steps: int = 50,
    tol: float | None = None,
    *,
    on_fail: str = "warn",
) -> Tensor:
    r"""AIM Fréchet means of the segments of a batch (e.g. its domains), all segments in one Karcher flow.

    What :func:`mean_aim` computes over dim 0 of each segment's samples, with the segments batched: each
    iteration whitens every sample with the current mean of its own segment (gathered per sample), averages the
    tangent vectors per segment (:meth:`Segments.mean`, one ``index_add``) and decomposes the ``S`` segment means
    in one batched ``eigh``, so an iteration costs the same number of decompositions (one of the ``N`` whitened
    samples, two of ``S`` means) however many segments the batch holds. Used by the domain-specific batch norms
    (Kobler et al., NeurIPS 2022: one set of statistics per domain).

    Parameters
    ----------
    X : Tensor ``(N, ..., n, n)``
        SPD matrices; dim 0 is the batch, any further batch dims (channels) get their own means.
    segments : Segments
        The segment of each sample (and, for a batch split into parts, the sum over the parts: every part
        computes the means of the union, one ``reduce`` per iteration).
    karcher_steps, tol, on_fail
        As :func:`mean_aim`, per segment: ``tol=0`` runs exactly ``karcher_steps`` unit steps; ``tol > 0`` runs
        the step-size controlled flow of :func:`mean_aim` in every segment, each segment with its own step sizes
        and stopping test (the largest residual over its channels), until every segment has stopped or the
        budget is spent. A segment that has stopped keeps its iterate unchanged while the others continue.
        The convergence warning or error names the segments that did not converge (their ``labels`` if set).

    Returns
    -------
    Tensor ``(S, ..., n, n)``
        The mean of each segment, in the order of the segments.
    """
    if karcher_steps < 1:
        raise ValueError(f"karcher_steps must be >= 1, got {karcher_steps}")
    if on_fail not in _ON_FAIL:
        raise ValueError(f"on_fail must be one of {', '.join(_ON_FAIL)}, got {on_fail!r}")
    batch_dim(X, 0)
    tol = _default_tol(X.dtype) if tol is None else float(tol)
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    G = segments.mean(X)
    if tol == 0:  # the batch-norm mode: exactly karcher_steps unit steps
        for _ in range(karcher_steps):
            S, Si = sym_sqrtm_invsqrtm(G)
            T = segments.mean(sym_logm(congruence(segments.gather(Si), X)))
            G = congruence(S, sym_expm(T))
        return G
    return _karcher_controlled_segments(X, segments, G, karcher_steps, tol, on_fail)


def _segment_tangent(X: Tensor, segments: Segments, Wi: Tensor) -> Tensor:
    r"""Per-segment mean logarithms :math:`\frac{1}{|I_s|}\sum_{i \in I_s} \log(W_s^{-1} X_i W_s^{-\top})`."""
    return segments.mean(sym_logm(congruence(segments.gather(Wi), X)))


def _karcher_controlled_segments(X: Tensor, segments: Segments, G: Tensor, steps: int, tol: float,
                                 on_fail: str) -> Tensor:
    """:func:`_karcher_controlled` in every segment at once; a stopped segment keeps its iterate."""
    W, Wi = sym_sqrtm_invsqrtm(G)
    T = _segment_tangent(X, segments, Wi)
    r = torch.linalg.matrix_norm(T)  # (S, ...)
    nu = torch.ones_like(r)
    tiny, eps = torch.finfo(r.dtype).tiny, torch.finfo(r.dtype).eps
    num = segments.num
    active = torch.ones(num, dtype=torch.bool, device=X.device)
    converged = torch.zeros_like(active)
    done = torch.zeros(num, dtype=torch.long, device=X.device)
    while True:  # at least one step per segment, as the plain flow
        done = done + active
        half = (0.5 * nu).unsqueeze(-1).unsqueeze(-1) * T
        Wc, Wci = W @ sym_expm(half), sym_expm(-half) @ Wi  # G_c = W exp(nu T) W^T; the step's direction stays T
        Tc = _segment_tangent(X, segments, Wci)
        rc = torch.linalg.matrix_norm(Tc)
        run = active.reshape((num,) + (1,) * (r.dim() - 1))
        with torch.no_grad():
            accept = (rc < r) | (rc <= tol)
            r2 = r.square()
            denom = r2 - (T * Tc).sum(dim=(-2, -1))
            secant = torch.where(denom > 0, nu * r2 / denom.clamp_min(tiny), nu)
            nu = torch.where(run, torch.where(accept, secant, torch.minimum(0.5 * nu, secant)).clamp(max=1.0), nu)
            accept = accept & run  # a stopped segment keeps its iterate
        a = accept.unsqueeze(-1).unsqueeze(-1)
        W, Wi, T = torch.where(a, Wc, W), torch.where(a, Wci, Wi), torch.where(a, Tc, T)
        r = torch.where(accept, rc, r)
        with torch.no_grad():
            top = r.detach().reshape(num, -1).amax(dim=1)
            now = top <= tol
            stalled = nu.reshape(num, -1).amax(dim=1) < eps  # no step size decreases the residual: round-off floor
            converged = torch.where(active, now, converged)
            active = active & ~now & ~stalled & (done < steps)
        if not bool(active.any()):
            break
    if not bool(converged.all()):
        left = ~converged
        names = torch.nonzero(left, as_tuple=False).squeeze(1) if segments.labels is None else segments.labels[left]
        bad = names.tolist()  # segment indices, or their labels (e.g. domain ids)
        msg = (f"segment_mean_aim: the Karcher flow of segment(s) {bad} stopped at residual "
               f"{float(top[~converged].max()):.3g} > tol={tol:.3g} after {int(done[~converged].max())} iterations "
               f"(karcher_steps={steps}); the result is not the mean to that tolerance (its AIM distance to the "
               "mean is at most the residual). Raise karcher_steps, loosen tol, or compute in float64 (the "
               "residual cannot go below round-off, about eps times the condition number)")
        if on_fail == "raise":
            raise KarcherConvergenceError(msg)
        warnings.warn(msg, KarcherConvergenceWarning, stacklevel=3)
    return sym(W @ W.transpose(-1, -2))
