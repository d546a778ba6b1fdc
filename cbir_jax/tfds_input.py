"""TFDS input: records of a prepared data_dir, read by position without TensorFlow, decoded by Pillow.

ArrayRecord datasets are read with `tfds.data_source` (random access, no TensorFlow); image
bytes skip TFDS decoding so folders and TFDS share `input_pipeline`'s decoding, resizing and
failure rows. TFRecord datasets need TensorFlow (`tfds_tfrecord`). Nothing here downloads.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Any, Sequence

import numpy as np

from cbir_jax import input_pipeline
from cbir_jax.decode import MAX_PIXELS


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
    data_dir: the prepared data_dir.
    num_records: examples in the split.
    image_key: the image feature read (first Image feature, or "image").
    label_names: class names of the "label" ClassLabel feature ([] without one).
    version: the dataset version read.
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

  def identity(self) -> dict[str, Any]:
    """What identifies the input in a manifest (resume must see the same records)."""
    return {"type": "tfds", "name": self.name, "split": self.split, "version": self.version,
            "num_records": self.num_records}

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
  def _keys(self) -> list[str]:
    return [f"{os.path.basename(f.path)}__{k}" for f in self.files
            for k in range(f.skip, f.skip + f.take)]

  def keys(self) -> list[str]:
    """Per record, its TFDS id ("<name>-<split>.array_record-00000-of-00001__<i>").

    Computed from the split's file layout: nothing is read or decoded.
    """
    return self._keys

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

  @functools.cached_property
  def _positions(self) -> dict[str, list[tuple[int, FileSpan]]]:
    """Shard file name -> (position of its first record in the split, its span)."""
    out: dict[str, list[tuple[int, FileSpan]]] = {}
    at = 0
    for f in self.files:
      out.setdefault(os.path.basename(f.path), []).append((at, f))
      at += f.take
    return out

  def position(self, key: str) -> int:
    """The position in the split of the record with TFDS id `key` (KeyError if none)."""
    shard, _, k = key.rpartition("__")
    for at, f in self._positions.get(shard, ()):
      if k.isdigit() and f.skip <= int(k) < f.skip + f.take:
        return at + int(k) - f.skip
    raise KeyError(f"{key!r} is not a record of {self.name}:{self.split}")

  @functools.cached_property
  def records(self) -> Records:
    """The split's records as a picklable reader (position -> (image bytes, label))."""
    if self.data is None:
      raise TfdsError(f"{self.name} is prepared as {self.file_format}, which has no random "
                      f"access; {_rebuild_hint(self.name, self.data_dir, extra=False)}")
    return Records(self.name, self.split, self.num_records, self.image_key,
                   bool(self.label_names), self.data)

  def example(self, i: int) -> tuple[bytes, int]:
    """(encoded image bytes, label or -1) of record i; thread-safe.

    Raises:
      IndexError: i out of range.
      TfdsError: a TFRecord dataset (no random access).
      OSError: the record cannot be read (damaged shard).
    """
    return self.records(i)

  def read(self, i: int) -> bytes:
    """The encoded image bytes of record i."""
    return self.example(i)[0]

  def read_key(self, key: str) -> bytes:
    """The encoded image bytes of the record with TFDS id `key`."""
    return self.read(self.position(key))


def _rebuild_hint(name: str, data_dir: str, *, extra: bool = True) -> str:
  hint = (f"rebuild it as ArrayRecord (`tfds build {name} --data_dir={data_dir} "
          "--file_format=array_record`)")
  if extra:
    hint += (", or install TensorFlow to read it as it is (the `tfrecord` extra: "
             "`pip install -e '.[tfrecord]'`)")
  return hint


def has_tensorflow() -> bool:
  """TensorFlow is installed (not imported: finding it is enough)."""
  return importlib.util.find_spec("tensorflow") is not None


def _builder(name: str, data_dir: str) -> Any:
  import tensorflow_datasets as tfds

  try:
    return tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends
    # TFDS lists every registered dataset in the message; keep its first line and hint.
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    hint = next((ln for ln in lines if ln.startswith("Did you mean")), "")
    raise TfdsError(f"TFDS dataset {name!r} not found in data_dir {data_dir} nor among the "
                    f"registered datasets ({type(e).__name__}: {lines[0] if lines else ''}"
                    f"{'; ' + hint if hint else ''})") from None


