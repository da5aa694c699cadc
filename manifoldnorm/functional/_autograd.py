"""Once-differentiable custom autograd backwards that refuse a second derivative with an actionable message.

The custom ``torch.autograd.Function`` s of this package (spectral functions, BW operators, the polar projection,
the Cholesky maps) save a factorization computed outside autograd (eigenvectors, singular vectors, Cholesky
factors) and use it as a constant in their hand-written backward. Their first derivative is exact; a derivative of
that backward (double backward: Hessian-vector products, gradient penalties, ``torch.autograd.gradgradcheck``)
would silently miss the derivative of the factorization. :func:`once_differentiable` runs the backward without a
graph and, when a graph of the backward is requested (``create_graph=True``), returns gradients whose own backward
raises ``NotImplementedError`` naming the function and what to use instead, like
``torch.autograd.function.once_differentiable`` (whose message says neither). The refusing node is also attached
to the Function's inputs (through :func:`anchor_inputs`), so the second derivative is refused even where the
incoming gradient is a constant (an output entering the loss linearly), a case in which
``torch.autograd.function.once_differentiable`` leaves the gradient without a graph: it is then taken as a
constant, silently, when combined with other terms.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["once_differentiable", "anchor_inputs"]


class _RefuseSecondDerivative(torch.autograd.Function):
    """Identity on ``t`` whose backward raises; ``links`` only connect it to the graph of the Function's inputs."""

    @staticmethod
    def forward(ctx, t: Tensor, msg: str, *links: Tensor) -> Tensor:  # type: ignore[override]
        ctx.msg = msg
        return t.clone()

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        raise NotImplementedError(ctx.msg)


def anchor_inputs(ctx: Any, *inputs: Any) -> None:
    """Call in a custom Function's ``forward``: keep one-element, graph-connected stand-ins of the inputs that
    require grad (a clone of their first entry: no reference to their storage) for :func:`once_differentiable`."""
    with torch.enable_grad():
        ctx.anchors = tuple(t[(0,) * t.dim()].clone() for t in inputs
                            if isinstance(t, Tensor) and t.requires_grad and t.numel() > 0)


def once_differentiable(name: str | Callable[[Any], str], advice: str) -> Callable:
    """Decorate a custom Function's ``backward``: run it without a graph; refuse to differentiate its result.

    Parameters
    ----------
    name : str or callable
        The public function the message names, or ``name(ctx)`` returning it.
    advice : str
        What to use for second derivatives (one sentence, appended to the message).
    """

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx: Any, *grads: Any) -> Any:
            with torch.no_grad():
                out = backward(ctx, *grads)
            if not torch.is_grad_enabled():  # create_graph=False: the usual first derivative
                return out
            what = name(ctx) if callable(name) else name
            msg = (f"{what} is once differentiable: its hand-written backward uses a saved factorization (eigen, "
                   "singular or Cholesky) as a constant, so a second derivative through it (double backward, "
                   f"Hessian-vector product, gradient penalty, gradgradcheck) would be wrong and is refused. {advice}")

            links = (*getattr(ctx, "anchors", ()), *(g for g in grads if isinstance(g, Tensor) and g.requires_grad))

            def mark(t: Any) -> Any:
                if not isinstance(t, Tensor):
                    return t
                return _RefuseSecondDerivative.apply(t.detach().requires_grad_(), msg, *links)

            return tuple(mark(t) for t in out) if isinstance(out, tuple) else mark(out)

        return wrapper

    return decorate
