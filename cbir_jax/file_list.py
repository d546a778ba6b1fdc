"""A file list as an input (`--file_list=FILE`): one image path per line, in row order.

Paths are relative to the list file's folder (absolute ones allowed); the images are then
read exactly like a folder's files, so a missing or unreadable one is a failure row.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np


class FileListError(ValueError):
  """A file list that cannot be used as it is (unreadable, empty, duplicate paths)."""


@dataclasses.dataclass(frozen=True)
class FileList:
  """The images a list names, in its order.

  Attributes:
    list_file: the list, absolute.
    root: its folder: relative paths are taken from here, and identity keys are relative
      to it (as a folder input's are to the folder).
    paths: per row, the image's absolute, normalised path (symlinks kept as named).
    lines: per row, the 1-based line of the list it comes from.
    labels: per row, int64 (-1: none); with `parent_labels`, the image's parent folder name
      numbered in sorted name order, else all -1.
    label_names: per row, the class name ("" without one).
    missing: rows whose file did not exist when listed (they become failure rows).
  """
  list_file: str
  root: str
  paths: list[str]
  lines: list[int]
  labels: np.ndarray
  label_names: list[str]
  missing: list[int]

  def missing_line(self, n: int = 3) -> str:
    """"file list: 2 of 40 listed files do not exist (line 3: a.jpg, ...)", or ""."""
    if not self.missing:
      return ""
    shown = ", ".join(f"line {self.lines[i]}: {self.paths[i]}" for i in self.missing[:n])
    more = ", ..." if len(self.missing) > n else ""
    return (f"file list: {len(self.missing)} of {len(self.paths)} listed files do not exist "
            f"({shown}{more}); they are counted as failures")


def _entries(data: bytes) -> list[tuple[int, str]]:
  """(line number, path as written) per line that names a file.

  Lines are split on "\\n" ("\\r\\n" too); surrounding whitespace is dropped, blank lines
  and lines starting with "#" are skipped. Bytes become names as the OS gives them
  (`os.fsdecode`), so non-UTF-8 names match the folder input's.
  """
  lines = ((n, os.fsdecode(raw).strip()) for n, raw in enumerate(data.split(b"\n"), start=1))
  return [(n, text) for n, text in lines if text and not text.startswith("#")]


def _refuse_duplicates(list_file: str, paths: list[str], lines: list[int]) -> None:
  first: dict[str, int] = {}  # path -> the line that first names it
  dups = [f"{p} (lines {first[p]} and {line})" for p, line in zip(paths, lines)
          if first.setdefault(p, line) != line]
  if dups:
    more = f" and {len(dups) - 3} more" if len(dups) > 3 else ""
    raise FileListError(f"{list_file}: {len(dups)} paths listed twice, which would give one "
                        f"image two rows: {'; '.join(dups[:3])}{more}")


def read_file_list(list_file: str, *, parent_labels: bool = False) -> FileList:
  """Reads `--file_list=list_file`.

  Args:
    parent_labels: label each image by the name of the folder that holds it (the folder
      input's rule for one level of class folders); False: no labels (-1), which a
      labels CSV can then give.

  Raises:
    FileListError: the list cannot be read, names no file, or names one file twice
      (after normalising "a/./b.jpg" and "a/b.jpg" to one path); with line numbers.
  """
  list_file = os.path.abspath(list_file)
  try:
    with open(list_file, "rb") as f:
      data = f.read()
  except OSError as e:
    raise FileListError(f"cannot read --file_list {list_file}: {e.strerror or e}") from None
  root = os.path.dirname(list_file)
  entries = _entries(data)
  if not entries:
    raise FileListError(f"--file_list {list_file} names no file (only blank or # lines)")
  lines = [n for n, _ in entries]
  paths = [os.path.normpath(os.path.join(root, p)) for _, p in entries]
  _refuse_duplicates(list_file, paths, lines)
  if parent_labels:  # numbered in sorted name order
    names = [os.path.basename(os.path.dirname(p)) for p in paths]
    labels = np.unique(names, return_inverse=True)[1].astype(np.int64)
  else:
    labels, names = np.full(len(paths), -1, np.int64), [""] * len(paths)
  missing = [i for i, p in enumerate(paths) if not os.path.exists(p)]
  return FileList(list_file=list_file, root=root, paths=paths, lines=lines, labels=labels,
                  label_names=names, missing=missing)


__all__ = ["FileList", "FileListError", "read_file_list"]
