"""The `cbir-*` commands: one module each, a thin absl launcher over a library function.

Each module defines its flags from a config dataclass (cbir_jax.cli) when imported, a `main()`
and a `run()` (the console script's entry point). `python -m cbir_jax COMMAND [flags]` runs
the same, as do the `launch/*.py` wrappers of a checkout. Modules are imported only when
their command runs: each defines absl flags, and two commands' flags must never meet.
"""
from __future__ import annotations

import importlib
import sys

# Command names, as typed after `cbir-` or `python -m cbir_jax`: each is a module of this package.
COMMANDS = ("extract", "search", "index", "evaluate", "classify", "port", "dedup", "serve")


def usage() -> str:
  names = ", ".join(COMMANDS)
  return f"usage: python -m cbir_jax COMMAND [--flags]; COMMAND is one of: {names} (--help each)"


def main(argv: list[str] | None = None) -> None:
  """`python -m cbir_jax COMMAND ...`: runs that command with the remaining arguments."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  name = argv[1]
  if name not in COMMANDS:
    sys.exit(f"cbir_jax: error: unknown command {name!r}; {usage()}")
  sys.argv = [f"cbir-{name}", *argv[2:]]  # absl parses sys.argv; the program name shows in --help
  importlib.import_module(f"cbir_jax.commands.{name}").run()
