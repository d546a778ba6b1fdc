"""The job's exceptions, shared by its stages and re-exported by `cbir_jax.extract`.

Each carries the exit status `extract.main` ends with.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


class ExtractError(RuntimeError):
  """The job cannot start or cannot go on; the message says why and what to do."""
  exit_code = 1


class Interrupted(ExtractError):
  """SIGINT/SIGTERM: the job stopped after writing the rows it had finished."""
  exit_code = 130


@contextlib.contextmanager
def reworded(*errors: type[BaseException]) -> Iterator[None]:
  """`errors` raised inside become ExtractErrors with the same one-line message."""
  try:
    yield
  except errors as e:
    raise ExtractError(str(e)) from None
