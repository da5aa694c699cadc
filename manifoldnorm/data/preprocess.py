r"""Signal preprocessing for epoched EEG: band-pass filtering, covariance estimation, re-centring.

NumPy/SciPy only; results are float64.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import butter, sosfiltfilt

__all__ = ["COV_ESTIMATORS", "bandpass", "covariances", "recenter", "riemannian_mean"]

COV_ESTIMATORS: tuple[str, ...] = ("oas", "scm", "lwf")
"""Names accepted by :func:`covariances`."""


def _check_trials(X: np.ndarray, name: str = "X") -> np.ndarray:
    X = np.asarray(X)
    if X.ndim < 2:
        raise ValueError(f"{name} must have shape (..., C, T), got {X.shape}")
    if not np.issubdtype(X.dtype, np.floating) and not np.issubdtype(X.dtype, np.integer):
        raise TypeError(f"{name} must be a real-valued array, got dtype {X.dtype}")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{name} contains NaN or Inf")
    return X


def bandpass(X: np.ndarray, sfreq: float, fmin: float = 8.0, fmax: float = 30.0, order: int = 4) -> np.ndarray:
    """Zero-phase Butterworth band-pass filter along the last axis.

    The filter is applied forwards and backwards (second-order sections), so the effective
    magnitude response is the square of an order-``order`` Butterworth band-pass and the phase is
    zero.

    Parameters
    ----------
    X : ndarray, shape (..., T)
        Signals; float inputs keep their dtype, integer inputs become float64.
    sfreq : float
        Sampling frequency in Hz.
    fmin, fmax : float
        Pass band edges in Hz, ``0 < fmin < fmax < sfreq / 2``.
    order : int
        Butterworth order of the one-pass design.

    Returns
    -------
    ndarray, same shape as ``X``
    """
    X = _check_trials(X) if np.ndim(X) >= 2 else np.asarray(X)
    nyquist = sfreq / 2.0
    if not 0 < fmin < fmax < nyquist:
        raise ValueError(f"need 0 < fmin < fmax < sfreq/2 = {nyquist:g} Hz, got fmin={fmin}, fmax={fmax}")
    if int(order) != order or order < 1:
        raise ValueError(f"order must be a positive integer, got {order}")
    sos = butter(int(order), [fmin, fmax], btype="bandpass", fs=sfreq, output="sos")
    out = sosfiltfilt(sos, np.asarray(X, dtype=np.float64), axis=-1)
    dtype = X.dtype if np.issubdtype(X.dtype, np.floating) else np.float64
    return out.astype(dtype, copy=False)


def _scm(Xc: np.ndarray) -> np.ndarray:
    return Xc @ np.swapaxes(Xc, -1, -2) / Xc.shape[-1]


def _shrink(S: np.ndarray, shrinkage: np.ndarray) -> np.ndarray:
    n = S.shape[-1]
    mu = np.trace(S, axis1=-2, axis2=-1) / n
    out = (1.0 - shrinkage)[..., None, None] * S
    out += (shrinkage * mu)[..., None, None] * np.eye(n)
    return out


def _oas_shrinkage(S: np.ndarray, n_samples: int) -> np.ndarray:
    """OAS shrinkage of Chen et al. (2010), Eq. (23), in the form used by scikit-learn ≥ 1.3."""
    n = S.shape[-1]
    alpha = np.mean(S**2, axis=(-2, -1))
    mu = np.trace(S, axis1=-2, axis2=-1) / n
    num = alpha + mu**2
    den = (n_samples + 1.0) * (alpha - mu**2 / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(den == 0, 1.0, np.minimum(num / np.where(den == 0, 1.0, den), 1.0))
    return rho


def _lwf_shrinkage(Xc: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Ledoit–Wolf (2004) shrinkage towards ``mu I`` from centred data (..., C, T)."""
    n, t = Xc.shape[-2], Xc.shape[-1]
    mu = np.trace(S, axis1=-2, axis2=-1) / n
    # delta: squared Frobenius distance of S to mu I (per entry); beta: variance of the estimate of S.
    delta = (np.sum(S**2, axis=(-2, -1)) - n * mu**2) / n
    X2 = Xc**2
    beta_ = np.sum(X2 @ np.swapaxes(X2, -1, -2), axis=(-2, -1)) / t
    beta = (beta_ - np.sum(S**2, axis=(-2, -1))) / (n * t)
    beta = np.minimum(beta, delta)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(beta == 0, 0.0, beta / np.where(delta == 0, 1.0, delta))


