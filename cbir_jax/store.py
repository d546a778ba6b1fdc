"""Descriptor output on disk: shards written atomically, a manifest, and a validated loader.

Layout of an output directory:
  manifest.json              settings (model, weights digest, preprocessing, descriptor
                             config, ...), shard list with row counts and SHA-256, failures
  shards/000007/             one shard = the decoded images of records [7*S, 8*S)
      <kind>.npy             descriptor rows [n, D] (float32 or float16)
      meta.npz               row, path, label, label_name, width, height (+ extra columns)
      failures.json          [[path, reason], ...] for records of this shard not decoded
      shard.json             rows, record range, SHA-256 of every file above (written last)
  descriptors/<kind>.npy     all shards concatenated (written once the job completes), so
                             `load_descriptors` can hand out one memory-mapped array
  failures-<process>.tsv     path <TAB> reason, the failures of that process' shards
  .lock-<process>            flock'ed while a job process writes here

A shard directory is built under a temporary name and renamed when complete,
so a shard either exists whole or not at all: a killed job loses at most the
shard in flight and a rerun recomputes exactly that. Rows hold decoded images
only; a failed image has no row (its record index is simply absent from
"row") and is listed in the failures file instead.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import uuid
from typing import IO, Any, Mapping, Sequence

import numpy as np

MANIFEST = "manifest.json"
SHARDS = "shards"
CONSOLIDATED = "descriptors"
FORMAT = "cbir_jax.descriptors"
FORMAT_VERSION = 1
META_COLUMNS = ("row", "path", "label", "label_name", "width", "height")


class StoreError(ValueError):
  """An output directory that cannot be written or read as asked; the message says why."""


def shard_name(k: int) -> str:
  return f"{k:06d}"


def _sha256(path: pathlib.Path, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def _fsync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes JSON to a temporary file, fsyncs and renames it over `path`."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  try:
    with open(tmp, "w") as f:
      f.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def read_manifest(output_dir: str | os.PathLike) -> dict[str, Any]:
  path = pathlib.Path(output_dir) / MANIFEST
  if not path.is_file():
    raise StoreError(f"{output_dir}: no {MANIFEST}; not a cbir_jax descriptor directory "
                     "(write one with launch/extract.py)")
  try:
    m = json.loads(path.read_text())
  except ValueError as e:
    raise StoreError(f"{path}: unreadable manifest ({e})") from e
  if m.get("format") != FORMAT:
    raise StoreError(f"{path}: not a cbir_jax descriptor manifest")
  return m


# --- writing -------------------------------------------------------------------------------


def lock(output_dir: str | os.PathLike, process_index: int = 0) -> IO[str]:
  """Takes this process' write lock on `output_dir`; the OS drops it when the process dies.

  Returns the open lock file; keep it open for the job's lifetime.

  Raises:
    StoreError: another live job holds the lock.
  """
  path = pathlib.Path(output_dir) / f".lock-{process_index}"
  f = open(path, "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    f.seek(0)
    holder = f.read().strip() or "unknown"
    f.close()
    if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
      raise StoreError(f"{output_dir} is being written by another job ({holder}); wait for it "
                       "to finish or stop it, or choose another --output") from None
    raise
  f.seek(0)
  f.truncate()
  f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
  f.flush()
  return f


def diff_settings(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = ""
                  ) -> list[str]:
  """Names of settings (dotted) that differ between two manifests."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += diff_settings(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: {a!r} in the directory, {b!r} now")
  return out


