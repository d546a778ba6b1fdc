"""Keeping the device fed: batches copied to the device ahead of the step, rows read back behind it.

Issue 17 item 3. The step loop (steps.py) only dispatches: a `Feed` thread takes the input
stream's batches and starts their host->device copies (`jax.device_put` with the step's input
sharding) up to `ahead` batches before the step needs them; after each dispatch the loop
starts the device->host copies of the outputs (`copy_to_host_async`) and hands them to a
`Rows` thread, which waits for them, assembles the rows and passes finished shards to the
shard writer, in step order. `DeviceTimeline` keeps when the device was computing, so the
summary can say, per phase of the loop, how long the device was busy and how long it waited.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import queue
import threading
from typing import Any, Callable, Iterator, Sequence

_POLL_S = 0.1  # how often a blocked feed thread looks for a close


class Feed:
  """`count` batches of `batches`, each with its device arrays `put(batch)`, `ahead` prepared.

  `get` returns (batch, device arrays) in order and raises the stream's error, if any, where
  the loop asks for that batch. `close` stops the thread; the stream is closed by its owner
  after `close` returns (the thread never touches it again).
  """

  def __init__(self, batches: Iterator[Any], count: int, put: Callable[[Any], Any],
               ahead: int = 2):
    # The queue holds ahead - 1 batches and the thread one more while it waits to add it.
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, ahead - 1))
    self._closed = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(batches, count, put),
                                    name="device-feed", daemon=True)
    self._thread.start()

  def _run(self, batches: Iterator[Any], count: int, put: Callable[[Any], Any]) -> None:
    try:
      for _ in range(count):
        if self._closed.is_set():
          return
        batch = next(batches)
        if not self._offer((batch, put(batch))):
          return
    except BaseException as e:  # noqa: BLE001 (re-raised in the loop's thread)
      self._offer(e)  # an item of its own: the others are (batch, device arrays) pairs

  def _offer(self, item: Any) -> bool:
    while not self._closed.is_set():
      try:
        self._queue.put(item, timeout=_POLL_S)
        return True
      except queue.Full:
        continue
    return False

  def get(self, stop: Callable[[], bool] | None = None) -> tuple[Any, Any] | None:
    """The next (batch, device arrays); None as soon as `stop()` says so while waiting (a
    stop request must not wait for an input that may never come: a hung read)."""
    while True:
      try:
        item = self._queue.get(timeout=_POLL_S)
        break
      except queue.Empty:
        if stop is not None and stop():
          return None
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    """Stops the thread (after the decode it may be in) and drops prepared batches."""
    self._closed.set()
    while self._thread.is_alive():
      self._thread.join(_POLL_S)
      self._drain()
    self._drain()

  def _drain(self) -> None:
    with contextlib.suppress(queue.Empty):
      while True:
        self._queue.get_nowait()


class DeviceTimeline:
  """When the device computed: step k ran from max(its dispatch, step k-1's end) to its end."""

  def __init__(self) -> None:
    self.busy: list[tuple[float, float]] = []
    self._last_end = 0.0

  def step(self, dispatched: float, ready: float) -> None:
    start = max(dispatched, self._last_end)
    if ready > start:
      self.busy.append((start, ready))
    self._last_end = max(self._last_end, ready)

  def busy_in(self, spans: Sequence[tuple[str, float, float]]) -> dict[str, float]:
    """Seconds the device was busy within each named span (summed per name)."""
    out: dict[str, float] = collections.defaultdict(float)
    busy, i = self.busy, 0
    for name, t0, t1 in spans:  # both lists are in time order
      while i < len(busy) and busy[i][1] <= t0:
        i += 1
      j = i
      while j < len(busy) and busy[j][0] < t1:
        out[name] += max(0.0, min(t1, busy[j][1]) - max(t0, busy[j][0]))
        j += 1
    return dict(out)


class Rows:
  """Consumes step outputs on one thread, in order; at most `in_flight` outstanding.

  `submit(fn, *args)` runs `fn(*args)` on the thread after the ones before; when more than
  `in_flight` are outstanding it first waits for the oldest and raises its error. After an
  error, later items are skipped (their rows would follow missing ones). `drain` waits for
  all and raises the first error.
  """

  def __init__(self, in_flight: int = 2, name: str = "rows"):
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
    self._pending: collections.deque = collections.deque()
    self._in_flight = in_flight
    self._failed = False

  def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
    if self._failed:
      return
    try:
      fn(*args)
    except BaseException:
      self._failed = True
      raise

  def submit(self, fn: Callable[..., None], *args: Any) -> None:
    """Queues one item, first waiting for the oldest while too many are outstanding."""
    self._pending.append(self._pool.submit(self._guarded, fn, *args))
    while len(self._pending) > self._in_flight:
      self._pending.popleft().result()

  def drain(self) -> None:
    while self._pending:
      self._pending.popleft().result()

  def close(self) -> None:
    """Waits for the item running, drops the rest (a stop at once, or an error on its way)."""
    self._failed = True  # queued items return at once
    self._pending.clear()
    self._pool.shutdown(wait=True)


__all__ = ["DeviceTimeline", "Feed", "Rows"]
