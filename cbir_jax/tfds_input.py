"""TFDS input: records of a prepared data_dir, read by position without TensorFlow, decoded by Pillow.

ArrayRecord datasets are read with `tfds.data_source` (random access, no TensorFlow); image
bytes skip TFDS decoding so folders and TFDS share `input_pipeline`'s decoding, resizing and
failure rows. TFRecord datasets need TensorFlow (`tfds_tfrecord`). Nothing here downloads.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Sequence

import numpy as np

from cbir_jax import input_pipeline, tfds_tfrecord
from cbir_jax.decode import MAX_PIXELS
# The opened split's types live in tfds_source (both readers use them); re-exported here.
from cbir_jax.tfds_source import FileSpan, Records, TfdsError, TfdsSource, rebuild_hint


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
    data_dir: where the dataset was prepared (`tfds build`); None: $TFDS_DATA_DIR, else
      ~/tensorflow_datasets.

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
    if importlib.util.find_spec("tensorflow") is None:  # found, not imported
      raise TfdsError(f"TFDS dataset {name!r} in {data_dir} is prepared as {fmt}, which needs "
                      f"TensorFlow to read; {rebuild_hint(name, data_dir)}, or install "
                      "TensorFlow to read it as it is (the `tfrecord` extra: "
                      "`pip install -e '.[tfrecord]'`)")
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
    return input_pipeline.BatchStream(tfds_tfrecord.rows_at(source, positions),
                                      read=input_pipeline.carried, keyed=True, **opts)
  return input_pipeline.encoded_batches(source.records, source.keys, positions, **opts)


__all__ = ["TfdsError", "TfdsSource", "Records", "FileSpan", "open_tfds", "position_batches"]
