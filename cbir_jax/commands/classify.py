r"""Prints the top-5 ImageNet classes (names, probabilities) of every image in a folder.

  cbir-classify --images=cbir_jax/sample_images
  cbir-classify --images=../shared/data/imagenet-sample/images \
      --labels_csv=../shared/data/imagenet-sample/labels.csv
Lines read `chelsea.jpg<TAB>tabby 0.62, tiger cat 0.21, ...`; with labels, the last
line is `top1=0.820 top5=0.960 n=1000`. Flags are the fields of
cbir_jax.classify.ClassifyConfig.
"""
from __future__ import annotations

from cbir_jax import classify, cli
from cbir_jax.job.errors import ExtractError  # an unusable --labels_csv: one line, as extract

FLAGS = cli.define(classify.ClassifyConfig)


def main() -> None:
  classify.run(FLAGS.config(), log=cli.printer("classify"))


def run() -> None:
  """The `cbir-classify` console script."""
  cli.run("classify", main, errors=(ValueError, OSError, ExtractError))
