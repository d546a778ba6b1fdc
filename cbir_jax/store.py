"""Descriptor output on disk: shards written atomically, locks, the manifest, a checked loader.

The finished layout is described in cbir_jax/index.py (the shards are the index: one folder
of .npy parts per kind, one metadata table, one failure list). While a job runs:
  shards/000007/             one shard = the rows of records [7*S, 8*S): <kind>.npy,
                             meta.npz, failures.json, shard.json (rows, record range,
                             SHA-256 of every file above; written last)
  shards/000007.part-1200/   a shard's first 1200 records, written when a job was stopped
                             mid-shard; the rerun continues from record 1200 of the shard
  gen-000001/delta/          the records an update extracts, before it assembles its shards
  .lock-worker-<i>           flock'ed while worker i writes here; .lock-job while a worker
                             prepares or finishes the job; removed when released

A shard directory is built under a temporary name and renamed when complete, so it exists
whole or not at all. Rows hold decoded images only; a failed image has no row (its record
index is absent from "row") and is listed in failures.json.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import uuid
from typing import IO, Any, Callable, Mapping, Sequence

import numpy as np

from cbir_jax import index as index_files
from cbir_jax.manifest import FORMAT, FORMAT_VERSION, FileEntry, Manifest, OldFormat

MANIFEST = "manifest.json"
SHARDS = "shards"
RECORDS = "records.npz"
DELTA = "delta"
WEBDATASET_CACHE = "webdataset-listing"  # per-shard listings of a --webdataset input (a cache)
META_COLUMNS = ("row", "path", "label", "label_name", "width", "height")
_PART = ".part-"


class StoreError(ValueError):
  """An output directory that cannot be written or read as asked; the message says why."""


def shard_name(k: int) -> str:
  return f"{k:06d}"


def piece_name(k: int, covered: int) -> str:
  """A stopped shard's finished part: its first `covered` records."""
  return f"{shard_name(k)}{_PART}{covered}"


def generation_base(generation: int) -> str:
  """The folder of a generation, relative to the output directory ("" for the first)."""
  return "" if generation == 0 else f"gen-{generation:06d}"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


_sha256 = sha256_file  # the name tests and format-1 tools use


def positions_sha256(positions: np.ndarray) -> str:
  """Digest of the record positions a shard covers (a rerun checks it plans the same ones)."""
  return hashlib.sha256(np.ascontiguousarray(positions, np.int64).tobytes()).hexdigest()


