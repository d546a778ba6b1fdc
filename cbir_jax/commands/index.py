r"""Builds an approximate L1 index (faiss) over an extraction output, for cbir-search --ann.

  cbir-index --index=/tmp/food7_index                  # IVF-flat L1, PCA 128
  cbir-index --index=/tmp/food7_index --kind=gem --type=hnsw --pca=0
The index goes to INDEX/ann/KIND/ (faiss's own file format and ann.json, which records the
extraction output it was built from: after `cbir-extract --update` it is refused until
rebuilt). Needs faiss: pip install 'cbir-jax[faiss]'. Flags are the fields of
cbir_jax.ann.IndexConfig.
"""
from __future__ import annotations

from cbir_jax import ann, cli

FLAGS = cli.define(ann.IndexConfig)


def main() -> None:
  log = cli.printer("index")
  r = ann.build(FLAGS.config(), log=log)
  shape = (f"IVF-flat L1, {r.nlist} lists" if r.type == "ivf"
           else f"HNSW L1, M={r.hnsw_m}")
  log(f"{ann.ann_dir(FLAGS.config().index, r.kind)}: {r.rows} rows of {r.kind} (D={r.dim}), "
      f"{shape}{f', PCA to {r.pca}' if r.pca else ''}, built in {r.build_seconds:.1f} s")


def run() -> None:
  """The `cbir-index` console script."""
  cli.run("index", main, errors=(ValueError, OSError, ImportError))
