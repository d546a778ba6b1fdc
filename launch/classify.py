"""Prints the top-5 ImageNet classes of every image in a folder, and accuracy with labels.

  python launch/classify.py --images=../shared/data/imagenet-sample/images \
      --labels_csv=../shared/data/imagenet-sample/labels.csv
The last line is then `top1=0.820 top5=0.960 n=1000`.
"""
from __future__ import annotations

import sys

from absl import app, flags

from cbir_jax import backbones, classify, runtime

_MODEL = flags.DEFINE_string("model", backbones.DEFAULT_BACKBONE, "Backbone name.")
_WEIGHTS = flags.DEFINE_string("weights", None,
                               "Weights directory (default: the shipped weights/<model>).")
_IMAGES = flags.DEFINE_string("images", None, "Folder of images (recursive).", required=True)
_LABELS = flags.DEFINE_string("labels_csv", None,
                              "CSV with columns file, class_index (optional class_name).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per step.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")


def main(argv: list[str]) -> None:
  runtime.tune_xla_cpu()  # before any JAX computation
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    labels = classify.read_labels_csv(_LABELS.value) if _LABELS.value else None
    result = classify.classify_folder(_IMAGES.value, model=_MODEL.value, weights=_WEIGHTS.value,
                                      labels=labels, batch_size=_BATCH.value, dtype=_DTYPE.value)
  except (ValueError, OSError) as e:  # WeightsError is a ValueError
    sys.exit(f"classify: error: {e}")
  for line in classify.report_lines(result, labels.names if labels else None):
    print(line)


if __name__ == "__main__":
  app.run(main)
