"""geoopt's Riemannian Adam with integer step counts that survive ``load_state_dict``, so a resumed run is exact."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import geoopt

from manifoldnorm.optim.registry import register_optimizer

__all__ = ["RiemannianAdam"]


class RiemannianAdam(geoopt.optim.RiemannianAdam):
    """``geoopt.optim.RiemannianAdam`` whose ``load_state_dict`` (and unpickling) keeps integer ``state["step"]``.

    geoopt keeps ``step`` as a Python int and computes the bias corrections ``1 - beta**step`` from it in double
    precision. ``torch.optim.Adam.__setstate__``, which ``load_state_dict`` and unpickling call, turns that int into
    a float32 tensor, so after a plain load the corrections are computed in float32 and the resumed run drifts
    from the uninterrupted one (about 1e-7 in float32 and float64 parameters alike). Here the ints are put back;
    the steps themselves are geoopt's, bit for bit. It is the registry's ``riemannian_adam``, so the composite
    optimizer and ``build_optimizer`` both resume exactly.
    """

    def __setstate__(self, state: dict[str, Any]) -> None:
        per_param = state.get("state", {})
        steps = {p: s["step"] for p, s in per_param.items() if isinstance(s, Mapping) and type(s.get("step")) is int}
        super().__setstate__(state)
        for p, step in steps.items():
            self.state[p]["step"] = step


# geoopt's Riemannian Adam reads only these group keys in its step (no fused/foreach/decoupled decay).
register_optimizer("riemannian_adam", RiemannianAdam, "riemannian",
                   keywords=("lr", "betas", "eps", "weight_decay", "amsgrad", "stabilize"))
