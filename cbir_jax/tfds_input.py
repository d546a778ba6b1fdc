"""TFDS input: encoded image bytes from a prepared data_dir, decoded by the same Pillow path.

Images are read with `tfds.decode.SkipDecoding` so every source (folders and
TFDS) goes through `input_pipeline.decode_image`: identical resizing, colour
conversion and failure reporting. Nothing here ever downloads.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator


from cbir_jax import input_pipeline


class TfdsError(ValueError):
  """A TFDS dataset that cannot be read as asked (unknown, not prepared, no image feature)."""


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
  """
  name: str
  split: str
  data_dir: str
  num_records: int
  image_key: str
  label_names: tuple[str, ...]
  version: str
  builder: Any = dataclasses.field(repr=False, compare=False, default=None)

  def identity(self) -> dict[str, Any]:
    """What identifies the input in a manifest (resume must see the same records)."""
    return {"type": "tfds", "name": self.name, "split": self.split, "version": self.version,
            "num_records": self.num_records}

  def dataset(self, start: int, stop: int):
    """tf.data of {"index", "data", "key", "label"} for records [start, stop) of the split."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    split = _subsplit(self.builder, self.split, start, stop, self.num_records)
    ds = self.builder.as_dataset(
        split=split, shuffle_files=False,
        decoders={self.image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(add_tfds_id=True, try_autocache=False))
    has_label = bool(self.label_names)
    image_key = self.image_key

    def fmt(i, ex):
      label = tf.cast(ex["label"], tf.int64) if has_label else tf.constant(-1, tf.int64)
      return {"index": tf.cast(i, tf.int64) + start, "data": ex[image_key],
              "key": ex["tfds_id"], "label": label}

    # take(): a mocked builder (tfds.testing.mock_data) ignores the slice and
    # yields its own count; a real one yields exactly stop - start.
    return ds.enumerate().map(fmt).take(stop - start)


def _subsplit(builder: Any, split: str, start: int, stop: int, total: int) -> str:
  """`split` restricted to its records [start, stop), as a TFDS split string."""
  import tensorflow_datasets as tfds

  if start == 0 and stop == total:
    return split
  if "[" not in split and "+" not in split:
    return f"{split}[{start}:{stop}]"
  # A sliced split ("train[10%:]"): make it absolute, then slice inside it.
  ri = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
  if len(ri) != 1:
    raise TfdsError(f"split {split!r} combines several ranges; give one split or one slice")
  r = ri[0]
  base = r.from_ or 0
  return f"{r.splitname}[{base + start}:{base + stop}]"


def open_tfds(spec: str, data_dir: str | None) -> TfdsSource:
  """Opens "name:split" in a prepared data_dir, without ever downloading.

  Args:
    spec: "name:split", e.g. "oxford_flowers102:train" or "imagenet2012:validation[:1000]".
    data_dir: the TFDS data_dir where the dataset was prepared (`tfds build`).

  Raises:
    TfdsError: unknown dataset, not prepared in data_dir, unknown split, no image feature.
  """
  import tensorflow_datasets as tfds

  input_pipeline._tf()  # TensorFlow off the accelerators before TFDS touches it
  name, sep, split = spec.partition(":")
  if not sep or not name or not split:
    raise TfdsError(f"--tfds must be name:split (e.g. oxford_flowers102:train), got {spec!r}")
  if data_dir is None:
    data_dir = os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends
    # TFDS lists every registered dataset in the message; keep its first line and hint.
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    hint = next((ln for ln in lines if ln.startswith("Did you mean")), "")
    raise TfdsError(f"TFDS dataset {name!r} not found in data_dir {data_dir} nor among the "
                    f"registered datasets ({type(e).__name__}: {lines[0] if lines else ''}"
                    f"{'; ' + hint if hint else ''})") from None
  # Checked here, before TFDS could try to download anything.
  if not builder.is_prepared():
    raise TfdsError(
        f"TFDS dataset {name!r} is not prepared in data_dir {data_dir} (expected "
        f"{builder.data_dir}/dataset_info.json). This job reads prepared data only and never "
        f"downloads: run `tfds build {name} --data_dir={data_dir}` on a machine with network "
        "access (or copy a prepared data_dir here), then rerun.")
  features = builder.info.features
  image_key = next((k for k, f in features.items()
                    if isinstance(f, tfds.features.Image)), None)
  if image_key is None:
    raise TfdsError(f"TFDS dataset {name!r} has no Image feature (features: {list(features)})")
  label = features["label"] if "label" in features else None
  label_names = (tuple(label.names) if isinstance(label, tfds.features.ClassLabel)
                 and label.names else ())
  try:
    num = builder.info.splits[split].num_examples
  except Exception:  # splits unknown (mocked builders): count what as_dataset says
    ds = builder.as_dataset(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    num = int(ds.cardinality().numpy())
    if num < 0:
      raise TfdsError(f"cannot tell how many examples split {split!r} of {name!r} has") from None
  return TfdsSource(name=name, split=split, data_dir=str(data_dir), num_records=int(num),
                    image_key=image_key, label_names=label_names,
                    version=str(builder.info.version), builder=builder)


def padded_dataset(source: TfdsSource, ranges: list[tuple[int, int]], batch_size: int):
  """Records of each [start, stop) range, each padded to a multiple of batch_size.

  Padding rows carry index -1 and empty bytes; they are never decoded.
  """
  import tensorflow as tf

  ds = None
  for start, stop in ranges:
    part = source.dataset(start, stop)
    pad = -(stop - start) % batch_size
    if pad:
      part = part.concatenate(tf.data.Dataset.from_tensors(
          {"index": tf.constant(-1, tf.int64), "data": tf.constant(b""),
           "key": tf.constant(b""), "label": tf.constant(-1, tf.int64)}).repeat(pad))
    ds = part if ds is None else ds.concatenate(part)
  return ds


def tfds_batches(source: TfdsSource, ranges: list[tuple[int, int]], *, image_size: int,
                 batch_size: int, num_threads: int | None = None, draft: bool = False
                 ) -> Iterator[input_pipeline.Batch]:
  """Decoded fixed-size batches over `ranges` of the split (each range padded separately)."""
  if not ranges:
    return iter(())
  return input_pipeline.encoded_batches(padded_dataset(source, ranges, batch_size),
                                        image_size=image_size, batch_size=batch_size,
                                        num_threads=num_threads, draft=draft)


def label_name(source: TfdsSource, label: int) -> str:
  return source.label_names[label] if 0 <= label < len(source.label_names) else ""


__all__ = ["TfdsError", "TfdsSource", "open_tfds", "tfds_batches", "label_name"]
