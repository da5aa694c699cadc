"""``norms``: forward+backward time and accuracy of every Riemannian norm layer, beside the published times.

    python -m benchmarks norms                                  # full grid, a few minutes on 2 cores
    python -m benchmarks norms --quick                          # n=20, N=32, few repeats
    python -m benchmarks norms --norms liebn_aim spdbn --sizes 20x32 93x128 --threads 1 --dtypes float64

The norms are :func:`default_norms`: every registered SPD and Lie-group norm (``list_norms(kind="spd")`` and
``kind="lie"``) that is not domain-aware (the domain-specific twins ``dsliebn_*``/``spddsmbn`` time the same math
per domain). For each it times one training-mode forward+backward (``(layer(X) * G).sum().backward()``) on a
fixed, well-conditioned batch, as the median process CPU time (``time.process_time``, summed over all threads, as
the published numbers) over adaptive repeats after warm-up; the wall time is kept as well. Layers are built with
``validate=False`` (no Cholesky check of the input: the published code has none); the cost of ``validate=True``
is reported once per norm at the first size.

Every row also reports the relative error of the output and of the input gradient against the layer's
``forward_ref`` (an independent plain-autograd path) run in float64 on a float64 copy of the layer, so a fast path
never hides a wrong answer; ``n/a`` where a layer has no ``forward_ref``. Input gradients are compared on the
tangent space of the input manifold (the symmetric part for SPD inputs, ``R skew(Rᵀ ∇)`` for rotations): the
normal component is arbitrary, as the inputs never leave the manifold.

Inputs, by ``get_norm_info(name).inputs``: ``"spd"``: ``(N, n, n)`` matrices ``Q diag(λ) Qᵀ`` with random
orthogonal ``Q`` and ``log λ`` uniform in ``[log 0.2, log 5]`` (condition number ≤ 25); ``"so3"``: ``(N, J, 3, 3)``
random rotations with ``J = max(n // 3, 1)`` (a sample is then a block-diagonal ``3J × 3J ≈ n × n`` matrix of
rotation blocks), built as ``layer = factory(J)``.

JSON: ``{"suite", "torch", "timer", "validate", "overhead": [...], "floors": [...], "rows": [{"norm", "n", "N",
"dtype", "threads", "ms", "wall_ms", "repeats", "published_ms", "ratio", "target", "met", "out_rel_err",
"grad_rel_err"}, ...]}``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn

from benchmarks._harness import (
    adaptive_repeats,
    chosen,
    default_out,
    dtype_name,
    env_info,
    fmt,
    md_table,
    median_ms,
    round_robin,
    timed,
    torch_threads,
    write_report,
)
from manifoldnorm.nn import create_norm_layer, get_norm_info, list_norms

SIZES = ((20, 32), (20, 128), (30, 32), (30, 128), (93, 32), (93, 128))
QUICK_SIZES = ((20, 32),)
# published fwd+bwd process-CPU ms (float64, one thread) of the reference implementations
PUBLISHED = {
    (20, 32): {"liebn_aim": 7.3, "liebn_lem": 4.0, "liebn_lcm": 1.2, "spdbn": 6.8, "spdmbn": 6.0, "gbwbn": 33.0},
    (93, 128): {"liebn_aim": 575.0, "liebn_lem": 316.0, "liebn_lcm": 93.0},
}
TARGETS = {"liebn_lcm": 0.8}  # target time / published time; 0.5 otherwise
DEFAULT_TARGET = 0.5
BUDGET_S = 0.6  # process CPU seconds spent on the timed repeats of one row (adaptive repeat count)


def default_norms() -> list[str]:
    """Registered ``spd`` and ``lie`` norms that are not domain-aware, sorted."""
    names = list_norms(kind="spd") + list_norms(kind="lie")
    return sorted(k for k in names if not get_norm_info(k).domain_aware)


def parse_size(token: str) -> tuple[int, int]:
    """``"20x32"`` -> ``(n, N)``."""
    try:
        n, N = (int(v) for v in token.lower().split("x"))
    except ValueError:
        raise ValueError(f"a size is written nxN, e.g. 20x32; got {token!r}") from None
    if n < 1 or N < 1:
        raise ValueError(f"sizes must be positive, got {token!r}")
    return n, N


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


def make_case(name: str, n: int, N: int, seed: int = 0) -> tuple[int, torch.Tensor, torch.Tensor]:
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


def tangent(name: str, X: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Project an input gradient on the tangent space at ``X`` (symmetric part; ``X skew(Xᵀ grad)`` on SO(3))."""
    if "spd" in get_norm_info(name).inputs:
        return 0.5 * (grad + grad.mT)
    A = X.mT @ grad
    return X @ (0.5 * (A - A.mT))


