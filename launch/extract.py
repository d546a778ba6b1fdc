r"""Extracts descriptors of a folder or a TFDS split into a directory of shards.

  python launch/extract.py --images=PHOTOS --output=/tmp/photos.desc
  python launch/extract.py --tfds=oxford_flowers102:train --data_dir=~/tensorflow_datasets \
      --output=/data/flowers.desc --batch_size=64 --dtype=bfloat16
Rerunning the same command continues an interrupted job; after the input changed,
`--update` keeps the rows of unchanged files and extracts the rest. Load the result with
`cbir_jax.load_descriptors(output_dir, kind)`. Exit status: 0 done (bad images
are listed in failures-*.tsv), 1 error, 130 interrupted (finished rows kept).
"""
from __future__ import annotations

import time

_STARTED = time.perf_counter()  # before the heavy imports, so the summary counts them

import sys  # noqa: E402

from absl import app, flags, logging

from cbir_jax import backbones, extract, runtime
from cbir_jax.descriptors import KINDS

_d = extract.ExtractConfig(output="")
_IMAGES = flags.DEFINE_string("images", None, "Folder of images (recursive; jpg, jpeg, png, bmp, "
                              "gif, webp, tif, tiff). Label = first-level subfolder, if any.")
_TFDS = flags.DEFINE_string("tfds", None, "TFDS dataset and split, NAME:SPLIT "
                            "(e.g. oxford_flowers102:train), read from --data_dir; never "
                            "downloads.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir where the dataset is prepared "
                                "(default $TFDS_DATA_DIR or ~/tensorflow_datasets).")
_LABELS = flags.DEFINE_string("labels_csv", None, "For --images: CSV with columns file, "
                              "class_index (optional class_name and more columns, kept as "
                              "metadata) giving labels by file name.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory (a rerun continues it).",
                              required=True)
_MODEL = flags.DEFINE_enum("model", backbones.DEFAULT_BACKBONE, sorted(backbones.BACKBONES),
                           "Backbone.")
_WEIGHTS = flags.DEFINE_string("weights", None, "Weights directory (default: the shipped "
                               "weights/<model>); 'random' for random weights from --seed.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of --weights=random.")
_KINDS = flags.DEFINE_list("kinds", list(KINDS), "Descriptor kinds to write, comma-separated, "
                           f"from {', '.join(KINDS)}.")
_BATCH = flags.DEFINE_integer("batch_size", _d.batch_size, "Images per device per step.")
_DTYPE = flags.DEFINE_enum("dtype", _d.dtype, ["float32", "bfloat16", "float16"],
                           "Compute dtype on the devices.")
_OUT_DTYPE = flags.DEFINE_enum("output_dtype", _d.output_dtype, list(extract.OUTPUT_DTYPES),
                               "Dtype of the stored descriptors.")
_SIZE = flags.DEFINE_integer("image_size", None, "Network input size, square, no crop "
                             "(default: the backbone's, 224).")
_THRESHOLD = flags.DEFINE_float("threshold", _d.threshold, "Significance threshold tau "
                                "(a fraction of the per-image maximum with --relative).")
_RELATIVE = flags.DEFINE_bool("relative", _d.relative, "tau = threshold x the image's "
                              "maximum last-block activation; --norelative: absolute tau.")
_MASKS = flags.DEFINE_enum("masks", _d.masks, ["channel", "spatial"], "channel: the paper's "
                           "per-channel masks; spatial: the authors' notebook variant.")
_SHARD = flags.DEFINE_integer("shard_size", _d.shard_size, "Input records per shard (the unit "
                              "of consolidation and resumption).")
_THREADS = flags.DEFINE_integer("num_threads", None, "Parallel image decodes per process "
                                "(default: tf.data autotune).")
_DRAFT = flags.DEFINE_bool("draft", False, "Decode JPEGs at reduced scale when larger than "
                           "needed (faster; pixels differ slightly).")
_UPDATE = flags.DEFINE_bool("update", False, "The input changed since the output was made: keep "
                            "the rows of unchanged records, extract new and changed ones, drop "
                            "removed ones (also after the folder moved).")
_DIGEST = flags.DEFINE_bool("content_digest", False, "Identify input files by a SHA-256 of their "
                            "bytes too, not only size and modification time (reads them twice).")
_CONSOLIDATE = flags.DEFINE_bool("consolidate", True, "At the end, concatenate the shards into "
                                 "one array per kind (memory-mappable as a whole).")
_PROGRESS = flags.DEFINE_enum("progress", "auto", ["auto", "bar", "log", "none"],
                              "auto: a bar on a terminal, log lines otherwise.")
_LOG_EVERY = flags.DEFINE_float("log_every_s", _d.log_every_s, "Seconds between log lines.")
_DIST = flags.DEFINE_bool("distributed", False, "Multi-process job with settings from the "
                          "cluster environment (SLURM, Open MPI, Cloud TPU).")
_COORD = flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of "
                             "process 0 (uses port and port+1; implies --distributed).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "Multi-process: this process' index.")
_STARTUP = flags.DEFINE_float("startup_timeout_s", _d.startup_timeout_s, "Multi-process: "
                              "seconds to wait for every process to start.")
_PEER = flags.DEFINE_float("peer_timeout_s", _d.peer_timeout_s, "Multi-process: a process "
                           "silent this long is taken for dead and the others end.")


def main(argv: list[str]) -> None:
  runtime.tune_xla_cpu()  # before any JAX computation
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # library INFO logs (orbax, jax) would bury ours
    logging.set_verbosity(logging.WARNING)
  # Canonical order, no repeats; unknown names are reported by ExtractConfig.check.
  kinds = tuple(k for k in KINDS if k in _KINDS.value) + tuple(
      k for k in dict.fromkeys(_KINDS.value) if k not in KINDS)
  config = extract.ExtractConfig(
      output=_OUTPUT.value, images=_IMAGES.value, tfds=_TFDS.value, data_dir=_DATA_DIR.value,
      labels_csv=_LABELS.value, model=_MODEL.value, weights=_WEIGHTS.value, seed=_SEED.value,
      kinds=kinds, batch_size=_BATCH.value, dtype=_DTYPE.value, output_dtype=_OUT_DTYPE.value,
      image_size=_SIZE.value, threshold=_THRESHOLD.value, relative=_RELATIVE.value,
      masks=_MASKS.value, shard_size=_SHARD.value, num_threads=_THREADS.value,
      draft=_DRAFT.value, consolidate=_CONSOLIDATE.value, update=_UPDATE.value,
      content_digest=_DIGEST.value, progress=_PROGRESS.value,
      log_every_s=_LOG_EVERY.value, distributed=_DIST.value,
      coordinator_address=_COORD.value, num_processes=_NPROC.value, process_id=_PID.value,
      startup_timeout_s=_STARTUP.value, peer_timeout_s=_PEER.value)
  sys.exit(extract.main(config, started=_STARTED))


if __name__ == "__main__":
  app.run(main)
