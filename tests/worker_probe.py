"""Readers for decode worker processes, picklable by reference, that say what the worker did.

`ModulesAfter` replaces each row's label by the worker's process id and which heavy
modules it had imported; `Marking` leaves a file per read; `failing` raises a bug.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable

HEAVY = ("jax", "tensorflow", "flax", "torch")


def imported_heavy(mask: int) -> list[str]:
  return [m for i, m in enumerate(HEAVY) if mask >> i & 1]


@dataclasses.dataclass(frozen=True)
class ModulesAfter:
  """(bytes of `inner(arg)`, pid * 16 + bit mask of the HEAVY modules imported)."""
  inner: Callable[[Any], tuple[bytes, int]]

  def __call__(self, arg: Any) -> tuple[bytes, int]:
    data, _ = self.inner(arg)
    mask = sum(1 << i for i, m in enumerate(HEAVY) if m in sys.modules)
    return data, os.getpid() * 16 + mask


def carried(arg: tuple[bytes, int]) -> tuple[bytes, int]:
  return arg


@dataclasses.dataclass(frozen=True)
class Marking:
  """Reads a file and leaves `<marks>/<n>` behind, n = its position in the name list."""
  marks: str

  def __call__(self, key: str) -> tuple[bytes, int]:
    with open(key, "rb") as f:
      data = f.read()
    open(os.path.join(self.marks, f"{os.getpid()}-{os.path.basename(key)}"), "w").close()
    return data, -1


def failing(key: str) -> tuple[bytes, int]:
  """A reader with a bug on files named boom.*: RuntimeError, not a bad-input error."""
  if os.path.basename(key).startswith("boom."):
    raise RuntimeError("reader bug on " + key)
  with open(key, "rb") as f:
    return f.read()


def dies_at_once(key: str) -> tuple[bytes, int]:
  """A worker killed by SIGBUS on its first read (what a full /dev/shm does)."""
  import signal
  os.kill(os.getpid(), signal.SIGBUS)
  raise AssertionError("SIGBUS did not end this process")


def blocking_read(key: str) -> bytes:
  """A plain blocking read, as of a file on a mount that stopped answering: the product's
  reader opens FIFOs without waiting (and refuses them), so a FIFO read here is the way
  to stand for a read that the kernel never completes (an `image_batches` reader)."""
  with open(key, "rb") as f:
    return f.read()
