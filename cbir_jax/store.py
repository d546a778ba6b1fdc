"""An output directory: its manifest (read, written, compared) and the checked index loader.

Split by concern: atomic.py (files written whole, checksums, locks), shards.py (the shards
as written), index.py (the finished layout: parts per kind as one view, the metadata table),
this module (manifest and reading an index). `store` re-exports the first two, so callers
keep one name for the output directory. While a job runs, beside the shards:
  gen-000001/delta/          the records an update extracts, before it assembles its shards
  .lock-worker-<i>           flock'ed while worker i writes here; .lock-job while a worker
                             prepares or finishes the job; removed when released
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from cbir_jax import index as index_files
# Re-exported: `store` stays the one name callers use for the output directory.
from cbir_jax.atomic import (DirLock, StoreError, fsync_dir, lock, sha256_file,  # noqa: F401
                             write_atomic, write_json_atomic)
from cbir_jax.manifest import FORMAT, FORMAT_VERSION, FileEntry, Manifest, OldFormat
from cbir_jax.shards import (DELTA, MANIFEST, META_COLUMNS, RECORDS, SHARDS,  # noqa: F401
                             ShardData, complete_shards, generation_base, npy_header, piece_name,
                             positions_sha256, read_failures_json, read_shard,
                             refuse_orphan_shards, remove_partial, shard_intact, shard_name,
                             shard_pieces, write_shard)

WEBDATASET_CACHE = "webdataset-listing"  # per-shard listings of a --webdataset input (a cache)


def read_manifest(output_dir: str | os.PathLike) -> dict[str, Any]:
  """manifest.json as a dict (see `load_manifest` for the typed record)."""
  path = pathlib.Path(output_dir) / MANIFEST
  if not path.is_file():
    raise StoreError(_not_an_index(pathlib.Path(output_dir)))
  try:
    m = json.loads(path.read_text())
  except ValueError as e:
    raise StoreError(f"{path}: unreadable manifest ({e})") from e
  if not isinstance(m, dict) or m.get("format") != FORMAT:
    raise StoreError(f"{path}: not a cbir_jax descriptor manifest")
  m.setdefault("format_version", 1)  # files of every format record theirs; none: the first
  if int(m["format_version"]) > FORMAT_VERSION:
    raise StoreError(f"{path}: written by a newer cbir_jax (format {m['format_version']}); "
                     "upgrade cbir_jax to read it")
  return m


def _not_an_index(out: pathlib.Path) -> str:
  """Why `out` has no manifest, in the words a user acts on: no such directory, not a
  directory, or a directory that is not (yet) an index."""
  make = f"make one with: cbir-extract --images=PHOTOS --output={out}"
  if not out.is_dir():
    what = "not a directory" if out.exists() else "no such directory"
    return f"{out}: {what}; an index is the folder cbir-extract writes ({make})"
  return f"{out}: not a cbir_jax index (it has no {MANIFEST}); {make}"


def load_manifest(output_dir: str | os.PathLike) -> Manifest:
  """The typed manifest of an output directory (format 4; earlier ones are refused)."""
  d = read_manifest(output_dir)  # its own errors: no index, unreadable, newer
  try:
    return Manifest.from_dict(d)
  except OldFormat as e:
    raise StoreError(f"{output_dir} was written by an earlier cbir_jax ({e}) in a layout this "
                     "version no longer reads; rebuild it: rerun launch/extract.py with the "
                     "same flags and a new --output") from None
  except (KeyError, TypeError, ValueError) as e:
    raise StoreError(f"{pathlib.Path(output_dir) / MANIFEST}: damaged manifest ({e!r})") from e


def write_manifest(output_dir: str | os.PathLike, manifest: Manifest) -> None:
  """Writes the manifest atomically: readers see the old one or the new one, never a mix."""
  write_json_atomic(pathlib.Path(output_dir) / MANIFEST, manifest.to_dict())


def prepare(output_dir: str | os.PathLike, new: Manifest) -> Manifest:
  """Creates the output directory and its manifest.

  A directory that already has a manifest is returned as is when its settings
  equal the new ones, refused otherwise (the job checks the input separately).

  Raises:
    StoreError: other settings, or complete shards without a manifest.
  """
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


def check_settings(out: pathlib.Path, old: Manifest, new: Manifest) -> None:
  """Refuses to mix rows of other settings into a directory."""
  diffs = old.settings.diff(new.settings)
  if diffs:
    raise StoreError(
        f"{out} already holds descriptors made with other settings; refusing to mix them. "
        "Differences: " + "; ".join(diffs[:8]) +
        (f" (+{len(diffs) - 8} more)" if len(diffs) > 8 else "") +
        ". Use another --output, or delete the directory to start over.")


def _npy_rows(path: pathlib.Path) -> int | None:
  """Rows an .npy header declares (None if it has no readable header)."""
  try:
    with open(path, "rb") as f:
      shape = npy_header(f)[0]
    return int(shape[0]) if shape else None
  except (OSError, ValueError):
    return None


def _file(out: pathlib.Path, e: FileEntry, verify: bool, *, rows: bool = False
          ) -> pathlib.Path:
  """A file the manifest lists: present, of its recorded size (with `rows`, an .npy of its
  recorded rows), and with `verify`, of its recorded digest."""
  p = out / e.file
  try:
    size = p.stat().st_size
  except OSError:
    raise StoreError(f"{out}: {e.file} is listed in the manifest but missing") from None
  if rows and (has := _npy_rows(p)) != e.rows:
    raise StoreError(f"{out}: {e.file} has {size} bytes ({has} rows), the manifest says "
                     f"{e.rows} rows (damaged or modified file)")
  if e.bytes >= 0 and size != e.bytes:
    raise StoreError(f"{out}: {e.file} has {size} bytes, the manifest says {e.bytes} "
                     "(damaged or modified file)")
  if verify and e.sha256 and sha256_file(p) != e.sha256:
    raise StoreError(f"{out}: {e.file} does not match its SHA-256 in the manifest "
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


def _read_meta(out: pathlib.Path, m: Manifest, verify: bool) -> dict[str, np.ndarray]:
  e = m.metadata
  if e is None:
    raise StoreError(f"{out}: the manifest lists no metadata table")
  p = _file(out, e, verify)
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
  arrays = [_load_npy(_file(out, e, verify, rows=True)) for e in parts]
  dim = m.dimensions.get(kind)
  for e, a in zip(parts, arrays):
    if dim is not None and a.shape[1] != dim:
      raise StoreError(f"{out}: {e.file} rows have {a.shape[1]} values, the manifest says {dim}")
  if sum(len(a) for a in arrays) != m.rows:
    raise StoreError(f"{out}: the parts of {kind} hold {sum(len(a) for a in arrays)} rows, the "
                     f"manifest says {m.rows}")
  return index_files.part_view(arrays)


# The kind used when none is asked for: the paper's FC+Conv descriptor, else (weights without
# FC layers, or an extraction of other kinds) the paper's Conv, then the baselines.
KIND_PREFERENCE = ("fc_conv", "conv", "fc", "gem", "mac", "spoc")


def check_kind(out: str | os.PathLike, m: Manifest, kind: str) -> None:
  """Refuses a kind the index does not hold, naming those it does."""
  if kind not in m.settings.kinds:
    raise StoreError(f"{out}: kind {kind!r} was not extracted; the index has "
                     f"{', '.join(m.settings.kinds)} (--kind=...)")


def choose_kind(output_dir: str | os.PathLike, kind: str | None
                ) -> tuple[str, str | None]:
  """(the kind to use, a note when it is not the usual default).

  `kind` None picks the first of KIND_PREFERENCE the index holds (fc_conv in an index of
  weights with FC layers, conv in one of no-top weights); the note says which, and why.

  Raises:
    StoreError: not an index, or an asked kind it does not hold.
  """
  m = load_manifest(output_dir)
  have = list(m.settings.kinds)
  if kind is not None:
    check_kind(output_dir, m, kind)
    return kind, None
  chosen = next((k for k in KIND_PREFERENCE if k in have), have[0] if have else None)
  if chosen is None:
    raise StoreError(f"{output_dir}: the index records no descriptor kind")
  if chosen == KIND_PREFERENCE[0]:
    return chosen, None
  return chosen, (f"kind {chosen} (the index has no {KIND_PREFERENCE[0]}; it has "
                  f"{', '.join(have)}; --kind picks another)")


def open_index(output_dir: str | os.PathLike, kind: str = "fc_conv", *, verify: bool = False
               ) -> tuple[Manifest, Any, dict[str, np.ndarray]]:
  """(manifest, descriptors, metadata) of a finished extraction; see `load_descriptors`."""
  out = pathlib.Path(output_dir)
  m = load_manifest(out)
  if not m.complete:
    done = len(complete_shards(out, m.path(SHARDS)))
    raise StoreError(f"{out}: extraction not finished ({done} of {m.num_shards} shards "
                     "written); rerun the extraction command (every worker) to complete it")
  check_kind(out, m, kind)
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
  if m is not None and m.complete:
    if m.failures_file is None:
      return []  # nothing failed: no failure list is written
    return [(key, reason) for key, reason, _ in
            read_failures_json(_file(out, m.failures_file, False))]
  where = m.path(SHARDS) if m is not None else SHARDS
  result = []
  for k, _ in sorted(complete_shards(out, where).items()):
    result += [(key, reason) for key, reason, _ in
               read_failures_json(out / where / shard_name(k) / "failures.json")]
  return result


__all__ = ["KIND_PREFERENCE", "StoreError", "ShardData", "check_kind", "choose_kind",
           "load_descriptors", "open_index", "read_failures",
           "read_manifest", "load_manifest", "write_manifest", "lock", "DirLock", "prepare",
           "write_shard", "complete_shards", "shard_pieces", "read_shard"]