def prepare(output_dir: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
  """Creates the output directory and its manifest, or checks a rerun matches it.

  Args:
    output_dir: the job's output directory.
    manifest: the new job's manifest head; "settings" must identify everything
      that changes the output (model, weights, preprocessing, input, ...).

  Returns:
    The manifest now on disk.

  Raises:
    StoreError: the directory holds output made with other settings.
  """
  manifest = json.loads(json.dumps(manifest))  # compare as stored (tuples become lists)
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / SHARDS).mkdir(exist_ok=True)
  path = out / MANIFEST
  if path.exists():
    old = read_manifest(out)
    diffs = diff_settings(old.get("settings", {}), manifest["settings"])
    if diffs:
      raise StoreError(
          f"{out} already holds descriptors made with other settings; refusing to mix them. "
          "Differences: " + "; ".join(diffs[:8]) +
          (f" (+{len(diffs) - 8} more)" if len(diffs) > 8 else "") +
          ". Use another --output, or delete the directory to start over.")
    return old
  leftover = complete_shards(out)
  if leftover:
    # Shards record no settings of their own: without the manifest nobody can tell
    # whether they match this job, and reusing them could mix two settings silently.
    raise StoreError(
        f"{out} holds {len(leftover)} complete shard(s) but no {MANIFEST}, so the settings "
        "that made them are unknown; refusing to reuse them. Restore the manifest, or "
        "delete the directory to start over.")
  m = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION, status="running",
           shards=[])
  write_json_atomic(path, m)
  return m


def complete_shards(output_dir: str | os.PathLike) -> dict[int, dict[str, Any]]:
  """Shards already written whole: index -> their shard.json."""
  root = pathlib.Path(output_dir) / SHARDS
  done = {}
  if not root.is_dir():
    return done
  for d in root.iterdir():
    if d.name.isdigit() and (d / "shard.json").is_file():
      try:
        info = json.loads((d / "shard.json").read_text())
      except ValueError:
        continue  # damaged: treated as missing, and rewritten by the job
      if not _sizes_match(d, info):
        continue  # a file truncated or lost after the shard was written: rewritten too
      done[int(d.name)] = info
  return done


def _sizes_match(d: pathlib.Path, info: dict[str, Any]) -> bool:
  """Every file shard.json lists exists with its recorded size (a cheap check: stat only)."""
  for name, f in info.get("files", {}).items():
    try:
      if (d / name).stat().st_size != f.get("bytes"):
        return False
    except OSError:
      return False
  return True


def remove_partial(output_dir: str | os.PathLike, shards: Sequence[int]) -> None:
  """Deletes leftovers of a killed job for `shards` (temporary or incomplete directories)."""
  root = pathlib.Path(output_dir) / SHARDS
  want = {shard_name(k) for k in shards}
  for d in root.iterdir():
    name = d.name
    if name.startswith(".tmp-") and name.split("-")[1] in want:
      shutil.rmtree(d, ignore_errors=True)
    elif name in want:  # not in complete_shards: missing shard.json, or damaged
      shutil.rmtree(d, ignore_errors=True)


def write_shard(output_dir: str | os.PathLike, k: int, *, start: int, stop: int,
                arrays: Mapping[str, np.ndarray], meta: Mapping[str, np.ndarray],
                failures: Sequence[tuple[str, str]], process_index: int = 0
                ) -> dict[str, Any]:
  """Writes shard k (records [start, stop)) under a temporary name, then renames it.

  Returns:
    The shard's info (as in shard.json).

  Raises:
    StoreError: the shard could not be written (disk full, permissions); nothing of
      it is left behind and complete shards are untouched.
  """
  root = pathlib.Path(output_dir) / SHARDS
  tmp = root / f".tmp-{shard_name(k)}-{uuid.uuid4().hex[:8]}"
  final = root / shard_name(k)
  rows = len(meta["row"])
  try:
    tmp.mkdir()
    files = {}

    def finish(name: str) -> None:
      p = tmp / name
      with open(p, "rb+") as f:
        os.fsync(f.fileno())
      files[name] = {"sha256": _sha256(p), "bytes": p.stat().st_size}

    for kind, a in arrays.items():
      if len(a) != rows:
        raise ValueError(f"shard {k}: {kind} has {len(a)} rows, metadata {rows}")
      np.save(tmp / f"{kind}.npy", a)
      finish(f"{kind}.npy")
    np.savez(tmp / "meta.npz", **{c: np.asarray(v) for c, v in meta.items()})
    finish("meta.npz")
    (tmp / "failures.json").write_text(json.dumps([list(f) for f in failures]))
    finish("failures.json")
    info = {"index": k, "start": start, "stop": stop, "rows": rows,
            "failures": len(failures), "process": process_index, "files": files,
            "shapes": {kind: list(a.shape) for kind, a in arrays.items()}}
    write_json_atomic(tmp / "shard.json", info)
    _fsync_dir(tmp)
    os.rename(tmp, final)
    _fsync_dir(root)
    return info
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    reason = os.strerror(e.errno) if e.errno else str(e)
    raise StoreError(f"cannot write shard {k} in {root}: {reason} ({e}); complete shards "
                     "are kept, rerun the same command to continue") from e


