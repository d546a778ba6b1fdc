"""Shards: fixed ranges of input records, each written atomically as one folder.

  shards/000007/             the rows of records [7*S, 8*S): <kind>.npy, meta.npz,
                             failures.json, shard.json (rows, record range, SHA-256 of every
                             file above; written last)
  shards/000007.part-1200/   a shard's first 1200 records, written when a job was stopped
                             mid-shard; the rerun continues from record 1200 of the shard

A shard directory is built under a temporary name and renamed when complete, so it exists
whole or not at all. Rows hold decoded images only; a failed image has no row (its record
index is absent from "row") and is listed in failures.json.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import pathlib
import shutil
import uuid
from typing import IO, Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from cbir_jax.atomic import StoreError, fsync_dir, sha256_file, write_json_atomic

MANIFEST = "manifest.json"
SHARDS = "shards"
RECORDS = "records.npz"
DELTA = "delta"
META_COLUMNS = ("row", "path", "label", "label_name", "width", "height")
_PART = ".part-"


def shard_name(k: int) -> str:
  return f"{k:06d}"


def piece_name(k: int, covered: int) -> str:
  """A stopped shard's finished part: its first `covered` records."""
  return f"{shard_name(k)}{_PART}{covered}"


def generation_base(generation: int) -> str:
  """The folder of a generation, relative to the output directory ("" for the first)."""
  return "" if generation == 0 else f"gen-{generation:06d}"


def positions_sha256(positions: np.ndarray) -> str:
  """Digest of the record positions a shard covers (a rerun checks it plans the same ones)."""
  return hashlib.sha256(np.ascontiguousarray(positions, np.int64).tobytes()).hexdigest()


def npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
  """(shape, Fortran order, dtype) from an open .npy file's header (ValueError: none)."""
  version = np.lib.format.read_magic(f)
  read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
          else np.lib.format.read_array_header_2_0)
  return read(f)


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


def _written(output_dir: str | os.PathLike, where: str, named: Callable[[str], bool]
             ) -> Iterator[tuple[pathlib.Path, dict[str, Any]]]:
  """(folder, shard.json) of the shard folders in `output_dir/where` whose name is
  `named` and that were written whole."""
  root = pathlib.Path(output_dir) / where
  for d in root.iterdir() if root.is_dir() else ():
    if named(d.name) and (info := _shard_info(d)) is not None:
      yield d, info


def complete_shards(output_dir: str | os.PathLike, where: str = SHARDS
                    ) -> dict[int, dict[str, Any]]:
  """Shards already written whole in `output_dir/where`: index -> their shard.json."""
  return {int(d.name): info for d, info in _written(output_dir, where, str.isdigit)}


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
  out: dict[int, list] = {}
  for d, info in _written(output_dir, where, lambda name: _PART in name):
    k, _, n = d.name.partition(_PART)
    if k.isdigit() and n.isdigit():  # not a temporary folder of one
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


__all__ = ["DELTA", "MANIFEST", "META_COLUMNS", "RECORDS", "SHARDS", "ShardData",
           "complete_shards", "generation_base", "npy_header", "piece_name", "positions_sha256",
           "read_failures_json", "read_shard", "refuse_orphan_shards", "remove_partial",
           "shard_intact", "shard_name", "shard_pieces", "write_shard"]
