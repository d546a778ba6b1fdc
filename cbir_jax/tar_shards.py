"""Tar shards at the member level: find them, list their headers, read one member by offset.

`webdataset_input` builds records from this; nothing here knows about labels or metadata.
Plain `tarfile`, uncompressed shards only: a compressed tar has no member offsets to seek to.
"""
from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import tarfile
from typing import Any, BinaryIO

from cbir_jax.atomic import write_atomic

SIDECAR_MAX_BYTES = 1 << 20  # a .json/.cls/.txt larger than this is not metadata: refused
SIDECARS = ("cls", "json", "txt")  # read while listing; other non-image members are counted
EXAMPLES = 3  # names kept per skip reason
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


def read_member(shard: Shard, offset: int, size: int) -> bytes:
  """The `size` bytes at `offset` of `shard`.

  Checks first that the shard still has the size and mtime it was listed with: a replaced
  shard could hold another image at that offset, and that row must fail, not be wrong.

  Raises:
    OSError: the shard is gone, changed since it was listed, or ends inside the member.
  """
  with open(shard.path, "rb") as f:
    st = os.fstat(f.fileno())
    if (st.st_size, st.st_mtime_ns) != (shard.size, shard.mtime_ns):
      raise OSError(f"shard {shard.rel} changed since it was listed (size or mtime differ); "
                    "rerun to list it again")
    f.seek(offset)
    data = f.read(size)  # buffered: reads on until `size` bytes or the end of the file
  if len(data) < size:
    raise OSError(f"shard {shard.rel} ends inside a member (byte {offset + len(data)})")
  return data


# --- finding the shards --------------------------------------------------------------------


def posix_rel(path: str, root: str) -> str:
  return pathlib.PurePath(os.path.relpath(path, root)).as_posix()


def _glob_root(spec: str) -> str:
  """The folder part of a glob before its first wildcard ("data/part-*/x.tar" -> "data")."""
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
    for dirpath, _, filenames in os.walk(spec, followlinks=False):
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
  paths = sorted((os.path.abspath(p) for p in paths), key=lambda p: posix_rel(p, root))
  return root, paths


def stat_shard(path: str, root: str) -> Shard:
  try:
    st = os.stat(path)
  except OSError as e:
    raise WebdatasetError(f"cannot read shard {path}: {e.strerror or e}") from None
  return Shard(path=path, rel=posix_rel(path, root), size=st.st_size, mtime_ns=st.st_mtime_ns)


# --- listing one shard ---------------------------------------------------------------------


def split_name(name: str) -> tuple[str, str]:
  """(key, extension) of a member: the key runs to the first dot of the basename.

  "a/000123.jpg" -> ("a/000123", "jpg"); "000123.seg.png" -> ("000123", "seg.png"),
  the webdataset convention (a whole extension names a field).
  """
  folder, _, base = name.rpartition("/")
  stem, _, ext = base.partition(".")
  return (f"{folder}/{stem}" if folder else stem), ext


@dataclasses.dataclass
class Sample:
  """The members of one key: image members as (name, data offset, size), sidecar bytes."""
  key: str
  images: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)
  sidecars: dict[str, bytes] = dataclasses.field(default_factory=dict)  # "cls"/"json"/"txt"


@dataclasses.dataclass
class ShardListing:
  """One shard's samples in the order of their keys' first members, and what was left out.

  Plain data (picklable): shards are listed in worker processes. `to_dict`/`from_dict` give
  the JSON form of the listing cache (sidecar bytes as base64).
  """
  samples: list[Sample]
  skipped: collections.Counter  # reason -> members left out
  examples: dict[str, list[str]]  # reason -> a few "<shard>/<member>" names

  def to_dict(self) -> dict[str, Any]:
    return {"samples": [[s.key, s.images, {k: base64.b64encode(v).decode("ascii")
                                           for k, v in s.sidecars.items()}]
                        for s in self.samples],
            "skipped": dict(self.skipped), "examples": self.examples}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ShardListing:
    samples = [Sample(key, [(n, int(o), int(z)) for n, o, z in images],
                      {k: base64.b64decode(v) for k, v in sidecars.items()})
               for key, images, sidecars in d["samples"]]
    return cls(samples, collections.Counter(d["skipped"]), d["examples"])


def shard_error(shard: Shard, why: str) -> WebdatasetError:
  return WebdatasetError(f"shard {shard.path} is not a whole tar ({why}); re-create or "
                         "re-download it, or move it out of the input")


def _check_end(f: BinaryIO, shard: Shard, end: int) -> None:
  """The archive must end in a zero block: `tarfile` stops silently at a cut-off header."""
  f.seek(end)
  block = f.read(tarfile.BLOCKSIZE)
  if len(block) < tarfile.BLOCKSIZE:
    raise shard_error(shard, f"it ends at byte {shard.size}, without the end-of-archive "
                             "blocks: truncated")
  if block.count(0) != tarfile.BLOCKSIZE:
    raise shard_error(shard, f"damaged member header at byte {end}")