def write_failures(output_dir: str | os.PathLike, shards: Sequence[int], process_index: int
                   ) -> int:
  """Writes failures-<process>.tsv from the failures of `shards`; returns their count."""
  root = pathlib.Path(output_dir)
  lines = []
  for k in sorted(shards):
    p = root / SHARDS / shard_name(k) / "failures.json"
    if p.is_file():
      for key, reason in json.loads(p.read_text()):
        lines.append(f"{_tsv(key)}\t{_tsv(reason)}\n")
  path = root / f"failures-{process_index}.tsv"
  tmp = path.with_name(f".{path.name}.tmp")
  # surrogateescape: a file name that is not valid UTF-8 is written back as its own bytes
  # (strict UTF-8 would crash the job at its very end).
  with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
    f.write("path\treason\n")
    f.writelines(lines)
  os.replace(tmp, path)
  return len(lines)


def _tsv(s: str) -> str:
  return str(s).replace("\t", " ").replace("\n", " ")


def finalize(output_dir: str | os.PathLike, *, num_shards: int, process_count: int,
             consolidate: bool = True) -> dict[str, Any]:
  """Completes the manifest once every shard exists (process 0, after all processes finish).

  Consolidation concatenates each kind's shards into descriptors/<kind>.npy so
  the result can be memory-mapped as one array.

  Raises:
    StoreError: shards are missing (for instance processes that do not share
      the output filesystem) or a file cannot be written.
  """
  out = pathlib.Path(output_dir)
  m = read_manifest(out)
  done = complete_shards(out)
  missing = [k for k in range(num_shards) if k not in done]
  if missing:
    raise StoreError(f"{out}: {len(missing)} of {num_shards} shards missing (first: "
                     f"{shard_name(missing[0])}); were all processes writing to one shared "
                     "directory? Rerun the same command to complete them.")
  shards = [done[k] for k in range(num_shards)]
  total = sum(s["rows"] for s in shards)
  m.update(shards=[{"index": s["index"], "dir": f"{SHARDS}/{shard_name(s['index'])}",
                    "start": s["start"], "stop": s["stop"], "rows": s["rows"],
                    "failures": s["failures"], "process": s["process"], "files": s["files"]}
                   for s in shards],
           rows=total, failures=sum(s["failures"] for s in shards),
           process_count=process_count, status="complete", consolidated={})
  if consolidate:
    try:
      m["consolidated"] = _consolidate(out, m, shards, total)
    except StoreError:
      raise
    except OSError as e:
      raise StoreError(f"{out}: cannot write the consolidated arrays: {e}; the shards are "
                       "complete, rerun the same command to retry") from e
    except ValueError as e:  # np.load of a shard file damaged after it was written
      raise StoreError(f"{out}: cannot read a shard while consolidating ({e}); delete the "
                       "damaged shard directory and rerun the same command") from e
  write_json_atomic(out / MANIFEST, m)
  return m


