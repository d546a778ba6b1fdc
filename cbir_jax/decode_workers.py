"""Decode worker processes: each decodes its share of every batch with its own threads.

`input_pipeline.BatchStream` runs them on many-core hosts, where one process' GIL holds a
thread pool to about five busy cores; pixels come back through shared memory. A worker
imports this module, `decode`, NumPy and Pillow (and whatever its reader needs), never
JAX or TensorFlow, and touches no accelerator.

Failures end in one line (`WorkerError`): a worker that dies, sends no heartbeat or is stuck
in a read (a FIFO, a dead network mount) is named, with why, instead of waited for
(`DecodeWorkers._answer`); its memory cannot outlive the job, however it ends (`_Segment`).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import mmap
import multiprocessing
import multiprocessing.connection
import multiprocessing.reduction
import os
import pickle
import queue
import shutil
import signal
import struct
import threading
import time
import traceback
import weakref
from multiprocessing import shared_memory
from typing import Any, Callable, Sequence

import numpy as np

from cbir_jax import decode
# A light module (no imports): the job prints an ExtractError as one line, not a traceback.
from cbir_jax.job.errors import ExtractError

# arg -> (encoded image, label): a path, a record position or the bytes themselves go in.
Reader = Callable[[Any], tuple[bytes, int]]
# Spawn, not fork: forking a process whose JAX runtime has threads running is unsafe, and a
# forked child would inherit the parent's accelerator state. Spawn starts a clean
# interpreter; as always with spawn, Python re-imports the parent's main module there
# (imports only: a script's `if __name__ == "__main__"` part does not run, nothing
# initialises JAX's backends).
START_METHOD = "spawn"
SHM_DIR = "/dev/shm"  # where POSIX shared memory lives on Linux (a docker default is 64 MB)
# Each worker's memory starts with a header: a heartbeat counter (uint64 at offset 0) that a
# thread of the worker bumps every HEARTBEAT_S. A worker whose counter stands still for
# SILENT_S (STARTUP_S before its first beat: a spawned interpreter importing NumPy and
# Pillow on a loaded host) is stopped (SIGSTOP) or hung, and the parent says so instead of
# waiting forever. The thread needs no decode to finish, so slow images never look silent.
HEADER = 64
# After the counter, the oldest read in progress, set by the same thread: its start
# (float64, time.monotonic: one clock for all processes on Linux; 0: none), then its piece's
# buffer and its row in the piece (int64 each). A healthy read of one image takes
# milliseconds; one that has not returned within SILENT_S is stuck (see READ_AT).
BEAT, READ_AT, READ_WHERE = struct.Struct("<Q"), struct.Struct("<d"), struct.Struct("<qq")
HEARTBEAT_S = 0.25
SILENT_S = 5.0
STARTUP_S = 120.0
POLL_S = 0.5  # how often the parent looks at the heartbeat while it waits


class WorkerError(ExtractError):
  """A decode worker died, or went silent: one line naming it, why and what to do."""


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


class _Segment:
  """One worker's shared memory: its heartbeat header, then its batch buffers.

  On Linux an anonymous memory file (memfd) handed to the worker as a file descriptor:
  it has no name, so nothing can outlive the processes that map it, even when the whole
  process group is SIGKILLed (a named /dev/shm segment stays until someone unlinks it,
  and a cleanup of ours never runs after SIGKILL). Elsewhere a named POSIX segment,
  unlinked by the parent at close.
  """

  def __init__(self, size: int):
    self.size, self.fd, self._shm = size, -1, None
    if hasattr(os, "memfd_create"):
      self.fd = os.memfd_create("cbir-decode", os.MFD_CLOEXEC)
      try:
        os.ftruncate(self.fd, size)
        self.mem: Any = mmap.mmap(self.fd, size)
      except BaseException:
        self.close_fd()
        raise
    else:
      self._shm = shared_memory.SharedMemory(create=True, size=size)
      self.mem = self._shm.buf

  def handle(self) -> _Handle:
    return _Handle(self.size, self.fd, self._shm.name if self._shm is not None else "")

  def beat(self) -> int:
    return BEAT.unpack_from(self.mem)[0]

  def oldest_read(self) -> tuple[float, int, int] | None:
    """(start, buffer, row) of the worker's oldest read in progress, as it last said."""
    at = READ_AT.unpack_from(self.mem, 8)[0]  # when first, then where (see _heartbeat)
    return (at, *READ_WHERE.unpack_from(self.mem, 16)) if at else None

  def close_fd(self) -> None:
    """Once the worker has its own copy (started): the mapping stays."""
    if self.fd >= 0:
      os.close(self.fd)
      self.fd = -1

  def close(self) -> None:
    self.close_fd()
    if self._shm is not None:
      self._shm.close()
      self._shm.unlink()
    else:
      with contextlib.suppress(BufferError):  # a view still exported: unmapped when collected
        self.mem.close()


