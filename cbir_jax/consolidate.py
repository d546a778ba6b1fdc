"""Finishing a generation: verify every shard once, then gather it into descriptors/.

Runs on process 0 after every shard exists. Every byte kept is checked here, once, against
the checksums written with the shards, so loaders afterwards only check sizes and shapes.
descriptors/ then holds one array per distinct kind, meta.npz and failures.json.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import pathlib
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from cbir_jax import store
from cbir_jax.manifest import FORMAT_VERSION, ConsolidatedEntry, Manifest, ShardEntry

_BLOCK = 1 << 22
META = "meta.npz"
FAILURES = "failures.json"


def _quiet(msg: str) -> None:
  del msg


class FinishProgress:
  """Progress of the finishing work, by bytes read: a bar on a terminal, else log lines.

  Log mode writes a first and a last line, and a line per step in between only when a
  second has passed since the previous one (a short finish stays two lines).
  """

  def __init__(self, mode: str = "none", log: Callable[[str], None] = _quiet,
               every_s: float = 1.0):
    self.mode = "bar" if mode == "auto" and sys.stderr.isatty() else mode
    if self.mode == "auto":
      self.mode = "log"
    self.log, self.every_s = log, every_s
    self.total = self.done = 0
    self.t0 = self.last = time.perf_counter()
    self.bar = None

  def start(self, total: int, what: str) -> None:
    self.total, self.t0 = total, time.perf_counter()
    self.last = self.t0
    if self.mode == "bar":
      try:
        from tqdm import tqdm
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="finishing",
                        dynamic_ncols=True)
        return
      except ImportError:
        self.mode = "log"
    if self.mode == "log":
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


def seal(out: pathlib.Path, m: Manifest, *, process_count: int, consolidate: bool = True,
         keep_shards: bool = True, progress: FinishProgress | None = None) -> Manifest:
  """The generation's complete manifest: shards listed and verified, descriptors/ written.

  Does not write the manifest (the caller switches it atomically) nor remove shards
  (the caller does, after the switch, unless `keep_shards`).

  Raises:
    StoreError: shards are missing (processes that do not share the output
      filesystem), a shard does not match its checksums (damaged after it was
      written: the message names it), or a file cannot be written.
  """
  progress = progress or FinishProgress()
  shards = _complete(out, m)
  kinds = list(m.settings.kinds)
  t = time.perf_counter()
  consolidate = consolidate and bool(shards)
  aliases = identical_kinds(shards, kinds) if consolidate else {}
  stored = [k for k in kinds if k not in aliases]
  # What is read once here: each stored kind while copied, metadata and failures while
  # gathered; what stays in shards only (aliases' files, or all with --consolidate=false)
  # is hashed on its own, unless the shards are about to be removed.
  read_later = {f"{k}.npy" for k in stored} | {META, FAILURES} if consolidate else set()
  alone = [(s, name) for s in shards for name in s.files
           if name not in read_later and (keep_shards or not consolidate)]
  progress.start(sum(int(s.files[n]["bytes"]) for s in shards for n in s.files
                     if n in read_later or (s, n) in alone),
                 f"verifying {len(shards)} shard(s)" + (
                     f", consolidating {len(stored)} kind(s) and the row metadata"
                     if consolidate else ""))
  _verify_files(out, alone, progress)
  entries: dict[str, Any] = {}
  if consolidate:
    folder = m.path(store.CONSOLIDATED)
    try:
      for kind in stored:
        entries[kind] = _consolidate(out, folder, kind, shards, progress)
      metadata, failures = _gather_meta(out, folder, shards, progress)
    except OSError as e:
      raise store.StoreError(f"{out}: cannot write the consolidated arrays: {e}; the shards "
                             "are complete, rerun the same command to retry") from e
  verified = {"at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "shards": len(shards), "consolidated": sorted(entries) + sorted(aliases),
              "finite": bool(entries), "seconds": round(time.perf_counter() - t, 3)}
  return m.replace(shards=shards, rows=sum(s.rows for s in shards),
                   failures=sum(s.failures for s in shards), process_count=process_count,
                   status="complete", consolidated=entries, aliases=aliases,
                   metadata=metadata if consolidate else None,
                   failures_file=failures if consolidate else None,
                   shards_kept=keep_shards or not consolidate, verified=verified,
                   format_version=FORMAT_VERSION)


def _complete(out: pathlib.Path, m: Manifest) -> tuple[ShardEntry, ...]:
  where = m.path(store.SHARDS)
  done = store.complete_shards(out, where)
  missing = [k for k in range(m.num_shards) if k not in done]
  if missing:
    raise store.StoreError(
        f"{out}: {len(missing)} of {m.num_shards} shards missing (first: "
        f"{store.shard_name(missing[0])}); were all processes writing to one shared "
        "directory? Rerun the same command to complete them.")
  return tuple(_entry(done[k], f"{where}/{store.shard_name(k)}") for k in range(m.num_shards))


def identical_kinds(shards: Sequence[ShardEntry], kinds: Sequence[str]) -> dict[str, str]:
  """Kinds whose shard files are byte-identical to an earlier kind's, shard by shard.

  Decided by the digests recorded when the shards were written (equal digests of equal
  .npy files mean equal headers and rows), so it holds whatever made them equal: by
  definition (EfficientNet-Lite0's fc is its spoc) or by the data (a 1x1 last block makes
  mac, spoc and gem equal). Returns {kind: the earlier kind it equals}.
  """
  first: dict[tuple[str, ...], str] = {}
  aliases = {}
  for kind in kinds:
    key = tuple(str(s.files.get(f"{kind}.npy", {}).get("sha256", "")) for s in shards)
    if not all(key):
      continue
    if key in first:
      aliases[kind] = first[key]
    else:
      first[key] = kind
  return aliases


def _entry(info: dict[str, Any], rel: str) -> ShardEntry:
  return ShardEntry(index=int(info["index"]), dir=rel, start=int(info["start"]),
                    stop=int(info["stop"]), rows=int(info["rows"]),
                    failures=int(info["failures"]), process=int(info["process"]),
                    files=info["files"])


def _damaged(out: pathlib.Path, rel: str, why: str) -> store.StoreError:
  shard = rel.rsplit("/", 1)[0]
  return store.StoreError(f"{out}: {rel} {why} (damaged after it was written); delete {shard} "
                          "and rerun the same command to recompute it")


def _verify_files(out: pathlib.Path, files: Sequence[tuple[ShardEntry, str]],
                  progress: FinishProgress) -> None:
  """Checks shard files against their SHA-256 in shard.json."""
  for s, name in files:
    if store.sha256_file(out / s.dir / name) != s.files[name]["sha256"]:
      raise _damaged(out, f"{s.dir}/{name}", "does not match its SHA-256 in shard.json")
    progress.step(int(s.files[name]["bytes"]), f"verified {s.dir}")


def _read_verified(out: pathlib.Path, s: ShardEntry, name: str) -> bytes:
  rel = f"{s.dir}/{name}"
  data = (out / rel).read_bytes()
  want = s.files.get(name, {}).get("sha256")
  if want and hashlib.sha256(data).hexdigest() != want:
    raise _damaged(out, rel, "does not match its SHA-256 in shard.json")
  return data


def _gather_meta(out: pathlib.Path, folder: str, shards: Sequence[ShardEntry],
                 progress: FinishProgress) -> tuple[ConsolidatedEntry, ConsolidatedEntry]:
  """descriptors/meta.npz (every shard's rows, in order) and descriptors/failures.json."""
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
  meta = {c: np.concatenate([p[c] for p in parts]) if parts else np.zeros(0) for c in columns}
  rows = len(meta["row"])
  # Compressed: fixed-width path strings are mostly padding.
  (out / folder).mkdir(parents=True, exist_ok=True)
  mpath = store.write_atomic(out / folder / META, lambda f: np.savez_compressed(f, **meta))
  text = json.dumps(failures).encode("utf-8", "surrogateescape")
  fpath = store.write_atomic(out / folder / FAILURES, lambda f: f.write(text))
  return (ConsolidatedEntry(f"{folder}/{META}", rows, store.sha256_file(mpath),
                            mpath.stat().st_size),
          ConsolidatedEntry(f"{folder}/{FAILURES}", len(failures), store.sha256_file(fpath),
                            fpath.stat().st_size))


def _read_header(src, rel: str, out: pathlib.Path) -> tuple[tuple[int, ...], bool, np.dtype]:
  try:
    version = np.lib.format.read_magic(src)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    return read(src)
  except ValueError as e:
    raise _damaged(out, rel, f"is not a valid .npy ({e})") from e


def _consolidate(out: pathlib.Path, folder: str, kind: str, shards: Sequence[ShardEntry],
                 progress: FinishProgress) -> ConsolidatedEntry:
  # Plain writes, not a memory map: on a full disk a write into a mapped file is
  # SIGBUS (the process dies), while write() raises ENOSPC that we can report.
  # Each shard file is hashed and scanned for non-finite values as it is copied, and
  # the output is hashed as it is written, so every byte is read once.
  (out / folder).mkdir(parents=True, exist_ok=True)
  total = sum(s.rows for s in shards)
  digest = hashlib.sha256()

  def copy(f) -> None:
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
      progress.step(int(s.files.get(f"{kind}.npy", {}).get("bytes", 0)),
                    f"{kind} consolidated")

  path = store.write_atomic(out / folder / f"{kind}.npy", copy)
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


__all__ = ["FinishProgress", "identical_kinds", "seal"]