def _features(name: str, builder: Any) -> tuple[str, tuple[str, ...]]:
  """(image feature key, label names of a ClassLabel "label" feature or ())."""
  import tensorflow_datasets as tfds

  features = builder.info.features
  image_key = next((k for k, f in features.items()
                    if isinstance(f, tfds.features.Image)), None)
  if image_key is None:
    raise TfdsError(f"TFDS dataset {name!r} has no Image feature (features: {list(features)})")
  label = features["label"] if "label" in features else None
  names = (tuple(label.names) if isinstance(label, tfds.features.ClassLabel) and label.names
           else ())
  return image_key, names


# Columns the job fills itself: a feature of one of these names is kept as "tfds_<name>".
_RESERVED = ("row", "path", "label", "label_name", "width", "height")


def _metadata_features(features: Any, image_key: str) -> tuple[tuple[str, str], ...]:
  """(column, feature) of every top-level scalar or text feature but the image and label."""
  import tensorflow_datasets as tfds

  out = []
  for k, f in features.items():
    if k in (image_key, "label") or isinstance(f, (tfds.features.Image,
                                                   tfds.features.FeaturesDict)):
      continue
    if tuple(getattr(f, "shape", (None,))) == ():  # Text, ClassLabel, Scalar, 0-d Tensor
      out.append((f"tfds_{k}" if k in _RESERVED else k, k))
  return tuple(out)


def _scalar_column(values: list[Any]) -> np.ndarray:
  """Feature values as one column: text as str (UTF-8, undecodable bytes kept), else numbers."""
  items = [v.item() if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.ndim == 0)
           else v for v in values]
  if any(isinstance(v, bytes) for v in items):
    return np.asarray([v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v)
                       for v in items], dtype=str)
  return np.asarray(items)


def _split_error(name: str, split: str, builder: Any, e: Exception) -> TfdsError:
  return TfdsError(f"cannot read split {split!r} of {name!r} ({type(e).__name__}: {e}); "
                   f"its splits: {', '.join(builder.info.splits)}")


def _files(name: str, split: str, builder: Any) -> tuple[FileSpan, ...]:
  try:
    instructions = builder.info.splits[split].file_instructions
  except Exception as e:  # unknown split, bad slice syntax
    raise _split_error(name, split, builder, e) from None
  return tuple(FileSpan(str(f.filename), int(f.skip),
                        int(f.take if f.take >= 0 else f.examples_in_shard - f.skip))
               for f in instructions)


def open_tfds(spec: str, data_dir: str | None) -> TfdsSource:
  """Opens "name:split" in a prepared data_dir, without ever downloading.

  ArrayRecord datasets are read without TensorFlow; TFRecord ones need it installed.

  Args:
    spec: "name:split", e.g. "oxford_flowers102:train" or "imagenet2012:validation[:1000]".
    data_dir: the TFDS data_dir where the dataset was prepared (`tfds build`).

  Raises:
    TfdsError: unknown dataset, not prepared in data_dir, unknown split, no image feature,
      or a TFRecord dataset without TensorFlow installed.
  """
  import tensorflow_datasets as tfds

  name, sep, split = spec.partition(":")
  if not sep or not name or not split:
    raise TfdsError(f"--tfds must be name:split (e.g. oxford_flowers102:train), got {spec!r}")
  if data_dir is None:
    data_dir = os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  builder = _builder(name, data_dir)
  # Checked here, before TFDS could try to download anything.
  if not builder.is_prepared():
    raise TfdsError(
        f"TFDS dataset {name!r} is not prepared in data_dir {data_dir} (expected "
        f"{builder.data_dir}/dataset_info.json). This job reads prepared data only and never "
        f"downloads: run `tfds build {name} --data_dir={data_dir} --file_format=array_record` "
        "on a machine with network access (or copy a prepared data_dir here), then rerun.")
  image_key, label_names = _features(name, builder)
  formats = {f.value for f in builder.info.available_file_formats()}
  data, fmt = None, "array_record"
  if "array_record" in formats:
    try:
      data = builder.as_data_source(split=split, file_format="array_record",
                                    decoders={image_key: tfds.decode.SkipDecoding()})
    except (KeyError, ValueError) as e:  # unknown split, bad slice syntax
      raise _split_error(name, split, builder, e) from None
  else:
    fmt = builder.info.file_format.value if builder.info.file_format else "unknown"
    if not has_tensorflow():
      raise TfdsError(f"TFDS dataset {name!r} in {data_dir} is prepared as {fmt}, which needs "
                      f"TensorFlow to read; {_rebuild_hint(name, data_dir)}")
  files = _files(name, split, builder)  # after as_data_source: its file format is the one read
  num = sum(f.take for f in files)
  if data is not None and len(data) != num:
    raise TfdsError(f"{name}:{split}: the data source holds {len(data)} records but the "
                    f"split's files list {num}")
  return TfdsSource(name=name, split=split, data_dir=str(data_dir), num_records=num,
                    image_key=image_key, label_names=label_names,
                    version=str(builder.info.version), file_format=fmt, files=files,
                    metadata=_metadata_features(builder.info.features, image_key)
                    if data is not None else (), builder=builder, data=data)