@dataclasses.dataclass(frozen=True)
class _Handle:
  """How a worker maps its segment: a memfd (sent as a file descriptor) or a name."""
  size: int
  fd: int = -1
  name: str = ""

  def __reduce__(self) -> Any:
    if self.fd < 0:
      return _Handle, (self.size, -1, self.name)
    # Pickled by Process.start: the descriptor itself goes to the spawned child.
    return _handle_with_fd, (self.size, multiprocessing.reduction.DupFd(self.fd))

  def attach(self) -> Any:
    """In the worker: the segment's memory (mmap or memoryview)."""
    if self.fd < 0:
      _ATTACHED.append(shared_memory.SharedMemory(name=self.name))  # kept: its buf lives
      return _ATTACHED[-1].buf
    mem = mmap.mmap(self.fd, self.size)
    os.close(self.fd)
    return mem


_ATTACHED: list[shared_memory.SharedMemory] = []  # in a worker, for its lifetime


def _handle_with_fd(size: int, dup: Any) -> _Handle:
  return _Handle(size, dup.detach())


@dataclasses.dataclass(frozen=True)
class _Setup:
  """What a worker needs, sent once when it starts."""
  read: Reader
  memory: _Handle
  shape: tuple[int, ...]  # (slots, rows per piece, height, width, 3)
  threads: int
  draft: bool
  max_pixels: int


class _Reads:
  """Worker: the reads in progress, by thread: (start, buffer, row in the piece)."""

  def __init__(self) -> None:
    self._lock = threading.Lock()
    self._now: dict[int, tuple[float, int, int]] = {}

  def watched(self, read: Reader, slot: int, j: int) -> Reader:
    def run(arg: Any) -> tuple[bytes, int]:
      me = threading.get_ident()
      with self._lock:
        self._now[me] = (time.monotonic(), slot, j)
      try:
        return read(arg)
      finally:
        with self._lock:
          self._now.pop(me, None)
    return run

  def oldest(self) -> tuple[float, int, int] | None:
    with self._lock:
      return min(self._now.values(), default=None)


def _heartbeat(mem: Any, reads: _Reads) -> None:
  """Worker thread: bumps the header's counter while the process runs (see SILENT_S), and
  publishes its oldest read in progress (see READ_AT)."""
  n = 0
  while True:
    n += 1
    oldest = reads.oldest()
    if oldest is None:
      READ_AT.pack_into(mem, 8, 0.0)
    else:  # where first, then when: a start the parent sees always has its row beside it
      READ_WHERE.pack_into(mem, 16, *oldest[1:])
      READ_AT.pack_into(mem, 8, oldest[0])
    BEAT.pack_into(mem, 0, n)
    time.sleep(HEARTBEAT_S)


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
    mem = s.memory.attach()
    reads = _Reads()
    threading.Thread(target=_heartbeat, args=(mem, reads), name="cbir-decode-beat",
                     daemon=True).start()
    slots = np.ndarray(s.shape, np.uint8, buffer=mem, offset=HEADER)
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
        started.put((slot, [(j, pool.submit(decode_row, slots[slot], j,
                                            reads.watched(s.read, slot, j), arg,
                                            s.shape[2:4], s.draft, s.max_pixels))
                            for j, arg in rows]))

    threading.Thread(target=receive, name="cbir-decode-receive", daemon=True).start()
    while (item := started.get()) is not None:
      slot, futures = item
      results.send(("ok", slot, _collect(slots[slot], futures)))
  except Exception:  # a reader that raised something else than OSError/ValueError, a bug
    with contextlib.suppress(OSError):  # the parent is gone
      results.send(("error", traceback.format_exc()))
  # At once: no waiting for decodes nobody will collect, nor for the receiving thread.
  os._exit(0)


