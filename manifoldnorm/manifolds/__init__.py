"""Riemannian manifolds for manifold-valued parameters (geoopt ``Manifold`` subclasses)."""

from .so import SpecialOrthogonal

__all__ = ["SpecialOrthogonal"]
