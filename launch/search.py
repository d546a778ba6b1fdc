"""Searches an extraction output with query images or rows; optionally writes a picture report.

  python launch/search.py --index=/tmp/food7_index --query_ids=0 --k=5 --report=/tmp/report
  python launch/search.py --index=/tmp/food7_index --query=a.jpg,b.jpg --kind=fc_conv
Query images go through the backbone, weights and preprocessing recorded in the
index's manifest; weights other than those recorded are refused.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from cbir_jax import descriptors, report, runtime, search

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


def main(argv: list[str]) -> None:
  runtime.tune_xla_cpu()  # before any JAX computation
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # keep library INFO logs (orbax) off the table
    logging.set_verbosity(logging.WARNING)
  try:
    results = search.search_index(_INDEX.value, kind=_KIND.value, k=_K.value,
                                  query_paths=_QUERY.value, query_ids=_QUERY_IDS.value,
                                  exclude_self=_EXCLUDE_SELF.value)
    print(search.format_results(results))
    if _REPORT.value:
      out = report.write_report(_REPORT.value, results, title=f"{_INDEX.value} ({_KIND.value})")
      print(f"report: {out['png']} {out['html']}")
  except (ValueError, OSError) as e:  # StoreError, IndexMismatch, WeightsError are ValueErrors
    sys.exit(f"search: error: {e}")


if __name__ == "__main__":
  app.run(main)
