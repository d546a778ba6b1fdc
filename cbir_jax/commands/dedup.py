r"""Lists groups of near-duplicate rows of an index (and exact copies), with a page of thumbnails.

  cbir-dedup --index=out/food7 --report=out/food7_dups
  cbir-dedup --index=out/food7 --kind=conv --threshold=0.01 --json=dups.json
Two rows are near-duplicates when their L1/D distance is below --threshold (default: --fraction
of the median distance of random row pairs); groups are chains of such pairs, plus rows whose
files have equal bytes. Flags are the fields of cbir_jax.dedup.DedupConfig.
"""
from __future__ import annotations

from cbir_jax import cli, dedup

FLAGS = cli.define(dedup.DedupConfig)


def main() -> None:
  dedup.run(FLAGS.config(), log=cli.printer("dedup"))


def run() -> None:
  """The `cbir-dedup` console script."""
  cli.run("dedup", main)
