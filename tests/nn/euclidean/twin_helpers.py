"""A float64 twin of a layer: the same training step in float64 is the reference for any input dtype."""

from __future__ import annotations

import copy

import torch

F64 = torch.float64


def float64_twin(layer: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``layer`` in its current state (take it before the step under test)."""
    return copy.deepcopy(layer).to(F64)


def assert_step_matches_twin(layer: torch.nn.Module, twin: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                             upstream: torch.Tensor | None = None, tol: float | None = None, **kw) -> None:
    """After ``y = layer(x, **kw)`` and ``(y * upstream).sum().backward()`` (``upstream=None``:
    ``y.square().sum()``): the twin's step gives the same output, input and parameter gradients and buffers
    (updated in forward and backward), up to the round-off of x's dtype (or of the tensor's own dtype).
    """
    def tol_for(t: torch.Tensor) -> float:  # the round-off of the input dtype or of the tensor's own dtype
        return tol if tol is not None else (1e-12 if x.dtype == F64 and t.dtype == F64 else 2e-5)

    low = copy.deepcopy(twin).float()  # the same step in float32, before the twin's step changes its state
    x64 = x.detach().to(F64).requires_grad_()
    y64 = twin(x64, **kw)
    if x.dtype == F64:  # float64 input is computed in float64: closer to the truth than the float32 computation
        y32 = low(x.detach().float(), **kw).detach().to(F64)
        torch.testing.assert_close(y32, y64.detach(), rtol=1e-4, atol=1e-4)
        assert not torch.equal(y32, y64.detach()), "a float64 input gave float32 results: computed in float32?"
    (y64.square() if upstream is None else y64 * upstream.detach().to(F64)).sum().backward()
    t = tol_for(y)
    torch.testing.assert_close(y.detach().to(F64), y64.detach(), rtol=t, atol=t, msg=lambda m: f"output: {m}")
    t = 10 * tol_for(x.grad)
    torch.testing.assert_close(x.grad.to(F64), x64.grad, rtol=t, atol=t, msg=lambda m: f"input gradient: {m}")
    for (k, p), p64 in zip(layer.named_parameters(), twin.parameters(), strict=True):
        t = 10 * tol_for(p.grad)
        torch.testing.assert_close(p.grad.to(F64), p64.grad, rtol=t, atol=t, msg=lambda m, k=k: f"{k}: {m}")
    for (k, b), b64 in zip(layer.named_buffers(), twin.buffers(), strict=True):
        t = tol_for(b)
        torch.testing.assert_close(b.to(b64.dtype), b64, rtol=t, atol=t, msg=lambda m, k=k: f"{k}: {m}")
