r"""Synchronized batch normalization across data-parallel processes, Euclidean and Riemannian.

:func:`convert_sync_norm` makes every batch-statistics norm of a model compute its statistics over the union of
the batches of all processes of a ``torch.distributed`` group (any backend, ``gloo`` on CPU included):

* Euclidean batch norms (``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm``,
  :class:`manifoldnorm.nn.BatchNorm`) become :class:`manifoldnorm.nn.SyncBatchNorm` (per-channel count, sum and
  sum of squares in one all-reduce; Ioffe & Szegedy, ICML 2015; cross-GPU statistics as Peng et al., "MegDet",
  CVPR 2018, Sec. 3.3).
* Riemannian norms (every registered ``spd``/``lie`` norm) keep their class, parameters and buffers and get a
  :class:`~manifoldnorm.distributed._reduce.ProcessGroupReducer`: each average over the batch inside their
  statistics becomes a sum over processes divided by the total count.

With per-process batches :math:`\{X_i\}_{i \in B_r}` of sizes :math:`n_r` (uneven sizes allowed) every process
computes the statistics of :math:`B = \bigcup_r B_r`, :math:`N = \sum_r n_r`:

.. math::

    \text{LEM / LCM:}\quad M = \phi^{-1}\Big(\frac1N\sum_r\sum_{i\in B_r}\phi(X_i)\Big),\qquad
    \text{AIM (Karcher step):}\quad G \leftarrow G^{1/2}\exp\Big(\frac1N\sum_r\sum_{i\in B_r}
    \log(G^{-1/2}X_iG^{-1/2})\Big)G^{1/2},

    \text{BW (fixed point):}\quad G \leftarrow G^{-1/2}\Big(\frac1N\sum_r\sum_{i\in B_r}
    (G^{1/2}X_iG^{1/2})^{1/2}\Big)^2G^{-1/2},\qquad
    \text{dispersion:}\quad v^2 = \frac1N\sum_r\sum_{i\in B_r} d^2(X_i, M).

Since every process holds the same estimate after each reduction, all of them run the same iteration and end
with the same mean; the result equals the single-process statistics of the concatenated batch up to the order
of floating-point summation. The all-reduce is differentiable (its backward sums the gradients over the
group), so the gradients of every process are those of the summed loss :math:`\sum_r L_r` of the whole batch.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from manifoldnorm.nn import BatchNorm, get_norm_info
from manifoldnorm.nn.euclidean.sync_bn import SyncBatchNorm

from ._reduce import ProcessGroupReducer

__all__ = ["convert_sync_norm", "revert_sync_norm", "is_synchronized", "synchronizable_layers",
           "ProcessGroupReducer"]

_ORIGIN = "_sync_norm_origin"  # attribute of a converted SyncBatchNorm: the class it replaced


def _is_batch_norm(m: nn.Module) -> bool:
    """A Euclidean batch norm that :func:`convert_sync_norm` replaces (torch's SyncBatchNorm included)."""
    return isinstance(m, _BatchNorm)


def _is_riemannian(m: nn.Module) -> bool:
    """A norm whose batch statistics are routed through a ``stats_reducer`` (see ``nn._batch_stats``)."""
    return hasattr(type(m), "stats_reducer")


def _check_supported(m: nn.Module) -> None:
    info = get_norm_info(type(m))
    if info is not None and info.kind in ("spd", "lie") and not _is_riemannian(m):
        raise TypeError(f"convert_sync_norm: the registered {info.kind} norm {info.name!r} ({type(m).__name__}) "
                        "computes batch statistics but has no 'stats_reducer' hook; route its batch averages "
                        "through manifoldnorm.nn._batch_stats to make it synchronizable")


def _to_sync_bn(bn: _BatchNorm, process_group) -> SyncBatchNorm:  # noqa: ANN001
    if isinstance(bn, LazyModuleMixin) and bn.has_uninitialized_params():
        raise ValueError(f"convert_sync_norm: {type(bn).__name__} has uninitialized parameters; run one forward "
                         "pass before converting")
    ref = bn.weight if bn.affine else bn.running_mean
    sync = SyncBatchNorm(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         track_running_stats=bn.track_running_stats, process_group=process_group,
                         dtype=None if ref is None else ref.dtype, device=None if ref is None else ref.device)
    _move_state(bn, sync)
    setattr(sync, _ORIGIN, type(bn))
    return sync


def _move_state(src: nn.Module, dst: nn.Module) -> None:
    """Hand the parameters and buffers (the same tensor objects) and the training flag over to ``dst``."""
    for name in ("weight", "bias"):
        if getattr(src, name, None) is not None:
            setattr(dst, name, getattr(src, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if getattr(src, name, None) is not None:
            dst.register_buffer(name, getattr(src, name))
    dst.train(src.training)


def _from_sync_bn(sync: SyncBatchNorm) -> nn.Module:
    origin = getattr(sync, _ORIGIN)
    kwargs = {"eps": sync.eps, "momentum": sync.momentum, "affine": sync.affine,
              "track_running_stats": sync.track_running_stats}
    try:
        bn = origin(sync.num_features, **kwargs)
    except TypeError:  # a subclass with another constructor: the layout-agnostic batch norm
        bn = BatchNorm(sync.num_features, **kwargs)
    _move_state(sync, bn)
    return bn


def _map_modules(module: nn.Module, fn) -> nn.Module:  # noqa: ANN001
    """Apply ``fn`` to ``module`` and (recursively) to the children of its result; replace what ``fn`` returns."""
    out = fn(module)
    for name, child in list(out.named_children()):
        new = _map_modules(child, fn)
        if new is not child:
            out.add_module(name, new)
    return out


def convert_sync_norm(module: nn.Module, process_group=None) -> nn.Module:  # noqa: ANN001
    r"""Synchronize the batch statistics of every batch norm in ``module`` (itself included) across processes.

    Euclidean batch norms are replaced by :class:`manifoldnorm.nn.SyncBatchNorm` holding the same parameter and
    buffer tensors; Riemannian norms are switched in place to statistics over all processes. Parameters,
    buffers and ``state_dict`` keys are unchanged, so checkpoints load in both directions, and optimizers built
    before the conversion keep their parameters. Returns ``module`` itself, or the replacement when ``module``
    is a Euclidean batch norm.

    Communication per training forward and layer (every process must run the forward, and the backward, in
    training mode together; evaluation communicates nothing):

    ========================================  ==============================================================
    norm                                      all-reduces (each mean carries its count in its first one)
    ========================================  ==============================================================
    Euclidean batch norm                      1 (count, sum, sum of squares)
    LieBN LEM / LCM (``liebn_lem/lcm``)       2: codomain mean, dispersion
    LieBN AIM / CRIM, SO(3) LieBN             ``karcher_steps`` + 2: arithmetic (chordal) start, one per
                                              Karcher step, dispersion
    SPDBN (``spdbn``)                         ``karcher_steps`` + 1 (no dispersion)
    SPDMBN (``spdmbn``)                       ``karcher_steps`` + 3: as AIM, plus the dispersion around the
                                              updated running mean (no gradient)
    GBWBN (``gbwbn``)                         ``mean_steps`` + 2: arithmetic start, one per fixed-point
                                              step, dispersion
    domain-specific norms                     2 (largest domain id, per-domain counts), then the above for
                                              every domain present on any process
    ========================================  ==============================================================

    The first reduction of a mean carries :math:`Cn^2` sums plus the count (``C`` channels of ``n x n``
    matrices), each further Karcher / fixed-point step :math:`Cn^2`, the dispersion :math:`C + 1`. In the
    backward, the reductions whose results carry a gradient run once more (the dispersion always; the mean
    steps only with ``detach_mean=False``). Refitting (test-time adaptation, see
    :func:`manifoldnorm.nn.refit_domain_norms`) uses the same reductions, with the early stop of the Karcher /
    fixed-point flow taken on the reduced step, so every process stops at the same iteration.

    Parameters
    ----------
    module : nn.Module
        A model or a single layer.
    process_group : torch.distributed.ProcessGroup, optional
        Group to synchronize over; the default (world) group when ``None``.

    Returns
    -------
    nn.Module

    Raises
    ------
    TypeError
        A registered ``spd``/``lie`` norm without the statistics hook (a new norm that does not route its
        batch averages through :mod:`manifoldnorm.nn._batch_stats`).

    Notes
    -----
    Without an initialized process group, or with a group of one process, the converted layers compute exactly
    what the original ones do and communicate nothing. Uneven batches are weighted by their sizes. A process
    may hold an empty batch (``N = 0``, also an empty domain in a domain-specific norm) as long as the union is
    not empty: it contributes nothing to the sums and still takes part in every collective, so no process
    waits for another. An empty union raises a ValueError on every process alike. Gradients follow the summed
    loss of all processes: ``DistributedDataParallel``, which averages gradients, divides them by the number
    of processes, exactly as for a single-process run on the whole batch with a mean over processes.

    References
    ----------
    Chen, Song, Liu & Sebe, "A Lie Group Approach to Riemannian Batch Normalization", ICLR 2024 (LieBN);
    Brooks et al., "Riemannian batch normalization for SPD neural networks", NeurIPS 2019 (SPDBN); Kobler et al.,
    "SPD domain-specific batch normalization ...", NeurIPS 2022 (SPDMBN/SPDDSMBN); Wang et al., "Learning to
    Normalize on the SPD Manifold under Bures-Wasserstein Geometry", CVPR 2025 (GBWBN); Pennec, Fillard & Ayache,
    IJCV 2006, Eq. 8 (Karcher flow); Álvarez-Esteban et al., J. Math. Anal. Appl. 2016 (BW fixed point);
    Hartley et al., "Rotation Averaging", IJCV 2013 (SO(3) mean).

    Deviations
    ----------
    None of these papers synchronizes statistics across processes; the union statistics above are the
    single-process definitions applied to the concatenated batch. The sums run in a different order than on
    one process (differences at round-off level).
    """
    reducer = ProcessGroupReducer(process_group)

    def convert(m: nn.Module) -> nn.Module:
        if _is_batch_norm(m):
            return _to_sync_bn(m, process_group)
        if isinstance(m, SyncBatchNorm) and process_group is not None:
            m.process_group = process_group
        elif _is_riemannian(m):
            m.stats_reducer = reducer
        else:
            _check_supported(m)
        return m

    return _map_modules(module, convert)


def revert_sync_norm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_norm`: local batch statistics again, original classes, same tensors.

    Every :class:`~manifoldnorm.nn.SyncBatchNorm` created by the conversion becomes an instance of the class it
    replaced (a ``SyncBatchNorm`` of the model itself stays); Riemannian norms drop their reducer.
    """
    def revert(m: nn.Module) -> nn.Module:
        if isinstance(m, SyncBatchNorm) and hasattr(m, _ORIGIN):
            return _from_sync_bn(m)
        if _is_riemannian(m) and "stats_reducer" in vars(m):
            del m.stats_reducer
        return m

    return _map_modules(module, revert)


def synchronizable_layers(module: nn.Module) -> list[nn.Module]:
    """The batch-statistics norms in ``module`` (itself included) that :func:`convert_sync_norm` handles."""
    return [m for m in module.modules() if _is_batch_norm(m) or isinstance(m, SyncBatchNorm) or _is_riemannian(m)]


def is_synchronized(module: nn.Module) -> bool:
    """Whether every batch-statistics norm in ``module`` synchronizes across processes (vacuously true if none).

    Euclidean batch norms must be :class:`~manifoldnorm.nn.SyncBatchNorm`; Riemannian norms must carry a
    :class:`~manifoldnorm.distributed._reduce.ProcessGroupReducer`.
    """
    for m in synchronizable_layers(module):
        if _is_batch_norm(m):
            return False
        if _is_riemannian(m) and not isinstance(m.stats_reducer, ProcessGroupReducer):
            return False
    return True

