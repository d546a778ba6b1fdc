"""Host input: list image folders, and decode images into fixed-size batches on every core.

Rows keep their input order; a file that cannot be read or decoded becomes a row with a
reason, never an exception. No TensorFlow: `tfds_input` feeds TFDS records through here too.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import pathlib
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from cbir_jax import decode
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

  @classmethod
  def padding(cls, batch_size: int, image_size: int | tuple[int, int], *,
              keyed: bool = False) -> Batch:
    """An all-padding batch (a step where this process has no records left)."""
    h, w = decode._size(image_size)
    return cls(images=np.zeros((batch_size, h, w, 3), np.uint8),
               index=np.full(batch_size, -1, np.int64), width=np.zeros(batch_size, np.int32),
               height=np.zeros(batch_size, np.int32), ok=np.zeros(batch_size, bool),
               valid=np.zeros(batch_size, bool), error=[""] * batch_size,
               key=[""] * batch_size if keyed else None,
               label=np.full(batch_size, -1, np.int64) if keyed else None)


# --- listing folders ---------------------------------------------------------------------


@dataclasses.dataclass
class Listing:
  """What a folder holds: the images to read, and the other files counted by extension."""
  records: list[Record]
  skipped: collections.Counter  # lower-case extension ("" for none) -> files not read


def list_folder(root: str | os.PathLike) -> Listing:
  """Every image under `root` (recursive, sorted path order), and what was left out.

  A file's label is its first-level subfolder (classes numbered in sorted name order);
  files directly in `root` get label -1. Images are the extensions Pillow can decode here
  (`IMAGE_EXTENSIONS`, case-insensitive); other files are counted in `skipped`. Directory
  symlinks are not followed, so a symlink loop cannot trap the walk.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
  paths: list[str] = []
  skipped: collections.Counter = collections.Counter()
  for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
    dirnames.sort()
    for name in filenames:
      ext = os.path.splitext(name)[1].lower()
      if ext in IMAGE_EXTENSIONS:
        paths.append(os.path.join(dirpath, name))
      else:
        skipped[ext] += 1
  paths.sort()
  rel_first = [pathlib.PurePath(os.path.relpath(p, root)).parts for p in paths]
  classes = sorted({parts[0] for parts in rel_first if len(parts) > 1})
  class_index = {c: i for i, c in enumerate(classes)}
  records = [Record(key=p, label=class_index[parts[0]] if len(parts) > 1 else -1,
                    label_name=parts[0] if len(parts) > 1 else "")
             for p, parts in zip(paths, rel_first)]
  return Listing(records=records, skipped=skipped)


def folder_records(root: str | os.PathLike) -> list[Record]:
  """`list_folder(root).records`."""
  return list_folder(root).records


