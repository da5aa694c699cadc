"""SPDNet with a Riemannian batch-norm slot in every stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from manifoldnorm import functional as mf
from manifoldnorm.nn.registry import NormSpec

from ._stages import SPDTrunk, check_dims, no_autocast

__all__ = ["SPDNet"]


class SPDNet(SPDTrunk):
    r"""SPD matrix classifier: ``[BiMap -> norm -> ReEig] * len(dims) -> LogEig -> Linear``.

    Huang & Van Gool, "A Riemannian Network for SPD Matrix Learning", AAAI 2017, with the batch-norm slot of
    SPDNetBN (Brooks et al., NeurIPS 2019) and LieBN (Chen et al., ICLR 2024) after each BiMap.

    Parameters
    ----------
    in_dim : int
        Size ``n`` of the input matrices ``(N, n, n)``.
    dims : sequence of int
        Output sizes of the BiMap layers (non-increasing, each ``<=`` the previous size).
    num_classes : int
    norm_layer : str, class, functools.partial or None
        Any norm accepting SPD inputs from :func:`manifoldnorm.nn.list_norms`; ``None`` (or ``'none'``) for plain
        SPDNet.
    norm_kwargs : dict, optional
        Extra arguments of every norm layer (e.g. ``{'momentum': 0.05}``, ``{'num_domains': 8}``).
    reeig_threshold : float
        ReEig eigenvalue floor.
    validate : bool
        Check that the input is a batch of SPD matrices (one Cholesky per matrix).

    Notes
    -----
    ``forward(x, domain=None)``: ``x`` ``(N, n, n)`` SPD in any float dtype; the SPD part runs in float64 with
    autocast disabled, the classifier in its own dtype (float32 by default), so the logits ``(N, num_classes)``
    are float32. ``domain`` (``(N,)`` LongTensor) is passed to every norm layer. The last ReEig and the LogEig
    share one eigendecomposition (:func:`manifoldnorm.functional.sym_reeig_logm`; same values and gradients,
    their modules' forward hooks are not called); ``model.fuse_reeig_logeig = False`` runs them one by one.
    """

    def __init__(self, in_dim: int, dims: Sequence[int], num_classes: int, norm_layer: NormSpec = "liebn_aim",
                 norm_kwargs: dict[str, Any] | None = None, reeig_threshold: float = 1e-4,
                 validate: bool = True) -> None:
        super().__init__()
        (in_dim,) = check_dims((in_dim,), "SPDNet in_dim")
        dims = check_dims(dims, "SPDNet")
        (num_classes,) = check_dims((num_classes,), "SPDNet num_classes")
        self.in_dim, self.dims, self.validate = in_dim, dims, bool(validate)
        sizes = (in_dim, *dims)
        self._build_trunk(sizes, num_classes, norm_layer, norm_kwargs, reeig_threshold, norm_first=True)

    def features(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        """Tangent-space features ``(N, d(d+1)/2)`` (float64) before the classifier."""
        if x.dim() != 3 or x.shape[-1] != self.in_dim or x.shape[-2] != self.in_dim:
            raise ValueError(f"SPDNet: expected input of shape (N, {self.in_dim}, {self.in_dim}), "
                             f"got {tuple(x.shape)}")
        with no_autocast(x.device):
            h = x.to(torch.float64)
            if self.validate:
                with torch.no_grad():
                    mf.check_spd(h.detach(), name="SPDNet input")
            return self._spd_features(h, domain)

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        return self.classify(self.features(x, domain))
