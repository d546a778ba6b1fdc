"""Decode worker processes: each decodes its share of every batch with its own threads.

`input_pipeline.BatchStream` runs them on many-core hosts, where one process' GIL holds a
thread pool to about five busy cores; pixels come back through shared memory. A worker
imports this module, `decode`, NumPy and Pillow (and whatever its reader needs), never
JAX or TensorFlow, and touches no accelerator.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import shutil
import signal
import threading
import traceback
import weakref
from multiprocessing import shared_memory
from typing import Any, Callable, Sequence

import numpy as np

from cbir_jax import decode

# arg -> (encoded image, label): a path, a record position or the bytes themselves go in.
Reader = Callable[[Any], tuple[bytes, int]]
# Spawn, not fork: forking a process whose JAX runtime has threads running is unsafe, and a
# forked child would inherit the parent's accelerator state. Spawn starts a clean
# interpreter; as always with spawn, Python re-imports the parent's main module there
# (imports only: a script's `if __name__ == "__main__"` part does not run, nothing
# initialises JAX's backends).
START_METHOD = "spawn"
SHM_DIR = "/dev/shm"  # where POSIX shared memory lives on Linux (a docker default is 64 MB)


def decode_row(images: np.ndarray, j: int, read: Reader, arg: Any, size: tuple[int, int],
               draft: bool, max_pixels: int) -> tuple[int, int, str, int]:
  """Decodes `read(arg)` into images[j] (left as it is on failure): (width, height, error, label)."""
  label = -1

  def data() -> bytes:
    nonlocal label
    data, label = read(arg)
    return data

  img, w, h, err = decode.safe_decode(data, size, draft=draft, max_pixels=max_pixels)
  if not err:
    images[j] = img
  return w, h, err, label


@dataclasses.dataclass(frozen=True)
class _Setup:
  """What a worker needs, sent once when it starts."""
  read: Reader
  shm_name: str
  shape: tuple[int, ...]  # (slots, rows per piece, height, width, 3)
  threads: int
  draft: bool
  max_pixels: int


def _collect(images: np.ndarray, futures: Sequence[tuple[int, concurrent.futures.Future]]
             ) -> list[tuple[int, int, int, str, int]]:
  """Waits for a piece's rows; blacks out every row not decoded (the slot held an older piece)."""
  concurrent.futures.wait([f for _, f in futures])  # one wake-up per piece
  out, decoded = [], np.zeros(len(images), bool)
  for j, f in futures:
    w, h, err, label = f.result()
    out.append((j, w, h, err, label))
    decoded[j] = not err
  images[~decoded] = 0
  return out


def _serve(tasks: multiprocessing.connection.Connection,
           results: multiprocessing.connection.Connection, s: _Setup) -> None:
  """Worker: pieces (slot, [(row, reader arg)]) in, ("ok", slot, per-row results) out, in order.

  A receiving thread queues each piece's rows on the decode threads as soon as it arrives,
  so the threads go on to the next piece while this thread waits for the last one's.
  """
  # Ctrl-C reaches the whole process group; the parent decides (the job stops between steps).
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    shm = shared_memory.SharedMemory(name=s.shm_name)
    slots = np.ndarray(s.shape, np.uint8, buffer=shm.buf)
    pool = concurrent.futures.ThreadPoolExecutor(s.threads, thread_name_prefix="cbir-decode")
    started: queue.SimpleQueue = queue.SimpleQueue()

    def receive() -> None:
      while True:
        try:
          task = tasks.recv()
        except (EOFError, OSError):  # the parent is gone
          task = None
        if task is None:
          started.put(None)
          return
        slot, rows = task
        started.put((slot, [(j, pool.submit(decode_row, slots[slot], j, s.read, arg,
                                            s.shape[2:4], s.draft, s.max_pixels))
                            for j, arg in rows]))

    threading.Thread(target=receive, name="cbir-decode-receive", daemon=True).start()
    while (item := started.get()) is not None:
      slot, futures = item
      results.send(("ok", slot, _collect(slots[slot], futures)))
  except Exception:  # a reader that raised something else than OSError/ValueError, a bug
    try:
      results.send(("error", traceback.format_exc()))
    except OSError:
      pass
  # At once: no waiting for decodes nobody will collect, nor for the receiving thread.
  os._exit(0)


