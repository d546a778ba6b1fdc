"""Running a job: what its processes tell each other, stop requests, progress, phase times.

`Coordinator` is the one place where processes meet: agreement on settings before anything
is written, the per-step stop decision, and the handling of a peer that fails mid-collective.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any, Callable, Mapping

import numpy as np

from cbir_jax.job.errors import ExtractError


class Coordinator:
  """One process alone: every question is answered locally."""
  process_index = 0
  process_count = 1

  def agree(self, *, settings: str, weights: str, input: str) -> None:
    """Checks every process has the same settings, weights and input digests.

    Called before any directory is prepared. Raises ExtractError naming what differs.
    """
    del settings, weights, input

  def all_started(self, error: str) -> None:
    """Raises ExtractError if this or any process could not start (`error` non-empty)."""
    if error:
      raise ExtractError(error)

  def max(self, value: int) -> int:
    """The largest `value` over processes (e.g. steps: every process runs that many)."""
    return value

  def should_stop(self, requested: bool) -> bool:
    """Per step: whether the job stops now. True on every process, or on none."""
    return requested

  def barrier(self, name: str) -> None:
    """Waits until every process reaches `name`."""
    del name


class MultiProcessCoordinator(Coordinator):
  """Processes of one `jax.distributed` job; every method is a collective all must call."""

  def __init__(self) -> None:
    import jax
    self.process_index, self.process_count = jax.process_index(), jax.process_count()

  def _gather(self, what: str, values: list[int]) -> np.ndarray:
    """[process, len(values)] of every process' values."""
    from jax.experimental import multihost_utils
    try:
      return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int64)))
    except Exception as e:  # a peer died or left: XlaRuntimeError and friends
      raise ExtractError(f"process {self.process_index}: lost the other processes during "
                         f"{what} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "complete shards are kept, rerun every process") from None

  def agree(self, *, settings: str, weights: str, input: str) -> None:
    named = {"settings": settings, "weights": weights, "input": input}
    got = self._gather("the settings check", [int(v[:15], 16) for v in named.values()])
    differ = [n for i, n in enumerate(named) if len(set(got[:, i].tolist())) > 1]
    if differ:
      raise ExtractError(
          f"the processes of this job do not agree on their {', '.join(differ)} (each process "
          "must be started with the same flags and see the same input); nothing was written")

  def all_started(self, error: str) -> None:
    ok = self._gather("start-up", [0 if error else 1])[:, 0]
    if error:
      raise ExtractError(error)
    if not ok.all():
      bad = [int(i) for i in np.flatnonzero(ok == 0)]
      raise ExtractError(f"process(es) {bad} could not start; see their messages")

  def max(self, value: int) -> int:
    return int(self._gather("planning", [value]).max())

  def should_stop(self, requested: bool) -> bool:
    return bool(self._gather("a step", [int(requested)]).any())

  def barrier(self, name: str) -> None:
    self._gather(name, [0])


def init_distributed(*, distributed: bool, coordinator_address: str | None,
                     num_processes: int | None, process_id: int | None) -> Coordinator:
  """Starts jax.distributed when asked (or when explicit settings imply it)."""
  import jax

  explicit = (coordinator_address, num_processes, process_id)
  if distributed or any(v is not None for v in explicit):
    try:
      jax.distributed.initialize(coordinator_address=coordinator_address,
                                 num_processes=num_processes, process_id=process_id)
    except RuntimeError as e:
      if "already initialized" not in str(e).lower():
        raise ExtractError(f"jax.distributed.initialize failed: {e}") from e
  return MultiProcessCoordinator() if jax.process_count() > 1 else Coordinator()


class StopFlag:
  """SIGINT/SIGTERM: the first asks the job to stop after the step in flight; a second, at once."""

  def __init__(self, log: Callable[[str], None]):
    self.requested = False
    self.at = 0.0  # perf_counter of the first request
    self._log = log
    self._old: dict[int, Any] = {}

  def _handle(self, signum, frame):
    if self.requested:  # a second Ctrl-C: stop now (complete shards are still safe)
      raise KeyboardInterrupt
    self.requested, self.at = True, time.perf_counter()
    self._log(f"{signal.Signals(signum).name} received: stopping after the step in flight; "
              "finished rows are kept (send it again to stop at once)")

  def __enter__(self) -> "StopFlag":
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGINT, signal.SIGTERM):
        self._old[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, h in self._old.items():
      signal.signal(s, h)


class Progress:
  """A tqdm bar on a terminal, else a log line every `every` seconds."""

  def __init__(self, total: int, mode: str, every: float, log: Callable[[str], None]):
    self.total, self.done, self.every, self.log = total, 0, every, log
    self.t0 = self.last = time.perf_counter()
    self.bar = None
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
      try:
        from tqdm import tqdm
        self.bar = tqdm(total=total, unit="img", dynamic_ncols=True, smoothing=0.1)
      except ImportError:
        pass
    self.quiet = mode == "none"

  def update(self, n: int) -> None:
    self.done += n
    if self.bar is not None:
      self.bar.update(n)
      return
    now = time.perf_counter()
    if not self.quiet and now - self.last >= self.every:
      self.last = now
      rate = self.done / max(now - self.t0, 1e-9)
      eta = (self.total - self.done) / rate if rate > 0 else float("inf")
      self.log(f"{self.done}/{self.total} images, {rate:.1f} images/s, "
               f"ETA {eta / 60:.1f} min")

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class Clock:
  """Wall time split into named phases that add up to the total by construction.

  `charge(name)` books the time since the previous charge to `name`.
  """

  def __init__(self, start: float | None = None):
    self.start = self._last = time.perf_counter() if start is None else start
    self.seconds: dict[str, float] = {}

  def charge(self, name: str) -> float:
    now = time.perf_counter()
    dt = now - self._last
    self.seconds[name] = self.seconds.get(name, 0.0) + dt
    self._last = now
    return dt

  @property
  def total(self) -> float:
    return self._last - self.start

  def get(self, name: str) -> float:
    return self.seconds.get(name, 0.0)

  def items(self) -> Mapping[str, float]:
    return dict(self.seconds)


__all__ = ["Clock", "Coordinator", "MultiProcessCoordinator", "Progress", "StopFlag",
           "init_distributed"]
