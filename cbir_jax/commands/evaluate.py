"""The paper's Table I protocol on a labelled extraction output: P@1/5/10, mAP, colour distance.

  cbir-evaluate --index=/tmp/food7_index --json=food7.json
  cbir-evaluate --index=/tmp/imagenet_index --label_column=group
  cbir-evaluate --index=/tmp/food7_index --image_root=/new/place/of/food7
  cbir-evaluate --index=/tmp/food7_index --kinds=conv,conv_balanced
Every labelled row is a query unless --num_queries draws fewer. (`group` is an extra column
of imagenet-sample's labels.csv, stored by `launch/extract.py --labels_csv`.) Flags are the
fields of cbir_jax.evaluation.EvaluateConfig.
"""
from __future__ import annotations

import json

from cbir_jax import cli, evaluation

FLAGS = cli.define(evaluation.EvaluateConfig)


def main() -> None:
  c = FLAGS.config()
  result = evaluation.evaluate(c.index, kinds=c.kinds, num_queries=c.num_queries or None,
                               k=c.k, seed=c.seed, label_column=c.label_column, bins=c.bins,
                               image_root=c.image_root, balance_from=c.balance_from)
  print(evaluation.format_table(result))
  if c.json:
    with open(c.json, "w") as f:
      json.dump(result, f, indent=1)
    print(f"json: {c.json}")


def run() -> None:
  """The `cbir-evaluate` console script."""
  cli.run("evaluate", main)
