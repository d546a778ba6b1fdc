"""The extraction job's configuration: every flag of launch/extract.py, typed and checked.

The job's stages (plan, steps, finish) take this type; `cbir_jax.extract` re-exports it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Annotated, Mapping

from cbir_jax import backbones, choices, decode, gpu_decode
from cbir_jax import descriptors as desc
from cbir_jax.choices import ComputeDtype, Kind, Masks, Model, OutputDtype, Progress, Resize
from cbir_jax.job import workers
from cbir_jax.job.errors import ExtractError, reworded

Decoder = Annotated[str, choices.OneOf(gpu_decode.KINDS, "decoder")]


@dataclasses.dataclass
class ExtractConfig:
  """Everything an extraction needs. Defaults reproduce the paper's settings on the default model.

  Attributes:
    output: output directory (created; a rerun continues it).
    images: folder of images (recursive; every format this Pillow build decodes, e.g. jpg,
      png, webp, tif; other files are counted, not read); the first-level subfolder, if
      any, is the label. None with `tfds`.
    tfds: "name:split" of a prepared TFDS dataset, read from `data_dir`; never downloads.
    webdataset: webdataset tar shards: a folder (its *.tar, recursive), a glob or one .tar
      (the img2dataset layout: key + jpg/png/webp + json/cls/txt; docs/inputs.md).
    file_list: a text file naming one image per line (relative to its folder), in row
      order; no labels unless `labels_csv` gives them.
    data_dir: TFDS data_dir where the dataset is prepared (default $TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    labels_csv: optional CSV (columns file, class_index[, class_name, ...]) giving labels
      by path relative to `images` or to the `file_list`'s folder (or by file name where names are unique); other
      columns become metadata columns.
    model: backbone name.
    weights: weights directory; None = the shipped weights of `model`;
      "random" = random initialisation from `seed` (tests, demos).
    seed: seed of random weights.
    kinds: descriptor kinds to write; empty (the default) = every kind the weights can
      give: all of them, or all but fc and fc_conv for weights without the FC layers
      (e.g. VGG16 ported from Keras' _notop.h5).
    batch_size: images per device per step.
    dtype: compute dtype (float32, bfloat16, float16).
    output_dtype: dtype of the stored descriptors (float32 or float16).
    image_size: square network input size; None = the backbone's default.
    threshold: significance threshold tau (a fraction of the image's maximum last-block
      activation with `relative`; SPEC.md section 4).
    relative: tau = threshold x the image's maximum; false: tau = threshold.
    masks: "channel": the paper's per-channel masks; "spatial": the authors' notebook variant.
    shard_size: input records per shard (one part of the index per kind, and the unit of
      resumption;
      a stopped job also keeps the finished part of the shard in progress).
    num_threads: parallel decodes per process (None = every core this process may use);
      changes no row (recorded with the run, not compared on reruns).
    num_workers: decode worker processes (None: threads in this process up to 4 cores,
      else one process per 4 cores, measured in docs/benchmarks.md; 0: threads only); with
      it set, num_threads is threads per process. Changes no row (recorded with the run).
    draft: decode JPEGs at the smallest DCT scale (1/2..1/8) still at least the input
      size, then resize as always (several times less CPU on large photos, pixels within
      about half a grey level); --nodraft decodes at full resolution. Recorded as a setting.
    max_pixels: images with more pixels are refused as decompression bombs (a setting:
      it decides which images get rows).
    update: bring an existing output up to date with a changed input: rows of
      unchanged records are kept, new and changed records extracted, removed ones dropped.
    content_digest: identify each file by a SHA-256 of its bytes as well as its size
      and modification time (reads every file once more when listing).
    progress: "auto" (bar on a terminal, log lines otherwise), "bar", "log", "none".
    log_every_s: seconds between progress log lines.
    worker: this worker's index (0-based) in a job of `workers` independent workers; with
      neither set, read from the scheduler's environment (SLURM, Kubernetes Indexed Jobs,
      $CBIR_JAX_WORKER/$CBIR_JAX_WORKERS; job/workers.py), else one worker.
    workers: the number of workers of the job (Kubernetes: the Job's completions).
    finish: only finish the job (verify, write metadata and manifest) once every worker's
      shards are written; the worker writing the last shard does this itself.
    jax_distributed: call jax.distributed.initialize() first (Cloud TPU slices, where the
      host's TPU chips need it) and take the worker index/count from JAX.
    resize: where images are resized to the network's input: "host" (Pillow after decoding),
      "device" (decoded into canvases, resized in the jitted step as Pillow's BILINEAR,
      docs/resize.md), "auto" (host on the CPU backend, device on accelerators). A setting:
      the two differ by rounding (about 0.1% of pixel values one level apart).
    compilation_cache: JAX's persistent compilation cache, so a rerun loads the step
      instead of compiling it: "auto" ($CBIR_JAX_COMPILATION_CACHE, else
      $XDG_CACHE_HOME/cbir_jax/jax, else ~/.cache/cbir_jax/jax; a directory JAX was already
      given is kept), a directory, or "none" (off). Only ever use a directory no one else
      may write to: JAX runs what it finds there.
    decoder: who decodes the images: "pillow" (the host), "nvimgcodec" (baseline JPEGs of a
      folder on the GPU with nvImageCodec, extra gpu-decode; everything else, and every
      failure reason, through Pillow), "nvimgcodec-cpu" (its CPU backend: tests,
      comparisons), "auto" (nvImageCodec when a GPU and the extra are there, else Pillow).
      nvImageCodec decodes at full size (no draft), so pixels differ by about a grey level;
      which one ran is in the summary and the manifest's run info.
  """
  output: str
  images: str | None = None
  tfds: str | None = None
  webdataset: str | None = None
  file_list: str | None = None
  data_dir: str | None = None
  labels_csv: str | None = None
  model: Model = backbones.DEFAULT_BACKBONE
  weights: str | None = None
  seed: int = 0
  kinds: tuple[Kind, ...] = ()
  batch_size: int = 16
  dtype: ComputeDtype = "float32"
  output_dtype: OutputDtype = "float32"
  image_size: int | None = None
  threshold: float = 0.5
  relative: bool = True
  masks: Masks = "channel"
  shard_size: int = 4096
  num_threads: int | None = None
  num_workers: int | None = None
  draft: bool = True
  max_pixels: int = decode.MAX_PIXELS
  update: bool = False
  content_digest: bool = False
  progress: Progress = "auto"
  log_every_s: float = 30.0
  worker: int | None = None
  workers: int | None = None
  finish: bool = False
  jax_distributed: bool = False
  resize: Resize = "auto"
  compilation_cache: str = "auto"
  decoder: Decoder = "auto"

  def check(self) -> None:
    """Raises ExtractError for settings that cannot work, before anything is touched."""
    inputs = (self.images, self.tfds, self.webdataset, self.file_list)
    if sum(x is not None for x in inputs) != 1:
      raise ExtractError("give exactly one input: --images=FOLDER, --tfds=NAME:SPLIT, "
                         "--webdataset=DIR_OR_GLOB or --file_list=FILE")
    if self.labels_csv and not (self.images or self.file_list):
      raise ExtractError("--labels_csv applies to --images folders and --file_list only")
    with reworded(ValueError):
      choices.check(self)  # kinds, dtypes, masks, progress, model: the flags' own lists
    for name, low, note in (("batch_size", 1, ""), ("shard_size", 1, ""), ("max_pixels", 1, ""),
                            ("num_workers", 0, " (or unset: chosen by the cores)"),
                            ("num_threads", 1, " (or unset: every core)"),
                            ("image_size", 32, " (five stride-2 blocks)")):
      value = getattr(self, name)
      if value is not None and value < low:
        raise ExtractError(f"{name} must be >= {low}{note}, got {value}")
    with reworded(ValueError):  # model and masks were checked above; this checks threshold
      desc.DescriptorConfig(self.threshold, self.relative, self.masks)
    self.worker_spec()

  def worker_spec(self, env: Mapping[str, str] | None = None) -> workers.WorkerSpec:
    """Worker index and count from the flags or the environment; raises ExtractError."""
    with reworded(workers.WorkerSpecError):
      return workers.resolve(self.worker, self.workers, os.environ if env is None else env)


__all__ = ["ExtractConfig"]
