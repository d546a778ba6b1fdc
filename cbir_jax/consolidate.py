"""Finishing a generation: the shards become the index, with no copy of descriptor arrays.

Runs once, under the job lock, after every shard exists. O(rows) metadata work only: each
shard's small files (meta.npz, failures.json) are checked against their SHA-256 and gathered
into one metadata table and one failure list; each shard's descriptor file gets a second
name `<kind>/part-NNNNNN.npy` (a hard link: no bytes copied) and is listed in the manifest
with the rows, size and SHA-256 recorded when the shard was written (its header and size
are checked here; the bytes were hashed as they were written, and `--update` re-checks
every row it reuses).
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import pathlib
import sys
import time
from typing import Callable, Sequence

import numpy as np

from cbir_jax import meta_columns, store
from cbir_jax import index as index_files
from cbir_jax.manifest import FORMAT_VERSION, FileEntry, Manifest, ShardEntry

META = "meta.npz"
FAILURES = "failures.json"


class FinishProgress:
  """Progress of the finishing work, by bytes read: a bar on a terminal, else log lines.

  Log mode writes a first and a last line, and a line per step in between only when a
  second has passed since the previous one (a short finish stays two lines).
  """

  def __init__(self, mode: str = "none", log: Callable[[str], None] | None = None,
               every_s: float = 1.0):
    self.mode = ("bar" if sys.stderr.isatty() else "log") if mode == "auto" else mode
    self.log, self.every_s = log or (lambda msg: None), every_s
    self.total = self.done = 0
    self.t0 = self.last = time.perf_counter()
    self.bar = None

  def start(self, total: int, what: str) -> None:
    self.total = total
    self.t0 = self.last = time.perf_counter()
    if self.mode == "bar":
      from tqdm import tqdm  # a dependency; imported only where a bar is drawn
      self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="finishing",
                      dynamic_ncols=True)
    elif self.mode == "log":
      self.log(f"finishing: {what} ({total / 1e6:.1f} MB)")

  def step(self, nbytes: int, what: str) -> None:
    self.done += nbytes
    if self.bar is not None:
      self.bar.update(nbytes)
    elif self.mode == "log" and time.perf_counter() - self.last >= self.every_s:
      self.last = time.perf_counter()
      self.log(f"finishing: {what} ({self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB, "
               f"{self.last - self.t0:.1f} s)")

  def close(self, what: str) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None
    if self.mode != "none":
      self.log(f"finishing: {what} ({time.perf_counter() - self.t0:.1f} s)")


def part_name(kind: str, k: int) -> str:
  return f"{kind}/part-{store.shard_name(k)}.npy"


def seal(out: pathlib.Path, m: Manifest, *, workers: int,
         progress: FinishProgress | None = None) -> Manifest:
  """The generation's complete manifest: shards listed, parts linked, metadata gathered.

  Does not write the manifest (the caller switches it atomically).

  Raises:
    StoreError: shards are missing (workers that do not share the output filesystem), a
      shard's file does not match its record (damaged after it was written: the message
      names it), or a file cannot be written.
  """
  progress = progress or FinishProgress()
  shards = _complete(out, m)
  kinds = list(m.settings.kinds)
  t = time.perf_counter()
  progress.start(sum(int(s.files[n]["bytes"]) for s in shards for n in (META, FAILURES)),
                 f"listing {len(shards)} shard(s) as the index")
  try:
    parts = {kind: tuple(_link_part(out, m, s, kind) for s in shards) for kind in kinds}
    metadata, failures = _gather_meta(out, m, shards, progress)
  except OSError as e:
    raise store.StoreError(f"{out}: cannot write the index files: {_os_text(e)}; the shards "
                           "are complete, rerun the same command to retry") from e
  verified = {"at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "shards": len(shards), "seconds": round(time.perf_counter() - t, 3)}
  made = ((store.SHARDS, *kinds, index_files.METADATA, index_files.FAILURES, store.RECORDS)
          if not m.base else (m.base,))
  return m.replace(shards=shards, rows=sum(s.rows for s in shards),
                   failures=sum(s.failures for s in shards), workers=workers,
                   status="complete", parts=parts, metadata=metadata, failures_file=failures,
                   made=made, verified=verified, format_version=FORMAT_VERSION)


def _os_text(e: OSError) -> str:
  import errno
  return f"the disk is full ({e})" if e.errno == errno.ENOSPC else str(e)


def _complete(out: pathlib.Path, m: Manifest) -> tuple[ShardEntry, ...]:
  where = m.path(store.SHARDS)
  done = store.complete_shards(out, where)
  missing = [k for k in range(m.num_shards) if k not in done]
  if missing:
    raise store.StoreError(
        f"{out}: {len(missing)} of {m.num_shards} shards missing (first: "
        f"{store.shard_name(missing[0])}); were all workers writing to one shared "
        "directory? Rerun the workers that write them.")
  return tuple(ShardEntry.from_dict({**done[k], "dir": f"{where}/{store.shard_name(k)}"})
               for k in range(m.num_shards))


def _link_part(out: pathlib.Path, m: Manifest, s: ShardEntry, kind: str) -> FileEntry:
  """`<kind>/part-K.npy`: a second name of the shard's file (hard link; no bytes copied)."""
  rel = f"{s.dir}/{kind}.npy"
  src, dst = out / rel, out / m.path(part_name(kind, s.index))
  with open(src, "rb") as f:
    try:
      shape, fortran, _ = store.npy_header(f)
    except ValueError as e:
      raise _damaged(out, rel, f"is not a valid .npy ({e})") from e
  if fortran or len(shape) != 2 or shape[0] != s.rows:
    raise _damaged(out, rel, f"holds shape {shape}, the shard {s.rows} rows")
  dst.parent.mkdir(parents=True, exist_ok=True)
  if not (dst.exists() and os.path.samefile(src, dst)):
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
      os.link(src, tmp)
    except OSError:  # a file system without hard links: a relative symbolic link
      os.symlink(os.path.relpath(src, dst.parent), tmp)
    os.replace(tmp, dst)
  return FileEntry.from_dict({**s.files[f"{kind}.npy"], "file": m.path(part_name(kind, s.index)),
                              "rows": s.rows})


