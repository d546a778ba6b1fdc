r"""Searches an extraction output with query images or rows; optionally writes a picture report.

  cbir-search --index=/tmp/food7_index --query_ids=0 --k=5 --report=/tmp/report
  cbir-search --index=/tmp/food7_index --query=a.jpg,b.jpg --kind=fc_conv --json
  cbir-search --index=/tmp/food7_index --query_ids=0 --report=/tmp/report \
      --image_root=/new/place/of/food7     # the images moved since the extraction
Query images go through the backbone, weights and preprocessing recorded in the
index's manifest; weights other than those recorded are refused. Flags are the fields
of cbir_jax.query.SearchConfig.
"""
from __future__ import annotations

from cbir_jax import cli, query

FLAGS = cli.define(query.SearchConfig)


def main() -> None:
  query.run(FLAGS.config(), log=cli.printer("search"))



def run() -> None:
  """The `cbir-search` console script."""
  cli.run("search", main)


if __name__ == "__main__":
  run()