def fsync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *,
                 unique_tmp: bool = False) -> pathlib.Path:
  """Writes a file whole or not at all; returns its path.

  `write(f)` fills a temporary binary file beside `path`, which is fsynced and renamed
  over `path`; on any error the temporary file is removed and `path` is untouched. The
  temporary name is fixed (`.name.tmp`), so a rerun after a kill overwrites what the
  killed run left, unless `unique_tmp` (for files that several writers may race on).
  """
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp" if unique_tmp
                       else f".{path.name}.tmp")
  try:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes JSON to a temporary file, fsyncs and renames it over `path`."""
  text = json.dumps(obj, indent=1, sort_keys=True) + "\n"
  write_atomic(path, lambda f: f.write(text.encode("utf-8")), unique_tmp=True)


# --- the manifest --------------------------------------------------------------------------


def read_manifest(output_dir: str | os.PathLike, name: str = MANIFEST) -> dict[str, Any]:
  """manifest.json as a dict (see `load_manifest` for the typed record)."""
  path = pathlib.Path(output_dir) / name
  if not path.is_file():
    raise StoreError(f"{output_dir}: no {MANIFEST}; not a cbir_jax descriptor directory "
                     "(write one with launch/extract.py)")
  try:
    m = json.loads(path.read_text())
  except ValueError as e:
    raise StoreError(f"{path}: unreadable manifest ({e})") from e
  if not isinstance(m, dict) or m.get("format") != FORMAT:
    raise StoreError(f"{path}: not a cbir_jax descriptor manifest")
  if int(m.get("format_version", 1)) > FORMAT_VERSION:
    raise StoreError(f"{path}: written by a newer cbir_jax (format {m['format_version']}); "
                     "upgrade cbir_jax to read it")
  return m


def load_manifest(output_dir: str | os.PathLike, name: str = MANIFEST) -> Manifest:
  """The typed manifest of an output directory (format 4; earlier ones are refused)."""
  d = read_manifest(output_dir, name)
  d.setdefault("format_version", 1)  # files of every format record theirs; none: the first
  try:
    return Manifest.from_dict(d)
  except OldFormat as e:
    raise StoreError(f"{output_dir} was written by an earlier cbir_jax ({e}) in a layout this "
                     "version no longer reads; rebuild it: rerun launch/extract.py with the "
                     "same flags and a new --output") from None
  except (KeyError, TypeError, ValueError) as e:
    raise StoreError(f"{pathlib.Path(output_dir) / name}: damaged manifest ({e!r})") from e


def write_manifest(output_dir: str | os.PathLike, manifest: Manifest, name: str = MANIFEST
                   ) -> None:
  """Writes the manifest atomically: readers see the old one or the new one, never a mix."""
  write_json_atomic(pathlib.Path(output_dir) / name, manifest.to_dict())


# --- writing -------------------------------------------------------------------------------


class DirLock:
  """A job process' write lock on an output directory: an flock'ed `.lock-<process>` file.

  `close()` removes the file, then releases the lock, so a finished job leaves no lock
  file. A job that opened the file just before it was removed gets the lock on a file
  that is no longer there; `lock` sees that (another inode at the path, or none) and
  takes the lock again on the file now at the path, so two jobs never both hold it.
  """

  def __init__(self, path: pathlib.Path, f: IO[str]):
    self.path, self._f = path, f

  @property
  def closed(self) -> bool:
    return self._f is None

  def close(self) -> None:
    if self._f is None:
      return
    try:
      if _same_file(self._f, self.path):
        self.path.unlink(missing_ok=True)
    finally:
      self._f.close()
      self._f = None

  def __enter__(self) -> "DirLock":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _same_file(f: IO[str], path: pathlib.Path) -> bool:
  try:
    a, b = os.fstat(f.fileno()), os.stat(path)
  except FileNotFoundError:
    return False
  return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def lock(output_dir: str | os.PathLike, name: int | str = 0, *, wait: bool = False) -> DirLock:
  """Takes the lock `.lock-<name>` on `output_dir`; the OS drops it when the process dies.

  Each worker holds `.lock-worker-<i>` while it runs (two copies of one worker are refused);
  `.lock-job` is held briefly, with `wait`, while a worker prepares or finishes the job.
  Returns the lock; `close()` it at the end (which removes the lock file).

  Raises:
    StoreError: (without `wait`) another live process holds the lock.
  """
  path = pathlib.Path(output_dir) / f".lock-{name}"
  for _ in range(100):  # another job removing the file as we open it: try again
    f = open(path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError as e:
      f.seek(0)
      holder = f.read().strip() or "unknown"
      f.close()
      if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise StoreError(f"{output_dir} is being written by another job ({holder}); wait for "
                         "it to finish or stop it, or choose another --output") from None
      raise
    except BaseException:
      f.close()
      raise
    if _same_file(f, path):
      f.seek(0)
      f.truncate()
      f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
      f.flush()
      return DirLock(path, f)
    f.close()
  raise StoreError(f"cannot take the lock {path}: it keeps being replaced")


def diff_settings(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = ""
                  ) -> list[str]:
  """Names of settings (dotted) that differ between two manifests' settings dicts."""
  from cbir_jax.manifest import diff_dicts
  return diff_dicts(old, new, prefix)


