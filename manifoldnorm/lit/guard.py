"""Non-finite values in training: skip a non-finite step, stop a diverging run with one clear error.

:class:`NonFiniteGuard` (a Lightning callback, on by default in ``conf/callbacks/default.yaml``) tests the global
gradient norm once per optimizer step; a non-finite one never reaches the weights: the step is skipped (every
gradient set to ``None``, which all optimizers of the project leave untouched, state included) and counted, and
after ``max_consecutive_skips`` skips in a row the run stops with a :class:`NonFiniteError`. A layer that raises
during the training forward (an ``eigh`` that fails on a non-finite or degenerate matrix) is turned into the same
error by :func:`numerical_errors`, which the project's Lightning modules wrap around their training step. The
cause is diagnosed only on failure: non-finite parameters, non-finite input, and the first layer whose output is
non-finite (the training step re-run once with forward hooks; single-process runs only).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from manifoldnorm._dist import is_multiprocess
from manifoldnorm.optim.finite import drop_grads, grad_norm

__all__ = ["NonFiniteError", "NonFiniteGuard", "numerical_errors", "nonfinite_parameters", "first_nonfinite_output"]

log = logging.getLogger(__name__)

ADVICE = ("try a lower learning rate (optimizer.*.lr), gradient clipping (trainer.gradient_clip_val=1.0) or "
          "float64 matrix functions in the norms (norm.compute_dtype=float64)")


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient, parameter or layer output (the message says which, where)."""


def _kind(t: Tensor) -> str:
    """``"NaN"``, ``"inf"`` or ``"NaN and inf"`` for a tensor with non-finite entries."""
    nan, inf = bool(torch.isnan(t).any()), bool(torch.isinf(t).any())
    return "NaN and inf" if nan and inf else "NaN" if nan else "inf" if inf else "finite"


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _nonfinite(obj: Any) -> Tensor | None:
    """The first floating tensor in ``obj`` (tensor, or nested tuple/list/dict) with a non-finite entry."""
    for t in _tensors(obj):
        if t.is_floating_point() or t.is_complex():
            if not bool(torch.isfinite(t.detach()).all()):
                return t
    return None


def nonfinite_parameters(module: nn.Module) -> list[tuple[str, str]]:
    """``(name, "NaN" | "inf" | "NaN and inf")`` of every parameter of ``module`` with a non-finite entry."""
    return [(name, _kind(p.detach())) for name, p in module.named_parameters()
            if not bool(torch.isfinite(p.detach()).all())]


@dataclass
class _Forward:
    """What a re-run of the forward found: the first layer with a non-finite output, the layer that raised."""

    output: tuple[str, str] | None = None  # (layer, kind)
    raised: tuple[str, BaseException] | None = None  # (layer, error)
    loss: str | None = None  # kind of a non-finite loss


def _label(name: str, module: nn.Module) -> str:
    return f"'{name}' ({type(module).__name__})" if name else f"the top module ({type(module).__name__})"


def first_nonfinite_output(module: nn.Module, run: Any) -> _Forward:
    """Call ``run()`` (a forward of ``module``) with forward hooks on every submodule; report what failed first.

    Returns the first submodule (in completion order, so the innermost) whose output has a non-finite entry, the
    innermost one that raised (with its error), and the kind of a non-finite result of ``run()``. Buffers (running
    statistics) are restored afterwards; parameters are not touched (the call runs under ``torch.no_grad``).
    """
    found = _Forward()
    stack: list[str] = []
    names = {m: n for n, m in module.named_modules()}

    def pre(mod: nn.Module, args: Any) -> None:
        stack.append(_label(names[mod], mod))

    def post(mod: nn.Module, args: Any, out: Any) -> None:
        label = stack.pop() if stack else _label(names[mod], mod)
        if found.output is None and (bad := _nonfinite(out)) is not None:
            found.output = (label, _kind(bad.detach()))

    handles = [m.register_forward_pre_hook(pre) for m in names] + [m.register_forward_hook(post) for m in names]
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    try:
        with torch.no_grad():
            result = run()
        if (bad := _nonfinite(result)) is not None:
            found.loss = _kind(bad)
    except Exception as err:  # noqa: BLE001 - the error is reported, not swallowed
        found.raised = (stack[-1] if stack else "the training step", err)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, b in module.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
    return found


