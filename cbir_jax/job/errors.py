"""The job's exceptions, shared by its stages and re-exported by `cbir_jax.extract`.

Each carries the exit status `extract.main` ends with.
"""
from __future__ import annotations


class ExtractError(RuntimeError):
  """The job cannot start or cannot go on; the message says why and what to do."""
  exit_code = 1


class Interrupted(ExtractError):
  """SIGINT/SIGTERM: the job stopped after writing the rows it had finished."""
  exit_code = 130
