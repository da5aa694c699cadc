r"""Diagnostics of norm layers from the data they see: spectra, dispersions, statistics, parameters.

Plain PyTorch (no Lightning): :class:`NormRecorder` puts forward hooks on every norm layer of a model while it
records, and takes them off again, so the forwards in between run without them. Each Riemannian norm
(:class:`~manifoldnorm.nn.RefittableNorm`: every SPD and Lie group batch norm, the domain-specific ones
included) gives :func:`riemannian_norm_stats`, each Euclidean norm :func:`euclidean_norm_stats`; all under
``torch.no_grad``, in float64, from the input and output of the recorded forward and the layer's buffers and
parameters right after it.

>>> rec = NormRecorder(model)                              # doctest: +SKIP
>>> rec.start(); loss = model(x).sum(); stats = rec.stop()  # doctest: +SKIP
>>> stats["stages.0.norm"]["cond_in"]                       # doctest: +SKIP

Distances are the layers' own (:meth:`RefittableNorm.distance`): affine-invariant for ``spdbn``, ``spdmbn``,
``spddsmbn``; the deformed metric of the group (θ, α, β) for ``liebn_*`` and ``dsliebn_*`` (plain AIM, LEM or
LCM at the defaults); the power-deformed generalized Bures-Wasserstein distance with the learned metric weight
for ``gbwbn``; the rotation angle for ``liebn_so3``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .base import RefittableNorm
from .registry import NORMS, IdentityNorm

__all__ = [
    "RIEMANNIAN_KEYS",
    "EUCLIDEAN_KEYS",
    "NormRecorder",
    "euclidean_norm_stats",
    "is_euclidean_norm",
    "norm_layers",
    "riemannian_norm_stats",
    "spectrum_stats",
]

#: keys :func:`riemannian_norm_stats` may return (those a layer has no counterpart for are left out)
RIEMANNIAN_KEYS: tuple[str, ...] = (
    "batch_var", "running_var", "dist_mean_bias", "dist_mean_identity", "bias_dist_identity",
    "metric_dist_identity", "shift_mean", "shift_min", "shift_max",
    "eig_min_in", "eig_max_in", "cond_in", "eig_min_out", "eig_max_out", "cond_out",
)
#: keys of :func:`euclidean_norm_stats`
EUCLIDEAN_KEYS: tuple[str, ...] = ("rms_in", "rms_out")

# torch's own Euclidean norms (subclasses included: the registered BatchNorm, LayerNorm, RMSNorm, GroupNorm)
_TORCH_NORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
                                            nn.LocalResponseNorm)


def is_euclidean_norm(module: nn.Module) -> bool:
    """Is ``module`` a Euclidean norm layer: one of torch's (batch, instance, layer, group, RMS norms) or a class
    registered with kind ``"euclidean"`` for Euclidean inputs (not :class:`IdentityNorm`, not the weight
    reparametrizations)?"""
    if isinstance(module, IdentityNorm):
        return False
    if isinstance(module, _TORCH_NORMS):
        return True
    for cls in type(module).__mro__:
        info = NORMS.find(cls)
        if info is not None:
            return info.kind == "euclidean" and "euclidean" in info.inputs
    return False


def norm_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(name, layer, kind)`` of every norm layer of ``model`` in module order, ``kind`` ``"riemannian"`` or
    ``"euclidean"``; a layer nested in another norm layer is left out (its parent reports)."""
    taken: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        if isinstance(module, RefittableNorm):
            kind = "riemannian"
        elif is_euclidean_norm(module):
            kind = "euclidean"
        else:
            continue
        taken.append(name)
        yield name, module, kind


def _nan() -> Tensor:
    return torch.tensor(math.nan, dtype=torch.float64)


