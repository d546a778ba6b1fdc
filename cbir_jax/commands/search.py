r"""Searches an extraction output with query images or rows; optionally writes a picture report.

  cbir-search --index=/tmp/food7_index --query_ids=0 --k=5 --report=/tmp/report
  cbir-search --index=/tmp/food7_index --query=a.jpg --query=b.jpg --json
  cbir-search --index=/tmp/food7_index --query=a.jpg,b.jpg --kind=fc_conv
  cbir-search --index=/tmp/food7_index --query_ids=0 --report=/tmp/report \
      --image_root=/new/place/of/food7     # the images moved since the extraction
  cbir-search --index=/tmp/food7_index --query=a.jpg \
      --weights=/new/place/of/vgg16        # the weights moved (same digest only)
Query images go through the backbone, weights and preprocessing recorded in the
index's manifest; weights other than those recorded are refused. --kind unset: fc_conv,
or, in an index without it (weights without FC layers), the first of conv, fc, gem, mac,
spoc it has, named on stderr. --query is repeatable,
one file name per flag (a name with a comma is never split; see SearchConfig.query).
Flags are the fields of cbir_jax.query.SearchConfig.
"""
from __future__ import annotations

from absl import flags

from cbir_jax import cli, query, search_command

FLAGS = cli.define(query.SearchConfig)
# --query is a repeatable flag of whole file names rather than a comma list (which would
# split a name holding a comma); query.query_names keeps unambiguous comma lists working.
delattr(flags.FLAGS, "query")
flags.DEFINE_multi_string("query", [], cli.field_docs(query.SearchConfig)["query"])


def main() -> None:
  search_command.run(FLAGS.config(), log=cli.printer("search"))


def run() -> None:
  """The `cbir-search` console script."""
  cli.run("search", main, errors=(ValueError, OSError, ImportError))  # no faiss: --ann
