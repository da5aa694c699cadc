"""Where a LieBN layer's time over its bare formula goes: the layer timed with one safeguard switched off at a time.

For ``python -m benchmarks norms --breakdown``. Each variant is the layer's training step with one part replaced
by a no-op while it runs (and restored at once), timed round-robin with the unchanged layer and the bare formula
(:mod:`benchmarks._bare`) in one process:

* ``no input check``: the NaN/Inf test of the input (:func:`manifoldnorm.functional.check_finite`, one reduction
  and a host synchronisation);
* ``no domain checks``: the eigenvalue-domain and finite-gradient tests of the fused kernels and the Karcher flow
  (``_check_domain``, ``_check_grad``: a reduction and a host synchronisation each);
* ``no second-derivative refusal``: the graph links of :func:`manifoldnorm.functional._autograd.anchor_inputs`;
* ``no statistics update``: the whole running-statistics update, SPD copies of the means included (the bare
  formula makes its own, cheaper update, so this variant does less than the formula);
* ``no degenerate test``: the test for a degenerate batch (its cheap sufficient form and the exact one).

The variants are wrong layers (no checks, or no statistics): they only measure, never train.
"""

from __future__ import annotations

import contextlib
import importlib
import statistics
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import nn

from benchmarks._bare import bare_call
from benchmarks._harness import round_robin

#: variant -> (module, attribute) pairs replaced by a no-op; ``"stats"`` stands for the layer's ``_update_stats``
SWITCHES: dict[str, tuple[tuple[str, str], ...]] = {
    "no input check": (("manifoldnorm.functional", "check_finite"),),
    "no domain checks": (("manifoldnorm.functional._liebn_ops", "_check_domain"),
                         ("manifoldnorm.functional._liebn_ops", "_check_grad"),
                         ("manifoldnorm.functional.spd_aim", "_check_domain")),
    "no second-derivative refusal": (("manifoldnorm.functional._liebn_ops", "anchor_inputs"),),
    "no statistics update": (("layer", "_update_stats"),),
    "no degenerate test": (("manifoldnorm.functional._liebn_ops", "_spread_rules_out_degenerate"),),
}
#: what a switched-off part returns
_NOOP: dict[str, Callable] = {
    "check_finite": lambda X, name="input": X,
    "_spread_rules_out_degenerate": lambda sq, M: True,
}


@contextlib.contextmanager
def switched_off(variant: str, layer: nn.Module) -> Iterator[None]:
    """Replace the parts of ``variant`` by no-ops while the block runs."""
    saved = []
    try:
        for mod_name, attr in SWITCHES[variant]:
            owner = layer if mod_name == "layer" else importlib.import_module(mod_name)
            saved.append((owner, attr, owner.__dict__.get(attr, None), attr in owner.__dict__))
            setattr(owner, attr, _NOOP.get(attr, lambda *a, **k: None))
        yield
    finally:
        for owner, attr, value, had in reversed(saved):
            if had:
                setattr(owner, attr, value)
            else:
                delattr(owner, attr)


def breakdown(name: str, layer: nn.Module, X: torch.Tensor, G: torch.Tensor, rounds: int,
              clock: Callable[[], float]) -> list[dict]:
    """Median ms of the layer, each variant and the bare formula, round-robin; rows with ``over_bare``."""
    from benchmarks.norms import train_step  # the norms suite's timed step (norms imports this module)

    twin = bare_call(name, layer)
    if twin is None:
        return []
    step = train_step(layer, layer, X, G, clock)

    def variant_step(variant: str) -> float:
        with switched_off(variant, layer):  # forward and backward (the kernels check in both)
            return step()

    steps: dict[str, Callable[[], float]] = {"layer": step}
    steps.update({v: partial(variant_step, v) for v in SWITCHES})
    steps["bare formula"] = train_step(twin[0], layer, X, G, clock)
    med = {k: 1e3 * statistics.median(v) for k, v in round_robin(steps, rounds, warmup=1, rotate=True).items()}
    return [{"variant": k, "ms": round(ms, 4), "over_bare": round(ms / med["bare formula"], 3),
             "saved_ms": round(med["layer"] - ms, 4)} for k, ms in med.items()]