def covariances(X: np.ndarray, estimator: str = "oas") -> np.ndarray:
    r"""Spatial covariance matrix of every trial.

    Each trial is centred over time, :math:`S = \frac1T \tilde X \tilde X^\top`. The shrinkage
    estimators return :math:`(1-\rho) S + \rho \mu I` with :math:`\mu = \operatorname{tr}(S)/C`:

    * ``"scm"``: :math:`\rho = 0` (may be singular when T < C).
    * ``"oas"``: oracle approximating shrinkage, Chen, Wiesel, Eldar & Hero (2010), IEEE TSP
      58(10), Eq. (23),

      .. math::
          \rho = \min\Big(1, \frac{\overline{S^2} + \mu^2}
                 {(T+1)\,(\overline{S^2} - \mu^2 / C)}\Big),

      with :math:`\overline{S^2}` the mean of the squared entries of S.
    * ``"lwf"``: Ledoit & Wolf (2004), J. Multivariate Anal. 88(2), Lemma 3.2–3.4.

    Parameters
    ----------
    X : ndarray, shape (..., C, T)
        Trials.
    estimator : {"oas", "scm", "lwf"}

    Returns
    -------
    ndarray, shape (..., C, C), float64

    Notes
    -----
    Deviations: as in scikit-learn (≥ 1.3), the OAS formula drops the factor ``2/C`` terms of the
    paper's Eq. (23) (they vanish for large C); ``oas`` and ``lwf`` match
    ``sklearn.covariance.oas`` / ``ledoit_wolf`` (and pyRiemann's estimators built on them) to
    floating-point precision.
    """
    if estimator not in COV_ESTIMATORS:
        raise ValueError(f"unknown covariance estimator {estimator!r}; valid names are {list(COV_ESTIMATORS)}")
    X = np.asarray(_check_trials(X), dtype=np.float64)
    if X.shape[-1] < 2:
        raise ValueError(f"need at least 2 time samples per trial, got {X.shape[-1]}")
    Xc = X - X.mean(axis=-1, keepdims=True)
    S = _scm(Xc)
    if estimator == "scm":
        return S
    if X.shape[-2] == 1:
        return S
    rho = _oas_shrinkage(S, X.shape[-1]) if estimator == "oas" else _lwf_shrinkage(Xc, S)
    return _shrink(S, rho)


def _check_spd(C: np.ndarray, name: str) -> np.ndarray:
    C = np.asarray(C, dtype=np.float64)
    if C.ndim < 2 or C.shape[-1] != C.shape[-2]:
        raise ValueError(f"{name} must have shape (..., n, n), got {C.shape}")
    if not np.all(np.isfinite(C)):
        raise ValueError(f"{name} contains NaN or Inf")
    scale = np.abs(C).max(axis=(-2, -1), keepdims=True) + np.finfo(np.float64).tiny
    if np.any(np.abs(C - np.swapaxes(C, -1, -2)) > 1e-8 * scale):
        raise ValueError(f"{name} is not symmetric")
    return (C + np.swapaxes(C, -1, -2)) / 2.0


def _eig_fn(C: np.ndarray, fn) -> np.ndarray:
    w, V = np.linalg.eigh(C)
    return (V * fn(w)[..., None, :]) @ np.swapaxes(V, -1, -2)


def riemannian_mean(covs: np.ndarray, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    r"""Affine-invariant (Karcher/Fréchet) mean of SPD matrices by the fixed-point iteration.

    .. math::
        M_{k+1} = M_k^{1/2} \exp\Big(\frac1N \sum_i \log\big(M_k^{-1/2} C_i M_k^{-1/2}\big)\Big)
        M_k^{1/2},

    started at the log-Euclidean mean; stops when the Frobenius norm of the mean tangent vector
    falls below ``tol``. (Moakher 2005, SIAM J. Matrix Anal. Appl. 26(3), Eq. 3.4 stationarity.)

    Parameters
    ----------
    covs : ndarray, shape (N, n, n)
        SPD matrices.

    Returns
    -------
    ndarray, shape (n, n)
    """
    covs = _check_spd(covs, "covs")
    if covs.ndim != 3 or covs.shape[0] == 0:
        raise ValueError(f"covs must have shape (N, n, n) with N >= 1, got {covs.shape}")
    if np.any(np.linalg.eigvalsh(covs)[..., 0] <= 0):
        raise ValueError("covs are not all positive definite")
    M = _eig_fn(_eig_fn(covs, np.log).mean(axis=0), np.exp)
    for _ in range(max_iter):
        w, V = np.linalg.eigh(M)
        sqrt_m = (V * np.sqrt(w)) @ V.T
        isqrt_m = (V / np.sqrt(w)) @ V.T
        tangent = _eig_fn(isqrt_m @ covs @ isqrt_m, np.log).mean(axis=0)
        M = sqrt_m @ _eig_fn((tangent + tangent.T) / 2, np.exp) @ sqrt_m
        M = (M + M.T) / 2
        if np.linalg.norm(tangent) < tol:
            break
    return M


def recenter(covs: np.ndarray, domain: np.ndarray | None = None) -> np.ndarray:
    r"""Re-centre every domain's covariances at the identity.

    .. math::
        \tilde C_i = M_{d(i)}^{-1/2}\, C_i\, M_{d(i)}^{-1/2},

    with :math:`M_d` the affine-invariant mean (:func:`riemannian_mean`) of the matrices of domain
    *d* (Zanini et al. 2018, IEEE TBME 65(5), "Transfer learning: a Riemannian geometry framework
    with applications to brain–computer interfaces", Eq. 8). After re-centring, the mean of each
    domain is the identity.

    Parameters
    ----------
    covs : ndarray, shape (N, n, n)
        SPD matrices.
    domain : ndarray, shape (N,), optional
        Domain id per matrix (all matrices form one domain when omitted).

    Returns
    -------
    ndarray, shape (N, n, n), float64
    """
    covs = _check_spd(covs, "covs")
    if covs.ndim != 3:
        raise ValueError(f"covs must have shape (N, n, n), got {covs.shape}")
    domain = np.zeros(len(covs), dtype=np.int64) if domain is None else np.asarray(domain)
    if domain.shape != (len(covs),):
        raise ValueError(f"domain must have shape ({len(covs)},), got {domain.shape}")
    out = np.empty_like(covs)
    for d in np.unique(domain):
        mask = domain == d
        isqrt = _eig_fn(riemannian_mean(covs[mask]), lambda w: 1.0 / np.sqrt(w))
        aligned = isqrt @ covs[mask] @ isqrt
        out[mask] = (aligned + np.swapaxes(aligned, -1, -2)) / 2.0
    return out
