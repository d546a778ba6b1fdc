"""The paper's Table I protocol on a labelled extraction output: P@1/5/10, mAP, colour distance.

  python launch/evaluate.py --index=/tmp/food7_index --json=food7.json
  python launch/evaluate.py --index=/tmp/imagenet_index --label_column=group
  python launch/evaluate.py --index=/tmp/food7_index --image_root=/new/place/of/food7
Every labelled row is a query unless --num_queries draws fewer. (`group` is an extra column
of imagenet-sample's labels.csv, stored by `launch/extract.py --labels_csv`.)
"""
from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from cbir_jax import evaluation, runtime

_INDEX = flags.DEFINE_string("index", None, "Extraction output directory.", required=True)
_KINDS = flags.DEFINE_list("kinds", None, "Descriptor kinds (default: every extracted kind).")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", None, "Queries drawn (seeded) from the "
                                    "labelled rows (default, or 0: every labelled row).")
_K = flags.DEFINE_integer("k", 5, "Results per query for the histogram distance (P@1, P@5 "
                          "and P@10 are always shown, with P@k).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the query draw and the random baseline.")
_LABEL_COLUMN = flags.DEFINE_string("label_column", "label",
                                    "Metadata column giving the class (e.g. group).")
_BINS = flags.DEFINE_integer("bins", evaluation.DEFAULT_BINS, "Histogram bins per channel.")
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "Where the index's image folder (or TFDS "
                                  "data_dir) is now, if it moved since the extraction.")
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
                                 bins=_BINS.value, image_root=_IMAGE_ROOT.value)
  except (ValueError, OSError) as e:  # StoreError is a ValueError
    sys.exit(f"evaluate: error: {e}")
  print(evaluation.format_table(result))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=1)
    print(f"json: {_JSON.value}")


if __name__ == "__main__":
  app.run(main)
