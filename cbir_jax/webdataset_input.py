"""Webdataset tar shards as an input (the img2dataset layout), listed once and read by position.

Listing reads tar headers and the small sidecar members (.cls, .json, .txt) only; each record
keeps its image's shard, data offset and size, so decode threads or worker processes read its
bytes with one seek+read, without rescanning the shard. Plain `tarfile`: the `webdataset`
package streams samples in order and has no random access, which resume and `--update` need.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
from typing import Any, Callable

import numpy as np

from cbir_jax import input_pipeline
from cbir_jax.decode import IMAGE_EXTENSIONS, MAX_PIXELS
from cbir_jax.tar_shards import (EXAMPLES, Sample, Shard, ShardListing, WebdatasetError,
                                 cached_list_shard, count, find_shards, list_shard,
                                 read_member, split_name, stat_shard)

# Columns the job fills itself: a json field of that name is kept as "json_<name>".
RESERVED_COLUMNS = frozenset({"row", "path", "label", "label_name", "width", "height", "txt"})
# Listing parses tar headers in Python (~50-80 us per member on one core); from this many
# shards on, they are listed by worker processes, which pay ~1 s to start.
PROCESSES_FROM_SHARDS = 8
_INT64 = range(-2**63, 2**63)
_LABELS = range(-1, 2**31)  # -1: none; class indices fit int32 everywhere downstream


@dataclasses.dataclass(frozen=True)
class MemberReader:
  """(shard, offset, size, label) -> (image bytes, label): the decode engine's reader.

  Picklable (the shard table only), so decode worker processes read members themselves.
  Raises OSError for a shard that changed since listing (`tar_shards.read_member`).
  """
  shards: tuple[Shard, ...]

  def __call__(self, arg: tuple[int, int, int, int]) -> tuple[bytes, int]:
    shard_index, offset, size, label = arg
    return read_member(self.shards[shard_index], offset, size), label


# --- labels and metadata columns ------------------------------------------------------------

Problem = Callable[[str, str, Any], None]  # (reason, record, detail): a record kept, data missing


def _parse_sidecars(sample: Sample, where: str, label_field: str | None, problem: Problem
                    ) -> tuple[int | str | None, dict[str, Any], str | None]:
  """(label or None, the json object or {}, the .txt text or None) of one sample; the label
  is the .cls integer, else the json field `label_field` (a class index or a name)."""
  doc: dict[str, Any] = {}
  label = None
  if "json" in sample.sidecars:
    try:
      doc = json.loads(sample.sidecars["json"])
      if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    except ValueError as e:
      doc = {}
      problem("unreadable .json (no metadata, no json label)", where, e)
  if "cls" in sample.sidecars:
    text = sample.sidecars["cls"].decode("utf-8", "replace").strip()
    try:
      label = int(text)
      if label not in _LABELS:
        raise ValueError("out of range")
    except ValueError:
      label = None
      problem("unreadable .cls (label -1)", where, text[:20])
  txt = sample.sidecars["txt"].decode("utf-8", "replace") if "txt" in sample.sidecars else None
  if label is None and label_field and doc.get(label_field) is not None:
    label = doc[label_field]
    if not isinstance(label, str) and (
        not isinstance(label, int) or isinstance(label, bool) or label not in _LABELS):
      problem(f"json {label_field!r} neither a class index nor a name (label -1)", where,
              repr(label)[:20])
      label = None
  return label, doc, txt


def _metadata(doc: dict[str, Any], txt: str | None, label_field: str | None) -> dict[str, Any]:
  """A record's metadata fields: json scalars (reserved names prefixed "json_"), "txt"."""
  out = {(f"json_{k}" if k in RESERVED_COLUMNS else k): v for k, v in doc.items()
         if k != label_field and (v is None or isinstance(v, (str, int, float, bool)))}
  if txt is not None:
    out["txt"] = txt
  return out


def _column(values: list[Any]) -> np.ndarray:
  """bool when every record has a bool, int64 when every one an int (in range), float64 when
  every one a number and some a float, else str ("": none; other values as json writes them)."""
  if all(isinstance(v, bool) for v in values):
    return np.array(values, bool)
  numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
  if len(numbers) == len(values):
    if not all(isinstance(v, int) for v in numbers):
      return np.array(values, np.float64)
    if all(v in _INT64 for v in numbers):
      return np.array(values, np.int64)
  as_text = ["" if v is None else v if isinstance(v, str) else json.dumps(v) for v in values]
  return np.array(as_text, dtype=str)


