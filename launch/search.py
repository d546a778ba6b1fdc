"""Searches an extraction output with query images or rows; optionally writes a picture report.

  python launch/search.py --index=/tmp/food7_index --query_ids=0 --k=5 --report=/tmp/report
  python launch/search.py --index=/tmp/food7_index --query=a.jpg,b.jpg --kind=fc_conv
  python launch/search.py --index=/tmp/food7_index --query_ids=0 --report=/tmp/report \
      --image_root=/new/place/of/food7     # the images moved since the extraction
Query images go through the backbone, weights and preprocessing recorded in the
index's manifest; weights other than those recorded are refused.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from cbir_jax import descriptors, index_images, report, runtime, search

_INDEX = flags.DEFINE_string("index", None, "Extraction output directory.", required=True)
_QUERY = flags.DEFINE_multi_string("query", [], "Query image file(s); repeat the flag or "
                                   "separate with commas.")
_QUERY_IDS = flags.DEFINE_multi_string("query_ids", [], "Rows of the index to use as queries "
                                       "(repeatable or comma-separated).")
_KIND = flags.DEFINE_enum("kind", "fc_conv", list(descriptors.KINDS), "Descriptor kind.")
_K = flags.DEFINE_integer("k", 5, "Results per query.")
_EXCLUDE_SELF = flags.DEFINE_bool("exclude_self", False,
                                  "Drop a --query_ids row from its own results.")
_REPORT = flags.DEFINE_string("report", None, "Folder for results.png and results.html.")
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "For --report: where the index's image "
                                  "folder (or TFDS data_dir) is now, if it moved.")


def main(argv: list[str]) -> None:
  runtime.tune_xla_cpu()  # before any JAX computation
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # keep library INFO logs (orbax) off the table
    logging.set_verbosity(logging.WARNING)
  try:
    images = (index_images.IndexImages.of_index(_INDEX.value, image_root=_IMAGE_ROOT.value)
              if _REPORT.value else None)  # a bad --image_root fails before the search
    results = search.search_index(_INDEX.value, kind=_KIND.value, k=_K.value,
                                  query_paths=_QUERY.value, query_ids=_QUERY_IDS.value,
                                  exclude_self=_EXCLUDE_SELF.value)
    print(search.format_results(results))
    if _REPORT.value:
      out = report.write_index_report(_REPORT.value, _INDEX.value, results, k=_K.value,
                                      images=images)
      print(f"report: {out['png']} {out['html']}")
      if out["missing"]:
        print(f"report: {len(out['missing'])} images not readable, drawn as grey boxes "
              f"(first: {out['missing'][0]})")
  except (ValueError, OSError) as e:  # StoreError, IndexMismatch, WeightsError are ValueErrors
    sys.exit(f"search: error: {e}")


if __name__ == "__main__":
  app.run(main)
