"""Reading a finished index: descriptor parts as one [rows, D] view, and the metadata table.

The layout (format 4: manifest.json, a folder of .npy parts per kind, metadata.parquet,
failures.json, the shards as written; gen-NNNNNN/ after `--update`s) and how to read it
without cbir_jax (NumPy, pyarrow, faiss): docs/extraction.md, "Output".
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np


METADATA = "metadata.parquet"
FAILURES = "failures.json"


# --- the metadata table ------------------------------------------------------------------------


def _column_to_arrow(pa: Any, v: np.ndarray) -> Any:
  if v.dtype.kind in "US":
    items = v.astype(str).tolist()
    try:
      return pa.array(items, pa.string())
    except (UnicodeEncodeError, ValueError):  # a name that is not valid UTF-8: its own bytes
      return pa.array([s.encode("utf-8", "surrogateescape") for s in items], pa.binary())
  return pa.array(v)


def write_metadata(f: Any, meta: Mapping[str, np.ndarray]) -> None:
  """Writes the metadata table as parquet to the open binary file `f`.

  Text columns are UTF-8 strings; a column holding a file name that is not valid UTF-8 is
  stored as binary (the name's own bytes), so nothing is lost.
  """
  import pyarrow as pa
  import pyarrow.parquet as pq

  names = list(meta)
  table = pa.table([_column_to_arrow(pa, np.asarray(meta[c])) for c in names], names=names)
  pq.write_table(table, f)


def read_metadata(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The metadata table as NumPy columns (text as str arrays, numbers as they were)."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  table = pq.read_table(path)
  out = {}
  for name, col in zip(table.column_names, table.columns):
    if pa.types.is_binary(col.type):  # a file name that is not UTF-8: its own bytes
      items = [b.decode("utf-8", "surrogateescape") for b in col.to_pylist()]
    elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
      items = col.to_pylist()
    else:
      out[name] = col.to_numpy()
      continue
    out[name] = np.asarray(items, dtype=str) if items else np.zeros(0, str)
  return out


# --- the descriptors: one view over the parts ---------------------------------------------------


class LazyRows:
  """Several [n_i, D] arrays (memory-mapped parts) read as one [sum n_i, D] array.

  Indexing reads only the rows asked for: an int, a slice, an integer or boolean array, or
  a tuple whose first item is one of those (numpy semantics on the result). `np.asarray`
  gives the whole array (read once). Read-only.
  """

  def __init__(self, parts: Sequence[np.ndarray]):
    if not parts:
      raise ValueError("no parts")
    self.parts = list(parts)
    self.dtype = self.parts[0].dtype
    self.starts = np.cumsum([0] + [len(p) for p in self.parts])
    self.shape = (int(self.starts[-1]), *self.parts[0].shape[1:])
    self.ndim = len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  def _rows(self, idx: np.ndarray) -> np.ndarray:
    out = np.empty((len(idx), *self.shape[1:]), self.dtype)
    which = np.searchsorted(self.starts, idx, side="right") - 1
    for k in np.unique(which):
      at = np.flatnonzero(which == k)
      out[at] = self.parts[k][idx[at] - self.starts[k]]
    return out

  def __getitem__(self, key: Any) -> Any:
    first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
    n = self.shape[0]
    if isinstance(first, slice):
      return self._rows(np.arange(*first.indices(n)))[(slice(None), *rest)]
    idx = np.asarray(first)  # an int too: a 0-d index, its row below
    if idx.dtype == bool:
      if idx.shape != (n,):
        raise IndexError(f"boolean index of shape {idx.shape} for {n} rows")
      idx = np.flatnonzero(idx)
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < -n or idx.max() >= n):
      raise IndexError(f"index out of bounds for axis 0 with size {n}")
    flat = self._rows(np.where(idx < 0, idx + n, idx).reshape(-1))
    # Index the gathered rows with an arange of idx's shape: numpy's own rules (broadcast
    # with array indices in `rest`) then apply exactly as on the whole array.
    return flat[(np.arange(idx.size).reshape(idx.shape), *rest)]

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    a = np.concatenate([np.asarray(p) for p in self.parts])
    return a if dtype is None else a.astype(dtype)

  def __iter__(self):
    for p in self.parts:
      yield from p

  def __repr__(self) -> str:
    return f"LazyRows(shape={self.shape}, dtype={self.dtype}, parts={len(self.parts)})"


def part_view(arrays: Sequence[np.ndarray]) -> np.ndarray | LazyRows:
  """The file itself for one part, else a lazy concatenation."""
  return arrays[0] if len(arrays) == 1 else LazyRows(arrays)


__all__ = ["FAILURES", "LazyRows", "METADATA", "part_view", "read_metadata",
           "write_metadata"]
