"""``norms``: each Riemannian norm's training step beside its plain-autograd twin, its kernel floor and another tree.

    python -m benchmarks norms                          # default grid: float64/float32, 1 and 2 threads
    python -m benchmarks norms --quick                  # n=16, N=32, one thread, 5 rounds (smoke run)
    python -m benchmarks norms --large                  # adds 93x32 and 93x128
    python -m benchmarks norms --domains 9              # adds the domain-aware norms, 9 domains per batch
    python -m benchmarks norms --against HEAD~3         # another revision (checked out in a temporary worktree)
    python -m benchmarks norms --against /path/to/tree  # or another source tree
    python -m benchmarks norms --norms liebn_aim spdbn --sizes 20x32 --threads 1 --dtypes float64

Rows. One row per (norm, n, N, dtype, threads). The norms are :func:`default_norms` (every registered ``spd`` and
``lie`` norm that is not domain-aware); ``--domains D`` adds :func:`domain_norms` (``dsliebn_*``,
``spddsmbn``), fed a domain-id vector of ``D`` domains in equal shares, shuffled with a fixed seed. Layers are
built with ``validate=False`` (no Cholesky check of the input), seed 0, in training mode. Sizes ``nxN``:
:data:`SIZES` (n ∈ {16, 22, 32} × N ∈ {32, 64}, and 20x32, 20x128, 30x128), ``--large`` adds :data:`LARGE_SIZES`
(93x32, 93x128), ``--quick`` is :data:`QUICK_SIZES` (16x32).

Contenders, all timed in the same run, round-robin (one step of each in turn, each round starting one step
later, so that a slow phase of the shared machine hits all of them alike), median over the rounds:

* **ours**: one training step ``(layer(X) * G).sum().backward()`` on a fresh leaf copy of ``X``, gradients zeroed
  outside the timed region; it includes the update of the running statistics (which ``ref`` does not make).
* **ref**: the same step through ``layer.forward_ref``, the plain-autograd twin (``nn/_reference.py``: the
  ``*_ref`` spectral functions, i.e. ``torch.linalg``'s own backward, explicit inverses, no shared
  decompositions). A domain-aware layer whose ``forward_ref`` takes no domain is referenced by its non-domain
  twin (:data:`DOMAIN_TWINS`, same parameters) run on each domain's samples; n/a where a layer has none.
* **floor**: the decompositions our layer runs, and nothing else. One training step of our layer is recorded with
  :func:`manifoldnorm.functional.profile.count_decompositions` (every batched eigh, Cholesky, SVD, QR, LU call at
  the ATen level, forward and backward, with shapes and dtype); the floor step replays those calls as bare
  ``torch.linalg`` calls of the same kinds, shapes and dtype on fixed inputs, without autograd: ``eigh``
  (``eigvalsh`` for a values-only call), ``cholesky_ex``, ``svd`` (``svdvals``), ``qr``, ``lu_factor_ex`` for
  every LU-based op (solve, inverse, determinant), ``eig``; SPD inputs (condition number ≤ 25), random ones for
  SVD and QR. No layer that runs these decompositions can be faster; ``ours/floor`` is the price of everything
  around them (products, elementwise work, dispatch).
* **+ products** and **+ dispatch**: two higher floors that say where the rest of ``ours`` goes. The same
  recorded step also logs every ATen call (their number: "ATen ops") and the shapes of its dense products and
  triangular solves (``bmm``, ``mm``, ``baddbmm``, ``addmm``, ``linalg_solve_triangular``: "products").
  "+ products" replays the decompositions and then those products bare; "+ dispatch" adds one call of the
  cheapest allocating ATen op (an ``add`` of two one-element tensors) for every other ATen call of the step,
  i.e. the price of making that many eager calls from Python whatever they compute. Where ``(+ dispatch)/floor``
  already exceeds :data:`FLOOR_TARGET`, the floor target cannot be met with the step's number of ATen calls in
  eager mode; ``ours/(+ dispatch)`` is what is left (Python between the calls, autograd bookkeeping, the work of
  the elementwise ops beyond a one-element add).
* **bare** (LieBN-LCM, -LEM, -AIM without domains): the layer's formula alone in plain autograd
  (:mod:`benchmarks._bare`: Algorithm 1's output and running-statistics update, the running mean kept in the
  codomain; no checks, no SPD copy of the means, ``torch.linalg``'s own backward), equal to the layer in float64,
  running statistics included (``tests/benchmarks/test_bare.py``). ``ours/bare`` is the price of what
  the layer adds; with ``--against``, ``bare/old`` above a ``new/old`` target means no eager implementation with
  the formula's calls meets it (the verdict says so: "below the bare formula").
* **old** (``--against REV_OR_PATH``): the same layer (name, size, seed, inputs, dtype, threads) built from
  another source tree, timed by a persistent worker subprocess (``benchmarks/_norms_worker.py`` run with
  ``PYTHONPATH=<tree>``; a revision is checked out with ``git worktree add --detach`` in a temporary folder and
  removed afterwards). The driver sends the worker one step request per round, in turn with its own contenders,
  over a line protocol of JSON objects on the worker's stdin/stdout. A norm, or a keyword, that the other tree
  does not have gives n/a.

Each row runs this process and the ``--against`` worker on the same first ``threads`` CPUs (:func:`pinned_cpus`,
``--no-pin`` to leave them to the scheduler; the row's ``cpus``). Times are process CPU
(``time.process_time``, summed over all threads; ``--clock wall`` for wall time), rounds
adaptive (about :data:`BUDGET_S` seconds per row, 3 to 25 rounds; ``--repeats`` fixes them). Every ratio printed
(``ours/ref``, ``ours/floor``, ``new/old``) is a quotient of two medians of the same row of the same run. The only
targets judged are same-run ratios: ``ours/floor ≤`` :data:`FLOOR_TARGET` ("floor ok") and, with ``--against``,
``new/old ≤`` :data:`OLD_TARGETS` at the sizes named there.

:data:`PUBLISHED` keeps the times published for the authors' implementations (float64, one thread, measured on
another day on another machine and code base). They appear only in their own column, labelled with their source,
at the sizes where they exist; nothing is divided by them.

Every row also reports the relative error of the output and of the input gradient against ``forward_ref`` run in
float64 on a float64 copy of the layer (the twin for domain-aware layers), so a fast path never hides a wrong
answer. Input gradients are compared on the tangent space of the input manifold (the symmetric part for SPD
inputs, ``R skew(Rᵀ ∇)`` for rotations): the normal component is arbitrary, as the inputs never leave the
manifold. The cost of ``validate=True`` is timed once per norm at the first size, alternately with
``validate=False``.

Inputs, by ``get_norm_info(name).inputs``: ``"spd"``: ``(N, n, n)`` matrices ``Q diag(λ) Qᵀ`` with random
orthogonal ``Q`` and ``log λ`` uniform in ``[log 0.2, log 5]``; ``"so3"``: ``(N, J, 3, 3)`` random rotations with
``J = max(n // 3, 1)``, built as ``layer = factory(J)``.

JSON (``outputs/bench_norms.json``): ``{"suite", "torch", "timer", "validate", "floor_target", "old_targets",
"against", "published_note", "overhead": [...], "rows": [{"norm", "n", "N", "dtype", "threads", "domains",
"rounds", "ms", "ref_ms", "ours_over_ref", "floor_ms", "ours_over_floor", "floor_ok", "floor_prod_ms",
"ours_over_floor_prod", "floor_prod_over_floor", "floor_eager_ms", "ours_over_floor_eager", "floor_eager_over_floor",
"products", "aten_ops", "decompositions": {"calls",
"matrices", "by_kind", "shapes"}, "bare_ms", "ours_over_bare", "bare_over_old", "old_ms", "new_over_old",
"old_target", "old_met", "old_decompositions", "old_note", "out_rel_err", "grad_rel_err", "published_ms",
"published_source"}, ...]}`` (``old_*``: ``None``
without ``--against``).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks._bare import BARE, bare_call
from benchmarks._breakdown import breakdown
from benchmarks._harness import (
    ROOT,
    Clock,
    adaptive_repeats,
    chosen,
    default_out,
    dtype_name,
    env_info,
    fmt,
    md_table,
    round_robin,
    torch_threads,
    write_report,
)
from manifoldnorm.functional.profile import count_decompositions
from manifoldnorm.nn import create_norm_layer, get_norm_info, list_norms

SIZES = ((16, 32), (16, 64), (20, 32), (20, 128), (22, 32), (22, 64), (30, 128), (32, 32), (32, 64))
LARGE_SIZES = ((93, 32), (93, 128))
QUICK_SIZES = ((16, 32),)
#: Times published for the authors' implementations: fwd+bwd process-CPU ms, float64, one thread, measured on
#: another day, on another machine and code base. Shown in their own column with the source; never a denominator.
PUBLISHED = {
    (20, 32): {"liebn_aim": 7.3, "liebn_lem": 4.0, "liebn_lcm": 1.2, "spdbn": 6.8, "spdmbn": 6.0, "gbwbn": 33.0},
    (93, 128): {"liebn_aim": 575.0, "liebn_lem": 316.0, "liebn_lcm": 93.0},
}
PUBLISHED_SOURCES = {
    "liebn_aim": "LieBN toolbox (Chen et al. 2024)",
    "liebn_lem": "LieBN toolbox (Chen et al. 2024)",
    "liebn_lcm": "LieBN toolbox (Chen et al. 2024)",
    "spdbn": "SPDNet SPDBN code (Brooks et al. 2019)",
    "spdmbn": "TSMNet SPDMBN code (Kobler et al. 2022)",
    "gbwbn": "GBWBN code (Wang et al. 2025)",
}
PUBLISHED_NOTE = "published, other day/machine/code base; float64, one thread; shown beside, never divided by"
FLOOR_TARGET = 1.5  # ours/floor: at most this much time around the decompositions ("floor ok")
#: new/old targets with --against: norm -> (largest ours/old, largest n it applies to; None: every n)
OLD_TARGETS: dict[str, tuple[float, int | None]] = {
    "liebn_lcm": (0.6, 32), "liebn_lem": (0.7, 32), "liebn_aim": (0.7, 32),
}
#: domain-aware norm -> the non-domain norm whose ``forward_ref`` on each domain's samples is its reference
DOMAIN_TWINS = {"dsliebn_aim": "liebn_aim", "dsliebn_lem": "liebn_lem", "dsliebn_lcm": "liebn_lcm",
                "spddsmbn": "spdmbn"}
BUDGET_S = 1.0  # seconds (on the chosen clock) spent on the timed rounds of one row, all contenders together
SEED = 0
WORKER = Path(__file__).resolve().parent / "_norms_worker.py"
CLOCKS: dict[str, Clock] = {"cpu": time.process_time, "wall": time.perf_counter}


def default_norms() -> list[str]:
    """Registered ``spd`` and ``lie`` norms that are not domain-aware, sorted."""
    names = list_norms(kind="spd") + list_norms(kind="lie")
    return sorted(k for k in names if not get_norm_info(k).domain_aware)


def domain_norms() -> list[str]:
    """Registered ``spd`` and ``lie`` norms that are domain-aware (timed with ``--domains D``), sorted."""
    names = list_norms(kind="spd") + list_norms(kind="lie")
    return sorted(k for k in names if get_norm_info(k).domain_aware)


def parse_size(token: str) -> tuple[int, int]:
    """``"20x32"`` -> ``(n, N)``."""
    try:
        n, N = (int(v) for v in token.lower().split("x"))
    except ValueError:
        raise ValueError(f"a size is written nxN, e.g. 20x32; got {token!r}") from None
    if n < 1 or N < 1:
        raise ValueError(f"sizes must be positive, got {token!r}")
    return n, N


# ------------------------------------------------------------------------------------------------ inputs
def _random_spd(N: int, n: int, g: torch.Generator) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(N, n, n, generator=g, dtype=torch.float64))
    lam = torch.exp(torch.empty(N, n, dtype=torch.float64).uniform_(-1.609, 1.609, generator=g))
    X = (Q * lam.unsqueeze(-2)) @ Q.mT
    return 0.5 * (X + X.mT)


def _random_rotations(N: int, J: int, g: torch.Generator) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(N, J, 3, 3, generator=g, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)
    det = torch.linalg.det(Q)
    return torch.cat([Q[..., :2], Q[..., 2:] * det[..., None, None]], dim=-1)  # det +1


def make_case(name: str, n: int, N: int, seed: int = SEED) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(num_features, X, G)`` in float64 for norm ``name`` at size ``(n, N)``; ``G`` weights the output."""
    g = torch.Generator().manual_seed(seed)
    inputs = get_norm_info(name).inputs
    if "spd" in inputs:
        X, feats = _random_spd(N, n, g), n
    elif "so3" in inputs:
        feats = max(n // 3, 1)
        X = _random_rotations(N, feats, g)
    else:
        raise ValueError(f"norm {name!r} takes {inputs} inputs; the norms benchmark knows 'spd' and 'so3'")
    return feats, X, torch.randn(X.shape, generator=g, dtype=torch.float64)


def domain_ids(N: int, domains: int, seed: int = SEED) -> torch.Tensor:
    """``(N,)`` ids ``0..domains-1`` in equal shares (the first ``N % domains`` one more), shuffled with ``seed``."""
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.arange(N) % domains)[torch.randperm(N, generator=g)]


