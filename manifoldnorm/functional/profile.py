r"""Count the matrix decompositions a piece of code runs (eigendecompositions, Cholesky, SVD, QR, LU).

The cost of a Riemannian layer on small matrices is dominated by its decompositions and by how many separate
(batched) calls it makes; :func:`count_decompositions` records every such call at the ATen level, so calls made
inside custom autograd functions and in the backward pass are seen too::

    with count_decompositions() as calls:
        layer(X).sum().backward()
    calls.count()                 # number of batched calls
    calls.matrices()              # number of matrices decomposed (batch sizes summed)
    calls.by_kind()               # {"eigh": 3, "cholesky": 1}

Benchmarks use it to build the kernel floor of a layer (the same decompositions timed alone); tests use it to
check that a layer's number of calls does not grow with, e.g., the number of domains in a batch.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Decomposition", "DecompositionLog", "count_decompositions", "DECOMPOSITION_OPS"]

#: ATen operator (overload packet name) -> kind of decomposition
DECOMPOSITION_OPS: dict[str, str] = {
    "_linalg_eigh": "eigh",
    "linalg_eigh": "eigh",
    "_linalg_eigvalsh": "eigh",
    "linalg_eigvalsh": "eigh",
    "linalg_eig": "eig",
    "linalg_eigvals": "eig",
    "linalg_cholesky_ex": "cholesky",
    "linalg_cholesky": "cholesky",
    "cholesky": "cholesky",
    "_linalg_svd": "svd",
    "linalg_svd": "svd",
    "linalg_svdvals": "svd",
    "linalg_qr": "qr",
    "linalg_lu_factor_ex": "lu",
    "linalg_lu": "lu",
    "_linalg_solve_ex": "lu",
    "linalg_inv_ex": "lu",
    "_linalg_det": "lu",
    "_linalg_slogdet": "lu",
}


@dataclass(frozen=True)
class Decomposition:
    """One batched decomposition call: its kind, the ATen op, the input shape and dtype."""

    kind: str
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def batch(self) -> int:
        """Number of matrices in the call (product of the leading dimensions)."""
        return math.prod(self.shape[:-2])


@dataclass
class DecompositionLog:
    """The calls recorded by :func:`count_decompositions`, in order."""

    calls: list[Decomposition] = field(default_factory=list)

    def count(self, kind: str | None = None) -> int:
        """Number of calls (of one ``kind`` if given)."""
        return sum(1 for c in self.calls if kind is None or c.kind == kind)

    def matrices(self, kind: str | None = None) -> int:
        """Number of matrices decomposed (of one ``kind`` if given)."""
        return sum(c.batch for c in self.calls if kind is None or c.kind == kind)

    def by_kind(self) -> dict[str, int]:
        """Calls per kind."""
        return dict(Counter(c.kind for c in self.calls))


class count_decompositions(TorchDispatchMode):  # noqa: N801 (used as a context manager, like a function)
    """Context manager recording every decomposition call; yields a :class:`DecompositionLog`."""

    def __init__(self) -> None:
        super().__init__()
        self.log = DecompositionLog()

    def __enter__(self) -> DecompositionLog:  # type: ignore[override]
        super().__enter__()
        return self.log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kind = DECOMPOSITION_OPS.get(func.overloadpacket.__name__)
        if kind is not None and args and isinstance(args[0], torch.Tensor):
            a = args[0]
            self.log.calls.append(Decomposition(kind, func.overloadpacket.__name__, tuple(a.shape), a.dtype))
        return func(*args, **(kwargs or {}))