def _rerun_training_step(pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> _Forward:
    """Re-run ``training_step`` on ``batch`` with logging off and hooks on; see :func:`first_nonfinite_output`."""
    pl_module.__dict__["_nonfinite_rerun"] = True
    pl_module.__dict__["log"] = lambda *args, **kwargs: None
    pl_module.__dict__["log_dict"] = lambda *args, **kwargs: None
    try:
        return first_nonfinite_output(pl_module, lambda: pl_module.training_step(batch, batch_idx))
    finally:
        for key in ("_nonfinite_rerun", "log", "log_dict"):
            pl_module.__dict__.pop(key, None)


def _where(pl_module: pl.LightningModule, batch_idx: int | None) -> str:
    trainer = pl_module._trainer
    if trainer is None:
        return "in training" if batch_idx is None else f"at batch {batch_idx}"
    tail = "" if batch_idx is None else f", batch {batch_idx}"
    return f"at training step {trainer.global_step} (epoch {trainer.current_epoch}{tail})"


def _first_param(bad: list[tuple[str, str]]) -> str:
    name, kind = bad[0]
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    return f"'{name}' ({kind}){more}"


def _diagnosis(pl_module: pl.LightningModule, batch: Any, batch_idx: int | None) -> tuple[list[str], _Forward]:
    """Causes found on failure: non-finite parameters and input, then a re-run of the training step with hooks."""
    causes = []
    bad = nonfinite_parameters(pl_module)
    if bad:
        causes.append(f"non-finite parameter {_first_param(bad)}")
    if batch is not None and (t := _nonfinite(batch)) is not None:
        causes.append(f"the input batch contains {_kind(t)}")
    fwd = _Forward()
    if batch is not None and batch_idx is not None and not _multiprocess():
        fwd = _rerun_training_step(pl_module, batch, batch_idx)
        if fwd.output is not None:
            causes.append(f"first non-finite layer output: {fwd.output[1]} in {fwd.output[0]}")
    return causes, fwd


def _multiprocess() -> bool:
    """In a multi-process run the re-run is left out: a synchronized norm would start collectives on one rank."""
    return is_multiprocess()


def _grad_scaler(trainer: pl.Trainer | None) -> Any:
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None)


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__.lstrip('_')}: {lines[0].rstrip('.') if lines else ''}"