def build_layer(name: str, feats: int, domains: int | None, dtype: torch.dtype, validate: bool = False) -> nn.Module:
    """``create_norm_layer(name, feats, validate=...)`` (``num_domains`` for a domain row) seeded, in ``dtype``."""
    torch.manual_seed(SEED)
    kwargs = {"num_domains": domains} if domains else {}
    return create_norm_layer(name, feats, validate=validate, **kwargs).to(dtype).train()


def tangent(name: str, X: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Project an input gradient on the tangent space at ``X`` (symmetric part; ``X skew(Xᵀ grad)`` on SO(3))."""
    if "spd" in get_norm_info(name).inputs:
        return 0.5 * (grad + grad.mT)
    A = X.mT @ grad
    return X @ (0.5 * (A - A.mT))


# ------------------------------------------------------------------------------------- the contenders
def layer_call(layer: nn.Module, domain: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> layer(x)``, or ``layer(x, domain)`` for a domain row."""
    return layer if domain is None else partial(layer, domain=domain)


def reference_call(name: str, layer: nn.Module, feats: int,
                   domain: torch.Tensor | None) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module] | None:
    """The plain-autograd twin of ``layer`` as ``(x -> y, module holding its parameters)``; ``None`` if none.

    Without domains: ``layer.forward_ref``. For a domain row: ``layer.forward_ref(x, domain=...)`` if it takes a
    domain, else the :data:`DOMAIN_TWINS` norm with the layer's parameters, its ``forward_ref`` run on each
    domain's samples and the outputs put back in batch order.
    """
    ref = getattr(layer, "forward_ref", None)
    if domain is None:
        return (ref, layer) if callable(ref) else None
    if callable(ref) and "domain" in inspect.signature(ref).parameters:
        return partial(ref, domain=domain), layer
    twin_name = DOMAIN_TWINS.get(name)
    if twin_name is None:
        return None
    dtype = next(layer.parameters()).dtype
    twin = build_layer(twin_name, feats, None, dtype)
    if twin.load_state_dict(dict(layer.named_parameters()), strict=False).unexpected_keys:
        return None  # parameters the twin does not have: not the same layer
    groups = [torch.nonzero(domain == d).squeeze(1) for d in torch.unique(domain).tolist()]
    back = torch.argsort(torch.cat(groups))

    def per_domain(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([twin.forward_ref(x.index_select(0, idx)) for idx in groups])[back]

    return per_domain, twin


def train_step(fn: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, X: torch.Tensor, G: torch.Tensor,
               clock: Clock) -> Callable[[], float]:
    """A step returning the seconds of ``(fn(X') * G).sum().backward()`` on a fresh leaf ``X'`` (setup untimed)."""
    def step() -> float:
        module.zero_grad(set_to_none=True)
        Xr = X.clone().requires_grad_()
        t0 = clock()
        (fn(Xr) * G).sum().backward()
        return clock() - t0

    return step


class _ValuesOnly(TorchFunctionMode):
    """Marks the time spent inside ``torch.linalg.eigvalsh``/``svdvals``: under a dispatch mode they reach ATen as
    full ``_linalg_eigh``/``_linalg_svd`` calls (with vectors), which the floor must replay as values-only."""

    FUNCS = (torch.linalg.eigvalsh, torch.linalg.svdvals)

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        inside = func in self.FUNCS
        self.depth += inside
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.depth -= inside


class _Recorder(count_decompositions):
    """:func:`count_decompositions` that also keeps, per call, what the replay needs (values only, full SVD)."""

    def __init__(self, values_only: _ValuesOnly) -> None:
        super().__init__()
        self.values_only = values_only
        self.flags: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        before = len(self.log.calls)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if len(self.log.calls) > before:
            op = func.overloadpacket.__name__
            full = bool(args[1]) if op in ("_linalg_svd", "linalg_svd") and len(args) > 1 else False
            values = self.values_only.depth > 0 or op in ("_linalg_eigvalsh", "linalg_eigvalsh", "linalg_svdvals",
                                                          "linalg_eigvals")
            self.flags.append({"values_only": values, "full_matrices": full})
        return out


def record_decompositions(step: Callable[[], object]) -> list[dict]:
    """The batched decompositions of one call of ``step``: ``[{"kind", "op", "shape", "dtype", "values_only",
    "full_matrices"}, ...]`` in call order (forward and backward)."""
    values_only = _ValuesOnly()
    recorder = _Recorder(values_only)
    with values_only, recorder as log:
        step()
    return [{"kind": c.kind, "op": c.op, "shape": list(c.shape), "dtype": dtype_name(c.dtype), **f}
            for c, f in zip(log.calls, recorder.flags, strict=True)]


def summarize_decompositions(calls: Sequence[dict]) -> dict:
    """``{"calls", "matrices", "by_kind", "shapes"}`` of recorded calls (``shapes``: ``"kind shape"`` -> count)."""
    by_kind: dict[str, int] = {}
    shapes: dict[str, int] = {}
    matrices = 0
    for c in calls:
        by_kind[c["kind"]] = by_kind.get(c["kind"], 0) + 1
        key = f"{c['kind']}{'(values)' if c['values_only'] else ''} {'x'.join(map(str, c['shape']))}"
        shapes[key] = shapes.get(key, 0) + 1
        batch = 1
        for s in c["shape"][:-2]:
            batch *= s
        matrices += batch
    return {"calls": len(calls), "matrices": matrices, "by_kind": by_kind, "shapes": shapes}


def floor_calls(calls: Sequence[dict], seed: int = SEED) -> list[Callable[[], object]]:
    """Bare ``torch.linalg`` calls replaying ``calls`` (kinds, shapes, dtypes) on fixed inputs, one per call.

    Inputs are made once here (not timed), one per (shape, dtype, SPD or not), shared by the calls that need it.
    """
    g = torch.Generator().manual_seed(seed + 2)
    inputs: dict[tuple, torch.Tensor] = {}

    def matrix(shape: Sequence[int], dtype: torch.dtype, spd: bool) -> torch.Tensor:
        key = (tuple(shape), dtype, spd)
        if key not in inputs:
            *lead, m, k = shape
            batch = 1
            for s in lead:
                batch *= s
            if spd and m == k:
                A = _random_spd(batch, m, g)
            else:
                A = torch.randn(batch, m, k, generator=g, dtype=torch.float64)
            inputs[key] = A.reshape(*lead, m, k).to(dtype).contiguous()
        return inputs[key]

    replay: list[Callable[[], object]] = []
    for c in calls:
        dtype = getattr(torch, c["dtype"])
        kind = c["kind"]
        if kind == "eigh":
            fn = torch.linalg.eigvalsh if c["values_only"] else torch.linalg.eigh
            replay.append(partial(fn, matrix(c["shape"], dtype, True)))
        elif kind == "cholesky":
            replay.append(partial(torch.linalg.cholesky_ex, matrix(c["shape"], dtype, True)))
        elif kind == "svd":
            A = matrix(c["shape"], dtype, False)
            replay.append(partial(torch.linalg.svdvals, A) if c["values_only"]
                          else partial(torch.linalg.svd, A, full_matrices=c["full_matrices"]))
        elif kind == "qr":
            replay.append(partial(torch.linalg.qr, matrix(c["shape"], dtype, False)))
        elif kind == "lu":
            replay.append(partial(torch.linalg.lu_factor_ex, matrix(c["shape"], dtype, True)))
        elif kind == "eig":
            fn = torch.linalg.eigvals if c["values_only"] else torch.linalg.eig
            replay.append(partial(fn, matrix(c["shape"], dtype, True)))
        else:
            raise ValueError(f"no replay for decomposition kind {kind!r}")
    return replay


#: the dense products and triangular solves a step makes (ATen level): with the decompositions, the floor
#: "+ products" replays them
PRODUCT_OPS = {"bmm": "bmm", "mm": "mm", "baddbmm": "bmm", "addmm": "mm", "linalg_solve_triangular": "trsm"}


class _ProductRecorder(TorchDispatchMode):
    """Records every ATen call of a step (their number: ``ops``) and the shapes of its products and solves."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.products: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops += 1
        name = func.overloadpacket.__name__
        kind = PRODUCT_OPS.get(name)
        if kind is not None:
            if name in ("baddbmm", "addmm"):
                a, b = args[1], args[2]
            else:
                a, b = args[0], args[1]
            self.products.append({"kind": kind, "a": list(a.shape), "b": list(b.shape), "dtype": dtype_name(a.dtype),
                                  "upper": bool((kwargs or {}).get("upper", args[2] if len(args) > 2 else False))
                                  if kind == "trsm" else None,
                                  "left": bool((kwargs or {}).get("left", args[3] if len(args) > 3 else True))
                                  if kind == "trsm" else None})
        return func(*args, **(kwargs or {}))


def record_products(step: Callable[[], object]) -> tuple[list[dict], int]:
    """The dense products (``bmm``/``mm``) and triangular solves of one call of ``step`` and the number of ATen
    calls it makes in all (forward and backward)."""
    rec = _ProductRecorder()
    with rec:
        step()
    return rec.products, rec.ops


def product_calls(products: Sequence[dict], seed: int = SEED) -> list[Callable[[], object]]:
    """Bare replays of recorded products: ``torch.bmm``/``torch.mm`` and ``solve_triangular`` (a well-conditioned
    triangular factor) of the same shapes and dtype, on fixed inputs."""
    g = torch.Generator().manual_seed(seed + 3)
    out: list[Callable[[], object]] = []
    for p in products:
        dtype = getattr(torch, p["dtype"])
        A = torch.randn(p["a"], generator=g, dtype=torch.float64)
        B = torch.randn(p["b"], generator=g, dtype=torch.float64)
        if p["kind"] == "trsm":
            n = A.shape[-1]
            A = (torch.tril(A) if not p["upper"] else torch.triu(A)) * 0.1 + 2.0 * torch.eye(n, dtype=torch.float64)
            out.append(partial(torch.linalg.solve_triangular, A.to(dtype), B.to(dtype), upper=p["upper"],
                               left=p["left"]))
        else:
            out.append(partial(torch.bmm if p["kind"] == "bmm" else torch.mm, A.to(dtype), B.to(dtype)))
    return out


def dispatch_calls(count: int) -> list[Callable[[], object]]:
    """``count`` of the cheapest ATen calls that still allocate a result (an ``add`` of two one-element float64
    tensors): the cost of making that many calls from Python in eager mode, whatever they compute."""
    a, b = torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    return [partial(torch.add, a, b)] * max(count, 0)


def floor_step(calls: Sequence[Callable[[], object]], clock: Clock) -> Callable[[], float]:
    """A step returning the seconds of all replayed decompositions, one after the other, without autograd."""
    def step() -> float:
        with torch.no_grad():
            t0 = clock()
            for call in calls:
                call()
            return clock() - t0

    return step


# ------------------------------------------------------------------------------------ the other tree
class OtherTree:
    """The same norm layers built from another source tree, timed on request by a worker subprocess.

    ``spec`` is a folder holding a ``manifoldnorm`` package, or a git revision of this repository, which is checked
    out with ``git worktree add --detach`` in a temporary folder (removed by :meth:`close`). The worker
    (``_norms_worker.py``) runs with ``PYTHONPATH=<tree>`` only; :meth:`__init__` checks that it imported that
    tree's ``manifoldnorm``. Use as a context manager.
    """

    def __init__(self, spec: str, clock: str = "cpu") -> None:
        self.spec, self.clock = spec, clock
        self._worktree: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.error: str | None = None
        self.tmp: Path | None = None
        self.tree = self._resolve(spec)
        self.commit = self._git("-C", str(self.tree), "rev-parse", "HEAD")
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-norms-inputs-"))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(PYTHONPATH=str(self.tree), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], cwd=self.tree, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        hello = self.request({"op": "hello"})
        if not hello.get("ok"):
            self.close()
            raise RuntimeError(f"--against {spec}: the worker did not start: {hello.get('error')}")
        imported = Path(hello["manifoldnorm"]).resolve()
        if self.tree not in imported.parents:
            self.close()
            raise RuntimeError(f"--against {spec}: the worker imported manifoldnorm from {imported}, not from "
                               f"{self.tree} (an installed copy shadows PYTHONPATH?)")
        self.info = {"spec": spec, "tree": str(self.tree), "commit": self.commit, "torch": hello["torch"],
                     "manifoldnorm": str(imported), "worktree": self._worktree is not None}

    @staticmethod
    def _git(*args: str) -> str | None:
        proc = subprocess.run(["git", *args], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def _resolve(self, spec: str) -> Path:
        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "manifoldnorm" / "__init__.py").is_file():
                raise ValueError(f"--against {spec}: no manifoldnorm package in that folder")
            return path.resolve()
        rev = self._git("-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}")
        if rev is None:
            raise ValueError(f"--against {spec}: neither a folder nor a git revision of {ROOT}")
        tmp = Path(tempfile.mkdtemp(prefix="bench-norms-against-"))
        proc = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp), rev],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"--against {spec}: git worktree add failed: {proc.stderr.strip()}")
        self._worktree = tmp
        return tmp.resolve()

    def request(self, req: dict) -> dict:
        """Send one request, return the reply; a dead worker answers ``ok: false`` from then on."""
        if self.error is not None:
            return {"ok": False, "error": self.error}
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError) as err:
            line, self.error = "", f"worker gone: {err}"
        if not line:
            self.error = self.error or f"worker exited (code {self.proc.poll()})"
            return {"ok": False, "error": self.error}
        return json.loads(line)

    def setup(self, name: str, feats: int, X: torch.Tensor, G: torch.Tensor, domain: torch.Tensor | None,
              domains: int | None, dtype: torch.dtype, threads: int) -> dict:
        """Build the layer in the worker; the reply (``ok``, ``dropped``, ``calls``, ``matrices`` or ``error``)."""
        path = self.tmp / "inputs.pt"
        torch.save({"X": X, "G": G, "domain": domain}, path)
        kwargs = {"validate": False, **({"num_domains": domains} if domains else {})}
        return self.request({"op": "setup", "norm": name, "features": feats, "inputs": str(path),
                             "dtype": dtype_name(dtype), "threads": threads, "seed": SEED, "clock": self.clock,
                             "kwargs": kwargs, "optional": list(kwargs)})

    def step(self) -> float:
        """Seconds of one training step of the layer set up last (NaN if the worker failed)."""
        reply = self.request({"op": "step"})
        return float(reply["s"]) if reply.get("ok") else float("nan")

    def close(self) -> None:
        """Stop the worker, delete the input files and the temporary worktree (if a revision was checked out)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "close"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        if self._worktree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(self._worktree)],
                           capture_output=True)
            shutil.rmtree(self._worktree, ignore_errors=True)
            self._worktree = None

    def __enter__(self) -> OtherTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- accuracy
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm((a.double() - b).flatten()) / torch.linalg.norm(b.flatten()))