def prepare(output_dir: str | os.PathLike, manifest: Manifest | Mapping[str, Any]) -> Manifest:
  """Creates the output directory and its manifest (format-1 style dicts are accepted too).

  A directory that already has a manifest is returned as is when its settings
  equal the new ones, refused otherwise (the job checks the input separately).

  Raises:
    StoreError: other settings, or complete shards without a manifest.
  """
  new = manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest)
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / SHARDS).mkdir(exist_ok=True)
  if (out / MANIFEST).exists():
    old = load_manifest(out)
    check_settings(out, old, new)
    return old
  refuse_orphan_shards(out)
  write_manifest(out, new)
  return new


def refuse_orphan_shards(out: pathlib.Path) -> None:
  """Raises StoreError if `out` holds complete shards but no manifest."""
  leftover = complete_shards(out)
  if leftover:
    # Shards record no settings of their own: without the manifest nobody can tell
    # whether they match this job, and reusing them could mix two settings silently.
    raise StoreError(
        f"{out} holds {len(leftover)} complete shard(s) but no {MANIFEST}, so the settings "
        "that made them are unknown; refusing to reuse them. Restore the manifest, or "
        "delete the directory to start over.")


def check_settings(out: pathlib.Path, old: Manifest, new: Manifest) -> None:
  """Refuses to mix rows of other settings into a directory."""
  diffs = old.settings.diff(new.settings)
  if diffs:
    raise StoreError(
        f"{out} already holds descriptors made with other settings; refusing to mix them. "
        "Differences: " + "; ".join(diffs[:8]) +
        (f" (+{len(diffs) - 8} more)" if len(diffs) > 8 else "") +
        ". Use another --output, or delete the directory to start over.")


@dataclasses.dataclass
class ShardData:
  """A shard's contents in memory."""
  arrays: dict[str, np.ndarray]
  meta: dict[str, np.ndarray]
  failures: list[tuple[str, str, int]]  # (path, reason, record position)


def write_shard(output_dir: str | os.PathLike, k: int, *, start: int, stop: int,
                arrays: Mapping[str, np.ndarray], meta: Mapping[str, np.ndarray],
                failures: Sequence[Sequence[Any]], process_index: int = 0,
                where: str = SHARDS, name: str | None = None, records: int | None = None,
                positions_digest: str = "") -> dict[str, Any]:
  """Writes shard k under a temporary name in `output_dir/where`, then renames it `name`.

  Args:
    start, stop: the record range the shard covers (first and one past the last record).
    arrays, meta, failures: its rows ({kind: [n, D]}, {column: [n]}) and failed records.
    where, name: its folder (default shards/) and name (default `shard_name(k)`).
    records, positions_digest: how many records it covers and their `positions_sha256`.

  Returns:
    The shard's info (as in shard.json).

  Raises:
    StoreError: the shard could not be written (disk full, permissions); nothing of
      it is left behind and complete shards are untouched.
  """
  root = pathlib.Path(output_dir) / where
  root.mkdir(parents=True, exist_ok=True)
  name = name or shard_name(k)
  tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
  rows = len(meta["row"])
  try:
    tmp.mkdir()
    files = _write_shard_files(tmp, k, rows, arrays, meta, failures)
    info = {"index": k, "start": start, "stop": stop, "rows": rows,
            "failures": len(failures), "process": process_index, "files": files,
            "shapes": {kind: list(a.shape) for kind, a in arrays.items()},
            "records": stop - start if records is None else records,
            "positions_sha256": positions_digest}
    write_json_atomic(tmp / "shard.json", info)
    fsync_dir(tmp)
    if (root / name).exists():  # a damaged leftover of the same name (not complete)
      shutil.rmtree(root / name)
    os.rename(tmp, root / name)
    fsync_dir(root)
    return info
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    reason = ("the disk is full" if e.errno == errno.ENOSPC else
              os.strerror(e.errno) if e.errno else str(e))
    raise StoreError(f"cannot write shard {k} in {root}: {reason} ({e}); complete shards "
                     "are kept, rerun the same command to continue") from e


