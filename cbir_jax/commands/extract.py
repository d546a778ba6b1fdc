r"""Extracts descriptors of a folder, a TFDS split, webdataset shards or a file list.

  cbir-extract --images=PHOTOS --output=/tmp/photos.desc
  cbir-extract --tfds=oxford_flowers102:train --data_dir=~/tensorflow_datasets \
      --output=/data/flowers.desc --batch_size=64 --dtype=bfloat16
  cbir-extract --webdataset=/data/shards --output=/data/web.desc   # *.tar (img2dataset)
  cbir-extract --file_list=list.txt --output=OUT                   # one path per line
  cbir-extract --images=PHOTOS --output=OUT --worker=I --workers=N   # worker I
  cbir-extract --images=PHOTOS --output=OUT --ray --workers=N --ray_gpus=1
Rerunning the same command continues an interrupted job; after the input changed,
`--update` keeps the rows of unchanged files and extracts the rest. Load the result with
`cbir_jax.load_descriptors(output_dir, kind)`. Exit status: 0 done (bad images
are listed in failures.json, absent when none), 1 error, 130 interrupted (finished rows
kept). Flags are the fields of cbir_jax.extract.ExtractConfig.
"""
from __future__ import annotations

import time

_STARTED = time.perf_counter()  # before the heavy imports, so the summary counts them


from cbir_jax import cli, extract, ray_job  # noqa: E402
from cbir_jax.descriptors import KINDS  # noqa: E402

FLAGS = cli.define(extract.ExtractConfig)
RAY = cli.define(ray_job.RayOptions)


def main() -> int:
  kinds = FLAGS.values()["kinds"]
  # Canonical order, no repeats (the settings a rerun is compared with); unknown names are
  # refused by the flag itself.
  config = FLAGS.config(kinds=tuple(k for k in KINDS if k in kinds))
  options = RAY.config()
  if options.ray:  # one Ray task per worker (--workers), each its own process
    return ray_job.run(config, options, log=cli.printer("extract"))
  if not config.jax_distributed:
    cli.warn_if_gpu_unused("extract")  # jax.distributed.initialize() must come before JAX starts
  return extract.main(config, started=_STARTED)  # the exit status of every outcome


def run() -> None:
  """The `cbir-extract` console script."""
  cli.run("extract", main, gpu_warning=False, errors=(ValueError, OSError, extract.ExtractError))
