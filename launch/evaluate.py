"""The paper's Table I protocol on a labelled extraction output: P@k, mAP, colour distance.

  python launch/evaluate.py --index=/tmp/food7_index --num_queries=100 --k=5 --json=food7.json
  python launch/evaluate.py --index=/tmp/imagenet_index --label_column=group
(`group` is an extra column of imagenet-sample's labels.csv, stored by
`launch/extract.py --labels_csv`.)
"""
from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from cbir_jax import evaluation, runtime

_INDEX = flags.DEFINE_string("index", None, "Extraction output directory.", required=True)
_KINDS = flags.DEFINE_list("kinds", None, "Descriptor kinds (default: every extracted kind).")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", 100,
                                    "Queries drawn from the labelled rows (0 = all).")
_K = flags.DEFINE_integer("k", 5, "Results per query for P@k and the histogram distance.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the query draw.")
_LABEL_COLUMN = flags.DEFINE_string("label_column", "label",
                                    "Metadata column giving the class (e.g. group).")
_BINS = flags.DEFINE_integer("bins", evaluation.DEFAULT_BINS, "Histogram bins per channel.")
_JSON = flags.DEFINE_string("json", None, "Write the numbers (and per-query results) here.")


def main(argv: list[str]) -> None:
  runtime.tune_xla_cpu()  # before any JAX computation
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # keep library INFO logs (orbax) off the table
    logging.set_verbosity(logging.WARNING)
  try:
    result = evaluation.evaluate(_INDEX.value, kinds=_KINDS.value,
                                 num_queries=_NUM_QUERIES.value or None, k=_K.value,
                                 seed=_SEED.value, label_column=_LABEL_COLUMN.value,
                                 bins=_BINS.value)
  except (ValueError, OSError) as e:  # StoreError is a ValueError
    sys.exit(f"evaluate: error: {e}")
  print(evaluation.format_table(result))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=1)
    print(f"json: {_JSON.value}")


if __name__ == "__main__":
  app.run(main)