def _columns(fields: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  """One column per field any record has, in first-seen order."""
  names = dict.fromkeys(k for doc in fields for k in doc)
  return {k: _column([doc.get(k) for doc in fields]) for k in names}


def _labels(values: list[Any], where: list[str]) -> tuple[np.ndarray, list[str]]:
  """Integer labels as they are; class names numbered in sorted name order, like folders."""
  names = [v for v in values if isinstance(v, str)]
  if names and any(isinstance(v, int) for v in values):
    i = next(i for i, v in enumerate(values) if isinstance(v, int))
    raise WebdatasetError(f"labels mix integers and class names (e.g. {where[i]}: {values[i]}, "
                          f"but elsewhere {names[0]!r}); use one kind")
  if names:
    index = {n: i for i, n in enumerate(sorted(set(names)))}
    return (np.array([index[v] if isinstance(v, str) else -1 for v in values], np.int64),
            [v if isinstance(v, str) else "" for v in values])
  return np.array([-1 if v is None else v for v in values], np.int64), [""] * len(values)


# --- the listing ------------------------------------------------------------------------------


@dataclasses.dataclass
class WebdatasetListing:
  """Every record of a webdataset in shard order, then member order, with labels and metadata.

  Attributes:
    root: the folder shard paths are relative to (the folder, or a glob's fixed part).
    shard_index, names, offsets, sizes: per record, where its image member lies.
    labels: int64 per record (-1: none); from .cls, else the json field `label_field`.
    label_names: per record, the class name when labels are names (json strings), else "".
    columns: metadata columns, one value per record: every scalar json field (a reserved
      name gets the prefix "json_") and "txt" (the .txt sidecar).
    skipped: reason -> members or keys left out (never silently); `examples` names a few.
    problems: reason -> records kept with some metadata missing (unreadable sidecars).
  """
  spec: str
  root: str
  shards: tuple[Shard, ...]
  shard_index: np.ndarray  # int32
  names: list[str]
  offsets: np.ndarray  # int64
  sizes: np.ndarray  # int64
  labels: np.ndarray
  label_names: list[str]
  columns: dict[str, np.ndarray]
  skipped: collections.Counter
  problems: collections.Counter
  examples: dict[str, list[str]]

  @property
  def num_records(self) -> int:
    return len(self.names)

  @functools.cached_property
  def keys(self) -> list[str]:
    """Per record, "<shard path relative to root>/<member name>": its identity key and path."""
    rels = [s.rel for s in self.shards]
    return [f"{rels[s]}/{n}" for s, n in zip(self.shard_index.tolist(), self.names)]

  @functools.cached_property
  def paths(self) -> list[str]:
    """Per record, "<root>/<shard>/<member name>": the row's "path", readable by `read_path`.

    Absolute like a folder input's paths, so an index whose shards moved is read through
    `image_root` the same way.
    """
    return [os.path.join(self.root, k) for k in self.keys]

  def stamps(self, content_digest: bool = False) -> list[str]:
    """Per record, "<member size>:<shard size>:<shard mtime_ns>" (":<sha256>" with digest).

    The shard's stat is in every stamp: a shard rewritten in place (a member replaced or
    appended) changes all its records, and they are read again.
    """
    shard_stamps = [s.stamp() for s in self.shards]
    out = [f"{z}:{shard_stamps[s]}"
           for s, z in zip(self.shard_index.tolist(), self.sizes.tolist())]
    if content_digest:
      out = [f"{s}:{hashlib.sha256(self.read(i)).hexdigest()}" for i, s in enumerate(out)]
    return out

  @property
  def reader(self) -> MemberReader:
    return MemberReader(self.shards)

  def arg(self, i: int) -> tuple[int, int, int, int]:
    """The reader's argument for record i: (shard, offset, size, label)."""
    return (int(self.shard_index[i]), int(self.offsets[i]), int(self.sizes[i]),
            int(self.labels[i]))

  def read(self, i: int) -> bytes:
    """The image bytes of record i (OSError: its shard changed or is cut short)."""
    return self.reader(self.arg(i))[0]

  def report_lines(self) -> list[str]:
    """One line per reason something was skipped or is missing; [] for a clean input."""
    kinds = (("skipped", self.skipped), ("kept without metadata", self.problems))
    return [f"webdataset: {what} {n}: {reason}, e.g. " + ", ".join(self.examples.get(reason, []))
            for what, counts in kinds
            for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _list_shards(shards: tuple[Shard, ...], processes: int | None, cache_dir: str | None
                 ) -> list[ShardListing]:
  """Every shard's listing, in order; by worker processes for many shards."""
  if processes is None:
    processes = (min(len(shards), input_pipeline.default_threads())
                 if len(shards) >= PROCESSES_FROM_SHARDS else 0)
  lister = functools.partial(cached_list_shard, image_extensions=IMAGE_EXTENSIONS,
                             cache_dir=cache_dir)
  if processes <= 1:
    return [lister(s) for s in shards]
  # Spawn, as the decode workers: this process may run JAX threads that fork would copy.
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(processes, mp_context=ctx) as pool:
    return list(pool.map(lister, shards, chunksize=1))


def list_webdataset(spec: str, *, label_field: str | None = "label",
                    processes: int | None = None, cache_dir: str | None = None
                    ) -> WebdatasetListing:
  """Lists the records of `--webdataset=spec` (a folder's `*.tar`, recursive; a glob; one .tar).

  A record is a key with exactly one image member (an extension the folder input reads:
  jpg, jpeg, png, webp, ...). Keys without an image, keys with several, links and other
  member types are skipped and counted; a shard that is not a whole uncompressed tar is an
  error. Labels come from `.cls` (an integer), else from the json field `label_field`
  (an integer, or a class name).

  Args:
    label_field: the json field holding a label when a sample has no `.cls` (None: none).
    processes: processes listing shards (0: this one; None: one per core from
      `PROCESSES_FROM_SHARDS` shards on).
    cache_dir: a folder keeping each shard's listing (JSON) while the shard's size and
      mtime stay, so a rerun or `--update` lists only new or changed shards; None: no cache.

  Raises:
    WebdatasetError: no shards, a truncated or damaged shard, labels of mixed kinds.
  """
  root, paths = find_shards(spec)
  shards = tuple(stat_shard(p, root) for p in paths)
  # Reasons with counts and a few examples: keys skipped, records kept with data missing.
  skipped, problems, examples = collections.Counter(), collections.Counter(), {}

  def problem(reason: str, where: str, detail: Any) -> None:
    count(problems, examples, reason, f"{where} ({detail})")

  located: list[tuple[int, str, int, int]] = []  # (shard, member name, data offset, size)
  label_values, fields, where = [], [], []
  for si, (shard, listing) in enumerate(zip(shards, _list_shards(shards, processes, cache_dir))):
    skipped.update(listing.skipped)
    for reason, names in listing.examples.items():
      examples[reason] = (examples.get(reason, []) + names)[:EXAMPLES]
    for sample in listing.samples:
      if len(sample.images) != 1:
        count(skipped, examples,
              "key without an image" if not sample.images else "key with several images",
              f"{shard.rel}/{sample.key}")
        continue
      name, offset, size = sample.images[0]
      located.append((si, name, offset, size))
      where.append(f"{shard.rel}/{name}")
      label, doc, txt = _parse_sidecars(sample, where[-1], label_field, problem)
      label_values.append(label)
      fields.append(_metadata(doc, txt, label_field))
  labels, label_names = _labels(label_values, where)
  column = lambda j, dtype: np.array([r[j] for r in located], dtype)  # noqa: E731
  return WebdatasetListing(
      spec=spec, root=root, shards=shards, shard_index=column(0, np.int32),
      names=[r[1] for r in located], offsets=column(2, np.int64), sizes=column(3, np.int64),
      labels=labels, label_names=label_names, columns=_columns(fields), skipped=skipped,
      problems=problems, examples=examples)


def _split_stored(path: str) -> tuple[str, str]:
  """(shard file, member name) of "<folders>/<shard>.tar/<member>": the first file on the way."""
  for i, ch in enumerate(path):
    if ch == "/" and i and os.path.isfile(path[:i]):
      return path[:i], path[i + 1:]
  raise OSError(f"{path} names no member of a tar shard (no shard file on its path)")


@functools.lru_cache(maxsize=16)
def _image_members(path: str, size: int, mtime_ns: int) -> tuple[Shard, dict[str, tuple[int, int]]]:
  """The shard and its image members' (offset, size) by name; cached while the shard stays."""
  shard = Shard(path=path, rel=os.path.basename(path), size=size, mtime_ns=mtime_ns)
  table = {}
  for sample in list_shard(shard, IMAGE_EXTENSIONS).samples:
    table.update((name, (offset, n)) for name, offset, n in sample.images)
  return shard, table


def read_path(path: str) -> bytes:
  """The image bytes of a row's stored "path" (`WebdatasetListing.paths`), for result pages.

  Lists the shard's headers once (cached for the 16 shards last read), then reads by offset.

  Raises:
    OSError: no such shard or member, or a shard that is not a whole tar (one line).
  """
  shard_path, name = _split_stored(path)
  st = os.stat(shard_path)
  try:
    shard, table = _image_members(shard_path, st.st_size, st.st_mtime_ns)
  except WebdatasetError as e:
    raise OSError(str(e)) from None
  if name not in table:
    raise OSError(f"shard {shard_path} has no image member {name!r}")
  return read_member(shard, *table[name])


def position_batches(listing: WebdatasetListing, positions: np.ndarray, *,
                     image_size: int | tuple[int, int], batch_size: int,
                     num_threads: int | None = None, num_workers: int | None = None,
                     draft: bool = True, max_pixels: int = MAX_PIXELS, prefetch: int = 2,
                     buckets: tuple[int, ...] | None = None) -> input_pipeline.BatchStream:
  """Decoded fixed-size batches of the records at `positions` (negative: a padding row);
  with `buckets`, canvases for the device resize (`input_pipeline.BatchStream`).

  The same engine as folders and TFDS: `Batch.index` is the position, `Batch.key` the
  record's key and `Batch.label` its label. Worker processes read members themselves.
  """
  paths = listing.paths
  rows = (None if p < 0 else input_pipeline.Row(p, listing.arg(p), paths[p])
          for p in np.asarray(positions, np.int64).tolist())
  return input_pipeline.BatchStream(
      rows, read=listing.reader, image_size=image_size, batch_size=batch_size,
      num_threads=num_threads, num_workers=num_workers, draft=draft, max_pixels=max_pixels,
      prefetch=prefetch, keyed=True, buckets=buckets)


__all__ = ["WebdatasetError", "WebdatasetListing", "MemberReader", "Shard", "find_shards",
           "list_webdataset", "position_batches", "read_member", "read_path", "split_name"]
