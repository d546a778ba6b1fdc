"""Webdataset tar shards as an input (the img2dataset layout), listed once and read by position.

Listing reads tar headers and the small sidecar members (.cls, .json, .txt) only; each record
keeps its image's shard, data offset and size, so decode threads or worker processes read its
bytes with one seek+read, without rescanning the shard. Plain `tarfile`: the `webdataset`
package streams samples in order and has no random access, which resume and `--update` need.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import hashlib
import json
import os
import pathlib
import tarfile
from typing import Any, Iterable, Iterator

import numpy as np

from cbir_jax import input_pipeline
from cbir_jax.decode import IMAGE_EXTENSIONS, MAX_PIXELS

SIDECAR_MAX_BYTES = 1 << 20  # a .json/.cls/.txt larger than this is not metadata: refused
# Columns the job fills itself: a json field of that name is kept as "json_<name>".
RESERVED_COLUMNS = frozenset({"row", "path", "label", "label_name", "width", "height", "txt"})
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_GLOB_CHARS = "*?["


class WebdatasetError(ValueError):
  """A webdataset that cannot be listed (no shards, a shard that is not a whole tar)."""


@dataclasses.dataclass(frozen=True)
class Shard:
  """One tar file: its absolute path, its POSIX path relative to the input root, its stat."""
  path: str
  rel: str
  size: int
  mtime_ns: int

  def stamp(self) -> str:
    return f"{self.size}:{self.mtime_ns}"


@dataclasses.dataclass(frozen=True)
class Member:
  """Where one record's image bytes lie: shard index, member name, data offset and size."""
  shard: int
  name: str
  offset: int
  size: int


@dataclasses.dataclass(frozen=True)
class MemberReader:
  """(shard, offset, size, label) -> (image bytes, label): the decode engine's reader.

  Picklable (the shard table only), so worker processes read members themselves. Each read
  checks that the shard still has the size and mtime it was listed with: a replaced shard
  could hold another image at that offset, and that row must be a failure, not a wrong row.
  """
  shards: tuple[Shard, ...]

  def __call__(self, arg: tuple[int, int, int, int]) -> tuple[bytes, int]:
    shard_index, offset, size, label = arg
    return read_member(self.shards[shard_index], offset, size), label


def read_member(shard: Shard, offset: int, size: int) -> bytes:
  """The `size` bytes at `offset` of `shard`; OSError if the shard changed or is too short."""
  fd = os.open(shard.path, os.O_RDONLY)
  try:
    st = os.fstat(fd)
    if (st.st_size, st.st_mtime_ns) != (shard.size, shard.mtime_ns):
      raise OSError(f"shard {shard.rel} changed since it was listed (size or mtime differ); "
                    "rerun to list it again")
    parts, done = [], 0
    while done < size:  # pread may return less than asked (very large members)
      block = os.pread(fd, size - done, offset + done)
      if not block:
        raise OSError(f"shard {shard.rel} ends inside a member (byte {offset + done})")
      parts.append(block)
      done += len(block)
    return b"".join(parts)
  finally:
    os.close(fd)


# --- finding the shards --------------------------------------------------------------------


def _posix_rel(path: str, root: str) -> str:
  return pathlib.PurePath(os.path.relpath(path, root)).as_posix()


def _glob_root(spec: str) -> str:
  """The folder part of a glob before its first wildcard ("data/{a,b}*/x.tar" -> "data")."""
  cut = min((spec.find(c) for c in _GLOB_CHARS if c in spec), default=len(spec))
  return os.path.dirname(spec[:cut]) or "."


def find_shards(spec: str) -> tuple[str, list[str]]:
  """(root, absolute shard paths sorted by path under root) of a folder, a glob or one file.

  A folder gives every `*.tar` under it (recursive, directory symlinks not followed);
  a glob gives every regular file it matches (`**` recursive).

  Raises:
    WebdatasetError: nothing found, with what was looked for.
  """
  if os.path.isdir(spec):
    root, paths = spec, []
    for dirpath, dirnames, filenames in os.walk(spec, followlinks=False):
      dirnames.sort()
      paths += [os.path.join(dirpath, n) for n in filenames if n.lower().endswith(".tar")]
    if not paths:
      raise WebdatasetError(f"--webdataset {spec}: no .tar shards under this folder "
                            "(compressed shards must be decompressed to .tar first)")
  elif any(c in spec for c in _GLOB_CHARS):
    root = _glob_root(spec)
    paths = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
    if not paths:
      raise WebdatasetError(f"--webdataset {spec}: the pattern matches no file")
  elif os.path.isfile(spec):
    root, paths = os.path.dirname(spec) or ".", [spec]
  else:
    raise WebdatasetError(f"--webdataset {spec}: no such folder or file")
  root = os.path.abspath(root)
  paths = sorted((os.path.abspath(p) for p in paths), key=lambda p: _posix_rel(p, root))
  return root, paths