def format_skipped(skipped: collections.Counter) -> str:
  """"skipped 3 files: .txt 2, .heic 1" (most frequent first); "" when nothing was skipped."""
  total = sum(skipped.values())
  if not total:
    return ""
  parts = ", ".join(f"{ext or '(no extension)'} {n}"
                    for ext, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
  return f"skipped {total} file{'s' if total != 1 else ''}: {parts}"


# --- the decoding engine -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
  """One input row: its `Batch.index`, its key (keyed streams) and how to get its bytes.

  `fetch()` returns (encoded image, label); an OSError or ValueError from it makes the row a
  failure with the reason.
  """
  index: int
  fetch: Callable[[], tuple[bytes, int]]
  key: str = ""


def default_threads() -> int:
  """The cores this process may use (its CPU affinity), the default decode parallelism."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclasses.dataclass
class _Pending:
  """A batch whose rows are being decoded: row slot -> future of (width, height, error, label)."""
  batch: Batch
  futures: list[tuple[int, concurrent.futures.Future]]

  def result(self) -> Batch:
    # One wake-up per batch, not one per row: the decoding threads keep the cores.
    concurrent.futures.wait([f for _, f in self.futures])
    b = self.batch
    for j, fut in self.futures:
      w, h, err, label = fut.result()
      b.width[j], b.height[j], b.ok[j], b.error[j] = w, h, not err, err
      if b.label is not None:
        b.label[j] = label
    return b


def _decode_into(images: np.ndarray, j: int, row: Row, size: tuple[int, int], draft: bool,
                 max_pixels: int) -> tuple[int, int, str, int]:
  """Worker: decodes `row` into images[j]; returns (width, height, error, label)."""
  label = -1

  def data() -> bytes:
    nonlocal label
    data, label = row.fetch()
    return data

  img, w, h, err = decode.safe_decode(data, size, draft=draft, max_pixels=max_pixels)
  if not err:
    images[j] = img
  return w, h, err, label


# A plain thread pool rather than Grain (PyPI `grain`): Pillow releases the GIL while
# decoding and resizing, so threads scale, and per element the pool costs 8-9 us of CPU
# against 45-55 us for Grain's `MapDataset.map(...).to_iter_dataset(ReadOptions(num_threads=2))`
# (20000 trivial elements on the 2-core development machine; wall time = CPU time, so that
# cost is serialised). At a 16-core host's ~6000 ImageNet-size images/s, Grain's share is a
# third of a core ahead of the accelerator, for features (sampling, shuffling, checkpointed
# iterators) an in-order inference pass does not use.
class BatchStream(Iterator[Batch]):
  """Fixed-size batches of `rows`, decoded ahead on a thread pool, in input order.

  A `None` row is padding: never read, `valid=False`. The last batch is padded to
  `batch_size`. Every row is decoded on its own, so the thread count changes no pixel and
  no order. Use it as a context manager (or call `close()`): closing cancels the rows not
  started and waits for the decodes in flight (at most one per thread), so a consumer that
  stops early leaves no thread behind. Exhausting the stream closes it too.
  """

  def __init__(self, rows: Iterable[Row | None], *, image_size: int | tuple[int, int],
               batch_size: int, num_threads: int | None = None, draft: bool = True,
               max_pixels: int = MAX_PIXELS, prefetch: int = 2, keyed: bool = False):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self._rows = iter(rows)
    self._size = decode._size(image_size)
    self._batch_size = batch_size
    self._decode = dict(size=self._size, draft=draft, max_pixels=max_pixels)
    self._keyed = keyed
    self._prefetch = max(0, prefetch)
    self._pending: collections.deque[_Pending] = collections.deque()
    self.num_threads = num_threads or default_threads()
    self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads,
                                                       thread_name_prefix="cbir-decode")
    self._closed = False

  def _submit_batch(self) -> bool:
    """Starts decoding the next batch's rows; False when the input is exhausted."""
    rows = [r for _, r in zip(range(self._batch_size), self._rows)]
    if not rows:
      return False
    b = Batch.padding(self._batch_size, self._size, keyed=self._keyed)
    futures = []
    for j, row in enumerate(rows):
      if row is None:
        continue
      b.index[j], b.valid[j] = row.index, True
      if b.key is not None:
        b.key[j] = row.key
      futures.append((j, self._pool.submit(_decode_into, b.images, j, row, **self._decode)))
    self._pending.append(_Pending(b, futures))
    return True

  def _fill(self, depth: int) -> None:
    while len(self._pending) < depth and self._submit_batch():
      pass

  def __next__(self) -> Batch:
    if self._closed:
      raise StopIteration
    self._fill(1)
    if not self._pending:
      self.close()
      raise StopIteration
    head = self._pending.popleft()
    self._fill(self._prefetch)  # the threads decode ahead while we wait for the head
    return head.result()

  def close(self) -> None:
    """Cancels the rows not started; waits for the decodes in flight. Idempotent."""
    if self._closed:
      return
    self._closed = True
    self._pending.clear()
    self._pool.shutdown(wait=True, cancel_futures=True)

  def __enter__(self) -> BatchStream:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self) -> None:
    if not getattr(self, "_closed", True):  # never blocks a garbage collector
      self._closed = True
      self._pool.shutdown(wait=False, cancel_futures=True)


def _file_rows(keys: Sequence[str], positions: Iterable[int], read: Callable[[str], bytes],
               offset: int = 0) -> Iterator[Row | None]:
  for p in positions:
    yield None if p < 0 else Row(p + offset, _unlabelled(read, keys[p]))