def _write_shard_files(tmp: pathlib.Path, k: int, rows: int, arrays: Mapping[str, np.ndarray],
                       meta: Mapping[str, np.ndarray], failures: Sequence[Sequence[Any]]
                       ) -> dict[str, dict[str, Any]]:
  files = {}

  def finish(name: str) -> None:
    p = tmp / name
    with open(p, "rb+") as f:
      os.fsync(f.fileno())
    files[name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}

  for kind, a in arrays.items():
    if len(a) != rows:
      raise ValueError(f"shard {k}: {kind} has {len(a)} rows, metadata {rows}")
    np.save(tmp / f"{kind}.npy", a)
    finish(f"{kind}.npy")
  np.savez(tmp / "meta.npz", **{c: np.asarray(v) for c, v in meta.items()})
  finish("meta.npz")
  # surrogateescape: file names that are not valid UTF-8 come back as their own bytes.
  (tmp / "failures.json").write_text(json.dumps([list(f) for f in failures]),
                                     encoding="utf-8", errors="surrogateescape")
  finish("failures.json")
  return files


def _shard_info(d: pathlib.Path) -> dict[str, Any] | None:
  """A shard's shard.json when every file it lists is there with its size (stat only)."""
  try:
    info = json.loads((d / "shard.json").read_text())
  except (OSError, ValueError):
    return None  # missing or damaged: treated as missing, and rewritten by the job
  for name, f in info.get("files", {}).items():
    try:
      if (d / name).stat().st_size != f.get("bytes"):
        return None  # a file truncated or lost after the shard was written
    except OSError:
      return None
  return info


def complete_shards(output_dir: str | os.PathLike, where: str = SHARDS
                    ) -> dict[int, dict[str, Any]]:
  """Shards already written whole in `output_dir/where`: index -> their shard.json."""
  root = pathlib.Path(output_dir) / where
  done = {}
  if not root.is_dir():
    return done
  for d in root.iterdir():
    if d.name.isdigit():
      info = _shard_info(d)
      if info is not None:
        done[int(d.name)] = info
  return done


def shard_intact(d: pathlib.Path, info: Mapping[str, Any]) -> bool:
  """Every file of a complete shard matches the SHA-256 recorded when it was written."""
  try:
    return all(sha256_file(d / name) == f.get("sha256")
               for name, f in info.get("files", {}).items())
  except OSError:
    return False


def shard_pieces(output_dir: str | os.PathLike, where: str = SHARDS
                 ) -> dict[int, list[tuple[int, pathlib.Path, dict[str, Any]]]]:
  """Finished parts of stopped shards: index -> [(records covered, folder, shard.json)]."""
  root = pathlib.Path(output_dir) / where
  out: dict[int, list] = {}
  if not root.is_dir():
    return out
  for d in root.iterdir():
    k, sep, n = d.name.partition(_PART)
    if sep and k.isdigit() and n.isdigit():
      info = _shard_info(d)
      if info is not None:
        out.setdefault(int(k), []).append((int(n), d, info))
  return {k: sorted(v, key=lambda t: t[0]) for k, v in out.items()}


def remove_partial(output_dir: str | os.PathLike, shards: Sequence[int], where: str = SHARDS,
                   keep: Sequence[pathlib.Path] = ()) -> None:
  """Deletes leftovers of a killed job for `shards` (temporary, incomplete, or pieces not kept)."""
  root = pathlib.Path(output_dir) / where
  if not root.is_dir():
    return
  want = {shard_name(k) for k in shards}
  keep = {pathlib.Path(p).name for p in keep}
  for d in root.iterdir():
    name = d.name
    if name.startswith(".tmp-") and name.split("-")[1].split(".")[0] in want:
      shutil.rmtree(d, ignore_errors=True)
    elif name.split(".")[0] in want and name not in keep and (
        _PART in name or _shard_info(d) is None):
      shutil.rmtree(d, ignore_errors=True)


def read_shard(d: str | os.PathLike, kinds: Sequence[str]) -> ShardData:
  """A complete shard's rows, metadata and failures, read into memory."""
  d = pathlib.Path(d)
  try:
    arrays = {k: np.load(d / f"{k}.npy", allow_pickle=False) for k in kinds}
    with np.load(d / "meta.npz", allow_pickle=False) as z:
      meta = {c: z[c] for c in z.files}
  except (OSError, ValueError) as e:
    raise StoreError(f"cannot read shard {d}: {e}; delete it and rerun to recompute it") from e
  return ShardData(arrays, meta, read_failures_json(d / "failures.json"))