def _read_sidecar(f: BinaryIO, m: tarfile.TarInfo, shard: Shard) -> bytes:
  if m.size > SIDECAR_MAX_BYTES:
    raise WebdatasetError(f"shard {shard.path}: member {m.name} is {m.size} bytes, more than "
                          f"the {SIDECAR_MAX_BYTES} a .cls/.json/.txt sidecar may have")
  f.seek(m.offset_data)  # tarfile seeks back to the next header itself
  return f.read(m.size)


def list_shard(shard: Shard, image_extensions: frozenset[str]) -> ShardListing:
  """Reads one shard's headers and sidecars; the image members (their lower-case extension,
  with the dot, in `image_extensions`) are only located.

  Raises:
    WebdatasetError: compressed, not a tar, truncated, or a damaged header (one line).
  """
  out = ShardListing([], collections.Counter(), {})
  by_key: dict[str, Sample] = {}
  try:
    with open(shard.path, "rb") as f:
      magic = f.read(6)
      kind = next((k for m, k in _COMPRESSED.items() if magic.startswith(m)), None)
      if kind:
        raise shard_error(shard, f"{kind}-compressed: members cannot be read by position; "
                                 "decompress it to a plain .tar")
      f.seek(0)
      with tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:  # headers only: tarfile seeks over the data of members not read
          _add_member(f, m, shard, image_extensions, by_key, out)
        _check_end(f, shard, tar.offset)
  except tarfile.TarError as e:
    raise shard_error(shard, f"tar: {e}") from None
  except OSError as e:
    raise WebdatasetError(f"cannot read shard {shard.path}: {e.strerror or e}") from None
  out.samples = list(by_key.values())
  return out


def count(counts: collections.Counter, examples: dict[str, list[str]], reason: str,
          example: str) -> None:
  """Counts one case of `reason`, keeping its first EXAMPLES examples."""
  counts[reason] += 1
  ex = examples.setdefault(reason, [])
  if len(ex) < EXAMPLES:
    ex.append(example)


def _add_member(f: BinaryIO, m: tarfile.TarInfo, shard: Shard, image_extensions: frozenset[str],
                by_key: dict[str, Sample], out: ShardListing) -> None:
  if m.isdir():
    return  # folders inside a tar hold nothing of their own; not worth a count
  if not m.isfile() or m.issparse():
    count(out.skipped, out.examples, "link or special member", f"{shard.rel}/{m.name}")
    return
  if m.offset_data + m.size > shard.size:
    raise shard_error(shard, f"member {m.name} runs past the end of the file: truncated")
  key, ext = split_name(m.name)
  ext = ext.lower()
  sample = by_key.setdefault(key, Sample(key))
  if f".{ext}" in image_extensions:
    # The same name twice (tar -r): the later copy replaces the earlier, as tar extracts it.
    sample.images = [i for i in sample.images if i[0] != m.name] + [
        (m.name, m.offset_data, m.size)]
  elif ext in SIDECARS:
    sample.sidecars[ext] = _read_sidecar(f, m, shard)
  else:
    count(out.skipped, out.examples,
          f"other member .{ext}" if ext else "member without extension", f"{shard.rel}/{m.name}")


# --- the listing cache ------------------------------------------------------------------------

CACHE_FORMAT = 1


def _cache_file(cache_dir: str, shard: Shard) -> str:
  return os.path.join(cache_dir, hashlib.sha256(shard.rel.encode("utf-8", "surrogateescape")
                                                ).hexdigest()[:32] + ".json")


def _cache_id(shard: Shard, image_extensions: frozenset[str]) -> dict[str, Any]:
  """What a cached listing must match: the shard as stated now and the image extensions."""
  return {"format": CACHE_FORMAT, "rel": shard.rel, "size": shard.size,
          "mtime_ns": shard.mtime_ns, "image_extensions": sorted(image_extensions)}


def cached_list_shard(shard: Shard, image_extensions: frozenset[str], cache_dir: str | None
                      ) -> ShardListing:
  """`list_shard`, kept in `cache_dir` per shard; reused while the shard's size and mtime stay.

  A cache file that is missing, damaged or of another shard state is a miss: the shard is
  listed again and the file replaced (atomically: a unique temporary file, then a rename).
  """
  if cache_dir is None:
    return list_shard(shard, image_extensions)
  path, want = _cache_file(cache_dir, shard), _cache_id(shard, image_extensions)
  with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # a miss: listed below
    doc = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    if doc.get("id") == want:
      return ShardListing.from_dict(doc["listing"])
  listing = list_shard(shard, image_extensions)
  os.makedirs(cache_dir, exist_ok=True)
  text = json.dumps({"id": want, "listing": listing.to_dict()})
  write_atomic(path, lambda f: f.write(text.encode("utf-8")), unique_tmp=True)
  return listing


__all__ = ["WebdatasetError", "Shard", "Sample", "ShardListing", "find_shards", "list_shard",
           "read_member", "split_name", "stat_shard", "shard_error", "cached_list_shard", "count"]
