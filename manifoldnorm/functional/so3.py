r"""The rotation group SO(3): exponential and logarithm, bi-invariant distance, Karcher mean, geodesics.

Rotations are ``(..., 3, 3)`` matrices, tangent vectors at the identity are axis-angle vectors
:math:`\omega \in \mathbb{R}^3` (``(..., 3)``), identified with skew matrices by the hat map
:math:`\hat\omega x = \omega \times x`. With :math:`\theta = \|\omega\|` and :math:`K = \hat\omega`,

.. math::

    \exp(\hat\omega) = I + \frac{\sin\theta}{\theta} K + \frac{1-\cos\theta}{\theta^2} K^2
    \qquad\text{(Rodrigues' rotation formula)},

    \log R = \frac{\theta}{2\sin\theta}\,(R - R^\top),\qquad \cos\theta = \tfrac12(\operatorname{tr} R - 1).

Metric convention: the bi-invariant metric :math:`\langle \hat u, \hat v\rangle = \tfrac12 \operatorname{tr}
(\hat u^\top \hat v) = u^\top v`, so :math:`d(A, B) = \|\log(A^\top B)\|_2 = \theta \in [0, \pi]`, the geodesic
angle of the relative rotation (Hartley, Trumpf, Dai & Li, "Rotation Averaging", IJCV 2013: the angular
distance). The embedded Frobenius metric gives :math:`\sqrt2\,\theta` instead.

The fast functions (:func:`so3_exp`, :func:`so3_log`) evaluate their coefficients by Taylor series near
:math:`\theta = 0`, and :func:`so3_log` reads the rotation axis from the symmetric part near :math:`\theta = \pi`,
so values are accurate to round-off and autograd gradients are exact and finite for every :math:`\theta < \pi`
(including :math:`\theta = 0`). The ``*_ref`` twins are the textbook formulas with plain autograd
(:func:`torch.linalg.matrix_exp`, :math:`\arccos`) for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from ._batch import BatchSum, SplitBatchMean, _align, batch_dim, default_tol, normalized_weights, raw_weights
from .polar import project_so

__all__ = [
    "so3_hat",
    "so3_vee",
    "so3_exp",
    "so3_log",
    "so3_exp_ref",
    "so3_log_ref",
    "distance_so3",
    "mean_so3",
    "mean_so3_chordal",
    "geodesic_so3",
    "left_mul",
    "project_so3",
    "check_rotation",
]

# Taylor branches: theta^2 < 0.02 in exp, u = 1 - cos(theta) < 0.01 in log. The truncated series below are
# accurate to < 1e-16 (relative) there, and the closed forms are free of cancellation above.
_EXP_SMALL = 0.02
_LOG_SMALL = 0.01
# cos(theta) below this value: the axis is read from the symmetric part (theta > ~2.35).
_LOG_NEAR_PI = -0.7
# sin(t)/t = sum_k (-1)^k t^{2k} / (2k+1)!,  (1 - cos t)/t^2 = sum_k (-1)^k t^{2k} / (2k+2)!   (k <= 4)
_SINC = tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(5))
_COSC = tuple((-1) ** k / math.factorial(2 * k + 2) for k in range(5))
# arccos(1 - u) / sqrt(1 - (1 - u)^2) = theta / sin(theta) = sum_k 2^k (k!)^2 / (2k+1)! u^k   (k <= 6)
_THETA_OVER_SIN = tuple(2**k * math.factorial(k) ** 2 / math.factorial(2 * k + 1) for k in range(7))


def _poly(x: Tensor, coeffs: tuple[float, ...]) -> Tensor:
    """Horner evaluation of ``sum_k coeffs[k] x^k``."""
    out = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        out = out * x + c
    return out


def _check_vec3(w: Tensor, name: str) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dim() < 1 or w.shape[-1] != 3:
        raise ValueError(f"{name}: expected axis-angle vectors of shape (..., 3), got {tuple(w.shape)}")


def _check_mat3(R: Tensor, name: str) -> None:
    if not isinstance(R, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(R).__name__}")
    if R.dim() < 2 or R.shape[-2:] != (3, 3):
        raise ValueError(f"{name}: expected 3x3 matrices of shape (..., 3, 3), got {tuple(R.shape)}")


def so3_hat(w: Tensor) -> Tensor:
    r"""Skew matrix :math:`\hat\omega` with :math:`\hat\omega x = \omega \times x`, ``(..., 3) -> (..., 3, 3)``."""
    _check_vec3(w, "so3_hat")
    x, y, z = w.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).unflatten(-1, (3, 3))


def so3_vee(S: Tensor) -> Tensor:
    r"""Inverse of :func:`so3_hat` on the skew part :math:`\tfrac12(S - S^\top)`, ``(..., 3, 3) -> (..., 3)``."""
    _check_mat3(S, "so3_vee")
    return 0.5 * torch.stack([S[..., 2, 1] - S[..., 1, 2], S[..., 0, 2] - S[..., 2, 0],
                              S[..., 1, 0] - S[..., 0, 1]], dim=-1)


def _needed(mask: Tensor) -> bool:
    """Whether a branch must be evaluated: always on accelerators (no host sync) and for empty stacks (free),
    only if used on the CPU."""
    return mask.device.type != "cpu" or mask.numel() == 0 or bool(mask.any())


def _select(mask: Tensor, a: Tensor | None, b: Tensor | None) -> Tensor:
    """``where(mask, a, b)`` where a branch that was skipped (``None``) is selected by no element."""
    if a is None:
        return b  # type: ignore[return-value]
    if b is None:
        return a
    return torch.where(mask, a, b)


def so3_exp(w: Tensor, *, skew: bool = False) -> Tensor:
    r"""Exponential map :math:`\mathfrak{so}(3) \to SO(3)` by Rodrigues' formula, stable at :math:`\theta = 0`.

    .. math::

        \exp(\hat\omega) = \cos\theta\, I + A(\theta)\,\hat\omega + B(\theta)\,\omega\omega^\top,\qquad
        A = \frac{\sin\theta}{\theta},\quad B = \frac{1-\cos\theta}{\theta^2} = \frac{2\sin^2(\theta/2)}{\theta^2},

    (:math:`\hat\omega^2 = \omega\omega^\top - \theta^2 I`, :math:`\cos\theta = 1 - B\theta^2`). For
    :math:`\theta^2 < 0.02`, :math:`A` and :math:`B` are evaluated by their Taylor series in :math:`\theta^2`
    (to :math:`\theta^8`, truncation error below 1e-16), so the gradient is exact at :math:`\omega = 0`.

    Parameters
    ----------
    w : Tensor, shape (..., 3), or (..., 3, 3) with ``skew=True``
        Axis-angle vectors (any angle), or skew-symmetric matrices (their skew part is used).
    skew : bool
        Read ``w`` as skew matrices ``(..., 3, 3)`` instead of vectors.

    Returns
    -------
    Tensor, shape (..., 3, 3)
        Rotation matrices.
    """
    if skew:
        w = so3_vee(w)
    _check_vec3(w, "so3_exp")
    # component form: no broadcasting over the 3x3 block, so the backward has no small reductions
    x, y, z = w.unbind(-1)
    t2 = x * x + y * y + z * z
    small = t2 < _EXP_SMALL
    A_s = B_s = A_g = B_g = None
    if _needed(small):
        A_s, B_s = _poly(t2, _SINC), _poly(t2, _COSC)
    if _needed(~small):
        t2_safe = torch.where(small, 1.0, t2)
        t = torch.sqrt(t2_safe)
        A_g = torch.sin(t) / t
        B_g = 2.0 * torch.sin(0.5 * t).square() / t2_safe
    A, B = _select(small, A_s, A_g), _select(small, B_s, B_g)
    cos = 1.0 - B * t2
    Bx, By, Bz = B * x, B * y, B * z
    Ax, Ay, Az = A * x, A * y, A * z
    bxy, bxz, byz = Bx * y, Bx * z, By * z
    return torch.stack([cos + Bx * x, bxy - Az, bxz + Ay,
                        bxy + Az, cos + By * y, byz - Ax,
                        bxz - Ay, byz + Ax, cos + Bz * z], dim=-1).unflatten(-1, (3, 3))


def so3_log(R: Tensor) -> Tensor:
    r"""Principal logarithm :math:`SO(3) \to \mathbb{R}^3` (axis-angle, :math:`\theta \in [0, \pi]`), stable at 0 and π.

    With :math:`c = \cos\theta = \frac12(\operatorname{tr}R - 1)` and :math:`v = (R - R^\top)^\vee = 2\sin\theta\, n`:

    * :math:`\theta` near 0 (:math:`1 - c < 0.01`): :math:`\omega = \tfrac12 f(1-c)\, v`, with
      :math:`f(u) = \theta/\sin\theta = \sum_k \frac{2^k (k!)^2}{(2k+1)!} u^k` (Taylor to :math:`u^6`);
    * in between: the same :math:`\omega = \tfrac12 f(1-c)\, v` with
      :math:`f = \arccos(c)/\sqrt{(1-c)(1+c)}` in closed form;
    * :math:`\theta` near π (:math:`c < -0.7`): the axis from the symmetric part
      :math:`S = \tfrac12(R + R^\top) - cI = (1 - c)\, n n^\top`, :math:`n = \pm S_{:k}/\sqrt{S_{kk}(1-c)}` with
      :math:`k = \arg\max_k S_{kk}`, the sign making :math:`n^\top v \ge 0`, and
      :math:`\theta = \operatorname{atan2}(n^\top v / 2, c)`.

    Parameters
    ----------
    R : Tensor, shape (..., 3, 3)
        Rotation matrices (not checked; see :func:`check_rotation`).

    Returns
    -------
    Tensor, shape (..., 3)
        :math:`\omega` with :math:`\exp(\hat\omega) = R`.

    Notes
    -----
    Values are accurate to round-off for every angle; autograd gradients are finite for :math:`\theta < \pi`,
    exact at :math:`R = I`. At :math:`\theta = \pi` the logarithm is discontinuous (:math:`\pm\pi n`).
    Below :math:`\theta \approx 2.35` the result is one analytic function of the nine entries of ``R`` (the
    angle read from the trace, as in :func:`so3_log_ref`), so gradients with respect to unconstrained
    :math:`3\times3` inputs agree with the reference there, not only along the group.
    On the CPU, branches that no element needs are skipped (one cheap host check per branch); on other
    devices all branches are evaluated and selected element-wise, without host synchronisation.
    """
    _check_mat3(R, "so3_log")
    # component form: no reductions over the small trailing dimensions
    r00, r01, r02, r10, r11, r12, r20, r21, r22 = R.flatten(-2).unbind(-1)
    v0, v1, v2 = r21 - r12, r02 - r20, r10 - r01
    c = 0.5 * (r00 + r11 + r22 - 1.0)
    u = 1.0 - c
    small = u < _LOG_SMALL
    near_pi = c < _LOG_NEAR_PI
    general = ~(small | near_pi)
    # theta / sin(theta) as a function of c = cos(theta): Taylor in u = 1 - c near 0, arccos in the general range
    h_small = _poly(u, _THETA_OVER_SIN) if _needed(small) else None
    h_gen = None
    if _needed(general):
        c_safe = torch.where(general, c, 0.0)
        h_gen = torch.arccos(c_safe) * torch.rsqrt((1.0 - c_safe) * (1.0 + c_safe))
    h = _select(small, h_small, h_gen)
    h = torch.full_like(c, 0.5) if h is None else 0.5 * h
    w0, w1, w2 = h * v0, h * v1, h * v2
    if _needed(near_pi):
        # near pi: the axis from the symmetric part S = (R + R^T)/2 - c I = (1 - c) n n^T
        s01, s02, s12 = 0.5 * (r01 + r10), 0.5 * (r02 + r20), 0.5 * (r12 + r21)
        d0, d1, d2 = r00 - c, r11 - c, r22 - c
        k0 = (d0 >= d1) & (d0 >= d2)
        k1 = ~k0 & (d1 >= d2)
        skk = torch.where(k0, d0, torch.where(k1, d1, d2))
        scale = torch.rsqrt(torch.where(near_pi, skk * u, 1.0))
        n0 = torch.where(k0, d0, torch.where(k1, s01, s02)) * scale
        n1 = torch.where(k0, s01, torch.where(k1, d1, s12)) * scale
        n2 = torch.where(k0, s02, torch.where(k1, s12, d2)) * scale
        nv = n0 * v0 + n1 * v1 + n2 * v2
        sign = torch.where(nv.detach() < 0, -1.0, 1.0)
        theta = torch.atan2(0.5 * sign * nv, c) * sign
        w0 = torch.where(near_pi, theta * n0, w0)
        w1 = torch.where(near_pi, theta * n1, w1)
        w2 = torch.where(near_pi, theta * n2, w2)
    return torch.stack([w0, w1, w2], dim=-1)


def so3_exp_ref(w: Tensor) -> Tensor:
    r"""Reference :math:`\exp(\hat\omega)` by :func:`torch.linalg.matrix_exp` (plain autograd), ``(..., 3, 3)``."""
    return torch.linalg.matrix_exp(so3_hat(w))


def so3_log_ref(R: Tensor) -> Tensor:
    r"""Reference log :math:`\frac{\theta}{2\sin\theta}(R - R^\top)^\vee`, :math:`\cos\theta = (\mathrm{tr}R-1)/2`.

    The textbook formula with plain autograd, ``(..., 3, 3) -> (..., 3)``. Valid for :math:`0 < \theta < \pi`
    only: it divides by :math:`\sin\theta` (NaN at :math:`R = I`) and loses accuracy near :math:`\pi`.
    """
    _check_mat3(R, "so3_log_ref")
    tr = torch.diagonal(R, dim1=-2, dim2=-1).sum(-1)
    theta = torch.arccos(torch.clamp(0.5 * (tr - 1.0), -1.0, 1.0))
    return (theta / (2.0 * torch.sin(theta))).unsqueeze(-1) * so3_vee(R) * 2.0


def distance_so3(A: Tensor, B: Tensor) -> Tensor:
    r"""Bi-invariant geodesic distance :math:`d(A, B) = \|\log(A^\top B)\|_2 = \theta \in [0, \pi]`, ``(...)``.

    The rotation angle of :math:`A^\top B` (Hartley et al., IJCV 2013, angular distance). Invariant under
    :math:`A, B \mapsto GA, GB` and :math:`A, B \mapsto AG, BG`. Under the embedded Frobenius metric the same
    geodesic has length :math:`\sqrt2\,\theta`. Broadcastable ``(..., 3, 3)`` inputs. The gradient at
    :math:`A = B` is the zero subgradient.
    """
    return torch.linalg.vector_norm(so3_log(A.mT @ B), dim=-1)


def geodesic_so3(A: Tensor, B: Tensor, t: Tensor | float) -> Tensor:
    r"""Point :math:`A \exp(t \log(A^\top B))` of the geodesic from ``A`` (t=0) to ``B`` (t=1), ``(..., 3, 3)``.

    ``t`` may be a float or a tensor broadcastable to the batch shape ``(...)`` (differentiable).
    """
    w = so3_log(A.mT @ B)
    if isinstance(t, Tensor):
        t = t.unsqueeze(-1)
    return A @ so3_exp(t * w)


def project_so3(X: Tensor) -> Tensor:
    r"""Closest rotation in Frobenius norm of ``(..., 3, 3)`` matrices (see :func:`.polar.project_so`).

    Differentiable with a backward that stays finite for repeated singular values.
    """
    _check_mat3(X, "project_so3")
    return project_so(X)


def mean_so3_chordal(R: Tensor, dim: int = 0, weights: Tensor | None = None) -> Tensor:
    r"""Chordal L2 mean :math:`\arg\min_M \sum_i w_i \|M - R_i\|_F^2`: the weighted average projected on SO(3).

    Hartley et al., IJCV 2013 (chordal L2 mean; the same rotation as the quaternion eigenvector mean of
    :meth:`scipy.spatial.transform.Rotation.mean`). ``R``: ``(..., N, ..., 3, 3)``; ``dim`` removed.
    """
    _check_mat3(R, "mean_so3_chordal")
    d = batch_dim(R, dim)
    w = normalized_weights(R, d, weights)
    return project_so3((w * R).sum(dim=d))


def mean_so3(
    R: Tensor,
    dim: int = 0,
    steps: int = 50,
    tol: float | None = None,
    init: Tensor | None = None,
    weights: Tensor | None = None,
    *,
    reduce: BatchSum | None = None,
) -> Tensor:
    r"""Weighted Karcher (geodesic L2) mean of rotations under the bi-invariant metric.

    Minimises :math:`\sum_i w_i\, d^2(M, R_i)` by Riemannian gradient descent with unit step (Hartley et al.,
    "Rotation Averaging", IJCV 2013, single rotation L2 averaging; Karcher 1977):

    .. math::

        M \leftarrow M \exp\Big(\textstyle\sum_i w_i \log(M^\top R_i)\Big).

    Parameters
    ----------
    R : Tensor, shape (..., N, ..., 3, 3)
        Rotations; the mean is taken over the batch dimension ``dim``.
    dim : int
        Batch dimension to reduce (not one of the last two).
    steps : int
        Maximum number of iterations.
    tol : float, optional
        Stop when :math:`\max\|\sum_i w_i \log(M^\top R_i)\|_2 \le` ``tol`` (tested after the update, so every
        computed step is applied). Default ``max(1e-10, 50 eps)``; ``tol=0`` always runs ``steps`` iterations
        (no host synchronisation).
    init : Tensor, optional
        Starting point ``(..., 3, 3)`` (shape of the result). Default: the chordal L2 mean
        (:func:`mean_so3_chordal`).
    weights : Tensor, optional
        Non-negative weights, shape ``(N,)`` or broadcastable to ``R.shape[:-2]``; normalised to sum to one.
    reduce : callable, optional
        For a batch split into parts (e.g. one per process), ``R`` being this part: ``reduce(t)`` sums ``t``
        over all parts (as in :func:`~manifoldnorm.functional.mean_aim`); the chordal start and every step
        then average over the union (one ``reduce`` each; the first also carries the total weight).

    Returns
    -------
    Tensor
        The mean, with ``dim`` removed.

    Notes
    -----
    The Karcher mean is unique and the iteration converges when the rotations lie in a geodesic ball of radius
    :math:`\pi/2` (Hartley et al. 2013). Differentiable by unrolling the iterations (the chordal starting point
    included, through the well-conditioned backward of :func:`project_so3`).
    """
    _check_mat3(R, "mean_so3")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"mean_so3: steps must be an int >= 1, got {steps!r}")
    d = batch_dim(R, dim)
    if reduce is None:
        w = normalized_weights(R, d, weights).squeeze(-1).movedim(d, 0)

        def average(T: Tensor) -> Tensor:
            return (_align(w, T.dim()) * T).sum(dim=0)
    else:
        average = SplitBatchMean(raw_weights(R, d, weights).movedim(d, 0), 0, reduce)
    R = R.movedim(d, 0)
    tol = default_tol(R.dtype) if tol is None else float(tol)
    M = project_so(average(R)) if init is None else init
    for _ in range(steps):
        T = average(so3_log(left_mul(M.mT, R)))
        M = M @ so3_exp(T)
        if tol > 0 and float(torch.linalg.vector_norm(T.detach(), dim=-1).max()) <= tol:
            break
    return M


def left_mul(A: Tensor, X: Tensor) -> Tensor:
    r"""Batched left translation :math:`X_i \mapsto A X_i`: ``A`` ``(..., n, n)``, ``X`` ``(N, ..., n, n)``.

    The same as ``A @ X`` with broadcasting over the leading batch dimension, computed as one contraction
    (faster than a batch of tiny matrix products on the CPU).
    """
    return torch.einsum("...ij,n...jk->n...ik", A, X)


def check_rotation(R: Tensor, name: str = "input", atol: float | None = None, n: int | None = 3) -> Tensor:
    r"""Raise a ValueError/TypeError unless ``R`` holds rotation matrices :math:`R^\top R = I`, :math:`\det R = +1`.

    Checks, in order: tensor type, floating dtype, shape ``(..., n, n)`` (``n=None``: any square size >= 2),
    NaN/Inf, orthogonality :math:`\max|R^\top R - I| \le` ``atol`` (default ``max(1e-6, 3 sqrt(eps))``:
    1e-6 in float64, 1e-3 in float32), and a positive determinant (reflections are rejected).
    Returns ``R`` unchanged.
    """
    if not isinstance(R, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of rotation matrices, got {type(R).__name__}")
    if not R.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {R.dtype}")
    size = "n" if n is None else str(n)
    if R.dim() < 2 or R.shape[-1] != R.shape[-2] or R.shape[-1] < 2 or (n is not None and R.shape[-1] != n):
        raise ValueError(f"{name}: expected rotation matrices of shape (..., {size}, {size}), "
                         f"got shape {tuple(R.shape)}")
    autocast = (torch.autocast(R.device.type, enabled=False) if R.device.type in ("cpu", "cuda", "xpu")
                else contextlib.nullcontext())
    with torch.no_grad(), autocast:  # the Gram matrix in the input's precision, not autocast's
        X = R.detach()
        bad = ~torch.isfinite(X)
        if bool(bad.any()):
            n_nan = int(torch.isnan(X).sum())
            raise ValueError(f"{name}: contains {n_nan} NaN and {int(bad.sum()) - n_nan} Inf entries")
        tol = max(1e-6, 3.0 * float(torch.finfo(X.dtype).eps) ** 0.5) if atol is None else float(atol)
        k = X.shape[-1]
        err = (X.mT @ X - torch.eye(k, dtype=X.dtype, device=X.device)).abs().amax(dim=(-1, -2))
        if bool((err > tol).any()):
            raise ValueError(f"{name}: matrices are not orthogonal: max |R^T R - I| = {float(err.max()):.3g} "
                             f"exceeds {tol:.3g}. Project with manifoldnorm.functional.so3.project_so3 if this "
                             "is round-off.")
        det = torch.linalg.det(X)
        if bool((det <= 0).any()):
            raise ValueError(f"{name}: {int((det <= 0).sum())} matrices have determinant -1 (reflections, not "
                             "rotations); SO(n) requires det R = +1")
    return R