def _positions(ranges: list[tuple[int, int]], batch_size: int) -> np.ndarray:
  """Each [start, stop) range, padded with -1 to whole batches."""
  parts = [np.zeros(0, np.int64)]
  for start, stop in ranges:
    parts += [np.arange(start, stop), np.full(-(stop - start) % batch_size, -1)]
  return np.concatenate(parts).astype(np.int64)


def tfds_batches(source: TfdsSource, ranges: list[tuple[int, int]], *,
                 image_size: int | tuple[int, int], batch_size: int,
                 num_threads: int | None = None, num_workers: int | None = None,
                 draft: bool = True, max_pixels: int = MAX_PIXELS, prefetch: int = 2
                 ) -> input_pipeline.BatchStream:
  """Decoded fixed-size batches over `ranges` of the split (each range padded separately).

  `Batch.index` is the record's position in the split, `Batch.key` its TFDS id and
  `Batch.label` its label (-1 without a ClassLabel "label" feature). Options as in
  `input_pipeline.image_batches`.
  """
  return position_batches(source, _positions(ranges, batch_size), image_size=image_size,
                          batch_size=batch_size, num_threads=num_threads,
                          num_workers=num_workers, draft=draft, max_pixels=max_pixels,
                          prefetch=prefetch)


def position_batches(source: TfdsSource, positions: np.ndarray, *,
                     image_size: int | tuple[int, int], batch_size: int,
                     num_threads: int | None = None, num_workers: int | None = None,
                     draft: bool = True, max_pixels: int = MAX_PIXELS, prefetch: int = 2,
                     buckets: Sequence[int] | None = None) -> input_pipeline.BatchStream:
  """Decoded fixed-size batches of the records at `positions` (negative: a padding row);
  with `buckets`, canvases for the device resize (`input_pipeline.BatchStream`).

  ArrayRecord records are read where they are decoded (worker processes reopen the
  split); TFRecord ones stream from tf.data in this process and travel with their rows.
  """
  opts = dict(image_size=image_size, batch_size=batch_size, num_threads=num_threads,
              num_workers=num_workers, draft=draft, max_pixels=max_pixels, prefetch=prefetch,
              buckets=buckets)
  if source.data is None:
    from cbir_jax import tfds_tfrecord
    return input_pipeline.BatchStream(tfds_tfrecord.rows_at(source, positions),
                                      read=input_pipeline.carried, keyed=True, **opts)
  return input_pipeline.encoded_batches(source.records, source.keys(), positions, **opts)


def label_name(source: TfdsSource, label: int) -> str:
  return source.label_names[label] if 0 <= label < len(source.label_names) else ""


__all__ = ["TfdsError", "TfdsSource", "Records", "FileSpan", "open_tfds", "tfds_batches",
           "position_batches", "label_name", "has_tensorflow"]