def spectrum_stats(x: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
    r"""Eigenvalue range and condition number of a stack of symmetric matrices ``(..., n, n)``, in float64.

    Returns ``({"eig_min", "eig_max", "cond"}, eigenvalues)``: the smallest and largest eigenvalue over the
    stack and the largest per-matrix condition number :math:`\lambda_{\max}/\lambda_{\min}` (``inf`` for a
    matrix with :math:`\lambda_{\min} \le 0`), and the eigenvalues ``(M, n)`` of the ``M`` matrices. A stack
    with a non-finite entry, or whose decomposition fails, gives NaN values and ``None``.
    """
    X = x.detach().to(torch.float64)
    X = X.reshape(-1, X.shape[-2], X.shape[-1])
    if X.numel() == 0 or not bool(torch.isfinite(X).all()):
        return {"eig_min": _nan(), "eig_max": _nan(), "cond": _nan()}, None
    try:
        lam = torch.linalg.eigvalsh(X)  # ascending
    except torch.linalg.LinAlgError:
        return {"eig_min": _nan(), "eig_max": _nan(), "cond": _nan()}, None
    lo, hi = lam[:, 0], lam[:, -1]
    cond = torch.where(lo > 0, hi / lo.clamp_min(torch.finfo(torch.float64).tiny), math.inf)
    return {"eig_min": lo.min(), "eig_max": hi.max(), "cond": cond.max()}, lam


def _domains(layer: nn.Module, domain: Any) -> Tensor | None:
    """Domain ids present in the batch of a domain-aware layer (``None`` for a layer that is not)."""
    if not getattr(layer, "domain_aware", False):
        return None
    d = torch.zeros(1, dtype=torch.long) if domain is None else torch.as_tensor(domain).reshape(-1).long()
    return torch.unique(d) if d.numel() else torch.zeros(1, dtype=torch.long)


def _present(buf: Tensor, ids: Tensor | None) -> Tensor:
    """The slots of the domains present (a domain-aware layer's buffers lead with the domain dimension)."""
    return buf if ids is None else buf[ids.to(buf.device)]


def _identity_like(X: Tensor) -> Tensor:
    return torch.eye(X.shape[-1], dtype=X.dtype, device=X.device).expand_as(X)


@torch.no_grad()
def riemannian_norm_stats(layer: RefittableNorm, x: Tensor, y: Tensor,
                          domain: Any = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    r"""Scalar diagnostics of a Riemannian norm layer after a training forward ``y = layer(x, domain)``.

    Returns ``(scalars, eigenvalues)``; ``scalars`` holds 0-d float64 tensors (keys :data:`RIEMANNIAN_KEYS`
    that apply to the layer):

    * ``batch_var``: the dispersion the layer normalized the batch with, its ``train_var`` after the step: the
      batch's Fréchet variance :math:`v^2` at ``train_momentum`` 1, Kobler's momentum blend :math:`v_\eta^2`
      below (a layer without ``train_var``, ``spdbn``: :math:`\frac1N\sum_i d^2(X_i, G)` about the mean
      :math:`G` it centred with);
    * ``running_var``: the running (evaluation) variance;
    * ``dist_mean_bias``, ``dist_mean_identity``: :math:`d(R, B)` and :math:`d(R, I)` of the running mean
      :math:`R` from the learned bias :math:`B` (``weight``) and the identity;
    * ``bias_dist_identity``: :math:`d(B, I)`; ``metric_dist_identity`` (``gbwbn``): :math:`d(M, I)` of the
      learned metric weight;
    * ``shift_mean``, ``shift_min``, ``shift_max``: the learned dispersions :math:`s` over channels;
    * ``eig_min_in``, ``eig_max_in``, ``cond_in`` and the same ``*_out``: :func:`spectrum_stats` of the input
      and output matrices (SPD layers only).

    Values over channels (and, for a domain-aware layer, over the domains present in the batch) are averaged;
    distances are :meth:`~manifoldnorm.nn.RefittableNorm.distance` of the layer. ``eigenvalues`` maps ``"in"``
    and ``"out"`` to the eigenvalues ``(M, n)`` of the input and output matrices (SPD layers).
    """
    out: dict[str, Tensor] = {}
    eig: dict[str, Tensor] = {}
    ids = _domains(layer, domain)
    mean = getattr(layer, "running_mean", None)
    f64 = torch.float64

    def dist(A: Tensor, B: Tensor) -> Tensor | None:
        try:
            return layer.distance(A.to(f64), B.to(f64)).to(f64)
        except NotImplementedError:
            return None

    train_var = getattr(layer, "train_var", None)
    train_mean = getattr(layer, "train_mean", None)
    if isinstance(train_var, Tensor):
        out["batch_var"] = _present(train_var, ids).to(f64).mean()
    elif isinstance(train_mean, Tensor) and x.dim() >= 3:
        G = _present(train_mean, ids).to(f64)
        X = x.detach().to(f64).reshape(x.shape[0], -1, x.shape[-2], x.shape[-1])
        d = dist(G, X)
        if d is not None:
            out["batch_var"] = d.square().mean()
    running_var = getattr(layer, "running_var", None)
    if isinstance(running_var, Tensor):
        out["running_var"] = _present(running_var, ids).to(f64).mean()
    weight = getattr(layer, "weight", None)
    if isinstance(mean, Tensor):
        R = _present(mean, ids).to(f64)
        for key, other in (("dist_mean_bias", weight), ("dist_mean_identity", None)):
            target = _identity_like(R) if other is None else other.detach().to(f64)
            d = dist(R, target)
            if d is not None:
                out[key] = d.mean()
    for key, param in (("bias_dist_identity", weight), ("metric_dist_identity", getattr(layer, "metric_weight", None))):
        if isinstance(param, Tensor):
            P = param.detach().to(f64)
            d = dist(P, _identity_like(P))
            if d is not None:
                out[key] = d.mean()
    shift = getattr(layer, "shift", None)
    if isinstance(shift, Tensor):
        s = shift.detach().to(f64)
        out.update(shift_mean=s.mean(), shift_min=s.min(), shift_max=s.max())
    if getattr(layer, "input_space", "spd") == "spd":
        for side, t in (("in", x), ("out", y)):
            stats, lam = spectrum_stats(t)
            out.update({f"{k}_{side}": v for k, v in stats.items()})
            if lam is not None:
                eig[side] = lam
    return out, eig


@torch.no_grad()
def euclidean_norm_stats(x: Tensor, y: Tensor) -> dict[str, Tensor]:
    r"""Root mean square of a Euclidean norm layer's input and output, :math:`\sqrt{\mathrm{mean}(x^2)}`, over every
    entry (batch included), in float64: ``{"rms_in", "rms_out"}``."""
    return {f"rms_{side}": t.detach().to(torch.float64).square().mean().sqrt() if t.numel() else _nan()
            for side, t in (("in", x), ("out", y))}


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    x = args[0] if args else kwargs.get("x", kwargs.get("input"))
    return x if isinstance(x, Tensor) else None


class NormRecorder:
    """Record the diagnostics of every norm layer of a model during the forwards between :meth:`start` and
    :meth:`stop`.

    :meth:`start` registers one forward hook per norm layer (:func:`norm_layers`); :meth:`stop` removes them
    all and returns ``{layer name: {key: 0-d float64 tensor}}``. Outside ``start``/``stop`` the model has no hook
    of this recorder, so its forwards cost nothing extra. Each layer is recorded at its first forward in training
    mode after :meth:`start` (a Riemannian layer refitting its statistics is not); later forwards are ignored.

    Parameters
    ----------
    model : nn.Module
        The model whose norm layers are recorded; names are relative to it.
    eigenvalues : bool
        Keep the eigenvalues of the inputs and outputs of the Riemannian SPD layers, in :attr:`eigenvalues`
        (``{layer name: {"in": (M, n), "out": (M, n)}}``, float64 on the CPU), e.g. for histograms.
    """

    def __init__(self, model: nn.Module, eigenvalues: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"NormRecorder: model must be an nn.Module, got {type(model).__name__}")
        self.layers: list[tuple[str, nn.Module, str]] = list(norm_layers(model))
        self.keep_eigenvalues = bool(eigenvalues)
        self.stats: dict[str, dict[str, Tensor]] = {}
        self.eigenvalues: dict[str, dict[str, Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def recording(self) -> bool:
        """Are the hooks attached?"""
        return bool(self._handles)

    def start(self) -> None:
        """Attach the hooks and forget earlier records."""
        self.stop()
        self.stats, self.eigenvalues = {}, {}
        for name, layer, kind in self.layers:
            self._handles.append(layer.register_forward_hook(self._hook(name, kind), with_kwargs=True))

    def stop(self) -> dict[str, dict[str, Tensor]]:
        """Remove the hooks; return the records of the layers seen since :meth:`start`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.stats

    def _hook(self, name: str, kind: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if name in self.stats or not module.training or getattr(module, "refitting", False):
                return
            x = _first_tensor(args, kwargs)
            if x is None or not isinstance(output, Tensor):
                return
            if kind == "euclidean":
                self.stats[name] = euclidean_norm_stats(x, output)
                return
            domain = kwargs.get("domain", args[1] if len(args) > 1 else None)
            stats, eig = riemannian_norm_stats(module, x, output, domain)  # type: ignore[arg-type]
            self.stats[name] = stats
            if self.keep_eigenvalues and eig:
                self.eigenvalues[name] = {k: v.cpu() for k, v in eig.items()}

        return hook