# --- listing one shard ---------------------------------------------------------------------


@dataclasses.dataclass
class _Sample:
  """The members of one key in a shard, as listed."""
  images: list[tarfile.TarInfo] = dataclasses.field(default_factory=list)
  sidecars: dict[str, bytes] = dataclasses.field(default_factory=dict)  # "cls"/"json"/"txt"


def split_name(name: str) -> tuple[str, str]:
  """(key, extension) of a member: the key runs to the first dot of the basename.

  "a/000123.jpg" -> ("a/000123", "jpg"); "000123.seg.png" -> ("000123", "seg.png"),
  the webdataset convention (a whole extension names a field).
  """
  folder, _, base = name.rpartition("/")
  stem, _, ext = base.partition(".")
  return (f"{folder}/{stem}" if folder else stem), ext


def _is_image(ext: str) -> bool:
  return f".{ext.lower()}" in IMAGE_EXTENSIONS


def _shard_error(shard: Shard, why: str) -> WebdatasetError:
  return WebdatasetError(f"shard {shard.path} is not a whole tar ({why}); re-create or "
                         "re-download it, or move it out of the input")


def _check_end(f: Any, shard: Shard, end: int) -> None:
  """The archive must end in a zero block: `tarfile` stops silently at a cut-off header."""
  f.seek(end)
  block = f.read(tarfile.BLOCKSIZE)
  if len(block) < tarfile.BLOCKSIZE:
    raise _shard_error(shard, f"it ends at byte {shard.size}, without the end-of-archive "
                              "blocks: truncated")
  if block.count(0) != tarfile.BLOCKSIZE:
    raise _shard_error(shard, f"damaged member header at byte {end}")


def _sidecar(tar: tarfile.TarFile, m: tarfile.TarInfo, shard: Shard) -> bytes:
  if m.size > SIDECAR_MAX_BYTES:
    raise WebdatasetError(f"shard {shard.path}: member {m.name} is {m.size} bytes, more than "
                          f"the {SIDECAR_MAX_BYTES} a .cls/.json/.txt sidecar may have")
  f = tar.extractfile(m)
  return f.read() if f is not None else b""


def _list_shard(shard: Shard, skipped: collections.Counter, examples: dict[str, list[str]]
                ) -> dict[str, _Sample]:
  """Key -> sample of one shard, in the order of the keys' first members."""
  samples: dict[str, _Sample] = {}

  def skip(reason: str, name: str) -> None:
    skipped[reason] += 1
    ex = examples.setdefault(reason, [])
    if len(ex) < 3:
      ex.append(f"{shard.rel}/{name}")

  try:
    with open(shard.path, "rb") as f:
      magic = f.read(6)
      kind = next((k for m, k in _COMPRESSED.items() if magic.startswith(m)), None)
      if kind:
        raise _shard_error(shard, f"{kind}-compressed: members cannot be read by position; "
                                  "decompress it to a plain .tar")
      f.seek(0)
      with tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:  # headers only: tarfile seeks over the data of members not read
          _add_member(tar, m, shard, samples, skip)
        _check_end(f, shard, tar.offset)
  except tarfile.TarError as e:
    raise _shard_error(shard, f"tar: {e}") from None
  except OSError as e:
    raise WebdatasetError(f"cannot read shard {shard.path}: {e}") from None
  return samples


def _add_member(tar: tarfile.TarFile, m: tarfile.TarInfo, shard: Shard,
                samples: dict[str, _Sample], skip: Any) -> None:
  if m.isdir():
    return  # folders inside a tar hold nothing of their own; not worth a count
  if not m.isfile() or m.issparse():
    skip("link or special member", m.name)
    return
  if m.offset_data + m.size > shard.size:
    raise _shard_error(shard, f"member {m.name} runs past the end of the file: truncated")
  key, ext = split_name(m.name)
  sample = samples.setdefault(key, _Sample())
  if _is_image(ext):
    # The same name twice (tar -r): a later copy replaces the earlier, as tar extracts it.
    sample.images = [i for i in sample.images if i.name != m.name] + [m]
  elif ext.lower() in ("cls", "json", "txt"):
    sample.sidecars[ext.lower()] = _sidecar(tar, m, shard)
  else:
    skip(f"other member .{ext.lower()}" if ext else "member without extension", m.name)


# --- labels and metadata columns ------------------------------------------------------------


