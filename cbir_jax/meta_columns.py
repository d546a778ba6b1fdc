"""Metadata columns as stored (meta.npz, metadata.parquet): typed when every value has one type.

Extra columns (TFDS features, webdataset json fields, labels CSV columns) keep their numbers:
a column is bool when every value is a bool, int64 when every value is an integer (that
fits), float64 when every value is a number and some a float, else text ("" for None).
The job decides per step and per shard, independently; `join` then gives the whole column
the type the same rule gives all its values at once (mixed parts become text), so the
table does not depend on how the rows were split into shards or steps.
"""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np

_INT64 = np.iinfo(np.int64)
_EMPTY_TEXT = np.zeros(0, "<U1")


def _is_int(v: Any) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _text(values: Any) -> np.ndarray:
  """Each value as text: "" for None, str() otherwise (fixed-width unicode: no pickle)."""
  items = ["" if v is None else v if isinstance(v, str) else str(v) for v in values]
  return np.asarray(items, dtype=str) if items else _EMPTY_TEXT


def _of_objects(values: Sequence[Any]) -> np.ndarray:
  """Python values (an object array, or a list) as one typed column."""
  if all(isinstance(v, (bool, np.bool_)) for v in values):
    return np.asarray(values, dtype=bool)
  if all(_is_int(v) and _INT64.min <= v <= _INT64.max for v in values):
    return np.asarray(values, dtype=np.int64)
  if all(_is_int(v) or isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
         for v in values):
    return np.asarray(values, dtype=np.float64)
  return _text(values)


def column(values: Any) -> np.ndarray:
  """One part of an extra column (a list, or an array) as stored: bool, int64, float64 or
  text (str; bytes as UTF-8 text as before)."""
  if not isinstance(values, np.ndarray):
    values = list(values)
    return _of_objects(values) if values else _EMPTY_TEXT
  v = values.reshape(-1)
  cast = {"b": bool, "i": np.int64, "f": np.float64}.get(v.dtype.kind)
  if cast is not None:
    return v.astype(cast)
  if v.dtype.kind == "u":  # only when every value fits int64
    return v.astype(np.int64) if not len(v) or v.max() <= _INT64.max else _text(v.tolist())
  if v.dtype.kind == "O":
    return _of_objects(v.tolist()) if len(v) else _EMPTY_TEXT
  return v.astype(str) if len(v) else _EMPTY_TEXT


def common(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Parts of one stored column converted to one type: theirs when all agree (empty parts do
  not count), float64 for integers and floats, text for any other mix."""
  parts = [np.asarray(p) for p in parts]
  kinds = {p.dtype.kind for p in parts if len(p)}
  if not kinds:
    return parts
  if len(kinds) == 1 and kinds != {"U"}:
    dtype = next(p.dtype for p in parts if len(p))
    return [p.astype(dtype) for p in parts]
  if kinds == {"i", "f"}:
    return [p.astype(np.float64) for p in parts]
  # str() of a stored bool, int64 or float64 is the text `column` gives its Python value.
  return [p if p.dtype.kind == "U" else _text(p.tolist()) for p in parts]


def join(parts: Sequence[np.ndarray]) -> np.ndarray:
  """The parts of one stored column as one array (see `common`)."""
  parts = common(parts)
  return np.concatenate(parts) if parts else _EMPTY_TEXT


__all__ = ["column", "common", "join"]
