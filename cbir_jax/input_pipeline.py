"""Host input: list image folders, and decode images into fixed-size batches on every core.

Rows keep their input order; a file that cannot be read or decoded becomes a row with a
reason, never an exception. No TensorFlow: `tfds_input` feeds TFDS records through here too.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import os
import pathlib
import pickle
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from absl import logging

from cbir_jax import canvas, decode, decode_workers, gpu_decode, turbo_decode
from cbir_jax.decode import (IMAGE_EXTENSIONS, MAX_PIXELS, _to_rgb, decode_image,  # noqa: F401
                             read_file)


@dataclasses.dataclass(frozen=True)
class Record:
  """One input image: where it comes from and its label (-1 when unknown)."""
  key: str  # a file path, or a TFDS id
  label: int = -1
  label_name: str = ""


@dataclasses.dataclass
class Batch:
  """A fixed-size batch of decoded rows.

  Padding rows (past the input's end, or laid out by a job) have `valid=False`, and that
  alone marks them; they also carry index -1, a black image and `ok=False`. `ok` implies
  `valid`: a failure row is valid, not ok, and says why in `error`.
  """
  images: np.ndarray  # uint8 [B, H, W, 3]
  index: np.ndarray  # int64 [B]: position of the record in the input list (-1: padding)
  width: np.ndarray  # int32 [B]: original size, before resizing (0: failure or padding)
  height: np.ndarray
  ok: np.ndarray  # bool [B]: decoded
  valid: np.ndarray  # bool [B]: a real input row (False only for padding)
  error: list[str]  # per row, "" when ok
  # Filled only by sources that carry them with the bytes (TFDS): per-row key and label.
  key: list[str] | None = None
  label: np.ndarray | None = None
  # Canvas mode (device resize): `images` are flat canvases [B, C * C * 3] of one bucket side
  # C, image j stored contiguously at the start of images[j] (`canvas`); 0 x 0 for padding
  # and failures.
  sizes: np.ndarray | None = None  # int32 [B, 2]: (height, width) in the canvas
  # Canvas mode: per row, who decoded it (turbo_decode.SIMPLEJPEG, "pillow"; "" unread or
  # padding) and why Pillow did ("" otherwise), for the job's decoder tally.
  decoders: list[str] | None = None
  routes: list[str] | None = None
  _recycle: Callable[[np.ndarray], None] | None = dataclasses.field(
      default=None, repr=False, compare=False)

  @property
  def bucket(self) -> int:
    """The canvas side (canvas mode), else the image height: which compiled step runs it."""
    return canvas.side_of(self.images) if self.sizes is not None else int(self.images.shape[1])

  def recycle(self) -> None:
    """Canvas mode: hands the canvases back (`canvas.POOL`): later batches are decoded into
    them. Only when nothing reads them any more, nor a device array that may alias them
    (after the step that took them has finished). `images` is None afterwards."""
    if self._recycle is not None and self.images is not None:
      self._recycle(self.images)
    self.images, self._recycle = None, None

  @classmethod
  def padding(cls, batch_size: int, image_size: int | tuple[int, int], *,
              keyed: bool = False, buckets: Sequence[int] | None = None) -> Batch:
    """An all-padding batch (a step where this process has no records left); with `buckets`
    (canvas mode): read-only zero canvases of the smallest bucket, taking no memory (a stream
    puts a buffer in their place: zeroing 5 MB per batch cost 2.6% of its CPU), sizes 0 x 0."""
    images = (np.broadcast_to(np.uint8(0), (batch_size, canvas.slot_bytes(min(buckets))))
              if buckets else np.zeros((batch_size, *decode._size(image_size), 3), np.uint8))
    return cls(images=images, index=np.full(batch_size, -1, np.int64),
               width=np.zeros(batch_size, np.int32), height=np.zeros(batch_size, np.int32),
               ok=np.zeros(batch_size, bool), valid=np.zeros(batch_size, bool),
               error=[""] * batch_size, key=[""] * batch_size if keyed else None,
               label=np.full(batch_size, -1, np.int64) if keyed else None,
               sizes=np.zeros((batch_size, 2), np.int32) if buckets else None,
               decoders=[""] * batch_size if buckets else None,
               routes=[""] * batch_size if buckets else None)


# --- listing folders ---------------------------------------------------------------------


@dataclasses.dataclass
class Listing:
  """What a folder holds: the images to read, and the other files counted by extension."""
  records: list[Record]
  skipped: collections.Counter  # lower-case extension ("" for none) -> files not read
  loops: list[str] = dataclasses.field(default_factory=list)  # directory links not followed
  documents: list[str] = dataclasses.field(default_factory=list)  # README, LICENSE*, *.md


# The `skipped` key of directory links not followed (shown apart by `format_skipped`).
LINK_LOOP = "(directory link loop)"


def _dir_id(path: str | os.DirEntry) -> tuple[int, int] | None:
  """(device, inode) of a directory, following links; None when it cannot be read."""
  try:
    st = path.stat() if isinstance(path, os.DirEntry) else os.stat(path)
  except OSError:
    return None
  return st.st_dev, st.st_ino


def _walk(root: str) -> tuple[list[str], collections.Counter, list[str], list[str]]:
  """(image paths, files not read by extension, directory links refused, documents) under `root`.

  An explicit stack, not recursion: a tree of any depth lists. A directory link to a folder
  on its own path from `root` (an ancestor, or itself) would never end and is refused.
  Folders that cannot be read are passed over, as `os.walk` does.
  """
  paths: list[str] = []
  skipped: collections.Counter = collections.Counter()
  loops: list[str] = []
  documents: list[str] = []
  stack = [(root, frozenset([_dir_id(root)]))]  # (folder, ids of it and its ancestors)
  while stack:
    folder, above = stack.pop()
    try:
      with os.scandir(folder) as it:
        entries = list(it)
    except OSError:
      continue
    for entry in entries:
      path = entry.path  # folder joined with the name
      try:
        is_dir = entry.is_dir()  # follows links
      except OSError:
        is_dir = False
      if not is_dir:
        ext = os.path.splitext(entry.name)[1].lower()
        if ext in IMAGE_EXTENSIONS:
          paths.append(path)
        elif is_document(entry.name):
          documents.append(path)
        else:
          skipped[ext] += 1
        continue
      ident = _dir_id(entry)
      if ident is None:
        continue
      if ident in above:
        loops.append(path)
        skipped[LINK_LOOP] += 1
        continue
      stack.append((path, above | {ident}))
  return paths, skipped, sorted(loops), sorted(documents)


# A collection's own documentation (README, LICENSE, notes): not images and expected in a
# folder of images, so not reported as skipped files (the first command users run lists
# the sample folder, whose LICENSES.md is no stray file).
DOCUMENT_STEMS = ("readme", "license", "licence", "licenses", "licences", "copying", "notice",
                  "authors", "changelog", "citation")
DOCUMENT_EXTENSIONS = (".md", ".rst")


def is_document(name: str) -> bool:
  """A documentation file by its name: README*, LICENSE*, COPYING*, ... or *.md, *.rst."""
  low = name.lower()
  stem = low.split(".", 1)[0].replace("-", "_").split("_", 1)[0]  # LICENSE-photos: license
  return stem in DOCUMENT_STEMS or os.path.splitext(low)[1] in DOCUMENT_EXTENSIONS


def list_folder(root: str | os.PathLike) -> Listing:
  """Every image under `root` (recursive, sorted path order), and what was left out.

  A file's label is its first-level subfolder (classes numbered in sorted name order); files
  directly in `root` get label -1. Images are the extensions Pillow can decode here
  (`IMAGE_EXTENSIONS`, case-insensitive); other files are counted in `skipped`, but
  documentation files (`is_document`) are listed in `documents`. Directory symlinks are
  followed and their files listed under the link's path (a class folder may be a link); a
  link back to a folder above it (a loop) is not followed, counted in `skipped` and named in
  a warning. Paths are `root` joined with the relative path.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
  paths, skipped, loops, documents = _walk(os.fspath(root))
  if loops:
    logging.warning("input: %d directory link%s not followed: %s leads back to a folder above "
                    "it (a loop)%s", len(loops), "s" if len(loops) != 1 else "", loops[0],
                    "" if len(loops) == 1 else ", and others")
  paths.sort()
  rel = (pathlib.PurePath(os.path.relpath(p, root)).parts for p in paths)
  names = [parts[0] if len(parts) > 1 else "" for parts in rel]  # "": directly in root
  class_index = {c: i for i, c in enumerate(sorted(set(names) - {""}))}
  records = [Record(key=p, label=class_index.get(n, -1), label_name=n)
             for p, n in zip(paths, names)]
  return Listing(records=records, skipped=skipped, loops=loops, documents=documents)


def folder_records(root: str | os.PathLike) -> list[Record]:
  """`list_folder(root).records`."""
  return list_folder(root).records


def format_skipped(skipped: collections.Counter) -> str:
  """"skipped 3 files: .txt 2, .heic 1" (most frequent first); "" when nothing was skipped.

  Directory links not followed (`LINK_LOOP`) are said apart: "...; 1 directory link not
  followed (a loop)".
  """
  files = {ext: n for ext, n in skipped.items() if ext != LINK_LOOP and n}
  total, loops = sum(files.values()), skipped.get(LINK_LOOP, 0)
  parts = ", ".join(f"{ext or '(no extension)'} {n}"
                    for ext, n in sorted(files.items(), key=lambda kv: (-kv[1], kv[0])))
  out = [f"skipped {total} file{'s' if total != 1 else ''}: {parts}"] if total else []
  if loops:
    out.append(f"{loops} directory link{'s' if loops != 1 else ''} not followed (a loop)")
  return "; ".join(out)


# --- the decoding engine -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
  """One input row: its `Batch.index`, its key (keyed streams) and its stream's `read` argument,
  small and picklable (a path, a record position, or the bytes), so it can go to a worker."""
  index: int
  arg: Any
  key: str = ""


def carried(arg: tuple[bytes, int]) -> tuple[bytes, int]:
  """The reader of rows whose `arg` is already (encoded image, label)."""
  return arg


def _unlabelled(read: Callable[[str], bytes], key: str) -> tuple[bytes, int]:
  """key -> bytes as a reader (`functools.partial(_unlabelled, read)`: picklable if `read` is)."""
  return read(key), -1


def default_threads() -> int:
  """The cores this process may use (its CPU affinity), the default decode parallelism."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Decode parallelism when it is not given, from images decoded and resized to 224 per
# wall-second (draft on):
# - 16-core H200 host, 500x375 JPEGs (docs/gpu/2026-11-27_h200_input_scaling.log):
#     1, 2, 4, 8, 16 threads in one process:         278, 555, 1045, 1367, 1208
#     1, 2, 4, 8, 16 processes (one decode at a time): 299, 617, 1234, 2032, 3660
#   Threads scale linearly to 4 (94%) and stall past 8: per CPU-second they stay at
#   ~260-290 images, the GIL (the Python part of each decode) caps a process at ~5 busy
#   cores. 4032x3024 JPEGs spend their time in Pillow with the GIL released; threads
#   scale there (42, 78, 135, 286, 456).
# - 2-core development machine, these worker processes against 2 threads, side by side
#   (docs/benchmarks.md, "Worker processes"; shared, load 6-10): past start-up equal
#   within the noise (0.93-1.15x on imagenet-sample and phone-size JPEGs), whole runs
#   of 256-1000 photos 0.60-0.91x and per CPU-second 0.60-0.90x: every stream pays
#   0.5-1.6 s and the CPU of starting its workers, and 2 cores have no GIL limit to lift.
# So: threads in this process up to 4 cores, where they scale linearly; above that,
# ceil(cores / 4) processes of ceil(cores / processes) threads (16 cores: 4 x 4), each in
# the range where its threads scale, and the main process left to the accelerator.
THREADS_ALONE_UP_TO = 4
THREADS_PER_WORKER = 4


def decode_parallelism(num_workers: int | None = None, num_threads: int | None = None, *,
                       cores: int | None = None) -> tuple[int, int]:
  """(worker processes, decode threads per process); 0 processes: threads in this process.

  `num_workers` None: split by the rule above, for `num_threads` decodes at once if given
  (a job's `--num_threads=8` keeps meaning eight decodes, as 2 processes x 4 threads), else
  for `cores` (default: those this process may use). `num_workers` given: `num_threads` per
  process (None: the cores over the processes).
  """
  cores = cores or default_threads()
  if num_workers is None:
    wanted = num_threads or cores
    num_workers = 0 if wanted <= THREADS_ALONE_UP_TO else -(-wanted // THREADS_PER_WORKER)
    num_threads = wanted if num_workers == 0 else -(-wanted // num_workers)
  elif num_threads is None:
    num_threads = cores if num_workers == 0 else -(-cores // num_workers)
  if num_workers < 0 or num_threads < 1:
    raise ValueError(f"num_workers must be >= 0 and num_threads >= 1, got {num_workers}, "
                     f"{num_threads}")
  return num_workers, num_threads


def _picklable(obj: Any) -> bool:
  try:
    pickle.dumps(obj)
    return True
  except Exception:  # pickle raises several types (PicklingError, TypeError, AttributeError)
    return False


def _size(n: float) -> str:
  """Bytes said so that small amounts do not read as 0 ("12.0 KB", "3.5 MB")."""
  for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{int(n)} bytes"


def _choose_parallelism(read: decode_workers.Reader, num_workers: int | None,
                        num_threads: int | None, batch_size: int, size: tuple[int, int],
                        ahead: int, buckets: Sequence[int] | None) -> tuple[int, int]:
  """`decode_parallelism`, with as many threads here where processes cannot run: canvas
  mode (`buckets`: worker processes return fixed-size resized rows through shared memory);
  chosen automatically, for a reader that does not pickle (a closure); asked for or not,
  where shared memory lacks room for their batch buffers (with one warning line)."""
  workers, threads = decode_parallelism(num_workers, num_threads)
  if workers and (buckets or num_workers is None and not _picklable(read)):
    return 0, workers * threads
  need = decode_workers.shm_bytes(workers, batch_size, size, ahead) if workers else 0
  room = decode_workers.shm_room() if workers else None
  if room is not None and room < need:
    logging.warning("input: %d decode processes need %s of shared memory, %s has %s free; "
                    "decoding with threads in this process instead (a container may need a "
                    "larger /dev/shm, e.g. docker --shm-size)", workers, _size(need),
                    decode_workers.SHM_DIR, _size(room))
    return 0, workers * threads
  return workers, threads


def _finish(b: Batch, rows: Iterable[tuple[int, int, int, str, int]]) -> Batch:
  """A decoded batch, from per row (slot j, width, height, error, label)."""
  for j, w, h, err, label in rows:
    b.width[j], b.height[j], b.ok[j], b.error[j] = w, h, not err, err
    if b.label is not None:
      b.label[j] = label
  return b


class _CanvasBatch:
  """One canvas-mode batch in flight. Stage 1 per row: read it, then plan a simplejpeg decode
  (headers only) or decode it with Pillow. Once every row's size is known: the bucket, a buffer
  and stage 2 per row, its pixels into its slot; the task that ends stage 1 queues stage 2, so
  no thread ever waits. Rows' sizes, errors and decoders go straight into `batch`."""

  def __init__(self, batch: Batch, rows: list[tuple[int, Any]], engine: _Canvases):
    self.batch, self._engine = batch, engine
    self._args = dict(rows)  # slot -> the row's `read` argument
    self._labels = dict.fromkeys(self._args, -1)
    self._pixels: dict[int, turbo_decode.Plan | np.ndarray] = {}  # a plan, or Pillow's pixels
    self._left = len(rows)  # tasks of the current stage not ended
    self._lock, self._done = threading.Lock(), threading.Event()
    self._failure: BaseException | None = None
    if not rows:
      self._stage_two()
    for j in self._args:
      engine.run(1, self._task, self._sniff, j, self._stage_two)

  def _sniff(self, j: int) -> None:
    try:
      data, self._labels[j] = self._engine.read(self._args[j])
    except (OSError, ValueError) as e:
      self.batch.error[j] = (str(e) if isinstance(e, ValueError) else
                             f"cannot read file: {e}") or type(e).__name__
      return
    plan = self._engine.plan(data) if data else "empty file"  # Pillow's path words it
    if isinstance(plan, str):
      return self._pillow(j, data, plan)
    self._pixels[j], self.batch.decoders[j] = plan, turbo_decode.SIMPLEJPEG
    self.batch.width[j], self.batch.height[j] = plan.original

  def _pillow(self, j: int, data: bytes, why: str) -> None:
    """The Pillow path (`canvas.decode_placed`): the row's pixels, or its reason."""
    b = self.batch
    b.decoders[j], b.routes[j] = gpu_decode.PILLOW, why
    self._pixels.pop(j, None)
    try:
      placed, (b.width[j], b.height[j]) = self._engine.place(data)
      self._pixels[j] = placed.pixels
    except ValueError as e:
      b.error[j], b.width[j], b.height[j] = str(e) or type(e).__name__, 0, 0

  def _fill(self, j: int) -> None:
    b, got = self.batch, self._pixels[j]
    if isinstance(got, turbo_decode.Plan):
      try:
        turbo_decode.decode_into(got, b.images[j])
        return
      except ValueError:  # refused (damaged, or a libjpeg warning): Pillow decides
        self._pillow(j, got.data, "simplejpeg refused the data")
      pixels = self._pixels.get(j)
      if pixels is not None and pixels.shape[:2] != got.shape:
        # Never seen: both decode the same header at the same scale. The batch's canvas is
        # sized for the plan, so a different image cannot be placed.
        b.error[j] = f"canvas: Pillow decoded {pixels.shape[:2]}, simplejpeg's plan was {got.shape}"
        b.width[j] = b.height[j] = 0
        del self._pixels[j]
    if j in self._pixels:
      canvas.put(b.images[j], self._pixels[j])
    else:  # became a failure here: 0 x 0, as every failure row is
      b.sizes[j] = 0

  def _task(self, work: Callable[[int], None], j: int, then: Callable[[], None]) -> None:
    """Runs one row's stage; the stage's last task runs `then`."""
    try:
      work(j)
    except BaseException as e:  # pylint: disable=broad-except  # a bug: raised by wait()
      self._failure = self._failure or e
    with self._lock:
      self._left -= 1
      last = self._left == 0
    if last:
      then()

  def _stage_two(self) -> None:
    try:
      if self._failure is None:
        b = self.batch
        for j, got in self._pixels.items():
          b.sizes[j] = got.shape[:2]
        b.images = canvas.POOL.take(len(b.index), canvas.bucket_for(b.sizes, self._engine.buckets))
        b._recycle = canvas.POOL.give  # pylint: disable=protected-access
        todo = list(self._pixels)
        self._left = len(todo)  # before any of them runs
        for j in todo:
          self._engine.run(2, self._task, self._fill, j, self._done.set)
        if todo:
          return
    except BaseException as e:  # pylint: disable=broad-except  # e.g. the pool shut down
      self._failure = e
    self._done.set()

  def wait(self) -> Batch:
    self._done.wait()
    if self._failure is not None:
      raise self._failure
    b = self.batch
    b.sizes[[j for j in self._args if b.error[j]]] = 0
    return _finish(b, [(j, b.width[j], b.height[j], b.error[j], self._labels[j])
                       for j in self._args])


class _Threads:
  """Rows decoded on a thread pool in this process, `ahead` batches at a time."""

  def __init__(self, read: decode_workers.Reader, threads: int, ahead: int,
               opts: dict[str, Any]):
    self._ahead, self.read, self._opts = ahead, read, opts
    self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="cbir-decode")

  def can_submit(self, in_flight: int) -> bool:
    return in_flight < self._ahead

  def submit(self, batch: Batch, rows: list[tuple[int, Any]]) -> Callable[[], Batch]:
    futures = [(j, self._pool.submit(decode_workers.decode_row, batch.images, j, self.read,
                                     arg, **self._opts)) for j, arg in rows]

    def wait() -> Batch:
      # One wake-up per batch, not one per row: the decoding threads keep the cores.
      concurrent.futures.wait([f for _, f in futures])
      return _finish(batch, [(j, *f.result()) for j, f in futures])

    return wait

  def close(self, wait: bool = True) -> None:
    self._pool.shutdown(wait=wait, cancel_futures=True)


class _Canvases(_Threads):
  """Canvas mode: JPEGs by simplejpeg straight into reused canvas buffers (`_CanvasBatch`).
  Stage-2 tasks run before stage-1 tasks, so a batch's files are decoded soon after they are
  read rather than after later batches' reads: fewer are held at once (a phone photo is
  ~2 MB; held longer, they grew and shrank the heap, ~145 page faults per photo)."""

  def __init__(self, read: decode_workers.Reader, threads: int, ahead: int,
               opts: dict[str, Any], buckets: Sequence[int]):
    super().__init__(read, threads, ahead, opts)
    self.buckets = buckets
    self.plan = functools.partial(turbo_decode.plan, target=opts["size"], largest=max(buckets),
                                  draft=opts["draft"], max_pixels=opts["max_pixels"])
    self.place = functools.partial(canvas.decode_placed, image_size=opts["size"], buckets=buckets,
                                   draft=opts["draft"], max_pixels=opts["max_pixels"])
    self._tasks: queue.PriorityQueue = queue.PriorityQueue()  # (-stage, order, fn, args)
    self._order = itertools.count()
    canvas.POOL.hold(ahead + 2)  # in flight, the consumer's, and one being handed back

  def run(self, stage: int, fn: Callable[..., None], *args: Any) -> None:
    self._tasks.put((-stage, next(self._order), fn, args))
    self._pool.submit(self._next)

  def _next(self) -> None:
    _, _, fn, args = self._tasks.get_nowait()  # one per submission: never empty
    fn(*args)

  def submit(self, batch: Batch, rows: list[tuple[int, Any]]) -> Callable[[], Batch]:
    return _CanvasBatch(batch, rows, self).wait


class _Processes:
  """Batches decoded by worker processes (`decode_workers`), each split among them."""

  def __init__(self, read: decode_workers.Reader, workers: int, threads: int, ahead: int,
               batch_size: int, opts: dict[str, Any]):
    self._workers = decode_workers.DecodeWorkers(
        read, workers=workers, threads=threads, batch_size=batch_size, size=opts["size"],
        batches_ahead=ahead, draft=opts["draft"], max_pixels=opts["max_pixels"])

  def can_submit(self, in_flight: int) -> bool:
    return self._workers.can_submit()

  def submit(self, batch: Batch, rows: list[tuple[int, Any]]) -> Callable[[], Batch]:
    tickets = self._workers.submit(rows)

    def wait() -> Batch:
      batch.images, results = self._workers.result(tickets)
      return _finish(batch, results)

    return wait

  def close(self, wait: bool = True) -> None:
    self._workers.close()


class BatchStream(Iterator[Batch], contextlib.AbstractContextManager):
  """Fixed-size batches of `rows`, decoded ahead in input order by threads or processes.

  A `None` row is padding: never read, `valid=False`; the last batch is padded to
  `batch_size`. Every row is decoded on its own by the same function, so neither the process
  nor the thread count changes a pixel or the order: they are run info, not settings. With
  `num_workers` > 0, worker processes of `num_threads` threads each decode a share of every
  batch and this process only receives the pixels (`decode_workers`); with 0, threads here
  decode row by row. Use it as a context manager (or call `close()`): closing drops the rows
  not started, waits for the thread decodes in flight (at most one per thread) or ends the
  worker processes, so a consumer that stops early leaves no thread or process behind.
  Exhausting the stream or an error in it closes it too.

  Args:
    rows: the rows in output order (`None`: padding).
    read: `Row.arg` -> (encoded image, label); runs on the decode threads, so it must be
      thread-safe, and in the worker processes, so it must pickle there (else threads).
    keyed: fill `Batch.key` and `Batch.label` from the rows.
    buckets: canvas mode (device resize): images are decoded (draft as usual), not resized,
      into canvases of the smallest of these sides that holds the batch (`Batch.sizes`,
      `canvas`), by threads in this process; None: resized on the host to `image_size`.
    The others: as in `image_batches` (processes keep at least one batch prefetched).
  """

  def __init__(self, rows: Iterable[Row | None], *, read: decode_workers.Reader,
               image_size: int | tuple[int, int], batch_size: int,
               num_threads: int | None = None, num_workers: int | None = None,
               draft: bool = True, max_pixels: int = MAX_PIXELS, prefetch: int = 2,
               keyed: bool = False, buckets: Sequence[int] | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self._closed = True  # until an engine runs
    self._rows = iter(rows)
    self._size = decode._size(image_size)
    self._batch_size = batch_size
    self._keyed = keyed
    self._buckets = tuple(buckets) if buckets else None
    self._pending: collections.deque[Callable[[], Batch]] = collections.deque()  # waits
    # Batches in flight: the one waited for and `prefetch` more; processes keep two, so a
    # worker decodes the next while this process collects the last.
    ahead = max(0, prefetch) + 1
    opts: dict[str, Any] = dict(size=self._size, draft=draft, max_pixels=max_pixels)
    self.num_workers, self.num_threads = _choose_parallelism(
        read, num_workers, num_threads, batch_size, self._size, max(2, ahead), self._buckets)
    if self.num_workers:
      self._engine: _Threads | _Processes = _Processes(
          read, self.num_workers, self.num_threads, max(2, ahead), batch_size, opts)
    elif self._buckets:
      self._engine = _Canvases(read, self.num_threads, ahead, opts, self._buckets)
    else:
      self._engine = _Threads(read, self.num_threads, ahead, opts)
    self._closed = False

  def _fill(self) -> None:
    """Starts batches while the engine has room or until the input ends."""
    while self._engine.can_submit(len(self._pending)):
      rows = [r for _, r in zip(range(self._batch_size), self._rows)]
      if not rows:
        return
      b = Batch.padding(self._batch_size, self._size, keyed=self._keyed,
                        buckets=self._buckets)
      todo = [(j, row) for j, row in enumerate(rows) if row is not None]
      for j, row in todo:
        b.index[j], b.valid[j] = row.index, True
        if b.key is not None:
          b.key[j] = row.key
      self._pending.append(self._engine.submit(b, [(j, row.arg) for j, row in todo]))

  def __next__(self) -> Batch:
    if self._closed:
      raise StopIteration
    try:
      self._fill()
      if not self._pending:
        raise StopIteration  # closes it, below
      batch = self._pending.popleft()()
      self._fill()  # its buffer is free again: decoding goes on while the consumer works
    except BaseException:
      self.close()
      raise
    return batch

  def close(self) -> None:
    """Drops the rows not started; waits for thread decodes or ends the workers. Idempotent."""
    if self._closed:
      return
    self._closed = True
    self._pending.clear()
    self._engine.close()

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self) -> None:
    if not getattr(self, "_closed", True):  # never waits for a thread decode
      self._closed = True
      self._engine.close(wait=False)


def positions_batches(keys: Sequence[str], positions: np.ndarray, *,
                      image_size: int | tuple[int, int], batch_size: int,
                      read: Callable[[str], bytes] = read_file, num_threads: int | None = None,
                      num_workers: int | None = None, draft: bool = True,
                      max_pixels: int = MAX_PIXELS, prefetch: int = 2,
                      buckets: Sequence[int] | None = None) -> BatchStream:
  """Like `image_batches`, over `keys[positions]`; a negative position is a padding row.

  Jobs use it to lay out their own fixed-size steps (shard-aligned, padded) while the decoders
  still work ahead across step and shard boundaries. `Batch.index` is the position itself.
  """
  rows = (None if p < 0 else Row(p, keys[p]) for p in np.asarray(positions, np.int64).tolist())
  return BatchStream(rows, read=functools.partial(_unlabelled, read), image_size=image_size,
                     batch_size=batch_size,
                     num_threads=num_threads, num_workers=num_workers, draft=draft,
                     max_pixels=max_pixels, prefetch=prefetch, buckets=buckets)


def image_batches(keys: Sequence[str], *, image_size: int | tuple[int, int], batch_size: int,
                  read: Callable[[str], bytes] = read_file, num_threads: int | None = None,
                  num_workers: int | None = None, draft: bool = True,
                  max_pixels: int = MAX_PIXELS, prefetch: int = 2,
                  buckets: Sequence[int] | None = None) -> BatchStream:
  """Decoded, resized, fixed-size batches of `keys` in order, prepared on every core.

  Args:
    keys: file paths (or ids that `read` understands), in output order.
    image_size, batch_size: output size (square int or (height, width)) and rows per batch
      (the last batch is padded).
    read: key -> encoded bytes (files by default); with worker processes it must pickle
      (a module-level function), and runs there.
    num_threads, num_workers: decode threads and processes, see `decode_parallelism`.
    draft, max_pixels: JPEG DCT-scaled decoding and the decompression-bomb limit, see
      `decode.decode_image`.
    prefetch: batches decoded ahead of the one the consumer waits for.
    buckets: canvas sides for the device resize (`BatchStream`); None: host resize.
  """
  return positions_batches(keys, np.arange(len(keys)), image_size=image_size,
                           batch_size=batch_size, read=read, num_threads=num_threads,
                           num_workers=num_workers, draft=draft, max_pixels=max_pixels,
                           prefetch=prefetch, buckets=buckets)


def encoded_batches(examples: decode_workers.Reader, keys: Sequence[str],
                    positions: np.ndarray, *, image_size: int | tuple[int, int],
                    batch_size: int, num_threads: int | None = None,
                    num_workers: int | None = None, draft: bool = True,
                    max_pixels: int = MAX_PIXELS, prefetch: int = 2,
                    buckets: Sequence[int] | None = None) -> BatchStream:
  """Batches of records read by position (TFDS): `Batch.key` and `Batch.label` are filled.

  `examples`: position -> (encoded image bytes, label), a `BatchStream` reader (OSError or
  ValueError make the row a failure); `keys`: position -> record id (`Batch.key`); a
  negative position is a padding row. The others: as in `image_batches`.
  """
  rows = (None if p < 0 else Row(p, p, keys[p])
          for p in np.asarray(positions, np.int64).tolist())
  return BatchStream(rows, read=examples, image_size=image_size, batch_size=batch_size,
                     num_threads=num_threads, num_workers=num_workers, draft=draft,
                     max_pixels=max_pixels, prefetch=prefetch, keyed=True, buckets=buckets)


def load_images(paths: Sequence[str], image_size: int | tuple[int, int], *,
                draft: bool = True, max_pixels: int = MAX_PIXELS
                ) -> tuple[np.ndarray, list[str]]:
  """Small-scale helper (queries, tests): decodes `paths` -> (uint8 [N, H, W, 3], errors)."""
  size = decode._size(image_size)
  got = [decode.safe_decode(functools.partial(read_file, p), size, draft=draft,
                            max_pixels=max_pixels) for p in paths]
  images = np.stack([g[0] for g in got]) if got else np.zeros((0, *size, 3), np.uint8)
  return images, [g[3] for g in got]