def _consolidate(out: pathlib.Path, m: dict[str, Any], shards: list[dict[str, Any]],
                 total: int) -> dict[str, Any]:
  # Plain writes, not a memory map: on a full disk a write into a mapped file is
  # SIGBUS (the process dies), while write() raises ENOSPC that we can report.
  # Every shard file is hashed as it is copied, so a shard damaged after it was
  # written is caught here instead of being sealed under a fresh checksum.
  (out / CONSOLIDATED).mkdir(exist_ok=True)
  result = {}
  if not shards:
    return result
  for kind in m["settings"]["kinds"]:
    path = out / CONSOLIDATED / f"{kind}.npy"
    tmp = path.with_name(f".{kind}.npy.tmp")
    try:
      with open(tmp, "wb") as f:
        header_at = None
        for s in shards:
          rel = f"{SHARDS}/{shard_name(s['index'])}/{kind}.npy"
          with open(out / rel, "rb") as src:
            try:
              version = np.lib.format.read_magic(src)
              read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                             else np.lib.format.read_array_header_2_0)
              shape, fortran, dtype = read_header(src)
            except ValueError as e:
              raise StoreError(f"{out}: {rel} is not a valid .npy ({e}); delete "
                               f"{SHARDS}/{shard_name(s['index'])} and rerun to recompute it"
                               ) from e
            if header_at is None:
              header_at = (dtype, shape[1:])
              np.lib.format.write_array_header_1_0(
                  f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                      "shape": (total, *shape[1:])})
            if (dtype, shape[1:]) != header_at or fortran or shape[0] != s["rows"]:
              raise StoreError(f"{out}: {rel} holds {shape} {dtype}, expected "
                               f"({s['rows']}, {header_at[1]}) {header_at[0]}")
            h = hashlib.sha256()
            data_at = src.tell()
            src.seek(0)
            h.update(src.read(data_at))
            while block := src.read(1 << 22):
              h.update(block)
              f.write(block)
            want = s.get("files", {}).get(f"{kind}.npy", {}).get("sha256")
            if want and h.hexdigest() != want:
              raise StoreError(f"{out}: {rel} does not match its SHA-256 in shard.json "
                               f"(damaged after it was written); delete "
                               f"{SHARDS}/{shard_name(s['index'])} and rerun to recompute it")
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      tmp.unlink(missing_ok=True)
      raise
    result[kind] = {"file": f"{CONSOLIDATED}/{kind}.npy", "rows": total,
                    "sha256": _sha256(path)}
  return result


# --- reading -------------------------------------------------------------------------------


def _check_file(out: pathlib.Path, rel: str, sha256: str | None, verify: bool) -> pathlib.Path:
  p = out / rel
  if not p.is_file():
    raise StoreError(f"{out}: {rel} is listed in the manifest but missing")
  if verify and sha256 and _sha256(p) != sha256:
    raise StoreError(f"{out}: {rel} does not match its SHA-256 in the manifest "
                     "(damaged or modified file)")
  return p


def _check_finite(a: np.ndarray, what: str, chunk: int = 65536) -> None:
  for i in range(0, len(a), chunk):
    block = np.asarray(a[i:i + chunk])
    if not np.isfinite(block).all():
      bad = i + int(np.argwhere(~np.isfinite(block))[0][0])
      raise StoreError(f"{what}: row {bad} holds NaN or infinity")


