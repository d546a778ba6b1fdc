"""The job's two exceptions, shared by its stages and re-exported by `cbir_jax.extract`."""
from __future__ import annotations


class ExtractError(RuntimeError):
  """The job cannot start or cannot go on; the message says why and what to do."""


class Interrupted(ExtractError):
  """SIGINT/SIGTERM: the job stopped after writing the rows it had finished."""
