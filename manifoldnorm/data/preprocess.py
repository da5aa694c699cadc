r"""Signal preprocessing for epoched EEG: band-pass filtering, covariance estimation, re-centring.

NumPy/SciPy only (SciPy is imported by :func:`bandpass` when it first runs). Filtering and covariances work
through the trials in chunks of :data:`CHUNK_TRIALS`: each chunk is converted to float64, processed and written
into the output, so no float64 copy of all raw trials is ever held. Every trial is processed on its own, so the
result does not depend on the chunk size (the tests check equality with the unchunked computation).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["CHUNK_TRIALS", "COV_ESTIMATORS", "bandpass", "bandpass_covariances", "covariances", "recenter",
           "riemannian_mean", "trace_normalize"]

COV_ESTIMATORS: tuple[str, ...] = ("oas", "scm", "lwf")
"""Names accepted by :func:`covariances`."""

CHUNK_TRIALS: int = 256
"""Trials processed at a time by :func:`bandpass` and :func:`covariances` (22 channels x 384 samples: 17 MB of
float64 per chunk)."""


def _check_chunk(chunk_size: int | None) -> int:
    if chunk_size is None:
        return CHUNK_TRIALS
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return int(chunk_size)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _check_trials(X: np.ndarray, name: str = "X") -> np.ndarray:
    X = np.asarray(X)
    if X.ndim < 2:
        raise ValueError(f"{name} must have shape (..., C, T), got {X.shape}")
    if not np.issubdtype(X.dtype, np.floating) and not np.issubdtype(X.dtype, np.integer):
        raise TypeError(f"{name} must be a real-valued array, got dtype {X.dtype}")
    rows = X.reshape(-1, X.shape[-1])
    if not all(np.isfinite(rows[part]).all() for part in _chunks(len(rows), max(CHUNK_TRIALS * X.shape[-2], 1))):
        raise ValueError(f"{name} contains NaN or Inf")  # checked a chunk at a time: no mask of all trials
    return X


def _bandpass_sos(sfreq: float, fmin: float, fmax: float, order: int) -> np.ndarray:
    from scipy.signal import butter  # SciPy on first use: importing manifoldnorm.data stays light

    nyquist = sfreq / 2.0
    if not 0 < fmin < fmax < nyquist:
        raise ValueError(f"need 0 < fmin < fmax < sfreq/2 = {nyquist:g} Hz, got fmin={fmin}, fmax={fmax}")
    if int(order) != order or order < 1:
        raise ValueError(f"order must be a positive integer, got {order}")
    return butter(int(order), [fmin, fmax], btype="bandpass", fs=sfreq, output="sos")


def _filter(sos: np.ndarray, X: np.ndarray) -> np.ndarray:
    from scipy.signal import sosfiltfilt

    return sosfiltfilt(sos, np.asarray(X, dtype=np.float64), axis=-1)


def bandpass(X: np.ndarray, sfreq: float, fmin: float = 8.0, fmax: float = 30.0, order: int = 4,
             chunk_size: int | None = None) -> np.ndarray:
    """Zero-phase Butterworth band-pass filter along the last axis.

    The filter is applied forwards and backwards (second-order sections), so the effective
    magnitude response is the square of an order-``order`` Butterworth band-pass and the phase is
    zero. Trials (the leading axes) are filtered ``chunk_size`` at a time in float64 and written into the
    output in the input's float dtype: a float32 input never has a float64 copy of all its trials.

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
    chunk_size : int, optional
        Trials filtered at a time (default :data:`CHUNK_TRIALS`); the result does not depend on it.

    Returns
    -------
    ndarray, same shape as ``X``
    """
    X = _check_trials(X) if np.ndim(X) >= 2 else np.asarray(X)
    sos = _bandpass_sos(sfreq, fmin, fmax, order)
    dtype = X.dtype if np.issubdtype(X.dtype, np.floating) else np.float64
    if X.ndim < 2:
        return _filter(sos, X).astype(dtype, copy=False)
    size = _check_chunk(chunk_size)
    flat = X.reshape(-1, *X.shape[-2:]) if X.ndim > 2 else X[None]
    out = np.empty(flat.shape, dtype=dtype)
    for part in _chunks(len(flat), size):
        out[part] = _filter(sos, flat[part])
    return out.reshape(X.shape)


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


def covariances(X: np.ndarray, estimator: str = "oas", chunk_size: int | None = None) -> np.ndarray:
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
    chunk_size : int, optional
        Trials converted to float64 and processed at a time (default :data:`CHUNK_TRIALS`); the result does not
        depend on it.

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
    X = _check_trials(X)
    if X.shape[-1] < 2:
        raise ValueError(f"need at least 2 time samples per trial, got {X.shape[-1]}")
    size = _check_chunk(chunk_size)
    if X.ndim == 2:
        return _covariances(X, estimator)
    flat = X.reshape(-1, *X.shape[-2:])
    out = np.empty((len(flat), X.shape[-2], X.shape[-2]), dtype=np.float64)
    for part in _chunks(len(flat), size):
        out[part] = _covariances(flat[part], estimator)
    return out.reshape(*X.shape[:-1], X.shape[-2])


def bandpass_covariances(X: np.ndarray, sfreq: float, band: Sequence[float] | None, order: int = 4,
                         estimator: str = "oas", chunk_size: int | None = None) -> np.ndarray:
    """``covariances(bandpass(X, sfreq, *band, order), estimator)``, one chunk of trials at a time.

    Equal to the two-step computation, value for value (the filtered chunk is rounded to the dtype of ``X``, as
    :func:`bandpass` returns it), while holding only one filtered chunk: neither the filtered trials nor a float64
    copy of the input exist in full. ``band=None`` skips the filter.

    Parameters
    ----------
    X : ndarray, shape (N, C, T)
    sfreq : float
    band : (fmin, fmax) or None
    order : int
    estimator : {"oas", "scm", "lwf"}
    chunk_size : int, optional
        Trials at a time (default :data:`CHUNK_TRIALS`).

    Returns
    -------
    ndarray, shape (N, C, C), float64
    """
    if estimator not in COV_ESTIMATORS:
        raise ValueError(f"unknown covariance estimator {estimator!r}; valid names are {list(COV_ESTIMATORS)}")
    X = _check_trials(X)
    if band is None:
        return covariances(X, estimator, chunk_size=chunk_size)
    fmin, fmax = (float(b) for b in band)
    if X.ndim != 3:
        raise ValueError(f"X must have shape (N, C, T), got {X.shape}")
    if X.shape[-1] < 2:
        raise ValueError(f"need at least 2 time samples per trial, got {X.shape[-1]}")
    sos = _bandpass_sos(sfreq, fmin, fmax, order)
    size = _check_chunk(chunk_size)
    dtype = X.dtype if np.issubdtype(X.dtype, np.floating) else np.float64
    out = np.empty((len(X), X.shape[1], X.shape[1]), dtype=np.float64)
    for part in _chunks(len(X), size):
        out[part] = _covariances(_filter(sos, X[part]).astype(dtype, copy=False), estimator)
    return out


def _covariances(X: np.ndarray, estimator: str) -> np.ndarray:
    """:func:`covariances` of checked trials, all at once."""
    X = np.asarray(X, dtype=np.float64)
    Xc = X - X.mean(axis=-1, keepdims=True)
    S = _scm(Xc)
    if estimator == "scm":
        return S
    if X.shape[-2] == 1:
        return S
    rho = _oas_shrinkage(S, X.shape[-1]) if estimator == "oas" else _lwf_shrinkage(Xc, S)
    return _shrink(S, rho)


def trace_normalize(C: np.ndarray) -> np.ndarray:
    r"""Scale every matrix to unit trace, :math:`C / \operatorname{tr}(C)`.

    Removes the overall power of a trial and keeps its spatial structure (the ratios of the eigenvalues): a
    classifier then cannot use the signal's scale (useful when the gain differs between recordings; harmful when
    the power is what tells the classes apart).

    Parameters
    ----------
    C : ndarray, shape (..., n, n)
        SPD matrices (positive trace).

    Returns
    -------
    ndarray, shape (..., n, n), float64
    """
    C = np.asarray(C, dtype=np.float64)
    if C.ndim < 2 or C.shape[-1] != C.shape[-2]:
        raise ValueError(f"C must have shape (..., n, n), got {C.shape}")
    tr = np.trace(C, axis1=-2, axis2=-1)
    if not np.all(tr > 0):
        raise ValueError(f"trace normalization needs matrices of positive trace; {int(np.sum(~(tr > 0)))} are not")
    return C / tr[..., None, None]


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