def _parse_sidecars(sample: _Sample, where: str, problem: Any
                    ) -> tuple[int | None, dict[str, Any], str | None]:
  """(.cls label or None, the json object or {}, the .txt text or None) of one sample."""
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
    except ValueError:
      problem("unreadable .cls (label -1)", where, text[:20])
  txt = sample.sidecars["txt"].decode("utf-8", "replace") if "txt" in sample.sidecars else None
  return label, doc, txt


def _metadata(doc: dict[str, Any], txt: str | None, label_field: str | None) -> dict[str, Any]:
  """A record's metadata fields: json scalars (reserved names prefixed "json_"), "txt"."""
  out = {(f"json_{k}" if k in RESERVED_COLUMNS else k): v for k, v in doc.items()
         if k != label_field and (v is None or isinstance(v, (str, int, float, bool)))}
  if txt is not None:
    out["txt"] = txt
  return out


def _column(values: list[Any]) -> np.ndarray:
  """int64 when every record has an int, float64 when every one a number, else str ("": none)."""
  numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
  if len(numbers) == len(values):
    if all(isinstance(v, int) for v in numbers):
      return np.array(values, np.int64)
    return np.array(values, np.float64)
  as_text = ["" if v is None else v if isinstance(v, str) else json.dumps(v) for v in values]
  return np.array(as_text, dtype=str)


def _labels(values: list[Any], where: list[str]) -> tuple[np.ndarray, list[str]]:
  """Integer labels as they are; class names numbered in sorted name order, like folders."""
  ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
  names = [v for v in values if isinstance(v, str)]
  if ints and names:
    i = next(i for i, v in enumerate(values) if isinstance(v, str))
    raise WebdatasetError(f"labels mix integers and class names (e.g. {where[i]}: {values[i]!r}); "
                          "use one kind")
  if names:
    index = {n: i for i, n in enumerate(sorted(set(names)))}
    return (np.array([index.get(v, -1) if isinstance(v, str) else -1 for v in values], np.int64),
            [v if isinstance(v, str) else "" for v in values])
  return (np.array([v if isinstance(v, int) and not isinstance(v, bool) else -1 for v in values],
                   np.int64), [""] * len(values))


# --- the listing ------------------------------------------------------------------------------


@dataclasses.dataclass
class WebdatasetListing:
  """Every record of a webdataset in shard order, then member order, with labels and metadata.

  Attributes:
    spec: the --webdataset value as given.
    root: the folder shard paths are relative to (the folder, or a glob's fixed part).
    shards: the tar files, in order.
    members: per record, where its image lies.
    labels: int64 per record (-1: none); from .cls, else the json field `label_field`.
    label_names: per record, the class name when labels are names (json strings), else "".
    columns: metadata columns, one value per record: every scalar json field (a reserved
      name gets the prefix "json_") and "txt" (the .txt sidecar).
    skipped: reason -> members or keys left out (never silently); `examples` names a few.
    problems: reason -> records kept with missing metadata (unreadable sidecars).
  """
  spec: str
  root: str
  shards: tuple[Shard, ...]
  members: list[Member]
  labels: np.ndarray
  label_names: list[str]
  columns: dict[str, np.ndarray]
  skipped: collections.Counter
  problems: collections.Counter
  examples: dict[str, list[str]]

  @property
  def num_records(self) -> int:
    return len(self.members)

  def keys(self) -> list[str]:
    """Per record, "<shard path relative to root>/<member name>": its identity key and path."""
    return self._keys

  @functools.cached_property
  def _keys(self) -> list[str]:
    return [f"{self.shards[m.shard].rel}/{m.name}" for m in self.members]

  def stamps(self, content_digest: bool = False) -> list[str]:
    """Per record, "<member size>:<shard size>:<shard mtime_ns>" (":<sha256>" with digest).

    The shard's stat is part of every stamp: a shard rewritten in place (a member replaced
    or appended) changes all its records, and they are read again.
    """
    out = [f"{m.size}:{self.shards[m.shard].stamp()}" for m in self.members]
    if content_digest:
      out = [f"{s}:{hashlib.sha256(self.read(i)).hexdigest()}" for i, s in enumerate(out)]
    return out

  @property
  def reader(self) -> MemberReader:
    return MemberReader(self.shards)

  def arg(self, i: int) -> tuple[int, int, int, int]:
    """The reader's argument for record i: (shard, offset, size, label)."""
    m = self.members[i]
    return m.shard, m.offset, m.size, int(self.labels[i])

  def read(self, i: int) -> bytes:
    """The image bytes of record i (OSError: its shard changed or is cut short)."""
    return self.reader(self.arg(i))[0]

  def rows(self, positions: Iterable[int]) -> Iterator[input_pipeline.Row | None]:
    keys = self.keys()
    for p in positions:
      yield None if p < 0 else input_pipeline.Row(p, self.arg(p), keys[p])

  def report_lines(self) -> list[str]:
    """One line per reason something was skipped or is missing; [] for a clean input."""
    out = []
    for what, counts in (("skipped", self.skipped), ("kept without metadata", self.problems)):
      for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        out.append(f"webdataset: {what} {n}: {reason}, e.g. "
                   + ", ".join(self.examples.get(reason, [])))
    return out