def _damaged(out: pathlib.Path, rel: str, why: str) -> store.StoreError:
  shard = rel.rsplit("/", 1)[0]
  return store.StoreError(f"{out}: {rel} {why} (damaged after it was written); delete {shard} "
                          "and rerun the same command to recompute it")


def _read_verified(out: pathlib.Path, s: ShardEntry, name: str) -> bytes:
  rel = f"{s.dir}/{name}"
  data = (out / rel).read_bytes()
  want = s.files.get(name, {}).get("sha256")
  if want and hashlib.sha256(data).hexdigest() != want:
    raise _damaged(out, rel, "does not match its SHA-256 in shard.json")
  return data


def _gather_meta(out: pathlib.Path, m: Manifest, shards: Sequence[ShardEntry],
                 progress: FinishProgress) -> tuple[FileEntry, FileEntry | None]:
  """The metadata table (every shard's rows, in order) and the failure list (None: none)."""
  parts, failures = [], []
  for s in shards:
    try:
      with np.load(io.BytesIO(_read_verified(out, s, META)), allow_pickle=False) as z:
        parts.append({c: z[c] for c in z.files})
    except ValueError as e:  # not an npz: damaged although its digest was not recorded
      raise _damaged(out, f"{s.dir}/{META}", f"cannot be read ({e})") from e
    if FAILURES in s.files:
      failures += json.loads(_read_verified(out, s, FAILURES).decode("utf-8", "surrogateescape"))
    progress.step(sum(int(s.files[n]["bytes"]) for n in (META, FAILURES) if n in s.files),
                  "row metadata")
  columns = list(parts[0]) if parts else list(store.META_COLUMNS)
  # One type per column over every shard (shards are typed alone: meta_columns).
  meta = {c: meta_columns.join([p[c] for p in parts]) if parts else np.zeros(0)
          for c in columns}
  mrel, frel = m.path(index_files.METADATA), m.path(index_files.FAILURES)
  mpath = store.write_atomic(out / mrel, lambda f: index_files.write_metadata(f, meta))
  mentry = FileEntry(mrel, len(meta["row"]), store.sha256_file(mpath), mpath.stat().st_size)
  if not failures:  # no failure list when nothing failed (the manifest says 0 failures)
    (out / frel).unlink(missing_ok=True)  # one left by an earlier try of this generation
    return mentry, None
  text = json.dumps(failures).encode("utf-8", "surrogateescape")
  fpath = store.write_atomic(out / frel, lambda f: f.write(text))
  return mentry, FileEntry(frel, len(failures), store.sha256_file(fpath), fpath.stat().st_size)


__all__ = ["FinishProgress", "part_name", "seal"]