def _step(layer: nn.Module, X: torch.Tensor, G: torch.Tensor, fn: Callable | None = None) -> torch.Tensor:
    Xr = X.clone().requires_grad_()
    ((fn or layer)(Xr) * G).sum().backward()
    return Xr.grad


def time_layer(layer: nn.Module, X: torch.Tensor, G: torch.Tensor, repeats: int | None,
               warmup: int = 2) -> tuple[float, float, int]:
    """Median process-CPU and wall ms of a training forward+backward; ``repeats=None`` chooses it adaptively."""
    layer.train()
    for _ in range(warmup):
        layer.zero_grad(set_to_none=True)
        t0 = time.process_time()
        _step(layer, X, G)
        first = time.process_time() - t0
    if repeats is None:
        repeats = adaptive_repeats(first, BUDGET_S, 3, 25)
    cpu, wall = [], []
    for _ in range(repeats):
        layer.zero_grad(set_to_none=True)
        c0, w0 = time.process_time(), time.perf_counter()
        _step(layer, X, G)
        cpu.append((time.process_time() - c0) * 1e3)
        wall.append((time.perf_counter() - w0) * 1e3)
    return statistics.median(cpu), statistics.median(wall), repeats


def validation_overhead(fast: nn.Module, checked: nn.Module, X: torch.Tensor, G: torch.Tensor,
                        repeats: int = 15) -> tuple[float, float]:
    """Median process-CPU ms of ``validate=False`` and ``validate=True`` layers, timed alternately."""
    def step(layer: nn.Module) -> Callable[[], float]:
        def run() -> float:
            layer.zero_grad(set_to_none=True)
            t0 = time.process_time()
            _step(layer, X, G)
            return time.process_time() - t0
        return run

    times = round_robin({"false": step(fast), "true": step(checked)}, repeats, warmup=1)
    return 1e3 * statistics.median(times["false"]), 1e3 * statistics.median(times["true"])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm((a.double() - b).flatten()) / torch.linalg.norm(b.flatten()))


