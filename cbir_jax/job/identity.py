"""Per-record input identities: what a rerun compares to know whether its input changed.

A record's identity is a key (its path relative to the input root, or its TFDS id) and a
stamp (size and modification time, optionally a SHA-256 of the bytes; for TFDS, its file's).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Sequence

import numpy as np

from cbir_jax import store


@dataclasses.dataclass(frozen=True)
class RecordIdentities:
  """Keys and stamps of every record, in input order (plain lists of str)."""
  keys: Sequence[str]
  stamps: Sequence[str]

  def __post_init__(self) -> None:
    object.__setattr__(self, "keys", [str(k) for k in self.keys])
    object.__setattr__(self, "stamps", [str(s) for s in self.stamps])
    if len(self.keys) != len(self.stamps):
      raise ValueError(f"{len(self.keys)} keys but {len(self.stamps)} stamps")

  def __len__(self) -> int:
    return len(self.keys)

  def digest(self) -> str:
    h = hashlib.sha256()
    for k, s in zip(self.keys, self.stamps):
      h.update(_utf8(k) + b"\0" + _utf8(s) + b"\n")
    return h.hexdigest()

  def save(self, path: str | os.PathLike) -> None:
    """Writes a compressed .npz of two NUL-separated UTF-8 blobs (no pickle), atomically."""
    store.write_atomic(path, lambda f: np.savez_compressed(
        f, count=np.int64(len(self)), keys=_blob(self.keys), stamps=_blob(self.stamps)))

  @classmethod
  def load(cls, path: str | os.PathLike) -> "RecordIdentities":
    with np.load(path, allow_pickle=False) as z:
      n = int(z["count"])
      return cls(keys=_unblob(z["keys"], n), stamps=_unblob(z["stamps"], n))


def _utf8(s: str) -> bytes:
  # Names that are not valid UTF-8 reach us as surrogate escapes: stored as their own bytes.
  return s.encode("utf-8", "surrogateescape")


def _blob(values: Sequence[str]) -> np.ndarray:
  return np.frombuffer(b"\0".join(_utf8(v) for v in values), np.uint8)


def _unblob(blob: np.ndarray, n: int) -> list[str]:
  if n == 0:
    return []
  return [b.decode("utf-8", "surrogateescape") for b in blob.tobytes().split(b"\0")]


def file_stamp(path: str, content_digest: bool = False) -> str:
  """"size:mtime_ns" (":sha256" with content_digest); "missing" for a file that vanished."""
  try:
    st = os.stat(path)
  except OSError:
    return "missing"
  stamp = f"{st.st_size}:{st.st_mtime_ns}"
  if content_digest:
    try:
      stamp += f":{store.sha256_file(path)}"
    except OSError:
      return "unreadable"
  return stamp


def folder_identities(root: str, paths: Sequence[str], *, content_digest: bool = False
                      ) -> RecordIdentities:
  """Identities of files under `root`: keys are POSIX paths relative to it."""
  keys = [pathlib.PurePath(os.path.relpath(p, root)).as_posix() for p in paths]
  return RecordIdentities(keys=keys, stamps=[file_stamp(p, content_digest) for p in paths])


@dataclasses.dataclass(frozen=True)
class InputDiff:
  """How a new input relates to an old one, record by record (positions are list indices)."""
  kept_new: np.ndarray  # new positions of unchanged records
  kept_old: np.ndarray  # their old positions
  added: np.ndarray  # new positions whose key the old input lacks
  changed: np.ndarray  # new positions whose key is old but whose stamp differs
  removed: np.ndarray  # old positions whose key is gone
  reordered: bool  # same records in another order

  @property
  def same_records(self) -> bool:
    return not (len(self.added) or len(self.changed) or len(self.removed) or self.reordered)


def compare(old: RecordIdentities, new: RecordIdentities) -> InputDiff:
  """Matches records by key, then compares stamps."""
  where = {k: i for i, k in enumerate(old.keys)}
  kept_new, kept_old, added, changed = [], [], [], []
  seen = np.zeros(len(old), bool)
  for j, (k, s) in enumerate(zip(new.keys, new.stamps)):
    i = where.get(k)
    if i is None:
      added.append(j)
      continue
    seen[i] = True
    if old.stamps[i] == s:
      kept_new.append(j)
      kept_old.append(i)
    else:
      changed.append(j)
  kept_new, kept_old, added, changed = (np.asarray(v, np.int64)
                                        for v in (kept_new, kept_old, added, changed))
  return InputDiff(kept_new=kept_new, kept_old=kept_old, added=added, changed=changed,
                   removed=np.flatnonzero(~seen).astype(np.int64),
                   reordered=bool((np.diff(kept_old) < 0).any()))


def examples(keys: Sequence[str], positions: np.ndarray, n: int = 3) -> list[str]:
  return [keys[int(i)] for i in positions[:n]]


def describe(diff: InputDiff, old: RecordIdentities, new: RecordIdentities, *, n: int = 3
             ) -> str:
  """"2 added (a.jpg, b.jpg), 1 removed (c.jpg), 3 changed (d.jpg, ...)"."""
  parts = []
  for what, pos, keys in (("added", diff.added, new.keys), ("removed", diff.removed, old.keys),
                          ("changed", diff.changed, new.keys)):
    if len(pos):
      more = ", ..." if len(pos) > n else ""
      parts.append(f"{len(pos)} {what} ({', '.join(examples(keys, pos, n))}{more})")
  if diff.reordered:
    parts.append("records in another order")
  return ", ".join(parts)


__all__ = ["InputDiff", "RecordIdentities", "compare", "describe", "file_stamp",
           "folder_identities"]