def _unlabelled(read: Callable[[str], bytes], key: str) -> Callable[[], tuple[bytes, int]]:
  return lambda: (read(key), -1)


def positions_batches(keys: Sequence[str], positions: np.ndarray, *,
                      image_size: int | tuple[int, int], batch_size: int,
                      read: Callable[[str], bytes] = read_file, num_threads: int | None = None,
                      draft: bool = True, max_pixels: int = MAX_PIXELS, prefetch: int = 2
                      ) -> BatchStream:
  """Like `image_batches`, over `keys[positions]`; a negative position is a padding row.

  Jobs use it to lay out their own fixed-size steps (shard-aligned, padded) while the
  threads still decode ahead across step and shard boundaries. `Batch.index` is the
  position itself (-1 for padding).
  """
  positions = np.asarray(positions, np.int64).tolist()
  return BatchStream(_file_rows(keys, positions, read), image_size=image_size,
                     batch_size=batch_size, num_threads=num_threads, draft=draft,
                     max_pixels=max_pixels, prefetch=prefetch)


def image_batches(keys: Sequence[str], *, image_size: int | tuple[int, int], batch_size: int,
                  read: Callable[[str], bytes] = read_file, num_threads: int | None = None,
                  draft: bool = True, max_pixels: int = MAX_PIXELS, prefetch: int = 2,
                  start_index: int = 0) -> BatchStream:
  """Decoded, resized, fixed-size batches of `keys` in order, prepared on a thread pool.

  Args:
    keys: file paths (or ids that `read` understands), in output order.
    image_size: output size (square int or (height, width)).
    batch_size: rows per batch; the last batch is padded to this size.
    read: key -> encoded bytes (files by default).
    num_threads: parallel decodes (default: the cores this process may use).
    draft: JPEG DCT-scaled decoding, see `decode.decode_image` (False: full resolution).
    max_pixels: larger images are refused (decompression bombs).
    prefetch: batches decoded ahead of the one the consumer waits for.
    start_index: `Batch.index` of keys[0] (a process' or a resumed job's offset).
  """
  return BatchStream(_file_rows(keys, range(len(keys)), read, start_index),
                     image_size=image_size, batch_size=batch_size, num_threads=num_threads,
                     draft=draft, max_pixels=max_pixels, prefetch=prefetch)


def encoded_batches(examples: Callable[[int], tuple[bytes, int]], keys: Sequence[str],
                    positions: np.ndarray, *, image_size: int | tuple[int, int],
                    batch_size: int, num_threads: int | None = None, draft: bool = True,
                    max_pixels: int = MAX_PIXELS, prefetch: int = 2) -> BatchStream:
  """Batches of records read by position (TFDS): `Batch.key` and `Batch.label` are filled.

  Args:
    examples: position -> (encoded image bytes, label); runs on the decode threads, so
      it must be thread-safe. OSError/ValueError make the row a failure.
    keys: position -> record id (`Batch.key`).
    positions: the rows in output order; a negative position is a padding row.
    image_size, batch_size, num_threads, draft, max_pixels, prefetch: as in `image_batches`.
  """
  def rows() -> Iterator[Row | None]:
    for p in np.asarray(positions, np.int64).tolist():
      yield None if p < 0 else Row(p, lambda p=p: examples(p), keys[p])

  return BatchStream(rows(), image_size=image_size, batch_size=batch_size,
                     num_threads=num_threads, draft=draft, max_pixels=max_pixels,
                     prefetch=prefetch, keyed=True)


def load_images(paths: Sequence[str], image_size: int | tuple[int, int], *,
                draft: bool = True, max_pixels: int = MAX_PIXELS
                ) -> tuple[np.ndarray, list[str]]:
  """Small-scale helper (queries, tests): decodes `paths` -> (uint8 [N, H, W, 3], errors)."""
  size = decode._size(image_size)
  out, errors = [], []
  for p in paths:
    img, _, _, err = decode.safe_decode(lambda p=p: read_file(p), size, draft=draft,
                                        max_pixels=max_pixels)
    out.append(img)
    errors.append(err)
  return np.stack(out) if out else np.zeros((0, *size, 3), np.uint8), errors