def _output_and_grad(fn: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor,
                     G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    Xr = X.clone().requires_grad_()
    y = fn(Xr)
    (y * G).sum().backward()
    return y.detach(), Xr.grad


def reference(name: str, layer64: nn.Module, feats: int, X: torch.Tensor, G: torch.Tensor,
              domain: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """float64 reference output and tangent input gradient (:func:`reference_call`); ``None`` without one."""
    probe = copy.deepcopy(layer64).train()
    ref = reference_call(name, probe, feats, domain)
    if ref is None:
        return None
    y, grad = _output_and_grad(ref[0], X, G)
    return y, tangent(name, X, grad)


def rel_errors(name: str, layer: nn.Module, X: torch.Tensor, G: torch.Tensor, domain: torch.Tensor | None,
               ref: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[float | None, float | None]:
    """(output, tangent input-gradient) relative errors of a fresh copy of ``layer`` in training mode vs ``ref``."""
    if ref is None:
        return None, None
    probe = copy.deepcopy(layer).train()
    y, grad = _output_and_grad(layer_call(probe, domain), X, G)
    return _rel(y, ref[0]), _rel(tangent(name, X.double(), grad.double()), ref[1])


# ------------------------------------------------------------------------------------------------- rows
def published(name: str, n: int, N: int, dtype: torch.dtype, threads: int,
              domains: int | None = None) -> tuple[float | None, str | None]:
    """``(ms, source)`` published for this row's setting (float64, one thread, no domains), else ``(None, None)``."""
    if dtype != torch.float64 or threads != 1 or domains:
        return None, None
    ms = PUBLISHED.get((n, N), {}).get(name)
    return (ms, PUBLISHED_SOURCES.get(name)) if ms is not None else (None, None)


def old_target(name: str, n: int) -> float | None:
    """The new/old target of ``name`` at size ``n`` (:data:`OLD_TARGETS`), ``None`` where none applies."""
    if name not in OLD_TARGETS:
        return None
    ratio, max_n = OLD_TARGETS[name]
    return ratio if max_n is None or n <= max_n else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (b > 0) or a != a:
        return None
    return round(a / b, 3)


def _median_ms(times: list[float] | None) -> float | None:
    if not times or any(t != t for t in times):
        return None
    return round(1e3 * statistics.median(times), 4)


def time_row(steps: dict[str, Callable[[], float]], rounds: int | None) -> tuple[dict[str, list[float]], int]:
    """Every step ``rounds`` times round-robin (each round starting one step later) after two untimed rounds;
    ``rounds=None``: as many as fit in about :data:`BUDGET_S` seconds, 3 to 25."""
    first = {k: step() for k, step in steps.items()}
    if rounds is None:
        rounds = adaptive_repeats(sum(v for v in first.values() if v == v), BUDGET_S, 3, 25)
    return round_robin(steps, rounds, warmup=1, rotate=True), rounds


def validation_overhead(fast: nn.Module, checked: nn.Module, X: torch.Tensor, G: torch.Tensor,
                        domain: torch.Tensor | None, repeats: int, clock: Clock) -> tuple[float, float]:
    """Median ms of ``validate=False`` and ``validate=True`` layers, timed alternately."""
    times = round_robin({"false": train_step(layer_call(fast, domain), fast, X, G, clock),
                         "true": train_step(layer_call(checked, domain), checked, X, G, clock)}, repeats, warmup=1)
    return 1e3 * statistics.median(times["false"]), 1e3 * statistics.median(times["true"])


def bench_norms(norms: Sequence[str], sizes: Sequence[tuple[int, int]], dtypes: Sequence[torch.dtype],
                threads: Sequence[int], repeats: int | None, domains: int | None = None,
                other: OtherTree | None = None, clock: str = "cpu",
                pin: bool = True) -> tuple[list[dict], list[dict]]:
    """Rows of the norms table and the ``validate=True`` overhead (first size, first dtype, first thread count)."""
    tick = CLOCKS[clock]
    rows, overhead = [], []
    for name in norms:
        dom = domains if get_norm_info(name).domain_aware else None
        for si, (n, N) in enumerate(sizes):
            feats, X64, G64 = make_case(name, n, N)
            d = domain_ids(N, dom) if dom else None
            ref64 = reference(name, build_layer(name, feats, dom, torch.float64), feats, X64, G64, d)
            for dtype in dtypes:
                layer = build_layer(name, feats, dom, dtype)
                X, G = X64.to(dtype), G64.to(dtype)
                errs = rel_errors(name, layer, X, G, d, ref64)
                ours = train_step(layer_call(layer, d), layer, X, G, tick)
                ours()  # one untimed step before recording (lazy setup is not part of a step)
                calls = record_decompositions(ours)
                products, aten_ops = record_products(ours)
                twin = reference_call(name, layer, feats, d)
                ref = train_step(twin[0], twin[1], X, G, tick) if twin is not None else None
                bare_twin = bare_call(name, layer) if d is None else None
                bare = train_step(bare_twin[0], layer, X, G, tick) if bare_twin is not None else None
                floor = floor_step(floor_calls(calls), tick)
                floor_prod = floor_step(floor_calls(calls) + product_calls(products), tick)
                others = aten_ops - len(products) - len(calls)
                floor_eager = floor_step(floor_calls(calls) + product_calls(products) + dispatch_calls(others), tick)
                for t in threads:
                    with torch_threads(t), pinned_cpus(t, other, pin) as cpus:
                        steps = {"ours": ours, **({"ref": ref} if ref is not None else {}),
                                 **({"bare": bare} if bare is not None else {}), "floor": floor,
                                 "floor_prod": floor_prod, "floor_eager": floor_eager}
                        old_reply = other.setup(name, feats, X64, G64, d, dom, dtype, t) if other else None
                        if old_reply is not None and old_reply.get("ok"):
                            steps["old"] = other.step
                        times, rounds = time_row(steps, repeats)
                        rows.append(_row(name, n, N, dtype, t, dom, rounds, times, calls, old_reply, errs,
                                         other is not None))
                        rows[-1].update(products=len(products), aten_ops=aten_ops, cpus=cpus)
                        if si == 0 and dtype == dtypes[0] and t == threads[0]:
                            checked = build_layer(name, feats, dom, dtype, validate=True)
                            ms_f, ms_v = validation_overhead(layer, checked, X, G, d, 5 if repeats else 15, tick)
                            overhead.append({"norm": name, "n": n, "N": N, "dtype": dtype_name(dtype),
                                             "threads": t, "domains": dom, "ms_validate_false": round(ms_f, 3),
                                             "ms_validate_true": round(ms_v, 3),
                                             "overhead_ms": round(ms_v - ms_f, 3)})
    return rows, overhead


def _row(name: str, n: int, N: int, dtype: torch.dtype, threads: int, domains: int | None, rounds: int,
         times: dict[str, list[float]], calls: Sequence[dict], old_reply: dict | None,
         errs: tuple[float | None, float | None], against: bool) -> dict:
    ms, ref_ms, floor_ms = (_median_ms(times.get(k)) for k in ("ours", "ref", "floor"))
    prod_ms = _median_ms(times.get("floor_prod"))
    eager_ms = _median_ms(times.get("floor_eager"))
    old_ms = _median_ms(times.get("old"))
    bare_ms = _median_ms(times.get("bare"))
    pub_ms, pub_src = published(name, n, N, dtype, threads, domains)
    floor_ratio = _ratio(ms, floor_ms)
    new_old = _ratio(ms, old_ms)
    target = old_target(name, n) if against else None
    note = None
    if old_reply is not None:
        note = old_reply.get("error") if not old_reply.get("ok") else (
            f"built without {', '.join(old_reply['dropped'])}" if old_reply.get("dropped") else None)
    return {
        "norm": name, "n": n, "N": N, "dtype": dtype_name(dtype), "threads": threads, "domains": domains,
        "rounds": rounds, "ms": ms, "ref_ms": ref_ms, "ours_over_ref": _ratio(ms, ref_ms),
        "floor_ms": floor_ms, "ours_over_floor": floor_ratio,
        "floor_ok": None if floor_ratio is None else bool(floor_ratio <= FLOOR_TARGET),
        "floor_prod_ms": prod_ms, "ours_over_floor_prod": _ratio(ms, prod_ms),
        "floor_prod_over_floor": _ratio(prod_ms, floor_ms),
        "floor_eager_ms": eager_ms, "ours_over_floor_eager": _ratio(ms, eager_ms),
        "floor_eager_over_floor": _ratio(eager_ms, floor_ms),
        "decompositions": summarize_decompositions(calls),
        "bare_ms": bare_ms, "ours_over_bare": _ratio(ms, bare_ms), "bare_over_old": _ratio(bare_ms, old_ms),
        "old_ms": old_ms, "new_over_old": new_old, "old_target": target,
        "old_met": None if target is None or new_old is None else bool(new_old <= target),
        "old_decompositions": ({"calls": old_reply["calls"], "matrices": old_reply["matrices"]}
                               if old_reply is not None and old_reply.get("ok") else None),
        "old_note": note,
        "out_rel_err": errs[0], "grad_rel_err": errs[1],
        "published_ms": pub_ms, "published_source": pub_src,
    }


# --------------------------------------------------------------------------------------------- printing
def _label(r: dict) -> str:
    """A row's norm, with its number of domains for a domain row."""
    return r["norm"] + (f" ({r['domains']} domains)" if r["domains"] else "")


def _below_bare(r: dict) -> bool:
    """Is the row's ``new/old`` target missed with the bare formula alone above it (``bare/old`` > target)?"""
    floor = r.get("bare_over_old")
    return r["old_met"] is False and floor is not None and floor > r["old_target"]


def _targets_cell(r: dict) -> str:
    parts = []
    if r["floor_ok"] is not None:
        parts.append(f"floor ≤{FLOOR_TARGET:g}×: {'ok' if r['floor_ok'] else 'not met'}")
    if r["old_target"] is not None:
        verdict = "n/a" if r["old_met"] is None else ("met" if r["old_met"] else "not met")
        if _below_bare(r):
            verdict += f", below the bare formula ({r['bare_over_old']:.2f}× old)"
        parts.append(f"new/old ≤{r['old_target']:g}×: {verdict}")
    return "; ".join(parts) or "—"


def markdown(rows: Sequence[dict], overhead: Sequence[dict] = (), against: str | None = None) -> str:
    """The norms table (and the ``validate=True`` overhead table) in Markdown."""
    head = ["norm", "n", "N", "dtype", "threads", "ms", "ref ms", "ours/ref", "bare ms", "ours/bare", "floor ms",
            "ours/floor",
            "decomp. calls / matrices", "+ products ms", "ours/(+ products)", "+ dispatch ms",
            "(+ dispatch)/floor", "ours/(+ dispatch)", "products / ATen ops"]
    if against:
        head += [f"old ms ({against})", "new/old", "bare/old", "old decomp."]
    head += ["out rel err", "grad rel err", "targets (same run)",
             "published ms, other day/machine (source)"]

    def cells(r: dict) -> list[str]:
        dec = r["decompositions"]
        out = [_label(r), r["n"], r["N"], r["dtype"], r["threads"], fmt(r["ms"], ".2f"), fmt(r["ref_ms"], ".2f"),
               fmt(r["ours_over_ref"], ".2f"), fmt(r.get("bare_ms"), ".2f", "—"),
               fmt(r.get("ours_over_bare"), ".2f", "—"),
               fmt(r["floor_ms"], ".2f"), fmt(r["ours_over_floor"], ".2f"),
               f"{dec['calls']} / {dec['matrices']}", fmt(r.get("floor_prod_ms"), ".2f"),
               fmt(r.get("ours_over_floor_prod"), ".2f"), fmt(r.get("floor_eager_ms"), ".2f"),
               fmt(r.get("floor_eager_over_floor"), ".2f"), fmt(r.get("ours_over_floor_eager"), ".2f"),
               f"{r.get('products', '—')} / {r.get('aten_ops', '—')}"]
        if against:
            old = r["old_decompositions"]
            out += [fmt(r["old_ms"], ".2f"), fmt(r["new_over_old"], ".2f"), fmt(r.get("bare_over_old"), ".2f", "—"),
                    "n/a" if old is None else f"{old['calls']} / {old['matrices']}"]
        pub = "—" if r["published_ms"] is None else f"{r['published_ms']:g} ({r['published_source']})"
        return [*out, fmt(r["out_rel_err"], ".1e"), fmt(r["grad_rel_err"], ".1e"), _targets_cell(r), pub]

    parts = [md_table(head, [cells(r) for r in rows])]
    notes = sorted({f"{r['norm']}: {r['old_note']}" for r in rows if r.get("old_note")})
    if notes:
        parts.append("Other tree: " + "; ".join(notes))
    if overhead:
        parts += ["validate=True overhead (input manifold check), timed alternately with validate=False:",
                  md_table(["norm", "n", "N", "dtype", "ms (validate=False)", "ms (validate=True)", "overhead ms"],
                           [[o["norm"], o["n"], o["N"], o["dtype"], f"{o['ms_validate_false']:.2f}",
                             f"{o['ms_validate_true']:.2f}", f"{o['overhead_ms']:+.2f}"] for o in overhead])]
    return "\n\n".join(parts)


@contextmanager
def pinned_cpus(count: int, other: OtherTree | None, enabled: bool = True) -> Iterator[list[int] | None]:
    """Run this process and the ``--against`` worker on the same first ``count`` CPUs they may use (restored
    afterwards); yields them, or ``None`` where nothing is pinned (disabled, not Linux, or ``count`` covers all).

    On a virtual machine whose cores are unequally slowed by the host (CPU steal), two processes left to the
    scheduler run on different cores at different speeds, and a ratio between them measures the cores: unpinned,
    ``new/old`` of one row (LieBN-LCM and -AIM, 20x32, float64, one thread) moved between 0.69 and 1.25 over three
    runs on a 2-core machine; pinned to one core, between 0.81 and 0.93. The contenders of this process run in turn
    on one thread and share a core either way."""
    cpus = sorted(os.sched_getaffinity(0)) if enabled and hasattr(os, "sched_setaffinity") else []
    if not cpus or count >= len(cpus):
        yield None
        return
    pids = [0] + ([other.proc.pid] if other is not None and other.proc is not None else [])
    for pid in pids:
        os.sched_setaffinity(pid, cpus[:count])
    try:
        yield cpus[:count]
    finally:
        for pid in pids:
            try:
                os.sched_setaffinity(pid, cpus)
            except ProcessLookupError:  # the worker has exited
                pass


def summary_markdown(rows: Sequence[dict]) -> str:
    """Per norm (and domain count), the range of each ratio over the rows of the table (sizes, dtypes, threads)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(_label(r), []).append(r)

    def span(rs: Sequence[dict], key: str, spec: str = ".2f") -> str:
        vals = [r.get(key) for r in rs]
        vals = [v for v in vals if v is not None]
        if not vals:
            return "—"
        lo, hi = min(vals), max(vals)
        return format(lo, spec) if format(lo, spec) == format(hi, spec) else f"{lo:{spec}}-{hi:{spec}}"

    out = []
    for name, rs in groups.items():
        judged = [r for r in rs if r.get("old_target") is not None]
        new_old = span(rs, "new_over_old")
        if judged:
            met = sum(bool(r["old_met"]) for r in judged)
            stopped = sum(_below_bare(r) for r in judged)
            new_old += (f" (target {judged[0]['old_target']:g}: met in {met} of {len(judged)} rows"
                        + (f"; bare formula above it in {stopped}" if stopped else "") + ")")
        calls = sorted({r.get("aten_ops") for r in rs if r.get("aten_ops") is not None})
        out.append([name, new_old, span(rs, "ours_over_bare"), span(rs, "bare_over_old"),
                    span(rs, "ours_over_floor"), span(rs, "floor_prod_over_floor"), span(rs, "floor_eager_over_floor"),
                    span(rs, "ours_over_floor_eager"),
                    "—" if not calls else (str(calls[0]) if len(calls) == 1 else f"{calls[0]}-{calls[-1]}")])
    return md_table(["norm", "new/old", "ours/bare", "bare/old", "ours/floor", "(+ products)/floor",
                     "(+ dispatch)/floor", "ours/(+ dispatch)", "ATen calls per step"], out)


def breakdown_markdown(rows: Sequence[dict]) -> str:
    """The ``--breakdown`` tables: one row per variant, then one per (norm, size) with the ms each variant saves."""
    full = md_table(["norm", "n", "N", "variant", "ms", "/ bare", "saved ms"],
                    [[r["norm"], r["n"], r["N"], r["variant"], f"{r['ms']:.2f}", f"{r['over_bare']:.2f}",
                      f"{r['saved_ms']:+.2f}"] for r in rows])
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["norm"], r["n"], r["N"]), {})[r["variant"]] = r
    variants = [v for v in next(iter(groups.values()), {}) if v not in ("layer", "bare formula")]
    pivot = md_table(["norm", "n x N", "layer ms", "bare ms", "layer / bare", *(f"{v}: saves ms" for v in variants)],
                     [[k[0], f"{k[1]}x{k[2]}", f"{g['layer']['ms']:.2f}", f"{g['bare formula']['ms']:.2f}",
                       f"{g['layer']['over_bare']:.2f}", *(f"{g[v]['saved_ms']:+.2f}" for v in variants)]
                      for k, g in groups.items()])
    return full + "\n\n" + pivot


def run_breakdown(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """``--breakdown``: per (norm, size), the layer, each variant of :mod:`benchmarks._breakdown` and the bare formula,
    round-robin in this process (first dtype, one thread, pinned to one CPU)."""
    norms = chosen(parser, args.norms, sorted(BARE)) if args.norms else sorted(BARE)
    try:
        sizes = [parse_size(t) for t in args.sizes] if args.sizes else list(QUICK_SIZES if args.quick else SIZES)
    except ValueError as err:
        parser.error(str(err))
    dtype, rounds = getattr(torch, args.dtypes[0]), args.repeats or (5 if args.quick else 150)
    rows = []
    with torch_threads(1), pinned_cpus(1, None, args.pin):
        for name in norms:
            for n, N in sizes:
                feats, X64, G64 = make_case(name, n, N)
                layer = build_layer(name, feats, None, dtype)
                for r in breakdown(name, layer, X64.to(dtype), G64.to(dtype), rounds, CLOCKS[args.clock]):
                    rows.append({"norm": name, "n": n, "N": N, "dtype": dtype_name(dtype), **r})
    print(breakdown_markdown(rows))
    meta = {**env_info("norms"), "mode": "breakdown", "rounds": rounds, "threads": 1,
            "timer": {"cpu": "time.process_time", "wall": "time.perf_counter"}[args.clock]}
    return write_report(args.out or default_out("norms_breakdown"), meta, rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks norms", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n=16, N=32, 1 thread, 5 rounds (smoke run)")
    parser.add_argument("--norms", nargs="+", default=None,
                        help="norm names (default: every non-domain-aware SPD/Lie norm; with --domains also the "
                             "domain-aware ones)")
    parser.add_argument("--sizes", nargs="+", default=None, help="nxN sizes, e.g. 16x32 93x128")
    parser.add_argument("--large", action="store_true", help="add 93x32 and 93x128 to the default sizes")
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch thread counts (default 1 2, --quick: 1)")
    parser.add_argument("--domains", type=int, default=None, metavar="D",
                        help="time the domain-aware norms too, on batches of D domains (e.g. 9)")
    parser.add_argument("--against", default=None, metavar="REV_OR_PATH",
                        help="also time the same layers from another source tree (a folder) or git revision")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: process CPU time, all threads (default); wall: wall-clock time")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per row (default: adaptive)")
    parser.add_argument("--breakdown", action="store_true",
                        help="only the LieBN layers with a bare formula: the layer with one safeguard switched off at "
                             "a time, beside the layer and the bare formula (where ours/bare goes)")
    parser.add_argument("--from-json", type=Path, default=None, metavar="REPORT",
                        help="print the table and the per-norm summary of a saved report (no timing)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin this process and the --against worker to the same CPUs (see pinned_cpus)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default outputs/bench_norms.json)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_json is not None:
        try:
            saved = json.loads(args.from_json.read_text())
        except (OSError, ValueError) as err:
            parser.error(f"--from-json {args.from_json}: cannot read a JSON report ({err})")
        if not isinstance(saved, dict) or saved.get("suite") != "norms" or "rows" not in saved:
            parser.error(f"--from-json {args.from_json}: not a report of the norms suite (its \"suite\" is "
                         f"{saved.get('suite') if isinstance(saved, dict) else None!r})")
        if saved.get("mode") == "breakdown":
            print(breakdown_markdown(saved["rows"]))
            return saved
        against = saved["against"]["spec"] if saved.get("against") else None
        print(markdown(saved["rows"], saved.get("overhead", ()), against))
        print("\n" + summary_markdown(saved["rows"]))
        return saved
    if args.breakdown:
        return run_breakdown(parser, args)
    if args.domains is not None and args.domains < 1:
        parser.error("--domains takes a positive number of domains")
    known = default_norms() + (domain_norms() if args.domains else [])
    norms = chosen(parser, args.norms, known)
    try:
        sizes = ([parse_size(t) for t in args.sizes] if args.sizes else
                 list(QUICK_SIZES if args.quick else SIZES) + list(LARGE_SIZES if args.large else ()))
    except ValueError as err:
        parser.error(str(err))
    threads = args.threads or ([1] if args.quick else [1, 2])
    repeats = args.repeats or (5 if args.quick else None)
    dtypes = [getattr(torch, d) for d in args.dtypes]
    try:
        other = OtherTree(args.against, args.clock) if args.against else None
    except (ValueError, RuntimeError) as err:
        parser.error(str(err))
    try:
        rows, overhead = bench_norms(norms, sizes, dtypes, threads, repeats, args.domains, other, args.clock,
                                     args.pin)
    finally:
        if other is not None:
            other.close()
    print(markdown(rows, overhead, args.against))
    print("\n" + summary_markdown(rows))
    meta = {**env_info("norms"),
            "timer": {"cpu": "time.process_time (process CPU, all threads)",
                      "wall": "time.perf_counter (wall)"}[args.clock],
            "validate": False, "floor_target": FLOOR_TARGET,
            "pinned": "each row's processes to its first `threads` CPUs" if args.pin else None,
            "old_targets": {k: {"max_ratio": r, "max_n": m} for k, (r, m) in OLD_TARGETS.items()},
            "against": other.info if other is not None else None, "published_note": PUBLISHED_NOTE,
            "overhead": overhead}
    return write_report(args.out or default_out("norms"), meta, rows)


if __name__ == "__main__":
    main()
