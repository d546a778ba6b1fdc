r"""Serves an extraction output over HTTP: a search API and a web page, the index kept loaded.

  cbir-serve --index=/tmp/food7_index            # then open http://127.0.0.1:8000/
  cbir-serve --index=/tmp/food7_index --port=0 --kind=conv --k=8
  curl 'http://127.0.0.1:8000/api/search?row=0&k=5'           # cbir-search --json's shape
  curl -F image=@photo.jpg 'http://127.0.0.1:8000/api/search?k=5'
Query images go through the backbone, weights and preprocessing recorded in the index's
manifest (--weights=DIR: where those weights are now, if they moved; checked by digest). Listens on 127.0.0.1 unless --host says otherwise. Flags are the fields of
cbir_jax.serve.ServeConfig; docs/serve.md describes the API.
"""
from __future__ import annotations

from cbir_jax import cli, serve

FLAGS = cli.define(serve.ServeConfig)


def main() -> None:
  serve.run(FLAGS.config(), log=cli.printer("serve"))


def run() -> None:
  """The `cbir-serve` console script."""
  cli.run("serve", main)
