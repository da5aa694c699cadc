"""Worker of ``python -m benchmarks norms --against``: times the norm layers of another source tree on request.

The driver starts it as ``python benchmarks/_norms_worker.py`` with ``PYTHONPATH=<tree>``, so that
``manifoldnorm`` is that tree's; it imports nothing from ``benchmarks`` (the other tree may have another one, or
none). One JSON object per line in each direction, requests on stdin and replies on stdout (whatever else the
process prints goes to stderr)::

    {"op": "hello"}
        -> {"ok": true, "torch": "2.x", "manifoldnorm": "<path of the imported package>", "norms": [...] | null}
    {"op": "setup", "norm": "liebn_aim", "features": 16, "inputs": "<file written by torch.save>",
     "dtype": "float64", "threads": 1, "seed": 0, "clock": "cpu" | "wall",
     "kwargs": {"validate": false, "num_domains": 9}, "optional": ["validate", "num_domains"]}
        -> {"ok": true, "dropped": [...], "calls": c, "matrices": m}  or  {"ok": false, "error": "..."}
    {"op": "step"}
        -> {"ok": true, "s": <seconds of one training forward+backward>}
    {"op": "close"}
        -> (exits)

``setup`` seeds torch with ``seed``, builds ``create_norm_layer(norm, features, **kwargs)`` in ``dtype`` and
training mode, and loads ``X``, ``G`` (float64) and ``domain`` (``None`` or ``(N,)`` ids) from ``inputs``. A
keyword in ``optional`` that the tree's layer does not accept is dropped (and named in ``dropped``); a norm the
tree does not know is an ``ok: false`` reply, which the driver reports as n/a. ``calls``/``matrices``: the
batched decompositions (eigh, Cholesky, SVD, QR, LU, eig) that one training forward+backward of this tree's layer
runs, counted at the ATen level by a dispatch mode written here (the tree may have no counter of its own).

``step`` times exactly what the driver times for its own layer: gradients zeroed and a fresh leaf copy of ``X``
made outside the timed region, then ``(layer(X[, domain]) * G).sum().backward()`` on the requested clock
(``time.process_time``, process CPU summed over threads, or ``time.perf_counter``).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # the script's folder (benchmarks/) must not shadow top-level modules

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

DECOMPOSITIONS = {  # ATen overload packets that run a batched decomposition
    "_linalg_eigh", "linalg_eigh", "_linalg_eigvalsh", "linalg_eigvalsh", "linalg_eig", "linalg_eigvals",
    "linalg_cholesky_ex", "linalg_cholesky", "cholesky", "_linalg_svd", "linalg_svd", "linalg_svdvals",
    "linalg_qr", "linalg_lu_factor_ex", "linalg_lu", "_linalg_solve_ex", "linalg_inv_ex", "_linalg_det",
    "_linalg_slogdet",
}


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.matrices = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func.overloadpacket.__name__ in DECOMPOSITIONS and args and isinstance(args[0], torch.Tensor):
            self.calls += 1
            self.matrices += math.prod(args[0].shape[:-2])
        return func(*args, **(kwargs or {}))


class Worker:
    def __init__(self) -> None:
        self.layer = None
        self.call = None
        self.X = self.G = None
        self.clock = time.process_time

    def hello(self, req: dict) -> dict:
        import manifoldnorm

        try:
            from manifoldnorm.nn import list_norms
            norms = list(list_norms())
        except Exception:  # noqa: BLE001 - an old tree may have no registry listing
            norms = None
        return {"ok": True, "torch": torch.__version__, "manifoldnorm": os.path.dirname(manifoldnorm.__file__),
                "norms": norms}

    def _build(self, name: str, features: int, kwargs: dict, optional: list[str]) -> tuple[object, list[str]]:
        from manifoldnorm.nn import create_norm_layer

        kwargs, dropped = dict(kwargs), []
        while True:
            try:
                return create_norm_layer(name, features, **kwargs), dropped
            except TypeError as err:
                bad = next((k for k in optional if k in kwargs and re.search(rf"\b{k}\b", str(err))), None)
                if bad is None:
                    raise
                kwargs.pop(bad)
                dropped.append(bad)

    def setup(self, req: dict) -> dict:
        self.layer = self.call = None
        torch.set_num_threads(int(req["threads"]))
        self.clock = time.perf_counter if req.get("clock") == "wall" else time.process_time
        dtype = getattr(torch, req["dtype"])
        data = torch.load(req["inputs"], weights_only=True)
        torch.manual_seed(int(req["seed"]))
        layer, dropped = self._build(req["norm"], int(req["features"]), req.get("kwargs", {}),
                                     req.get("optional", []))
        layer = layer.to(dtype).train()
        self.X, self.G = data["X"].to(dtype), data["G"].to(dtype)
        domain = data.get("domain")
        self.layer = layer
        self.call = layer if domain is None else (lambda x: layer(x, domain))
        with _Count() as count:
            self._step()
        return {"ok": True, "dropped": dropped, "calls": count.calls, "matrices": count.matrices}

    def _step(self) -> float:
        self.layer.zero_grad(set_to_none=True)
        Xr = self.X.clone().requires_grad_()
        t0 = self.clock()
        (self.call(Xr) * self.G).sum().backward()
        return self.clock() - t0

    def step(self, req: dict) -> dict:
        if self.call is None:
            return {"ok": False, "error": "no layer set up"}
        return {"ok": True, "s": self._step()}


def main() -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints of the imported code go to stderr, never into the protocol
    sys.stdout = sys.stderr
    worker = Worker()
    for line in sys.stdin:
        req = json.loads(line)
        op = req.get("op")
        if op == "close":
            break
        try:
            reply = getattr(worker, op)(req) if op in ("hello", "setup", "step") else {
                "ok": False, "error": f"unknown op {op!r}"}
        except Exception as err:  # noqa: BLE001 - every failure is an answer (n/a in the driver's table)
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
        out.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