def rel_errors(name: str, layer: nn.Module, X: torch.Tensor, G: torch.Tensor,
               ref: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[float | None, float | None]:
    """(output, tangent input-gradient) relative errors of a fresh copy of ``layer`` in training mode vs ``ref``."""
    if ref is None:
        return None, None
    probe = copy.deepcopy(layer).train()
    Xr = X.clone().requires_grad_()
    y = probe(Xr)
    (y * G).sum().backward()
    return _rel(y.detach(), ref[0]), _rel(tangent(name, X.double(), Xr.grad.double()), ref[1])


def reference(name: str, layer64: nn.Module, X: torch.Tensor,
              G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """float64 ``forward_ref`` output and tangent input gradient; ``None`` if the layer has no ``forward_ref``."""
    if not callable(getattr(layer64, "forward_ref", None)):
        return None
    probe = copy.deepcopy(layer64).train()
    Xr = X.clone().requires_grad_()
    y = probe.forward_ref(Xr)
    (y * G).sum().backward()
    return y.detach(), tangent(name, X, Xr.grad)


def _row(name: str, n: int, N: int, dtype: torch.dtype, threads: int, ms: float, wall: float, repeats: int,
         errs: tuple[float | None, float | None]) -> dict:
    published = PUBLISHED.get((n, N), {}).get(name) if dtype == torch.float64 and threads == 1 else None
    target = TARGETS.get(name, DEFAULT_TARGET) if published is not None else None
    ratio = ms / published if published is not None else None
    return {
        "norm": name, "n": n, "N": N, "dtype": dtype_name(dtype), "threads": threads,
        "ms": round(ms, 3), "wall_ms": round(wall, 3), "repeats": repeats, "published_ms": published,
        "ratio": None if ratio is None else round(ratio, 3), "target": target,
        "met": None if ratio is None else bool(ratio <= target),
        "out_rel_err": errs[0], "grad_rel_err": errs[1],
    }


def bench_norms(norms: Sequence[str], sizes: Sequence[tuple[int, int]], dtypes: Sequence[torch.dtype],
                threads: Sequence[int], repeats: int | None) -> tuple[list[dict], list[dict]]:
    """Rows of the norms table and the ``validate=True`` overhead (first size, first dtype, first thread count)."""
    rows, overhead = [], []
    for name in norms:
        for si, (n, N) in enumerate(sizes):
            feats, X64, G64 = make_case(name, n, N)
            layer64 = create_norm_layer(name, feats, validate=False)
            layer64 = layer64.to(torch.float64)
            ref = reference(name, layer64, X64, G64)
            for dtype in dtypes:
                layer = copy.deepcopy(layer64).to(dtype)
                X, G = X64.to(dtype), G64.to(dtype)
                errs = rel_errors(name, layer, X, G, ref)
                for t in threads:
                    with torch_threads(t):
                        ms, wall, reps = time_layer(layer, X, G, repeats)
                        rows.append(_row(name, n, N, dtype, t, ms, wall, reps, errs))
                        if si == 0 and dtype == dtypes[0] and t == threads[0]:
                            checked = create_norm_layer(name, feats, validate=True).to(dtype).train()
                            ms_f, ms_v = validation_overhead(layer, checked, X, G, 5 if repeats else 15)
                            overhead.append({"norm": name, "n": n, "N": N, "dtype": rows[-1]["dtype"],
                                             "threads": t, "ms_validate_false": round(ms_f, 3),
                                             "ms_validate_true": round(ms_v, 3),
                                             "overhead_ms": round(ms_v - ms_f, 3)})
    return rows, overhead


def _lem_chain(X: torch.Tensor, G: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    lam, U = torch.linalg.eigh(X)
    S = 0.7 * ((U * lam.log().unsqueeze(-2)) @ U.mT) + K
    mu, V = torch.linalg.eigh(S)
    (V * mu.exp().unsqueeze(-2)) @ V.mT
    P = U.mT @ V
    return U @ (P @ (V.mT @ G @ V) @ P.mT) @ U.mT


def floor_rows(sizes: Sequence[tuple[int, int]], repeats: int | None) -> list[dict]:
    """Lower bounds set by the dense kernels at each size with published times (float64, one thread).

    Times ``torch.linalg.eigh`` and one batched product of the ``(N, n, n)`` batch, and the bare chain that any
    exact LEM-LieBN forward+backward must run: ``eigh(X)``, :math:`\\log X = U\\log\\Lambda U^\\top`,
    ``eigh`` of the scaled and biased result, its exponential, and the seven products of a Daleckii–Krein backward
    that chains both decompositions (:math:`U_S^\\top \\bar Y U_S`, :math:`P = U_X^\\top U_S`,
    :math:`P(\\cdot)P^\\top`, :math:`U_X(\\cdot)U_X^\\top`), without any elementwise work. The chain is the
    floor of a LEM layer on this machine: when it exceeds the target, no exact float64 implementation meets it.
    """
    rows = []
    with torch_threads(1):
        for n, N in sizes:
            published = PUBLISHED.get((n, N), {}).get("liebn_lem")
            if published is None:
                continue
            _, X, G = make_case("liebn_lem", n, N)
            K = 0.1 * (G[0] + G[0].mT)
            reps = repeats or (25 if n < 50 else 7)

            def ms(fn: Callable[[], object], reps: int = reps) -> float:
                return round(median_ms(timed(fn), reps, warmup=2), 3)

            rows.append({"n": n, "N": N, "eigh_ms": ms(partial(torch.linalg.eigh, X)),
                         "bmm_ms": ms(partial(torch.bmm, X, X)),
                         "lem_chain_ms": ms(partial(_lem_chain, X, G, K)),
                         "lem_published_ms": published,
                         "lem_target_ms": round(DEFAULT_TARGET * published, 3)})
    return rows


def markdown(rows: Sequence[dict], overhead: Sequence[dict], floors: Sequence[dict] = ()) -> str:
    def norm_row(r: dict) -> list[str]:
        met = "—" if r["met"] is None else ("yes" if r["met"] else "no")
        pub = "—" if r["published_ms"] is None else f"{r['published_ms']:g}"
        tgt = "—" if r["target"] is None else f"≤{r['target']:g}×"
        return [r["norm"], r["n"], r["N"], r["dtype"], r["threads"], f"{r['ms']:.2f}", pub, fmt(r["ratio"], ".3f", "—"),
                tgt, met, fmt(r["out_rel_err"], ".1e"), fmt(r["grad_rel_err"], ".1e"), f"{r['wall_ms']:.2f}"]

    parts = [md_table(["norm", "n", "N", "dtype", "threads", "ms", "published ms", "ratio", "target", "met",
                       "out rel err", "grad rel err", "wall ms"], [norm_row(r) for r in rows])]
    if overhead:
        parts += ["validate=True overhead (input manifold check), timed alternately with validate=False:",
                  md_table(["norm", "n", "N", "dtype", "ms (validate=False)", "ms (validate=True)", "overhead ms"],
                           [[o["norm"], o["n"], o["N"], o["dtype"], f"{o['ms_validate_false']:.2f}",
                             f"{o['ms_validate_true']:.2f}", f"{o['overhead_ms']:+.2f}"] for o in overhead])]
    if floors:
        parts += ["Kernel floor (float64, one thread; bare LEM chain = 2 eigh + 9 products, no elementwise work):",
                  md_table(["n", "N", "eigh ms", "bmm ms", "bare LEM chain ms", "LEM target ms", "chain / target"],
                           [[f["n"], f["N"], f"{f['eigh_ms']:.2f}", f"{f['bmm_ms']:.2f}", f"{f['lem_chain_ms']:.2f}",
                             f"{f['lem_target_ms']:g}", f"{f['lem_chain_ms'] / f['lem_target_ms']:.2f}"]
                            for f in floors])]
    return "\n\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks norms", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n=20, N=32, 1 thread, 5 repeats (smoke run)")
    parser.add_argument("--norms", nargs="+", default=None, help="norm names (default: every SPD/Lie norm)")
    parser.add_argument("--sizes", nargs="+", default=None, help="nxN sizes, e.g. 20x32 93x128")
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch thread counts (default 1 2, --quick: 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default: adaptive)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default outputs/bench_norms.json)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    norms = chosen(parser, args.norms, default_norms())
    try:
        sizes = [parse_size(t) for t in args.sizes] if args.sizes else list(QUICK_SIZES if args.quick else SIZES)
    except ValueError as err:
        parser.error(str(err))
    threads = args.threads or ([1] if args.quick else [1, 2])
    repeats = args.repeats or (5 if args.quick else None)
    dtypes = [getattr(torch, d) for d in args.dtypes]
    rows, overhead = bench_norms(norms, sizes, dtypes, threads, repeats)
    floors = floor_rows(sizes, repeats) if torch.float64 in dtypes else []
    print(markdown(rows, overhead, floors))
    meta = {**env_info("norms"), "timer": "time.process_time (process CPU, all threads)", "validate": False,
            "overhead": overhead, "floors": floors}
    return write_report(args.out or default_out("norms"), meta, rows)


if __name__ == "__main__":
    main()