def shm_room() -> int | None:
  """Free bytes where shared memory lives (None: not a place this can check)."""
  return shutil.disk_usage(SHM_DIR).free if os.path.isdir(SHM_DIR) else None


def _shutdown(procs: list[Any], conns: list[Any], shms: list[Any]) -> None:
  """Ends the workers (they hold nothing that needs a clean stop), then frees the memory."""
  for p in procs:
    if p.pid is not None and p.exitcode is None:
      p.terminate()
  for p in procs:
    if p.pid is not None:
      p.join(5)
      if p.exitcode is None:
        p.kill()
        p.join()
  for c in conns:
    c.close()
  for s in shms:  # after the workers: none of them can attach a name already gone
    s.close()
    s.unlink()


def _layout(workers: int, batch_size: int, batches_ahead: int) -> tuple[int, int, int]:
  """(rows per piece, pieces per batch, buffers per worker) for `batches_ahead` in flight."""
  piece = -(-batch_size // min(workers, batch_size))
  pieces = -(-batch_size // piece)
  return piece, pieces, max(2, -(-batches_ahead * pieces // workers))


def shm_bytes(workers: int, batch_size: int, size: tuple[int, int], batches_ahead: int) -> int:
  """The shared memory `DecodeWorkers` allocates for these settings."""
  piece, _, slots = _layout(workers, batch_size, batches_ahead)
  return workers * slots * piece * size[0] * size[1] * 3


@dataclasses.dataclass(frozen=True)
class Ticket:
  """Where a piece of a batch is decoded: rows [start, start + rows) in `worker`'s `slot`."""
  worker: int
  slot: int
  start: int
  rows: int


class DecodeWorkers:
  """`workers` processes of `threads` decode threads; each batch is split among them.

  A batch of B rows goes out as min(workers, B) pieces of consecutive rows, each to the
  worker with the most free buffers, so every worker has a share of every batch: a job
  of a few batches keeps all of them busy, and the first batch comes back soonest.
  `result(tickets)` waits for a batch's pieces and returns a copy of its pixels; batches
  must be collected in submission order (each worker answers in its own order).
  `close()` (also at exit, or when garbage collected) ends the processes and frees the
  shared memory.

  Raises:
    TypeError: `read` cannot be pickled for the workers.
  """

  def __init__(self, read: Reader, *, workers: int, threads: int, batch_size: int,
               size: tuple[int, int], batches_ahead: int, draft: bool, max_pixels: int):
    self._batch_size = batch_size
    self._piece, self.pieces, slots = _layout(workers, batch_size, batches_ahead)
    self._shape = (slots, self._piece, *size, 3)
    self._procs: list[Any] = []
    self._conns: list[tuple[Any, Any]] = []  # per worker: (tasks out, results in)
    self._pipes: list[Any] = []  # every end this process holds
    self._shms: list[shared_memory.SharedMemory] = []
    self._free: list[list[int]] = []
    self._answered = [False] * workers
    self._close = weakref.finalize(self, _shutdown, self._procs, self._pipes, self._shms)
    ctx = multiprocessing.get_context(START_METHOD)
    try:
      for i in range(workers):
        self._start(ctx, i, read, threads, draft, max_pixels)
    except Exception as e:
      self.close()
      if isinstance(e, pickle.PicklingError) or "pickle" in str(e).lower():
        raise TypeError(f"the reader {read!r} cannot be sent to decode worker processes ({e}); "
                        "give a module-level function or a picklable object, or "
                        "num_workers=0 for threads in this process") from e
      raise

  def _start(self, ctx: Any, i: int, read: Reader, threads: int, draft: bool,
             max_pixels: int) -> None:
    self._shms.append(shared_memory.SharedMemory(create=True, size=int(np.prod(self._shape))))
    task_r, task_w = ctx.Pipe(duplex=False)
    result_r, result_w = ctx.Pipe(duplex=False)
    self._conns.append((task_w, result_r))
    self._pipes.extend([task_w, result_r])
    setup = _Setup(read, self._shms[-1].name, self._shape, threads, draft, max_pixels)
    p = ctx.Process(target=_serve, args=(task_r, result_w, setup), daemon=True,
                    name=f"cbir-decode-{i}")
    self._procs.append(p)
    try:
      p.start()  # pickles `setup` here
    finally:
      task_r.close()
      result_w.close()
    self._free.append(list(range(self._shape[0])))

  def can_submit(self) -> bool:
    """Whether a whole batch's pieces fit in the free buffers."""
    return sum(len(f) for f in self._free) >= self.pieces

  def pids(self) -> list[int]:
    return [p.pid for p in self._procs]

  def submit(self, rows: Sequence[tuple[int, Any]]) -> list[Ticket]:
    """Sends one batch's rows (row j, reader arg); the other rows come back black."""
    if not self.can_submit():
      raise RuntimeError("no free batch buffer: collect results first")
    tickets = []
    for start in range(0, self._batch_size, self._piece):
      w = max(range(len(self._free)), key=lambda i: len(self._free[i]))
      t = Ticket(w, self._free[w].pop(), start, min(self._piece, self._batch_size - start))
      self._conns[w][0].send((t.slot, [(j - start, arg) for j, arg in rows
                                       if start <= j < start + t.rows]))
      tickets.append(t)
    return tickets

  def _gone(self, w: int) -> RuntimeError:
    proc = self._procs[w]
    proc.join(1)  # its exit code, when it is exiting
    hint = "" if self._answered[w] else (
        "; it never answered: if the main script starts the job outside "
        "`if __name__ == \"__main__\":`, each spawned worker re-runs it (Python stops "
        "that, see above) - add the guard, or pass num_workers=0")
    return RuntimeError(f"decode worker {w} (pid {proc.pid}) is gone (exit code "
                        f"{proc.exitcode}; out of memory, or a signal?){hint}")

  def _answer(self, w: int) -> Any:
    """The next message of worker w; RuntimeError when it failed or died."""
    conn, proc = self._conns[w][1], self._procs[w]
    while not conn.poll():  # wakes up on a message, or when the worker is gone
      multiprocessing.connection.wait([conn, proc.sentinel])
      if proc.exitcode is not None and not conn.poll():
        raise self._gone(w)
    try:
      msg = conn.recv()
    except (EOFError, OSError):
      raise self._gone(w) from None
    if msg[0] == "error":
      raise RuntimeError(f"decode worker {w} (pid {proc.pid}) failed:\n{msg[1]}")
    self._answered[w] = True
    return msg

  def result(self, tickets: Sequence[Ticket]
             ) -> tuple[np.ndarray, list[tuple[int, int, int, str, int]]]:
    """(pixels [B, H, W, 3], per-row (j, width, height, error, label)) of a submitted batch.

    Raises:
      RuntimeError: a worker failed (its traceback is in the message) or died.
    """
    images = np.empty((self._batch_size, *self._shape[2:]), np.uint8)
    out = []
    for t in tickets:
      _, slot, rows = self._answer(t.worker)
      if slot != t.slot:  # never hand out another piece's pixels
        raise RuntimeError(f"decode worker {t.worker} answered for buffer {slot}, "
                           f"expected {t.slot}")
      piece = np.ndarray(self._shape[1:], np.uint8, buffer=self._shms[t.worker].buf,
                         offset=t.slot * int(np.prod(self._shape[1:])))
      images[t.start:t.start + t.rows] = piece[:t.rows]
      del piece  # no view may outlive the shared memory
      self._free[t.worker].append(t.slot)
      out.extend((t.start + j, *r) for j, *r in rows)
    return images, out

  def close(self) -> None:
    """Ends the workers (in-flight decodes are dropped) and frees the memory. Idempotent."""
    self._close()
