"""Labels of a folder's files from a CSV (columns file, class_index[, class_name, ...]).

Keys are paths relative to the input folder, or bare file names when those are unique
among the files; anything that does not match is counted and reported, never dropped silently.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from cbir_jax.job.errors import ExtractError


@dataclasses.dataclass(frozen=True)
class LabelsReport:
  """How a labels CSV matched the listed files (recorded in the manifest)."""
  csv: str
  rows: int
  labelled: int  # files that got a row
  unlabelled: int  # files without a row (label -1)
  unused_keys: int  # rows that match no file
  case_mismatches: int  # rows that match a file only when case is ignored
  examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def lines(self) -> list[str]:
    out = [f"labels: {self.labelled} of {self.labelled + self.unlabelled} files labelled from "
           f"{self.csv}"]
    ex = self.examples
    if self.unlabelled:
      out.append(f"labels: {self.unlabelled} files have no row in the CSV (label -1), e.g. "
                 + ", ".join(ex.get("unlabelled", [])))
    if self.case_mismatches:
      out.append(f"labels: warning: {self.case_mismatches} CSV keys differ from file names only "
                 "in upper/lower case and were not matched, e.g. "
                 + ", ".join(ex.get("case", [])))
    if self.unused_keys - self.case_mismatches > 0:
      out.append(f"labels: {self.unused_keys - self.case_mismatches} CSV rows match no listed "
                 "file, e.g. " + ", ".join(ex.get("unused", [])))
    return out


@dataclasses.dataclass
class Labels:
  labels: np.ndarray  # int64 [N], -1 unknown
  names: list[str]
  extra: dict[str, np.ndarray]  # further CSV columns, str [N]
  sha256: str
  report: LabelsReport


def _read_rows(path: str) -> tuple[list[dict[str, str]], str]:
  try:
    text = pathlib.Path(path).read_text(encoding="utf-8")
  except OSError as e:
    raise ExtractError(f"cannot read --labels_csv {path}: {e}") from None
  except UnicodeDecodeError as e:
    raise ExtractError(f"--labels_csv {path} is not UTF-8 text ({e})") from None
  rows = list(csv.DictReader(text.splitlines()))
  if not rows or "file" not in rows[0] or "class_index" not in rows[0]:
    raise ExtractError(f"{path}: a labels CSV needs the columns file and class_index")
  return rows, hashlib.sha256(text.encode()).hexdigest()


def _by_key(path: str, rows: list[dict[str, str]]) -> dict[str, tuple[int, dict[str, str]]]:
  by_key = {}
  for i, r in enumerate(rows):
    try:
      label = int(r["class_index"])
    except (TypeError, ValueError):
      raise ExtractError(f"{path}: line {i + 2}: class_index {r['class_index']!r} is not an "
                         "integer") from None
    if not -1 <= label < 2 ** 31:  # labels are stored as int64; -1 means unknown
      raise ExtractError(f"{path}: line {i + 2}: class_index {label} is out of range "
                         "(-1 for unknown, else 0 to 2**31 - 1)")
    key = pathlib.PurePosixPath((r["file"] or "").replace("\\", "/")).as_posix()
    if key in by_key:
      raise ExtractError(f"{path}: line {i + 2}: file {r['file']!r} is listed twice")
    by_key[key] = (label, r)
  return by_key


def _match(path: str, root: str, rel: Sequence[str], by_key: dict
           ) -> tuple[list[str | None], set[str]]:
  """The CSV key of each file (None: no row), and the keys used."""
  names: dict[str, list[int]] = {}
  for i, r in enumerate(rel):
    names.setdefault(r.rsplit("/", 1)[-1], []).append(i)
  hit: list[str | None] = [r if r in by_key else None for r in rel]
  rel_set = set(rel)
  for key in by_key:
    if "/" in key or key in rel_set:
      continue
    files = names.get(key, [])
    if len(files) > 1:
      shown = ", ".join(rel[i] for i in files[:3])
      raise ExtractError(
          f"{path}: file {key!r} names {len(files)} files under {root} ({shown}"
          f"{', ...' if len(files) > 3 else ''}); use paths relative to {root} as keys")
    if files and hit[files[0]] is None:
      hit[files[0]] = key
  return hit, {h for h in hit if h is not None}


def labels_from_csv(path: str, keys: Sequence[str], root: str) -> Labels:
  """Labels, names and extra columns for `keys` (file paths under `root`) from a CSV.

  Raises:
    ExtractError: unreadable CSV, missing columns, bad class indices, a key
      listed twice, or a bare file name that names several files.
  """
  rows, digest = _read_rows(path)
  by_key = _by_key(path, rows)
  rel = [pathlib.PurePath(os.path.relpath(k, root)).as_posix() for k in keys]
  hit, used = _match(path, root, rel, by_key)
  other = [c for c in rows[0] if c not in ("file", "class_index", "class_name")]
  found = [by_key[key][1] if key is not None else {} for key in hit]  # the CSV row of each file
  labels = np.array([by_key[key][0] if key is not None else -1 for key in hit], np.int64)
  report = _report(path, len(rows), rel, hit, set(by_key) - used)
  return Labels(labels=labels, names=[r.get("class_name") or "" for r in found],
                extra={c: np.array([r.get(c) or "" for r in found], dtype=str) for c in other},
                sha256=digest, report=report)


def _report(path: str, n_rows: int, rel: Sequence[str], hit: list[str | None],
            unused: set[str], n: int = 3) -> LabelsReport:
  folded: dict[str, str] = {}
  for r in rel:
    folded.setdefault(r.lower(), r)
    folded.setdefault(r.rsplit("/", 1)[-1].lower(), r)
  case = sorted(k for k in unused if k.lower() in folded)
  unlabelled = [r for r, h in zip(rel, hit) if h is None]
  return LabelsReport(
      csv=str(path), rows=n_rows, labelled=len(rel) - len(unlabelled),
      unlabelled=len(unlabelled), unused_keys=len(unused), case_mismatches=len(case),
      examples={"unlabelled": unlabelled[:n],
                "case": [f"{k} ~ {folded[k.lower()]}" for k in case[:n]],
                "unused": sorted(unused - set(case))[:n]})


__all__ = ["Labels", "LabelsReport", "labels_from_csv"]
