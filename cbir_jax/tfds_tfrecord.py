"""TFDS datasets prepared as TFRecord: read in order through tf.data (TensorFlow needed).

The optional path (`pip install -e '.[tfrecord]'`): records stream from tf.data into the same
decoding engine as every other source. ArrayRecord datasets never come here.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterator, Sequence

from cbir_jax import input_pipeline
from cbir_jax.tfds_source import TfdsError, TfdsSource


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


def _runs(positions: Sequence[int]) -> Iterator[tuple[int, int]]:
  """Maximal runs [start, stop) of consecutive positions; a padding row (-1) is (-1, 0)."""
  # Within a run, position - index is constant; padding rows are one group, split below.
  for key, group in itertools.groupby(enumerate(positions),
                                      lambda ip: ip[1] - ip[0] if ip[1] >= 0 else None):
    run = [p for _, p in group]
    if key is None:
      yield from [(-1, 0)] * len(run)
    else:
      yield run[0], run[-1] + 1


def rows_at(source: TfdsSource, positions: Sequence[int]
            ) -> Iterator[input_pipeline.Row | None]:
  """The records at `positions` in order (a negative position: a padding row, `None`).

  Each run of consecutive positions is one sub-split read through tf.data.
  """
  import tensorflow as tf
  import tensorflow_datasets as tfds

  tf.config.set_visible_devices([], "GPU")  # keep TensorFlow off the accelerators

  has_label = bool(source.label_names)
  for start, stop in _runs([int(p) for p in positions]):
    if start < 0:
      yield None
      continue
    ds = source.builder.as_dataset(
        split=_subsplit(source.builder, source.split, start, stop, source.num_records),
        shuffle_files=False, decoders={source.image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(add_tfds_id=True, try_autocache=False))
    n = 0
    for ex in ds.as_numpy_iterator():
      data, label = bytes(ex[source.image_key]), int(ex["label"]) if has_label else -1
      yield input_pipeline.Row(start + n, (data, label),
                               ex["tfds_id"].decode("utf-8", "replace"))
      n += 1
    if n != stop - start:  # never pass rows on under the wrong positions
      raise TfdsError(f"{source.name}:{source.split}[{start}:{stop}] gave {n} records, "
                      f"expected {stop - start}")