def shm_room() -> int | None:
  """Free bytes where shared memory lives (None: not a place this can check).

  None with memfds (Linux): they are not files of /dev/shm, so its size (docker's 64 MB
  default) does not bound them; the memory limit does, like any memory of the job.
  """
  if hasattr(os, "memfd_create"):
    return None
  return shutil.disk_usage(SHM_DIR).free if os.path.isdir(SHM_DIR) else None


_RERUN = "complete shards are kept, rerun the same command to continue"
_CRASH = ("a crash in native decoding code (Pillow or a library it uses) on some image; "
          "please report it with the image")
# The likely cause of a worker's death by each signal, and what to do.
_WHY = {
    "SIGKILL": "out of memory (the kernel's OOM killer; see `dmesg`) or killed by hand; "
               "fewer decode workers (--num_workers) or a smaller --batch_size need less",
    "SIGBUS": "its shared memory ran out (the memory limit, or without memfds the /dev/shm "
              "size, e.g. docker --shm-size) or a file it read changed under it; give it more "
              "room, or decode with threads (--num_workers=0)",
    "SIGSEGV": _CRASH,
    "SIGABRT": _CRASH,
}
_OUTSIDE = ("a signal from outside this job (a user, a scheduler); signal the job's main "
            "process to stop it")


def _stopped(pid: int) -> bool:
  """Whether a process is stopped (SIGSTOP/SIGTSTP) or traced; False where /proc cannot say."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      return f.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")
  except (OSError, IndexError):
    return False


def _shutdown(procs: list[Any], conns: list[tuple[Any, Any]], segments: list[_Segment]
              ) -> None:
  """Ends the workers at once (they hold nothing that needs a clean stop; SIGKILL also ends
  a stopped one), then frees the memory."""
  for p in procs:
    if p.pid is not None and p.exitcode is None:
      p.kill()
  for p in procs:
    if p.pid is not None:
      p.join()
  for task_w, result_r in conns:
    task_w.close()
    result_r.close()
  for s in segments:
    s.close()


def _layout(workers: int, batch_size: int, batches_ahead: int) -> tuple[int, int, int]:
  """(rows per piece, pieces per batch, buffers per worker) for `batches_ahead` in flight."""
  piece = -(-batch_size // min(workers, batch_size))
  pieces = -(-batch_size // piece)
  return piece, pieces, max(2, -(-batches_ahead * pieces // workers))


def shm_bytes(workers: int, batch_size: int, size: tuple[int, int], batches_ahead: int) -> int:
  """The shared memory `DecodeWorkers` allocates for these settings."""
  piece, _, slots = _layout(workers, batch_size, batches_ahead)
  return workers * (HEADER + slots * piece * size[0] * size[1] * 3)


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
  shared memory. A worker that dies, or sends no heartbeat for SILENT_S seconds, makes
  `submit` or `result` raise `WorkerError` (one line naming it, why and what to do).

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
    self._segments: list[_Segment] = []
    self._free = [list(range(slots)) for _ in range(workers)]  # per worker: free buffers
    # Per worker: buffer -> {row: reader arg}, to name the file of a read that hangs.
    self._sent: list[dict[int, dict[int, Any]]] = [{} for _ in range(workers)]
    self._answered = [False] * workers
    self._close = weakref.finalize(self, _shutdown, self._procs, self._conns, self._segments)
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
    self._segments.append(_Segment(HEADER + int(np.prod(self._shape))))
    task_r, task_w = ctx.Pipe(duplex=False)
    result_r, result_w = ctx.Pipe(duplex=False)
    self._conns.append((task_w, result_r))
    setup = _Setup(read, self._segments[-1].handle(), self._shape, threads, draft, max_pixels)
    p = ctx.Process(target=_serve, args=(task_r, result_w, setup), daemon=True,
                    name=f"cbir-decode-{i}")
    self._procs.append(p)
    try:
      p.start()  # pickles `setup` here
    finally:
      task_r.close()
      result_w.close()
      self._segments[-1].close_fd()  # the worker holds its own

  def can_submit(self) -> bool:
    """Whether a whole batch's pieces fit in the free buffers."""
    return sum(len(f) for f in self._free) >= self.pieces

  def submit(self, rows: Sequence[tuple[int, Any]]) -> list[Ticket]:
    """Sends one batch's rows (row j, reader arg); the other rows come back black."""
    if not self.can_submit():
      raise RuntimeError("no free batch buffer: collect results first")
    tickets = []
    for start in range(0, self._batch_size, self._piece):
      w = max(range(len(self._free)), key=lambda i: len(self._free[i]))
      t = Ticket(w, self._free[w].pop(), start, min(self._piece, self._batch_size - start))
      piece = [(j - start, arg) for j, arg in rows if start <= j < start + t.rows]
      self._sent[w][t.slot] = dict(piece)
      try:
        self._conns[w][0].send((t.slot, piece))
      except OSError:  # BrokenPipeError: it died (its exit code may not be in yet)
        raise self._dead(w) from None
      tickets.append(t)
    return tickets

  def _dead(self, w: int) -> RuntimeError:
    """The error of worker w found dead: the failure it reported before it exited (a
    reader's bug, waiting in its pipe behind answers nobody will collect), else `_gone`."""
    conn = self._conns[w][1]
    with contextlib.suppress(EOFError, OSError):
      while conn.poll():
        msg = conn.recv()
        if msg[0] == "error":
          return self._failed(w, msg[1])
    return self._gone(w)

  def _failed(self, w: int, trace: str) -> RuntimeError:
    return RuntimeError(f"decode worker {w} (pid {self._procs[w].pid}) failed:\n{trace}")

  def _gone(self, w: int) -> WorkerError:
    """One line: which worker died, of what, and what to do."""
    proc = self._procs[w]
    proc.join(5)  # its exit code: a broken pipe can come before the kernel has reaped it
    code = proc.exitcode
    when = "" if self._answered[w] else " before its first answer"
    what = f"decode worker {w} (pid {proc.pid})"
    if code is not None and code < 0:
      try:
        name = signal.Signals(-code).name
      except ValueError:
        name = f"signal {-code}"
      return WorkerError(f"{what} is gone, killed by {name}{when}: "
                         f"{_WHY.get(name, _OUTSIDE)}; {_RERUN}")
    if code and not self._answered[w]:  # Python stopped it while it started
      return WorkerError(
          f"{what} exited with code {code}{when} (its error is above): if the main script "
          "starts the job outside `if __name__ == \"__main__\":`, each spawned worker re-runs "
          "it - add the guard, or decode with threads (num_workers=0, --num_workers=0)")
    how = "is gone" if code is None else f"exited with code {code}"
    return WorkerError(f"{what} {how}{when} (closed its pipe); {_RERUN}")

  def _silent(self, w: int, seconds: float) -> WorkerError:
    proc = self._procs[w]
    return WorkerError(
        f"decode worker {w} (pid {proc.pid}) sent no heartbeat for {seconds:.0f} s: it is "
        "stopped (SIGSTOP, a debugger) or hung; do not stop decode workers on their own "
        f"(stop the whole job: SIGTSTP/SIGCONT to its process group); {_RERUN}")

  def _stuck(self, w: int, since: float) -> WorkerError | None:
    """The error naming the file worker w's oldest read in progress has been reading for
    SILENT_S (counted from `since` at the earliest: when this process was last seen
    resumed); None when no read has taken that long."""
    oldest = self._segments[w].oldest_read()
    if oldest is None or (seconds := time.monotonic() - max(oldest[0], since)) <= SILENT_S:
      return None
    arg = self._sent[w].get(oldest[1], {}).get(oldest[2])
    what = (repr(arg) if isinstance(arg, str) else f"record {arg}" if isinstance(arg, int)
            else "an image")
    return WorkerError(
        f"decode worker {w} (pid {self._procs[w].pid}) has been reading {what} "
        f"for {seconds:.0f} s without an answer: a file that never ends or never "
        "comes (a FIFO or device, a dead network mount); take it out of the input or fix "
        f"its storage; {_RERUN}")

  def _answer(self, w: int) -> Any:
    """The next message of worker w; RuntimeError when it failed, WorkerError when it died,
    sent no heartbeat for SILENT_S (STARTUP_S before its first), or has had a read in
    progress for SILENT_S."""
    conn, proc, segment = self._conns[w][1], self._procs[w], self._segments[w]
    beat, last = segment.beat(), time.monotonic()
    changed, resumed = last, 0.0
    while not conn.poll():  # wakes up on a message, when the worker is gone, or to look
      multiprocessing.connection.wait([conn, proc.sentinel], timeout=POLL_S)
      if proc.exitcode is not None and not conn.poll():
        raise self._gone(w)
      now, seen = time.monotonic(), segment.beat()
      # A long gap between looks means this process was stopped or starved itself (the
      # whole job suspended and resumed): the worker gets a fresh chance.
      if seen != beat or now - last > POLL_S + 2.0:
        beat, changed = seen, now
      if now - last > POLL_S + 2.0:
        resumed = now
      last = now
      # Before its first beat it may still be importing; unless it is stopped already.
      started = beat or _stopped(proc.pid)
      if now - changed > (SILENT_S if started else max(SILENT_S, STARTUP_S)):
        raise self._silent(w, now - changed)
      # Alive and beating, but stuck in a read. Only while it beats: a stopped worker's
      # header is stale, and "no heartbeat" above is what it needs to hear.
      if now - changed <= POLL_S + 2 * HEARTBEAT_S and (hung := self._stuck(w, resumed)) is not None:
        raise hung
    try:
      msg = conn.recv()
    except (EOFError, OSError):
      raise self._gone(w) from None
    if msg[0] == "error":
      raise self._failed(w, msg[1])
    self._answered[w] = True
    return msg

  def result(self, tickets: Sequence[Ticket]
             ) -> tuple[np.ndarray, list[tuple[int, int, int, str, int]]]:
    """(pixels [B, H, W, 3], per-row (j, width, height, error, label)) of a submitted batch.

    Raises:
      RuntimeError: a worker's reader failed (its traceback is in the message).
      WorkerError: a worker died, or sent no heartbeat or was stuck in a read for SILENT_S.
    """
    images = np.empty((self._batch_size, *self._shape[2:]), np.uint8)
    out = []
    for t in tickets:
      _, slot, rows = self._answer(t.worker)
      if slot != t.slot:  # never hand out another piece's pixels
        raise RuntimeError(f"decode worker {t.worker} answered for buffer {slot}, "
                           f"expected {t.slot}")
      piece = np.ndarray(self._shape[1:], np.uint8, buffer=self._segments[t.worker].mem,
                         offset=HEADER + t.slot * int(np.prod(self._shape[1:])))
      images[t.start:t.start + t.rows] = piece[:t.rows]
      del piece  # no view may outlive the shared memory
      self._free[t.worker].append(t.slot)
      out.extend((t.start + j, *r) for j, *r in rows)
    return images, out

  def close(self) -> None:
    """Ends the workers (in-flight decodes are dropped) and frees the memory. Idempotent."""
    self._close()
