"""``python -m benchmarks <suite> [options]``: run one suite (its ``main(argv)``); ``--help`` lists them."""

from __future__ import annotations

import importlib
import sys

from benchmarks import suites


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    names = suites()
    usage = (f"usage: python -m benchmarks {{{','.join(names)}}} [options]\n"
             "       python -m benchmarks <suite> --help     # the options of one suite")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        for name in names:
            doc = (importlib.import_module(f"benchmarks.{name}").__doc__ or "").strip().splitlines()
            print(f"  {name:9s} {doc[0].removeprefix(f'``{name}``: ') if doc else ''}")
        raise SystemExit(0 if argv else 2)
    if argv[0] not in names:
        print(usage, file=sys.stderr)
        raise SystemExit(f"python -m benchmarks: unknown suite {argv[0]!r}; valid: {', '.join(names)}")
    importlib.import_module(f"benchmarks.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main()
