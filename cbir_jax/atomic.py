"""Files written whole or not at all, checksums, and the locks on an output directory."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import pathlib
import uuid
from typing import IO, Any, Callable

class StoreError(ValueError):
  """An output directory that cannot be written or read as asked; the message says why."""


def sha256_file(path: str | os.PathLike) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


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


class DirLock:
  """A job process' write lock on an output directory: an flock'ed `.lock-<process>` file.

  `close()` removes the file, then releases the lock, so a finished job leaves no lock
  file. A job that opened the file just before it was removed gets the lock on a file
  that is no longer there; `lock` sees that (another inode at the path, or none) and
  takes the lock again on the file now at the path, so two jobs never both hold it.
  """

  def __init__(self, path: pathlib.Path, f: IO[str]):
    self.path, self._f = path, f

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


__all__ = ["DirLock", "StoreError", "fsync_dir", "lock", "sha256_file", "write_atomic",
           "write_json_atomic"]
