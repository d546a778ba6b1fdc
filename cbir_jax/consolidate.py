"""Finishing a generation: verify every shard once, then concatenate each kind into one array.

Runs on process 0 after every shard exists. Every byte is checked here, once, against the
checksums written with the shards, so loaders afterwards only check sizes and shapes.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import os
import pathlib
import time
from typing import Any, Callable, Sequence

import numpy as np

from cbir_jax import store
from cbir_jax.manifest import ConsolidatedEntry, Manifest, ShardEntry

_BLOCK = 1 << 22


def _quiet(msg: str) -> None:
  del msg


def seal(out: pathlib.Path, m: Manifest, *, process_count: int, consolidate: bool = True,
         log: Callable[[str], None] = _quiet) -> Manifest:
  """The generation's complete manifest: shards listed and verified, arrays consolidated.

  Does not write the manifest: the caller switches it atomically.

  Raises:
    StoreError: shards are missing (processes that do not share the output
      filesystem), a shard does not match its checksums (damaged after it was
      written: the message names it), or a file cannot be written.
  """
  where = m.path(store.SHARDS)
  done = store.complete_shards(out, where)
  missing = [k for k in range(m.num_shards) if k not in done]
  if missing:
    raise store.StoreError(
        f"{out}: {len(missing)} of {m.num_shards} shards missing (first: "
        f"{store.shard_name(missing[0])}); were all processes writing to one shared "
        "directory? Rerun the same command to complete them.")
  shards = tuple(_entry(done[k], f"{where}/{store.shard_name(k)}") for k in range(m.num_shards))
  kinds = list(m.settings.kinds)
  t = time.perf_counter()
  _verify_shards(out, shards, skip=kinds if consolidate and shards else ())
  consolidated = {}
  if consolidate and shards:
    total = sum(f["bytes"] for s in shards for f in s.files.values()) / 1e6
    log(f"finishing: verifying {len(shards)} shard(s) and consolidating {len(kinds)} kinds "
        f"({total:.0f} MB)")
    try:
      for i, kind in enumerate(kinds):
        if total > 256:  # a line per kind where it takes a while
          log(f"finishing: {kind} ({i + 1}/{len(kinds)})")
        consolidated[kind] = _consolidate(out, m.path(store.CONSOLIDATED), kind, shards)
    except OSError as e:
      raise store.StoreError(f"{out}: cannot write the consolidated arrays: {e}; the shards "
                             "are complete, rerun the same command to retry") from e
  verified = {"at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "shards": len(shards), "consolidated": sorted(consolidated),
              "finite": bool(consolidated), "seconds": round(time.perf_counter() - t, 3)}
  return m.replace(shards=shards, rows=sum(s.rows for s in shards),
                   failures=sum(s.failures for s in shards), process_count=process_count,
                   status="complete", consolidated=consolidated, verified=verified)


def _entry(info: dict[str, Any], rel: str) -> ShardEntry:
  return ShardEntry(index=int(info["index"]), dir=rel, start=int(info["start"]),
                    stop=int(info["stop"]), rows=int(info["rows"]),
                    failures=int(info["failures"]), process=int(info["process"]),
                    files=info["files"])


def _damaged(out: pathlib.Path, rel: str, why: str) -> store.StoreError:
  shard = rel.rsplit("/", 1)[0]
  return store.StoreError(f"{out}: {rel} {why} (damaged after it was written); delete {shard} "
                          "and rerun the same command to recompute it")


def _verify_shards(out: pathlib.Path, shards: Sequence[ShardEntry], skip: Sequence[str]) -> None:
  """Checks every shard file against its SHA-256 (kinds in `skip` are checked while copied)."""
  skip_files = {f"{k}.npy" for k in skip}
  for s in shards:
    for name, f in s.files.items():
      if name in skip_files:
        continue
      if store.sha256_file(out / s.dir / name) != f["sha256"]:
        raise _damaged(out, f"{s.dir}/{name}", "does not match its SHA-256 in shard.json")


def _read_header(src, rel: str, out: pathlib.Path) -> tuple[tuple[int, ...], bool, np.dtype]:
  try:
    version = np.lib.format.read_magic(src)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    return read(src)
  except ValueError as e:
    raise _damaged(out, rel, f"is not a valid .npy ({e})") from e


def _consolidate(out: pathlib.Path, folder: str, kind: str, shards: Sequence[ShardEntry]
                 ) -> ConsolidatedEntry:
  # Plain writes, not a memory map: on a full disk a write into a mapped file is
  # SIGBUS (the process dies), while write() raises ENOSPC that we can report.
  # Each shard file is hashed and scanned for non-finite values as it is copied, and
  # the output is hashed as it is written, so every byte is read once.
  (out / folder).mkdir(parents=True, exist_ok=True)
  path = out / folder / f"{kind}.npy"
  tmp = path.with_name(f".{kind}.npy.tmp")
  total = sum(s.rows for s in shards)
  digest = hashlib.sha256()
  try:
    with open(tmp, "wb") as f:
      header_at = None
      for s in shards:
        rel = f"{s.dir}/{kind}.npy"
        with open(out / rel, "rb") as src:
          shape, fortran, dtype = _read_header(src, rel, out)
          if header_at is None:
            header_at = (dtype, shape[1:])
            header = _header_bytes(dtype, (total, *shape[1:]))
            digest.update(header)
            f.write(header)
          if (dtype, shape[1:]) != header_at or fortran or shape[0] != s.rows:
            raise store.StoreError(f"{out}: {rel} holds {shape} {dtype}, expected "
                                   f"({s.rows}, {header_at[1]}) {header_at[0]}")
          row_bytes = dtype.itemsize * int(np.prod(shape[1:]))
          _copy_checked(src, f, digest, out, rel, s, dtype, row_bytes)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return ConsolidatedEntry(file=f"{folder}/{kind}.npy", rows=total, sha256=digest.hexdigest(),
                           bytes=path.stat().st_size)


def _header_bytes(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
            "shape": shape})
  return buf.getvalue()


def _copy_checked(src, dst, out_digest, out: pathlib.Path, rel: str, s: ShardEntry,
                  dtype: np.dtype, row: int) -> None:
  h = hashlib.sha256()
  data_at = src.tell()
  src.seek(0)
  h.update(src.read(data_at))
  row = max(row, 1)
  block_rows = max(1, _BLOCK // row)
  first = 0
  while block := src.read(block_rows * row):
    h.update(block)
    values = np.frombuffer(block, dtype)
    if not np.isfinite(values).all():
      bad = first + int(np.flatnonzero(~np.isfinite(values))[0]) * dtype.itemsize // row
      raise _damaged(out, rel, f"holds NaN or infinity in its row {bad}")
    first += len(block) // row
    out_digest.update(block)
    dst.write(block)
  want = s.files.get(rel.rsplit("/", 1)[-1], {}).get("sha256")
  if want and h.hexdigest() != want:
    raise _damaged(out, rel, "does not match its SHA-256 in shard.json")


__all__ = ["seal"]