@contextlib.contextmanager
def numerical_errors(pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> Iterator[None]:
    """Turn a numerical failure of the training forward into one :class:`NonFiniteError` line.

    A ``torch.linalg.LinAlgError`` (e.g. ``eigh`` that does not converge) always, and a ``ValueError`` when a
    parameter, the input or a layer output is non-finite (e.g. a layer's non-SPD input check), become a
    :class:`NonFiniteError` that names the layer that raised, the step, the non-finite values found and what to
    try; any other ``ValueError`` (a real input error, with its own message) passes unchanged. Costs nothing
    unless the step raises: the diagnosis (a re-run of the step with forward hooks) runs only then.
    """
    try:
        yield
    except (torch.linalg.LinAlgError, ValueError) as err:
        if pl_module.__dict__.get("_nonfinite_rerun"):
            raise
        causes, fwd = _diagnosis(pl_module, batch, batch_idx)
        if not causes and not isinstance(err, torch.linalg.LinAlgError):
            raise
        layer = fwd.raised[0] if fwd.raised is not None else "a layer"
        cause = "; ".join(causes) if causes else "all parameters, the input and the layer outputs before it finite"
        raise NonFiniteError(
            f"training diverged {_where(pl_module, batch_idx)}: {layer} raised {_one_line(err)}; {cause}; "
            f"{ADVICE}"
        ) from err


class NonFiniteGuard(pl.Callback):
    """Skip optimizer steps with a non-finite gradient; stop the run after ``max_consecutive_skips`` in a row.

    Before each optimizer step (``on_before_optimizer_step``, after the backward and before gradient clipping)
    the global gradient norm of the optimizer's parameters is computed in one fused call
    (:func:`manifoldnorm.optim.grad_norm`) and tested with one host synchronization. If it is NaN or inf
    (including a float32 sum of squares that overflows), every gradient of that optimizer is set to ``None``:
    the optimizer step leaves all weights and their optimizer state (moments, step counts) unchanged, and the
    clipping that follows has nothing to clip. The skip is counted and logged as a warning line; the totals are
    logged once per epoch as ``train/skipped_steps``. The scheduler and ``trainer.global_step`` still advance.

    After ``max_consecutive_skips`` skipped steps in a row, or at the first skip if a parameter is already
    non-finite (skipping cannot repair it), the run stops with a :class:`NonFiniteError` naming what went
    non-finite (loss, gradient, parameter, a layer's output), the step, the parameter or layer, and what to try.
    Before validation and before every checkpoint is written the parameters are tested too (once per epoch), so
    a checkpoint never holds non-finite weights: ``last.ckpt`` stays the last good one.

    Parameters
    ----------
    max_consecutive_skips : int
        Skipped steps in a row that stop the run (>= 1).

    Notes
    -----
    Deviation: geoopt's ``RiemannianSGD`` counts a skipped step in its group step counter (used only for its
    ``stabilize`` period); every other optimizer's state is untouched. In DDP the gradients are already
    all-reduced, so every process takes the same decision. With float16 mixed precision (a ``GradScaler``) an
    overflowing gradient after a finite loss is the scaler's business (it skips the step and lowers its
    scale): such steps are neither skipped again nor counted; a non-finite loss is.
    """

    def __init__(self, max_consecutive_skips: int = 5) -> None:
        super().__init__()
        if isinstance(max_consecutive_skips, bool) or not isinstance(max_consecutive_skips, int) \
                or max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be an int >= 1, got {max_consecutive_skips!r}")
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped = 0
        self.consecutive = 0
        self._batch: tuple[Any, int] | None = None
        self._loss: Tensor | None = None

    # ----------------------------------------------------------------- per step (cheap)
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch = (batch, batch_idx)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = grad_norm(params)
        if bool(torch.isfinite(norm).item()):
            self.consecutive = 0
            return
        if _grad_scaler(trainer) is not None and (self._loss is None or bool(torch.isfinite(self._loss).all())):
            return  # float16 loss scaling: the GradScaler skips an overflowing step and lowers its scale itself
        reason = self._gradient_reason(pl_module, params)
        drop_grads(params)
        self.skipped += 1
        self.consecutive += 1
        bad_params = nonfinite_parameters(pl_module)
        if bad_params or self.consecutive >= self.max_consecutive_skips:
            raise self._error(pl_module, reason, stopped=not bad_params)
        log.warning("NonFiniteGuard: skipped the optimizer step %s: %s (%d in a row; the run stops at %d)",
                    _where(pl_module, self._batch[1] if self._batch else None), reason, self.consecutive,
                    self.max_consecutive_skips)

    # ----------------------------------------------------------------- per epoch / checkpoint
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=False, on_epoch=True)
        self._check_parameters(pl_module, "at the end of the training epoch")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._check_parameters(pl_module, "before validation")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._check_parameters(pl_module, "before writing a checkpoint (none was written)")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))

    # ----------------------------------------------------------------- diagnosis (only on failure)
    def _gradient_reason(self, pl_module: pl.LightningModule, params: list[Tensor]) -> str:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        bad = [(names.get(id(p), f"of shape {tuple(p.shape)}"), _kind(p.grad)) for p in params
               if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        if bad:
            what = f"non-finite gradient in {_first_param(bad)}"
        else:
            top = max((p for p in params if p.grad is not None), key=lambda p: float(p.grad.abs().max()))
            what = (f"gradient norm overflows {top.grad.dtype} (largest entry {float(top.grad.abs().max()):.3g} in "
                    f"'{names.get(id(top), tuple(top.shape))}')")
        if self._loss is not None and not bool(torch.isfinite(self._loss).all()):
            what = f"non-finite loss ({_kind(self._loss)}), hence {what}"
        return what

    def _error(self, pl_module: pl.LightningModule, reason: str, stopped: bool) -> NonFiniteError:
        batch, batch_idx = self._batch if self._batch is not None else (None, None)
        causes, fwd = _diagnosis(pl_module, batch, batch_idx)
        if fwd.raised is not None:
            causes.append(f"{fwd.raised[0]} raises {_one_line(fwd.raised[1])}")
        head = (f"{self.consecutive} steps skipped in a row (max_consecutive_skips={self.max_consecutive_skips})"
                if stopped
                else "a parameter is non-finite, skipping steps cannot repair it")
        cause = f" ({'; '.join(causes)})" if causes else ""
        return NonFiniteError(f"training diverged {_where(pl_module, batch_idx)}: {reason}{cause}; {head}; "
                              f"the last checkpoint written holds the last finite weights; {ADVICE}")

    def _check_parameters(self, pl_module: pl.LightningModule, when: str) -> None:
        params = [p.detach() for p in pl_module.parameters()]
        if not params or bool(torch.isfinite(torch.nn.utils.get_total_norm(params, error_if_nonfinite=False)).item()):
            return
        bad = nonfinite_parameters(pl_module)  # empty if only the norm of finite weights overflowed
        if not bad:
            return
        raise NonFiniteError(f"training diverged {_where(pl_module, None)}: non-finite parameter {_first_param(bad)} "
                             f"{when}; the last checkpoint written holds the last finite weights; {ADVICE}")

    def __repr__(self) -> str:
        return f"NonFiniteGuard(max_consecutive_skips={self.max_consecutive_skips})"

