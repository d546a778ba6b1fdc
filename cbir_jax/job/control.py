"""Running a job: what its processes tell each other, stop requests, progress, phase times.

`Coordinator` is the one place where processes meet (on `cbir_jax.distributed`): start-up
errors and agreement before anything is written, stop requests, leaving together or with one
line. The job's steps have no cross-process collectives, so no process can hang in one.
"""
from __future__ import annotations

import contextlib
import pathlib
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping

from cbir_jax import distributed
from cbir_jax.job import agreement
from cbir_jax.job.errors import ExtractError

# What a process that ends because of another says the user should do.
HINT = "complete shards are kept; rerun the same command on every process to continue"


def timeouts(config: Any) -> distributed.Timeouts:
  """The job's multi-process time limits; raises ExtractError for impossible ones."""
  try:
    return distributed.Timeouts(startup_s=config.startup_timeout_s, peer_s=config.peer_timeout_s)
  except ValueError as e:
    raise ExtractError(str(e).replace("Timeouts.startup_s", "startup_timeout_s")
                       .replace("Timeouts.peer_s", "peer_timeout_s")) from None


@contextlib.contextmanager
def _as_extract_error() -> Iterator[None]:
  try:
    yield
  except distributed.DistributedError as e:  # PeerLost, JobMismatch, ...: one line each
    raise ExtractError(str(e), exit_code=e.exit_code) from None


@contextlib.contextmanager
def _at_once() -> Iterator[None]:
  """SIGTERM as SIGINT (KeyboardInterrupt) while processes wait for each other to start."""
  def handle(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt

  if threading.current_thread() is not threading.main_thread():
    yield
    return
  old = signal.signal(signal.SIGTERM, handle)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, old)


class Coordinator:
  """This process' part in a job of one process or several; see the module docstring.

  A context manager: inside it, SIGINT/SIGTERM belong to the job. During the steps
  (`stepping`) the first one asks every process to stop after its step in flight, writing
  the rows it finished; anywhere else, and on a second signal, the process stops at once
  (KeyboardInterrupt), which loses nothing: shards are written atomically, the manifest
  last.
  """

  def __init__(self, cluster: distributed.Cluster | distributed.LocalCluster,
               log: Callable[[str], None]):
    self.cluster, self.log = cluster, log
    self.process_index, self.process_count = cluster.process_index, cluster.process_count
    self.stop_noticed_at = 0.0  # perf_counter when this process learnt of a stop request
    self.at_once = ""  # the signal that stopped this process at once, if any
    self._graceful, self._signalled, self._logged, self._old = False, False, False, {}

  @classmethod
  def start(cls, config: Any, log: Callable[[str], None]) -> "Coordinator":
    """Joins the job's other processes (or stands alone); call before any JAX computation.

    The job's identity is the absolute output directory: a process of another job that
    reaches the same coordinator is refused without harming this one.
    """
    with _as_extract_error(), _at_once():
      cluster = distributed.initialize(
          str(pathlib.Path(config.output).resolve()),
          coordinator_address=config.coordinator_address, num_processes=config.num_processes,
          process_id=config.process_id, auto_detect=config.distributed,
          timeouts=timeouts(config), program="extract", hint=HINT)
    return cls(cluster, log)

  # -- meeting points: every process calls them, in the same order

  def all_started(self, error: str, stage: str = "start-up") -> None:
    """Raises ExtractError on every process if this one (`error` non-empty) or another failed."""
    with _as_extract_error():
      errors = self.cluster.gather(stage, error)
    if error:
      raise ExtractError(error)
    bad = [(k, e) for k, e in enumerate(errors) if e]
    if bad:
      more = f" (and {len(bad) - 1} more processes)" if len(bad) > 1 else ""
      raise ExtractError(f"process {bad[0][0]} could not start{more}: {bad[0][1]}")

  def agree(self, fields: Mapping[str, str], shown: Mapping[str, str], records: Any,
            noun: str) -> None:
    """Raises ExtractError on every process, naming what differs, unless all are equal.

    Args:
      fields, shown: from `agreement.fields`.
      records: this process' input identities (searched for the first differing record
        when the input differs).
      noun: "files" or "records".
    """
    try:
      self.cluster.agree(fields, shown=shown)
      return
    except distributed.Disagreement as e:
      detail, differ = e.detail, e.fields
    except distributed.DistributedError as e:
      raise ExtractError(str(e), exit_code=e.exit_code) from None
    if "input" in differ:
      with _as_extract_error():
        where = agreement.first_difference(self.cluster.gather, records, noun)
      detail += f"; {where}" if where else ""
    raise ExtractError(f"{detail}. Start every process with the same flags and the same input "
                       "(file names, sizes and modification times); nothing was written")

  def max(self, value: int) -> int:
    """The largest `value` over processes (e.g. steps: every process runs that many)."""
    with _as_extract_error():
      return max(int(v) for v in self.cluster.gather("max", str(int(value))))

  def barrier(self, name: str) -> None:
    """Waits until every process reaches `name`."""
    with _as_extract_error():
      self.cluster.barrier(name)

  def decide_stop(self, finished: bool) -> str | None:
    """After the steps: None when every process finished its work, else why the job stops
    (the same answer on every process)."""
    with _as_extract_error():
      return self.cluster.decide_stop(finished)

  def shutdown(self) -> None:
    """The end of a job done or stopped together: waits for every process, then leaves."""
    with _as_extract_error():
      self.cluster.shutdown()

  @property
  def hint(self) -> str:
    """What to do after this process stopped early."""
    return HINT if self.process_count > 1 else HINT.replace(" on every process", "")

  # -- this process alone

  def stop_requested(self) -> bool:
    """Per step, without talking to the others: whether a stop was asked of any process.

    Raises:
      ExtractError: another process died, hung, failed or was stopped at once.
    """
    with _as_extract_error():
      self.cluster.check()
    reason = self.cluster.stop_reason
    if reason and not self.stop_noticed_at:
      self.stop_noticed_at = time.perf_counter()
    if reason and not self._logged:
      self._logged = True  # logged here, not in the signal handler (reentrant I/O)
      self.log(f"stopping after the step in flight ({reason}); finished rows are kept (send "
               "SIGINT/SIGTERM again to stop at once)")
    return reason is not None

  def leave(self, message: str, code: int) -> int:
    """Ends this process' part with one line on stderr. With other processes it tells them
    why and exits at once (they end too); alone it returns `code`."""
    if isinstance(self.cluster, distributed.Cluster):
      self.cluster.abort(message, code)
    kind = "" if code == distributed.EXIT_INTERRUPTED else "error: "
    print(f"extract: {kind}{message}", file=sys.stderr, flush=True)
    return code

  @contextlib.contextmanager
  def stepping(self) -> Iterator[None]:
    """The step loop and the stop decision after it: a first signal stops after the step."""
    self._graceful = True
    try:
      yield
    finally:
      self._graceful = False

  def _handle(self, signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if not self._graceful or self._signalled:
      self.at_once = name
      raise KeyboardInterrupt
    self._signalled = True
    self.stop_noticed_at = time.perf_counter()
    self.cluster.request_stop(f"{name} to process {self.process_index}")

  def __enter__(self) -> "Coordinator":
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
      try:
        from tqdm import tqdm
        self.bar = tqdm(total=total, unit="img", dynamic_ncols=True, smoothing=0.1)
      except ImportError:
        pass
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


__all__ = ["Clock", "Coordinator", "HINT", "Progress", "timeouts"]