def read_failures_json(path: pathlib.Path) -> list[tuple[str, str, int]]:
  if not path.is_file():
    return []
  items = json.loads(path.read_text(encoding="utf-8", errors="surrogateescape"))
  return [(f[0], f[1], int(f[2]) if len(f) > 2 else -1) for f in items]


# --- reading -------------------------------------------------------------------------------


def _npy_rows(path: pathlib.Path) -> int | None:
  """Rows an .npy header declares (None if it has no readable header)."""
  try:
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
              else np.lib.format.read_array_header_2_0)
      shape = read(f)[0]
    return int(shape[0]) if shape else None
  except (OSError, ValueError):
    return None


def _file(out: pathlib.Path, rel: str, want: Mapping[str, Any] | None, verify: bool,
          rows: int | None = None) -> pathlib.Path:
  """A file the manifest lists: present, of its recorded size (and, for an .npy, `rows`
  rows), and with `verify`, of its recorded digest."""
  p = out / rel
  try:
    size = p.stat().st_size
  except OSError:
    raise StoreError(f"{out}: {rel} is listed in the manifest but missing") from None
  want = want or {}
  has = _npy_rows(p) if rows is not None else None
  if rows is not None and has != rows:
    raise StoreError(f"{out}: {rel} has {size} bytes ({has} rows), the manifest says {rows} "
                     "rows (damaged or modified file)")
  if want.get("bytes", -1) >= 0 and size != want["bytes"]:
    raise StoreError(f"{out}: {rel} has {size} bytes, the manifest says {want['bytes']} "
                     "(damaged or modified file)")
  if verify and want.get("sha256") and sha256_file(p) != want["sha256"]:
    raise StoreError(f"{out}: {rel} does not match its SHA-256 in the manifest "
                     "(damaged or modified file)")
  return p


def _check_finite(a: np.ndarray, what: str, chunk: int = 65536) -> None:
  for i in range(0, len(a), chunk):
    block = np.asarray(a[i:i + chunk])
    if not np.isfinite(block).all():
      bad = i + int(np.argwhere(~np.isfinite(block))[0][0])
      raise StoreError(f"{what}: row {bad} holds NaN or infinity")


def _load_npy(path: pathlib.Path) -> np.ndarray:
  try:
    a = np.load(path, mmap_mode="r", allow_pickle=False)
  except Exception as e:  # truncated or not an .npy
    raise StoreError(f"cannot read {path}: {e}") from e
  if a.ndim != 2:
    raise StoreError(f"{path}: expected a 2-D array, found shape {a.shape}")
  return a


def _entry(e: FileEntry) -> dict[str, Any]:
  return {"sha256": e.sha256, "bytes": e.bytes}


def _read_meta(out: pathlib.Path, m: Manifest, verify: bool) -> dict[str, np.ndarray]:
  e = m.metadata
  if e is None:
    raise StoreError(f"{out}: the manifest lists no metadata table")
  p = _file(out, e.file, _entry(e), verify)
  try:
    meta = index_files.read_metadata(p)
  except Exception as err:  # parquet errors of a damaged file
    raise StoreError(f"{out}: cannot read {e.file} ({err})") from err
  have = len(meta.get("row", ()))
  if have != m.rows or e.rows != m.rows:
    raise StoreError(f"{out}: {e.file} has {have} rows, the manifest says {m.rows}")
  return meta


