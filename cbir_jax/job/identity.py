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


@dataclasses.dataclass(frozen=True)
class RecordIdentities:
  """Keys and stamps of every record, in input order."""
  keys: np.ndarray  # str [N]
  stamps: np.ndarray  # str [N]

  def __len__(self) -> int:
    return len(self.keys)

  def digest(self) -> str:
    h = hashlib.sha256()
    for k, s in zip(self.keys.tolist(), self.stamps.tolist()):
      h.update(k.encode("utf-8", "surrogateescape") + b"\0" +
               s.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()

  def save(self, path: str | os.PathLike) -> None:
    """Writes an .npz (fixed-width unicode: loads without pickle), atomically."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
      np.savez(f, keys=_text(self.keys), stamps=_text(self.stamps))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "RecordIdentities":
    with np.load(path, allow_pickle=False) as z:
      return cls(keys=z["keys"], stamps=z["stamps"])


def _text(values: np.ndarray) -> np.ndarray:
  # Names that are not valid UTF-8 reach us as surrogate escapes; numpy stores them fine.
  return np.asarray(values, dtype=str) if len(values) else np.zeros(0, "<U1")


def file_stamp(path: str, content_digest: bool = False) -> str:
  """"size:mtime_ns" (":sha256" with content_digest); "missing" for a file that vanished."""
  try:
    st = os.stat(path)
  except OSError:
    return "missing"
  stamp = f"{st.st_size}:{st.st_mtime_ns}"
  if content_digest:
    try:
      h = hashlib.sha256()
      with open(path, "rb") as f:
        while block := f.read(1 << 22):
          h.update(block)
      stamp += f":{h.hexdigest()}"
    except OSError:
      return "unreadable"
  return stamp


def folder_identities(root: str, paths: Sequence[str], *, content_digest: bool = False
                      ) -> RecordIdentities:
  """Identities of files under `root`: keys are POSIX paths relative to it."""
  keys = [pathlib.PurePath(os.path.relpath(p, root)).as_posix() for p in paths]
  stamps = [file_stamp(p, content_digest) for p in paths]
  return RecordIdentities(keys=_text(np.asarray(keys, dtype=object)),
                          stamps=_text(np.asarray(stamps, dtype=object)))


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
  where = {k: i for i, k in enumerate(old.keys.tolist())}
  kept_new, kept_old, added, changed = [], [], [], []
  seen = np.zeros(len(old), bool)
  for j, (k, s) in enumerate(zip(new.keys.tolist(), new.stamps.tolist())):
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
  i64 = lambda v: np.asarray(v, np.int64)  # noqa: E731
  kept_old_a = i64(kept_old)
  return InputDiff(kept_new=i64(kept_new), kept_old=kept_old_a, added=i64(added),
                   changed=i64(changed), removed=np.flatnonzero(~seen).astype(np.int64),
                   reordered=bool(len(kept_old_a) > 1 and (np.diff(kept_old_a) < 0).any()))


def examples(keys: np.ndarray, positions: np.ndarray, n: int = 3) -> list[str]:
  return [str(keys[i]) for i in positions[:n]]


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
