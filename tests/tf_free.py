"""Runs Python code in a subprocess where TensorFlow cannot be imported, as if not installed.

The blocker wraps the path finder, so `import tensorflow` fails with ModuleNotFoundError and
`importlib.util.find_spec("tensorflow")` is None, as in a venv without it (a `None` entry in
sys.modules would not do: TFDS and etils treat any entry there as "TensorFlow loaded").
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]

BLOCKER = textwrap.dedent("""
    import importlib.machinery, sys

    class _NoTensorflow:
      @classmethod
      def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow":
          return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

      @classmethod
      def invalidate_caches(cls):
        importlib.machinery.PathFinder.invalidate_caches()

    sys.meta_path[:] = [_NoTensorflow if f is importlib.machinery.PathFinder else f
                        for f in sys.meta_path]
    try:
      import tensorflow
      raise SystemExit("the blocker let tensorflow through")
    except ModuleNotFoundError:
      pass
""")


def run_python(code: str, *, block_tensorflow: bool, timeout: float = 300
               ) -> subprocess.CompletedProcess:
  """Runs `code` (dedented) in a fresh interpreter with the repository first on the path."""
  code = textwrap.dedent(code)
  if block_tensorflow:
    code = BLOCKER + code
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
      JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=str(REPO))