def _read_array(out: pathlib.Path, m: Manifest, kind: str, verify: bool):
  parts = m.parts.get(kind, ())
  if not parts and m.rows == 0:
    return np.zeros((0, m.dimensions.get(kind, 0)), np.dtype(m.settings.output_dtype))
  if not parts:
    raise StoreError(f"{out}: the manifest lists no parts of {kind}")
  arrays = [_load_npy(_file(out, e.file, _entry(e), verify, rows=e.rows)) for e in parts]
  dim = m.dimensions.get(kind)
  for e, a in zip(parts, arrays):
    if dim is not None and a.shape[1] != dim:
      raise StoreError(f"{out}: {e.file} rows have {a.shape[1]} values, the manifest says {dim}")
  if sum(len(a) for a in arrays) != m.rows:
    raise StoreError(f"{out}: the parts of {kind} hold {sum(len(a) for a in arrays)} rows, the "
                     f"manifest says {m.rows}")
  return index_files.part_view(arrays)


def open_index(output_dir: str | os.PathLike, kind: str = "fc_conv", *, verify: bool = False
               ) -> tuple[Manifest, Any, dict[str, np.ndarray]]:
  """(manifest, descriptors, metadata) of a finished extraction; see `load_descriptors`."""
  out = pathlib.Path(output_dir)
  m = load_manifest(out)
  if not m.complete:
    done = len(complete_shards(out, m.path(SHARDS)))
    raise StoreError(f"{out}: extraction not finished ({done} of {m.num_shards} shards "
                     "written); rerun the extraction command (every worker) to complete it")
  if kind not in m.settings.kinds:
    raise StoreError(f"{out}: kind {kind!r} was not extracted; available: "
                     f"{list(m.settings.kinds)}")
  meta = _read_meta(out, m, verify)
  array = _read_array(out, m, kind, verify)
  if verify:
    _check_finite(array, f"{out} ({kind})")
  return m, array, meta


def load_descriptors(output_dir: str | os.PathLike, kind: str = "fc_conv", *,
                     verify: bool = False) -> tuple[Any, dict[str, np.ndarray]]:
  """Descriptors and metadata of a finished extraction, rows in input order.

  The shards are the index: the rows of a kind are its parts (one memory-mapped .npy per
  shard). Loading checks what is cheap: every listed file exists with its recorded size,
  row counts and shapes agree.

  Args:
    output_dir: a directory written by the extraction job (format 4; an older one gets
      one line saying how to rebuild it).
    kind: descriptor kind (fc, conv, fc_conv, mac, spoc, gem; those the job extracted).
    verify: also recompute SHA-256 checksums and check every value is finite.

  Returns:
    (array [N, D]: the part itself (read-only memory map) when the index has one part,
    else a `cbir_jax.index.LazyRows` view that reads only the rows asked for (numpy-like
    indexing, `np.asarray` for the whole array);
    metadata: dict of equal-length arrays "row" (index in the input list), "path" (file
    path or TFDS id), "label" (-1 if unknown), "label_name", "width", "height", plus any
    extra columns). Failed images have no row.

  Raises:
    StoreError: unfinished job, unknown kind, or files that do not match the manifest.
  """
  _, array, meta = open_index(output_dir, kind, verify=verify)
  return array, meta


def read_failures(output_dir: str | os.PathLike) -> list[tuple[str, str]]:
  """All (path, reason) failures of the current generation (finished or partial), in input order."""
  out = pathlib.Path(output_dir)
  m = load_manifest(out) if (out / MANIFEST).is_file() else None
  if m is not None and m.complete and m.failures_file is None and m.format_version >= 4:
    return []  # nothing failed: no failure list is written
  if m is not None and m.complete and m.failures_file is not None:
    f = m.failures_file
    p = _file(out, f.file, _entry(f), False)
    return [(key, reason) for key, reason, _ in read_failures_json(p)]
  where = m.path(SHARDS) if m is not None else SHARDS
  result = []
  for k, _ in sorted(complete_shards(out, where).items()):
    result += [(key, reason) for key, reason, _ in
               read_failures_json(out / where / shard_name(k) / "failures.json")]
  return result


__all__ = ["StoreError", "ShardData", "load_descriptors", "open_index", "read_failures",
           "read_manifest", "load_manifest", "write_manifest", "lock", "DirLock", "prepare",
           "write_shard", "complete_shards", "shard_pieces", "read_shard"]
