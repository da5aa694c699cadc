"""``layers``: forward+backward time of every Euclidean norm layer relative to torch's LayerNorm and RMSNorm.

    python -m benchmarks layers                    # widths 256, 768, 1024 on 2048 tokens, float32
    python -m benchmarks layers --quick            # width 64 on 256 tokens, 3 repeats
    python -m benchmarks layers --norms layernorm dyt --widths 512 --tokens 4096

Times one training forward+backward of every norm of :func:`layer_norms` on a ``(tokens, width)`` batch, beside
``torch.nn.LayerNorm`` and ``torch.nn.RMSNorm`` timed in the same process, and reports the ratios to both
(median process-CPU time over adaptive repeats, the contenders round-robin; the machine is noisy, the ratios
are the result). JSON: ``{"suite", "torch", "timer", "threads", "rows": [{"norm", "width", "tokens", "dtype",
"ms", "x_layernorm", "x_rmsnorm"}, ...]}``.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch

from benchmarks._harness import (
    adaptive_repeats,
    chosen,
    default_out,
    dtype_name,
    env_info,
    fwd_bwd_seconds,
    md_table,
    round_robin,
    torch_threads,
    write_report,
)
from manifoldnorm.nn import create_norm_layer, get_norm_info, list_norms

LAYER_WIDTHS = (256, 768, 1024)
LAYER_TOKENS = 2048
BUDGET_S = 0.5
BASELINES = ("torch_layer_norm", "torch_rms_norm")


def is_timed_layer(name: str) -> bool:
    """Whether the ``layers`` suite times registered Euclidean norm ``name``.

    It must normalize activations (``"euclidean"`` in ``get_norm_info(name).inputs``; the weight
    reparametrizations ``weight_norm``, ``weight_std``, ``spectral_norm`` take a module instead) and have learnable
    parameters: a stateless layer (the identity ``none``, nGPT's projection onto the sphere ``ngpt_norm``) is a
    copy or one division, nothing to set beside LayerNorm.
    """
    info = get_norm_info(name)
    return (info.kind == "euclidean" and "euclidean" in info.inputs
            and any(True for _ in create_norm_layer(name, 8).parameters()))


def layer_norms() -> list[str]:
    """The registered Euclidean norms that :func:`is_timed_layer` admits, sorted."""
    return [k for k in list_norms(kind="euclidean") if is_timed_layer(k)]


def _time_interleaved(fns: dict[str, Callable], x: torch.Tensor, g: torch.Tensor,
                      repeats: int | None) -> dict[str, float]:
    """Median ms per function; the repeats run round-robin so that slow phases of the machine hit all alike."""
    steps = {k: partial(fwd_bwd_seconds, f, x, g) for k, f in fns.items()}
    first = {k: max(step(), step(), 1e-6) for k, step in steps.items()}
    rounds = repeats or adaptive_repeats(sum(first.values()), BUDGET_S * len(fns), 7, 60)
    return {k: 1e3 * statistics.median(v) for k, v in round_robin(steps, rounds).items()}


def bench_layers(norms: Sequence[str], widths: Sequence[int], tokens: int, dtype: torch.dtype,
                 repeats: int | None) -> list[dict]:
    """Forward+backward ms of each norm on ``(tokens, width)`` and its ratio to torch LayerNorm and RMSNorm."""
    rows = []
    for width in widths:
        gen = torch.Generator().manual_seed(width)
        x = torch.randn(tokens, width, generator=gen, dtype=dtype)
        g = torch.randn(tokens, width, generator=gen, dtype=dtype)
        fns = {"torch_layer_norm": torch.nn.LayerNorm(width, eps=1e-5, dtype=dtype),
               "torch_rms_norm": torch.nn.RMSNorm(width, eps=1e-6, dtype=dtype)}
        fns.update({name: create_norm_layer(name, width).to(dtype).train() for name in norms})
        ms = _time_interleaved(fns, x, g, repeats)
        for name in fns:
            rows.append({"norm": name, "width": width, "tokens": tokens, "dtype": dtype_name(dtype),
                         "ms": ms[name], "x_layernorm": ms[name] / ms["torch_layer_norm"],
                         "x_rmsnorm": ms[name] / ms["torch_rms_norm"]})
    return rows


def markdown(rows: Sequence[dict]) -> str:
    widths = sorted({r["width"] for r in rows})
    names = list(dict.fromkeys(r["norm"] for r in rows))

    def cell(name: str, w: int) -> str:
        r = next((r for r in rows if r["norm"] == name and r["width"] == w), None)
        return ("n/a" if r is None or math.isnan(r["ms"]) else
                f"{r['ms']:.2f} ({r['x_layernorm']:.2f}, {r['x_rmsnorm']:.2f})")

    return md_table(["norm", *(f"C={w}: ms (× LN, × RMS)" for w in widths)],
                    [[name, *(cell(name, w) for w in widths)] for name in names])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks layers", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="width 64, 256 tokens, 3 repeats (smoke run)")
    parser.add_argument("--norms", nargs="+", default=None, help="norm names (default: every Euclidean norm layer)")
    parser.add_argument("--widths", type=int, nargs="+", default=list(LAYER_WIDTHS), help="feature widths")
    parser.add_argument("--tokens", type=int, default=LAYER_TOKENS, help="rows of the input")
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float64", "float32"],
                        help="dtype of the layers and input: the last one given (default float32)")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="torch threads (the first; default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: adaptive)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default outputs/bench_layers.json)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    norms = chosen(parser, args.norms, layer_norms())
    widths = [64] if args.quick else args.widths
    tokens = 256 if args.quick else args.tokens
    with torch_threads((args.threads or [1])[0]):
        rows = bench_layers(norms, widths, tokens, getattr(torch, args.dtypes[-1]), 3 if args.quick else args.repeats)
        meta = {**env_info("layers"), "timer": "time.process_time", "threads": torch.get_num_threads()}
    print(markdown(rows))
    return write_report(args.out or default_out("layers"), meta, rows)


if __name__ == "__main__":
    main()
