"""Feature layout of Euclidean norm layers, and an adapter that lets any of them fill any model slot.

A layer declares where its features live with the class attribute ``feature_dim``:

* ``1``: channels first, ``(N, C)`` or ``(N, C, *spatial)`` (BatchNorm, GroupNorm, EvoNorm, ...);
* ``-1``: channels last, ``(..., C)`` (LayerNorm, RMSNorm, DyT, ...);
* ``None``: any layout (the identity).

Layers without the attribute are taken as channels first, except torch's own ``nn.LayerNorm`` and
``nn.RMSNorm``, which are channels last. A model calls :func:`adapt_layout` with the layout of its activations
(``-1`` for transformer tokens ``(B, T, C)``, ``1`` for images ``(N, C, H, W)``) and never needs to know which
norm it holds.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["feature_dim_of", "adapt_layout", "MovedFeatures"]

_LAYOUTS = (1, -1)


def feature_dim_of(layer: nn.Module) -> int | None:
    """The feature dimension a layer normalizes over: ``1``, ``-1`` or ``None`` (layout-agnostic)."""
    if hasattr(type(layer), "feature_dim"):
        dim = type(layer).feature_dim
        if dim not in (*_LAYOUTS, None):
            raise ValueError(f"{type(layer).__name__}.feature_dim must be 1, -1 or None, got {dim!r}")
        return dim
    if isinstance(layer, (nn.LayerNorm, nn.RMSNorm)):
        return -1
    return 1


class MovedFeatures(nn.Module):
    """Calls ``layer`` with the feature dimension moved from ``features_dim`` to the layer's own, and back.

    The wrapped layer is the attribute ``layer`` (its parameters appear as ``layer.<name>`` in the state dict).
    """

    def __init__(self, layer: nn.Module, features_dim: int) -> None:
        super().__init__()
        self.layer = layer
        self.features_dim = features_dim

    def extra_repr(self) -> str:
        return f"features_dim={self.features_dim} -> {feature_dim_of(self.layer)}"

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        if x.ndim < 2:
            raise ValueError(f"{type(self.layer).__name__}: expected an input with at least 2 dims, got shape "
                             f"{tuple(x.shape)}")
        src = 1 if self.features_dim == 1 else x.ndim - 1
        dst = x.ndim - 1 if src == 1 else 1
        y = self.layer(x.movedim(src, dst), domain=domain) if _takes_domain(self.layer) else \
            self.layer(x.movedim(src, dst))
        return y.movedim(dst, src)


def _takes_domain(layer: nn.Module) -> bool:
    import inspect

    try:
        return "domain" in inspect.signature(layer.forward).parameters
    except (TypeError, ValueError):
        return False


def adapt_layout(layer: nn.Module, features_dim: int) -> nn.Module:
    """Return ``layer`` if it normalizes dimension ``features_dim`` of the caller's tensors, else a wrapper.

    Parameters
    ----------
    layer : nn.Module
        A norm layer (see the module docstring for how its layout is read).
    features_dim : {1, -1}
        Where the caller keeps features: ``1`` for ``(N, C, ...)``, ``-1`` for ``(..., C)``.
    """
    if features_dim not in _LAYOUTS:
        raise ValueError(f"features_dim must be 1 (channels first) or -1 (channels last), got {features_dim!r}")
    own = feature_dim_of(layer)
    if own is None or own == features_dim:
        return layer
    return MovedFeatures(layer, features_dim)
