"""The bulk extraction job: images (folder or TFDS) -> an index of descriptor parts (index.py).

`run` goes through named stages (cbir_jax/job/): plan the job (input, weights, settings,
output directory, work left) -> run the steps -> assemble rows into shards -> finish
(list the shards as the index: parts per kind, one metadata table; switch the manifest;
no descriptor array is copied). A job is
one or several independent workers (job/workers.py), each running one jitted step on its
local devices over its own range of shards; complete shards survive kills and a rerun
(of a worker, or of the whole job with any worker count) continues.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable, Mapping

from cbir_jax import backbones, choices, decode, store
from cbir_jax import descriptors as desc
from cbir_jax.choices import COMPUTE_DTYPES, OUTPUT_DTYPES, PROGRESS_MODES  # noqa: F401 (kept here)
from cbir_jax.choices import ComputeDtype, Kind, Masks, Model, OutputDtype, Progress
from cbir_jax.job import control, workers
from cbir_jax.job.errors import ExtractError, Interrupted
from cbir_jax.weights import random_params


@dataclasses.dataclass
class ExtractConfig:
  """Everything an extraction needs. Defaults reproduce the paper's settings on the default model.

  Attributes:
    output: output directory (created; a rerun continues it).
    images: folder of images (recursive; every format this Pillow build decodes, e.g. jpg,
      png, webp, tif; other files are counted, not read); the first-level subfolder, if
      any, is the label. None with `tfds`.
    tfds: "name:split" of a prepared TFDS dataset, read from `data_dir`; never downloads.
    data_dir: TFDS data_dir where the dataset is prepared (default $TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    labels_csv: optional CSV (columns file, class_index[, class_name, ...]) giving labels
      by path relative to `images` (or by file name where names are unique); other
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
  """
  output: str
  images: str | None = None
  tfds: str | None = None
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

  def check(self) -> None:
    """Raises ExtractError for settings that cannot work, before anything is touched."""
    if (self.images is None) == (self.tfds is None):
      raise ExtractError("give exactly one input: --images=FOLDER or --tfds=NAME:SPLIT")
    if self.labels_csv and not self.images:
      raise ExtractError("--labels_csv applies to --images folders only")
    try:
      choices.check(self)  # kinds, dtypes, masks, progress, model: the flags' own lists
    except ValueError as e:
      raise ExtractError(str(e)) from None
    for name in ("batch_size", "shard_size", "max_pixels"):
      if getattr(self, name) < 1:
        raise ExtractError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.num_workers is not None and self.num_workers < 0:
      raise ExtractError(f"num_workers must be >= 0 (or unset: chosen by the cores), got "
                         f"{self.num_workers}")
    if self.num_threads is not None and self.num_threads < 1:
      raise ExtractError(f"num_threads must be >= 1 (or unset: every core), got "
                         f"{self.num_threads}")
    if self.image_size is not None and self.image_size < 32:
      raise ExtractError(f"image_size must be >= 32 (five stride-2 blocks), got "
                         f"{self.image_size}")
    try:
      backbones.get(self.model)
      desc.DescriptorConfig(self.threshold, self.relative, self.masks)
    except ValueError as e:
      raise ExtractError(str(e)) from None
    self.worker_spec()

  def worker_spec(self, env: Mapping[str, str] | None = None) -> workers.WorkerSpec:
    """Worker index and count from the flags or the environment; raises ExtractError."""
    try:
      return workers.resolve(self.worker, self.workers, os.environ if env is None else env)
    except workers.WorkerSpecError as e:
      raise ExtractError(str(e)) from None


# Phases of the summary's time breakdown, in the order they happen.
PHASES = ("imports", "startup", "input", "test delay", "compile", "device", "host", "write",
          "waiting for other workers", "assemble", "finish", "stop")


@dataclasses.dataclass
class Summary:
  """What one worker did, and where its wall time went (the phases add up to `seconds`)."""
  output: str
  worker: int
  images: int = 0  # decoded and written
  failed: int = 0  # records that could not be decoded
  reused: int = 0  # rows (and failures) kept from the previous generation by --update
  shards_written: int = 0
  shards_skipped: int = 0  # complete from an earlier run
  parts_written: int = 0  # finished parts of shards in progress, written on a stop
  seconds: float = 0.0
  phases: dict[str, float] = dataclasses.field(default_factory=dict)
  compiles: int = -1  # compilations of the step (1 expected), -1 if unknown
  stop_s: float = 0.0  # from the stop request to the rows written
  complete: bool = False  # the whole output (all workers) is finished
  missing: int = 0  # shards of other workers still to be written (the job is not finished)
  update_line: str = ""
  skipped_line: str = ""  # files of the input folder not read ("skipped 3 files: .txt 2, ...")

  def _phase(self, name: str) -> float:
    return self.phases.get(name, 0.0)

  @property
  def input_wait_s(self) -> float:
    return self._phase("input")

  @property
  def device_s(self) -> float:
    return self._phase("device")

  @property
  def write_s(self) -> float:
    return self._phase("write")

  @property
  def startup_s(self) -> float:
    return self._phase("imports") + self._phase("startup")

  @property
  def compile_s(self) -> float:
    return self._phase("compile")

  @property
  def finish_s(self) -> float:
    return self._phase("assemble") + self._phase("finish")

  @property
  def images_per_s(self) -> float:
    return (self.images + self.failed) / self.seconds if self.seconds > 0 else 0.0

  @property
  def steady_images_per_s(self) -> float:
    """Throughput of the steps alone (no startup, compiling or finishing)."""
    t = self.seconds - self.startup_s - self.compile_s - self.finish_s
    return (self.images + self.failed) / t if t > 0 else 0.0

  def line(self) -> str:
    share = self.input_wait_s / self.seconds if self.seconds > 0 else 0.0
    times = ", ".join(f"{name} {self.phases[name]:.1f}" for name in PHASES
                      if self.phases.get(name, 0.0) >= 0.05)
    update = f"; {self.update_line}" if self.update_line else ""
    skipped = f", {self.skipped_line}" if self.skipped_line else ""
    return (f"extracted {self.images} images, {self.failed} failed{skipped}, in "
            f"{self.seconds:.1f} s "
            f"({self.images_per_s:.1f} images/s; {self.steady_images_per_s:.1f} while "
            f"stepping); waiting for input {100 * share:.0f}%; seconds: {times}; shards "
            f"written {self.shards_written}, skipped (already complete) "
            f"{self.shards_skipped}{update}; output {self.output}" + (
                f" (not finished yet: {self.missing} shard(s) of other workers to go; the "
                "worker that writes the last one finishes the job)" if self.missing else ""))


def _log(msg: str) -> None:
  print(f"[extract] {msg}", file=sys.stderr, flush=True)


def run(config: ExtractConfig, *, log: Callable[[str], None] = _log,
        started: float | None = None, worker: control.Worker | None = None) -> Summary:
  """Runs (or continues, or with `config.update` updates) this worker's part of an extraction.

  Args:
    config: the job.
    log: where progress and messages go (stderr by default).
    started: `time.perf_counter()` when the program started (launchers pass it so the
      summary's time breakdown covers imports too).
    worker: this process' place in the job with its signal handling (`main` passes it);
      None: from `config` and the environment, without signal handling.

  Returns:
    This worker's summary (`complete`: the whole job is finished).

  Raises:
    ExtractError: bad settings, unreadable input, a directory of other settings or of
      another input, a locked directory, a write error (disk full), or `Interrupted`.
  """
  config.check()
  clock = control.Clock(started)
  if started is not None:
    clock.charge("imports")
  if worker is None:
    worker = control.Worker(_worker_spec(config), log)
  return _run(config, worker, clock, log)


def _worker_spec(config: ExtractConfig) -> workers.WorkerSpec:
  """The worker's index and count; with --jax_distributed, JAX's process index and count."""
  if not config.jax_distributed:
    return config.worker_spec()
  import jax

  jax.distributed.initialize()  # public API; finds the TPU slice's processes itself
  return workers.WorkerSpec(jax.process_index(), jax.process_count(), "jax.distributed")


def _run(config: ExtractConfig, worker: control.Worker, clock: control.Clock,
         log: Callable[[str], None]) -> Summary:
  from cbir_jax.job import finish, plan as planning, steps

  summary = Summary(output=str(config.output), worker=worker.index)
  plan = planning.plan_job(config, worker, log)
  clock.charge("startup")
  summary.skipped_line = plan.source.skipped_line()
  try:
    summary.shards_skipped = plan.skipped
    _report_plan(plan, worker, log)
    if plan.done:
      summary.complete = True
      return summary
    if not config.finish:
      reason = steps.StepRunner(plan, config, worker, clock, summary, log).run()
      if reason:
        raise Interrupted(
            f"interrupted ({reason}): {_who(worker)} stopped after writing "
            f"{summary.shards_written} shard(s) and the finished part of the shard in "
            f"progress; they are kept in {plan.out}. Rerun the same command to continue.")
    missing = finish.finish(plan, config, worker, clock, summary, log)
    if missing and config.finish:
      raise ExtractError(f"cannot finish {plan.out} yet: {len(missing)} shard(s) not written "
                         f"(first: {store.shard_name(missing[0])}); run (or rerun) the workers "
                         "that write them")
    summary.missing, summary.complete = len(missing), not missing
  except store.StoreError as e:
    raise ExtractError(str(e)) from e
  except OSError as e:
    raise ExtractError(f"error writing {plan.out}: {planning.describe_os_error(e)}; complete "
                       "shards are kept, rerun the same command to continue") from e
  finally:
    clock.charge("finish" if summary.complete else "stop")
    summary.phases, summary.seconds = clock.items(), clock.total
    if plan.update is not None:
      summary.reused, summary.update_line = plan.update.report.reused, plan.update.report.line()
    if plan.lock:
      plan.lock.close()
  return summary


def _who(worker: control.Worker) -> str:
  return "the job" if worker.count == 1 else f"worker {worker.index} of {worker.count}"


def main(config: ExtractConfig, *, started: float | None = None) -> int:
  """Runs this worker as launch/extract.py does and returns its exit status.

  0: this worker's part done (the summary line on stdout; the whole job is finished when
  every worker's is). 1: an error, one line "extract: error: ..." on stderr. 130: stopped by
  SIGINT/SIGTERM (finished rows kept; rerun to continue). Workers never wait for each
  other: one that fails, dies or hangs stops no other.
  """
  try:
    config.check()
    worker = control.Worker(_worker_spec(config), _log)
  except ExtractError as e:
    print(f"extract: error: {e}", file=sys.stderr, flush=True)
    return e.exit_code
  with worker:
    try:
      summary = run(config, started=started, worker=worker)
    except Interrupted as e:
      print(f"extract: {e}", file=sys.stderr, flush=True)
      return e.exit_code
    except KeyboardInterrupt:  # a second signal, or one outside the steps: nothing is lost
      print(f"extract: stopped at once ({worker.at_once or 'interrupted'}); {control.HINT}",
            file=sys.stderr, flush=True)
      return control.EXIT_INTERRUPTED
    except ExtractError as e:
      print(f"extract: error: {e}", file=sys.stderr, flush=True)
      return e.exit_code
  print(summary.line(), flush=True)
  return 0


def _report_plan(plan, worker: control.Worker, log: Callable[[str], None]) -> None:
  if worker.count > 1:
    log(worker.spec.line())
  if worker.index == 0 and plan.source.labels_report is not None:
    for line in plan.source.labels_report.lines():
      log(line)
  if plan.done:
    log(f"{plan.out} is complete and up to date with its input; nothing to do")
  elif plan.skipped:
    log(f"{_who(worker)}: {plan.skipped} shard(s) already complete, "
        f"{len(plan.units)} to go")


__all__ = ["ExtractConfig", "ExtractError", "Interrupted", "Summary", "main", "random_params",
           "run"]