def load_descriptors(output_dir: str | os.PathLike, kind: str = "fc_conv", *,
                     verify: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Descriptors and metadata of a finished extraction, rows in input order.

  Args:
    output_dir: a directory written by the extraction job.
    kind: descriptor kind (fc, conv, fc_conv, mac, spoc; those the job extracted).
    verify: check SHA-256 checksums and that every value is finite (reads the
      data once); row counts and shapes are always checked.

  Returns:
    (array [N, D], read-only memory-mapped when the job consolidated its shards
    (the default), else the shards concatenated in memory;
    metadata: dict of equal-length arrays "row" (index in the input list),
    "path" (file path or TFDS id), "label" (-1 if unknown), "label_name",
    "width", "height", plus any extra columns). Failed images have no row.

  Raises:
    StoreError: unfinished job, unknown kind, or files that do not match the manifest.
  """
  out = pathlib.Path(output_dir)
  m = read_manifest(out)
  if m.get("status") != "complete":
    done = len(complete_shards(out))
    raise StoreError(f"{out}: extraction not finished ({done} of {m.get('num_shards', '?')} "
                     "shards written); rerun the extraction command to complete it")
  kinds = m["settings"]["kinds"]
  if kind not in kinds:
    raise StoreError(f"{out}: kind {kind!r} was not extracted; available: {kinds}")
  metas, parts = [], []
  consolidated = m.get("consolidated", {}).get(kind)
  for s in m["shards"]:
    d = s["dir"]
    files = s.get("files", {})
    if not (out / d).is_dir():
      raise StoreError(f"{out}: shard {d} is listed in the manifest but missing")
    mp = _check_file(out, f"{d}/meta.npz", files.get("meta.npz", {}).get("sha256"), verify)
    try:
      with np.load(mp, allow_pickle=False) as z:
        meta = {c: z[c] for c in z.files}
    except Exception as e:  # zip/format errors of a damaged file
      raise StoreError(f"{out}: cannot read {d}/meta.npz ({e})") from e
    if len(meta.get("row", ())) != s["rows"]:
      raise StoreError(f"{out}: {d}/meta.npz has {len(meta.get('row', ()))} rows, the "
                       f"manifest says {s['rows']}")
    metas.append(meta)
    if consolidated is None:
      ap = _check_file(out, f"{d}/{kind}.npy", files.get(f"{kind}.npy", {}).get("sha256"),
                       verify)
      a = _load_npy(ap)
      if len(a) != s["rows"]:
        raise StoreError(f"{out}: {d}/{kind}.npy has {len(a)} rows, the manifest says "
                         f"{s['rows']}")
      parts.append(a)
  total = sum(s["rows"] for s in m["shards"])
  if consolidated is not None:
    p = _check_file(out, consolidated["file"], consolidated.get("sha256"), verify)
    array = _load_npy(p)
    if len(array) != total or consolidated.get("rows") != total:
      raise StoreError(f"{out}: {consolidated['file']} has {len(array)} rows, the shards "
                       f"in the manifest {total}")
  elif parts:
    array = np.concatenate(parts) if len(parts) > 1 else parts[0]
  else:
    raise StoreError(f"{out}: the manifest lists no shards")
  if verify:
    _check_finite(array, f"{out} ({kind})")
  cols = metas[0].keys() if metas else META_COLUMNS
  meta = {c: np.concatenate([mt[c] for mt in metas]) for c in cols}
  return array, meta


def _load_npy(path: pathlib.Path) -> np.ndarray:
  try:
    a = np.load(path, mmap_mode="r", allow_pickle=False)
  except Exception as e:  # truncated or not an .npy
    raise StoreError(f"cannot read {path}: {e}") from e
  if a.ndim != 2:
    raise StoreError(f"{path}: expected a 2-D array, found shape {a.shape}")
  return a


def read_failures(output_dir: str | os.PathLike) -> list[tuple[str, str]]:
  """All (path, reason) failures of a finished or partial job, in input order."""
  out = pathlib.Path(output_dir)
  result = []
  for k, _ in sorted(complete_shards(out).items()):
    p = out / SHARDS / shard_name(k) / "failures.json"
    if p.is_file():
      result += [tuple(f) for f in json.loads(p.read_text())]
  return result


__all__ = ["StoreError", "load_descriptors", "read_failures", "read_manifest", "lock",
           "prepare", "write_shard", "finalize", "complete_shards"]