def _stat_shard(path: str, root: str) -> Shard:
  try:
    st = os.stat(path)
  except OSError as e:
    raise WebdatasetError(f"cannot read shard {path}: {e}") from None
  return Shard(path=path, rel=_posix_rel(path, root), size=st.st_size, mtime_ns=st.st_mtime_ns)


def list_webdataset(spec: str, *, label_field: str | None = "label") -> WebdatasetListing:
  """Lists the records of `--webdataset=spec` (a folder, a glob or one .tar).

  A record is a key with exactly one image member (an extension the folder input reads:
  jpg, jpeg, png, webp, ...). Keys without an image, keys with several, links and other
  member types are skipped and counted; a shard that is not a whole uncompressed tar is an
  error. Labels come from `.cls` (an integer), else from the json field `label_field`
  (an integer, or a class name).

  Raises:
    WebdatasetError: no shards, a truncated or damaged shard, labels of mixed kinds.
  """
  root, paths = find_shards(spec)
  shards = tuple(_stat_shard(p, root) for p in paths)
  skipped: collections.Counter = collections.Counter()
  problems: collections.Counter = collections.Counter()
  examples: dict[str, list[str]] = {}

  def problem(reason: str, where: str, detail: Any) -> None:
    problems[reason] += 1
    ex = examples.setdefault(reason, [])
    if len(ex) < 3:
      ex.append(f"{where} ({detail})")

  members, label_values, fields, where = [], [], [], []
  for si, shard in enumerate(shards):
    for key, sample in _list_shard(shard, skipped, examples).items():
      reason = ("key without an image" if not sample.images else
                "key with several images" if len(sample.images) > 1 else None)
      if reason:
        skipped[reason] += 1
        examples.setdefault(reason, []).append(f"{shard.rel}/{key}")
        del examples[reason][3:]
        continue
      m = sample.images[0]
      members.append(Member(si, m.name, m.offset_data, m.size))
      where.append(f"{shard.rel}/{m.name}")
      label, doc, txt = _parse_sidecars(sample, where[-1], problem)
      if label is None and label_field and label_field in doc:
        label = doc[label_field]
        if isinstance(label, bool) or not isinstance(label, (int, str)):
          problem(f"json {label_field!r} neither an integer nor a name (label -1)", where[-1],
                  repr(label)[:20])
          label = None
      label_values.append(label)
      fields.append(_metadata(doc, txt, label_field))
  labels, label_names = _labels(label_values, where)
  return WebdatasetListing(spec=spec, root=root, shards=shards, members=members, labels=labels,
                           label_names=label_names, columns=_columns(fields),
                           skipped=skipped, problems=problems, examples=examples)


def _columns(fields: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  """One column per field any record has (first-seen order); lists and objects are left out."""
  names = dict.fromkeys(k for doc in fields for k in doc)
  return {k: _column([doc.get(k) for doc in fields]) for k in names}


def position_batches(listing: WebdatasetListing, positions: np.ndarray, *,
                     image_size: int | tuple[int, int], batch_size: int,
                     num_threads: int | None = None, num_workers: int | None = None,
                     draft: bool = True, max_pixels: int = MAX_PIXELS, prefetch: int = 2
                     ) -> input_pipeline.BatchStream:
  """Decoded fixed-size batches of the records at `positions` (negative: a padding row).

  The same engine as folders and TFDS: `Batch.index` is the position, `Batch.key` the
  record's key and `Batch.label` its label. Worker processes read members themselves.
  """
  return input_pipeline.BatchStream(
      listing.rows(np.asarray(positions, np.int64).tolist()), read=listing.reader,
      image_size=image_size, batch_size=batch_size, num_threads=num_threads,
      num_workers=num_workers, draft=draft, max_pixels=max_pixels, prefetch=prefetch,
      keyed=True)


__all__ = ["WebdatasetError", "WebdatasetListing", "Shard", "Member", "MemberReader",
           "find_shards", "list_webdataset", "position_batches", "read_member", "split_name"]
