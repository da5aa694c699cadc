"""``spectral``: forward+backward of the matrix logarithm of a batch of SPD matrices, three ways side by side.

    python -m benchmarks spectral                  # 4 sizes x float64/float32; writes outputs/bench_spectral.json
    python -m benchmarks spectral --quick          # n=20, N=32, float64, few repeats

In one process (these machines are noisy; compare ratios, not absolute numbers):

* ``ours``: :func:`manifoldnorm.functional.sym_logm` (one batched ``eigh``, Daleckii–Krein backward);
* ``eigh_autograd``: :func:`manifoldnorm.functional.sym_logm_ref`, the same forward differentiated by
  ``torch.linalg.eigh``'s own backward;
* ``svd_loop``: one ``torch.linalg.svd`` per matrix in a Python loop, the layout of the published SPDNet code
  (no SVD-based logarithm exists in :mod:`manifoldnorm.functional`: every spectral function there is
  ``eigh``-based, so this contender is the only place it is written).

It also reports the relative gradient error of each against ``ours`` (float64) at a random input, and whether
each gives a finite gradient at ``X = 2I`` (repeated eigenvalues). Prints a Markdown table and writes JSON:
``{"suite", "torch", "rows": [{"op", "impl", "n", "N", "dtype", "threads", "ms", "grad_rel_err_vs_ours_f64",
"finite_grad_at_2I"}, ...]}``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks._harness import (
    default_out,
    dtype_name,
    env_info,
    fwd_bwd_seconds,
    md_table,
    median_ms,
    torch_threads,
    write_report,
)
from manifoldnorm import functional as mf

SIZES = ((20, 32), (20, 128), (93, 32), (93, 128))  # (n, N)
QUICK_SIZES = ((20, 32),)


def svd_loop_logm(X: torch.Tensor) -> torch.Tensor:
    """``U diag(log S) Uᵀ`` from one ``torch.linalg.svd`` per matrix, in a Python loop (torch's SVD backward)."""
    flat = X.reshape(-1, *X.shape[-2:])
    outs = []
    for A in flat:
        U, S, _ = torch.linalg.svd(A)
        outs.append((U * torch.log(S)) @ U.T)
    return torch.stack(outs).reshape(X.shape)


IMPLS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "ours": mf.sym_logm, "eigh_autograd": mf.sym_logm_ref, "svd_loop": svd_loop_logm}


def _grad(fn: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    Xr = X.clone().requires_grad_()
    (fn(Xr) * G).sum().backward()
    return mf.sym(Xr.grad)


def bench_spectral(quick: bool) -> list[dict]:
    """One row per (size, dtype, implementation), at the current torch thread count."""
    sizes = QUICK_SIZES if quick else SIZES
    dtypes = [torch.float64] if quick else [torch.float64, torch.float32]
    repeats = 3 if quick else 15
    rows = []
    for n, N in sizes:
        for dtype in dtypes:
            g = torch.Generator().manual_seed(0)
            A = torch.randn(N, n, n, generator=g, dtype=torch.float64)
            X = (A @ A.mT / n + 0.1 * torch.eye(n, dtype=torch.float64)).to(dtype)
            G = torch.randn(N, n, n, generator=g, dtype=torch.float64).to(dtype)
            ref_grad = _grad(mf.sym_logm, X.double(), G.double())
            tie = (2.0 * torch.eye(n, dtype=dtype)).expand(2, n, n).contiguous()
            for name, fn in IMPLS.items():
                grad = _grad(fn, X, G).double()
                rel = float(torch.linalg.norm(grad - ref_grad) / torch.linalg.norm(ref_grad))
                finite_at_tie = bool(torch.isfinite(_grad(fn, tie, G[:2])).all())
                ms = median_ms(lambda fn=fn, X=X, G=G: fwd_bwd_seconds(fn, X, G), repeats, warmup=3)
                rows.append({
                    "op": "logm", "impl": name, "n": n, "N": N, "dtype": dtype_name(dtype),
                    "threads": torch.get_num_threads(), "ms": round(ms, 3),
                    "grad_rel_err_vs_ours_f64": rel, "finite_grad_at_2I": finite_at_tie,
                })
    return rows


def markdown(rows: Sequence[dict]) -> str:
    def ratio(r: dict) -> float:
        base = next(x["ms"] for x in rows
                    if x["impl"] == "ours" and (x["n"], x["N"], x["dtype"]) == (r["n"], r["N"], r["dtype"]))
        return r["ms"] / base

    return md_table(
        ["n", "N", "dtype", "impl", "fwd+bwd ms (median CPU)", "× ours", "grad rel. err", "finite at 2I"],
        [[r["n"], r["N"], r["dtype"], r["impl"], f"{r['ms']:.2f}", f"{ratio(r):.2f}",
          f"{r['grad_rel_err_vs_ours_f64']:.1e}", "yes" if r["finite_grad_at_2I"] else "no"] for r in rows])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks spectral", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one size, float64, few repeats (smoke run)")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="torch threads (the first; default 1)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default outputs/bench_spectral.json)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with torch_threads((args.threads or [1])[0]):
        rows = bench_spectral(args.quick)
    print(markdown(rows))
    return write_report(args.out or default_out("spectral"), env_info("spectral"), rows)


if __name__ == "__main__":
    main()
