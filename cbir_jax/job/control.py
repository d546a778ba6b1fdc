"""Running one worker of a job: stop requests, progress, phase times.

Workers never talk to each other (they agree through the output directory, see plan.py),
so this is all local: SIGINT/SIGTERM handling and the per-step stop check.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

from cbir_jax.job.workers import WorkerSpec

EXIT_INTERRUPTED = 130
# What a worker that stopped early tells the user to do.
HINT = "complete shards are kept; rerun the same command to continue"


class Worker:
  """This process' part in a job: worker `spec.index` of `spec.count`; see the module docstring.

  A context manager: inside it, SIGINT/SIGTERM belong to the job. During the steps
  (`stepping`) the first one asks the loop to stop after its step in flight, writing the
  rows it finished; anywhere else, and on a second signal, the process stops at once
  (KeyboardInterrupt), which loses nothing: shards are written atomically, the manifest
  last.
  """

  def __init__(self, spec: WorkerSpec, log: Callable[[str], None]):
    self.spec, self.log = spec, log
    self.index, self.count = spec.index, spec.count
    self.at_once = ""  # the signal that stopped this process at once, if any
    self.stop_reason: str | None = None
    self._graceful, self._logged, self._old = False, False, {}

  def stop_requested(self) -> bool:
    """Per step: whether a stop was asked (logged once, here rather than in the handler)."""
    if self.stop_reason and not self._logged:
      self._logged = True
      self.log(f"stopping after the step in flight ({self.stop_reason}); finished rows are "
               "kept (send SIGINT/SIGTERM again to stop at once)")
    return self.stop_reason is not None

  @contextlib.contextmanager
  def stepping(self) -> Iterator[None]:
    """The step loop: a first signal stops after the step in flight."""
    self._graceful = True
    try:
      yield
    finally:
      self._graceful = False

  def _handle(self, signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if not self._graceful or self.stop_reason:
      self.at_once = name
      raise KeyboardInterrupt
    self.stop_reason = name if self.count == 1 else f"{name} to worker {self.index}"

  def __enter__(self) -> "Worker":
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGINT, signal.SIGTERM):
        self._old[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}


class Progress:
  """A tqdm bar on a terminal, else a log line every `every` seconds."""

  def __init__(self, total: int, mode: str, every: float, log: Callable[[str], None]):
    self.total, self.done, self.every, self.log = total, 0, every, log
    self.t0 = self.last = time.perf_counter()
    self.bar = None
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
      from tqdm import tqdm  # a dependency of the package

      self.bar = tqdm(total=total, unit="img", dynamic_ncols=True, smoothing=0.1)
    self.quiet = mode == "none" or total == 0  # e.g. a process whose shards are all done

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

  `charge(name)` books the time since the previous charge to `name`; `spans` keeps each
  booking's (name, start, end), so other timelines (the device's) can be laid over the phases.
  """

  def __init__(self, start: float | None = None):
    self.start = self._last = time.perf_counter() if start is None else start
    self.seconds: dict[str, float] = {}
    self.spans: list[tuple[str, float, float]] = []

  def charge(self, name: str) -> None:
    now = time.perf_counter()
    self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
    self.spans.append((name, self._last, now))
    self._last = now

  @property
  def total(self) -> float:
    return self._last - self.start


__all__ = ["Clock", "EXIT_INTERRUPTED", "HINT", "Progress", "Worker"]
