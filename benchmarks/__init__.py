"""Benchmarks of manifoldnorm: one module per suite, run from the repository root.

    python -m benchmarks <suite> [options]       # or: python -m benchmarks.<suite> [options]
    python -m benchmarks --help                  # the suites

Suites: ``spectral`` (matrix logarithm: ours vs eigh autograd vs an SVD loop), ``norms`` (every SPD/Lie norm
layer vs its plain-autograd ``forward_ref`` twin, its kernel floor and optionally another source tree, all in one
run, with accuracy against ``forward_ref``), ``layers`` (every Euclidean norm layer vs torch's
LayerNorm/RMSNorm), ``sweep`` (Euclidean norms in training, over seeds), ``optim`` (normalized optimizers vs AdamW
on lm_char), ``scale`` (1 vs 2 DDP processes, synchronized norms), ``guard`` (cost of the non-finite guard),
``step`` (the flagship's Lightning step vs the bare step), ``flagship`` (the flagship run vs an older commit:
time, memory, start-up, accuracy). Each writes ``outputs/bench_<suite>.json`` by default; see
``benchmarks/README.md``. Every ratio a suite prints compares times of the same run. Timing targets live here,
never in the tests.
"""

from __future__ import annotations

import pkgutil


def suites() -> list[str]:
    """The suite modules of this package (every public module; ``_harness`` etc. are helpers), sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
