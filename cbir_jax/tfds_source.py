"""An opened TFDS split: what the job reads, keys and stamps (`tfds_input.open_tfds` opens it).

Shared by both readers: `tfds_input` (ArrayRecord, by position, without TensorFlow) and
`tfds_tfrecord` (TFRecord through tf.data), so neither imports the other's module for it.
Light: NumPy only (decode worker processes unpickle `Records` from here).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import numpy as np

class TfdsError(ValueError):
  """A TFDS dataset that cannot be read as asked (unknown, not prepared, no image feature)."""


@dataclasses.dataclass(frozen=True)
class FileSpan:
  """Records [skip, skip + take) of one shard file, in split order."""
  path: str
  skip: int
  take: int


@dataclasses.dataclass(frozen=True)
class Records:
  """Random access to a split's records: position -> (encoded image bytes, label or -1).

  Thread-safe, and picklable, so decode worker processes read records themselves: the
  TFDS data source pickles as its file list and reopens its ArrayRecord files in the worker
  (a few kB; the worker imports tensorflow_datasets, never TensorFlow).
  """
  name: str
  split: str
  num_records: int
  image_key: str
  has_label: bool
  data: Any = dataclasses.field(repr=False, compare=False)  # tfds ArrayRecord data source

  def __call__(self, i: int) -> tuple[bytes, int]:
    """Raises IndexError (out of range) or OSError (the record cannot be read)."""
    if not 0 <= i < self.num_records:
      raise IndexError(f"record {i} out of range (0..{self.num_records - 1})")
    try:
      ex = self.data[i]
      label = int(ex["label"]) if self.has_label else -1
      return bytes(ex[self.image_key]), label
    except Exception as e:  # the reader raises several types for a damaged shard
      raise OSError(f"cannot read record {i} of {self.name}:{self.split}: "
                    f"{type(e).__name__}: {e}") from e


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """A prepared TFDS split, opened for reading.

  Attributes:
    name: dataset name as given ("oxford_flowers102" or "name/config:version").
    split: split as given ("train", "test[:10%]").
    image_key: the image feature read (first Image feature, or "image").
    label_names: class names of the "label" ClassLabel feature ([] without one).
    file_format: "array_record" (random access) or "tfrecord" (needs TensorFlow).
    files: the split's records, shard by shard, in order.
    metadata: (column, feature) of the scalar and text features kept as metadata
      columns (ArrayRecord datasets; a column named like one the job fills gets "tfds_").
  """
  name: str
  split: str
  data_dir: str
  num_records: int
  image_key: str
  label_names: tuple[str, ...]
  version: str
  file_format: str = "array_record"
  files: tuple[FileSpan, ...] = dataclasses.field(default=(), repr=False)
  metadata: tuple[tuple[str, str], ...] = ()
  builder: Any = dataclasses.field(repr=False, compare=False, default=None)
  data: Any = dataclasses.field(repr=False, compare=False, default=None)  # tfds data source

  def metadata_columns(self, positions: Any) -> dict[str, np.ndarray]:
    """The metadata columns of the records at `positions` (read by position, image skipped).

    Raises:
      OSError: a record cannot be read.
    """
    if not self.metadata:
      return {}
    try:
      examples = [self.data[int(i)] for i in positions]
    except Exception as e:  # the reader raises several types for a damaged shard
      raise OSError(f"cannot read the metadata of {self.name}:{self.split}: "
                    f"{type(e).__name__}: {e}") from e
    return {c: _scalar_column([ex[f] for ex in examples]) for c, f in self.metadata}

  @functools.cached_property
  def keys(self) -> list[str]:
    """Per record, its TFDS id ("<name>-<split>.array_record-00000-of-00001__<i>").

    Computed from the split's file layout: nothing is read or decoded.
    """
    return [f"{os.path.basename(f.path)}__{k}" for f in self.files
            for k in range(f.skip, f.skip + f.take)]

  def record_stamps(self) -> list[str]:
    """Per record, "<shard file>:<size>:<mtime_ns>": changes when its shard's bytes change."""
    out: list[str] = []
    for f in self.files:
      try:
        st = os.stat(f.path)
        stamp = f"{os.path.basename(f.path)}:{st.st_size}:{st.st_mtime_ns}"
      except OSError:  # a missing shard: no stamp matches a recorded one
        stamp = f"{os.path.basename(f.path)}:missing"
      out.extend([stamp] * f.take)
    return out

  def position(self, key: str) -> int:
    """The position in the split of the record with TFDS id `key` (KeyError if none)."""
    shard, _, k = key.rpartition("__")
    at = 0  # the position of the span's first record
    for f in self.files:
      if os.path.basename(f.path) == shard and k.isdigit() and f.skip <= int(k) < f.skip + f.take:
        return at + int(k) - f.skip
      at += f.take
    raise KeyError(f"{key!r} is not a record of {self.name}:{self.split}")

  @functools.cached_property
  def records(self) -> Records:
    """The split's records as a picklable reader (position -> (image bytes, label))."""
    if self.data is None:
      raise TfdsError(f"{self.name} is prepared as {self.file_format}, which has no random "
                      f"access; {rebuild_hint(self.name, self.data_dir)}")
    return Records(self.name, self.split, self.num_records, self.image_key,
                   bool(self.label_names), self.data)

  def read(self, i: int) -> bytes:
    """The encoded image bytes of record i; thread-safe.

    Raises:
      IndexError: i out of range.
      TfdsError: a TFRecord dataset (no random access).
      OSError: the record cannot be read (damaged shard).
    """
    return self.records(i)[0]

  def read_key(self, key: str) -> bytes:
    """The encoded image bytes of the record with TFDS id `key`."""
    return self.read(self.position(key))


def rebuild_hint(name: str, data_dir: str) -> str:
  return (f"rebuild it as ArrayRecord (`tfds build {name} --data_dir={data_dir} "
          "--file_format=array_record`)")


def _scalar_column(values: list[Any]) -> np.ndarray:
  """Feature values as one column: text as str (UTF-8, undecodable bytes kept), else numbers."""
  items = [v.item() if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.ndim == 0)
           else v for v in values]
  if any(isinstance(v, bytes) for v in items):
    return np.asarray([v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v)
                       for v in items], dtype=str)
  return np.asarray(items)


__all__ = ["FileSpan", "Records", "TfdsError", "TfdsSource"]
