"""The bulk extraction job: images (folder or TFDS) -> descriptor shards on disk.

`run` goes through named stages (cbir_jax/job/): plan the job (input, weights, settings,
output directory, work left) -> run the steps -> assemble rows into shards -> finish
(verify, consolidate, switch the manifest). One jitted step on a "data" mesh over every
device of every process; complete shards survive kills and a rerun continues (store.py).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from cbir_jax import backbones, choices, store
from cbir_jax import descriptors as desc
from cbir_jax.choices import COMPUTE_DTYPES, OUTPUT_DTYPES, PROGRESS_MODES  # noqa: F401 (kept here)
from cbir_jax.choices import ComputeDtype, Kind, Masks, Model, OutputDtype, Progress
from cbir_jax.job import control
from cbir_jax.job.errors import ExtractError, Interrupted
from cbir_jax.weights import random_params


@dataclasses.dataclass
class ExtractConfig:
  """Everything an extraction needs. Defaults reproduce the paper's settings on the default model.

  Attributes:
    output: output directory (created; a rerun continues it).
    images: folder of images (recursive; jpg, jpeg, png, bmp, gif, webp, tif, tiff); the
      first-level subfolder, if any, is the label. None with `tfds`.
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
    kinds: descriptor kinds to write.
    batch_size: images per device per step.
    dtype: compute dtype (float32, bfloat16, float16).
    output_dtype: dtype of the stored descriptors (float32 or float16).
    image_size: square network input size; None = the backbone's default.
    threshold: significance threshold tau (a fraction of the image's maximum last-block
      activation with `relative`; SPEC.md section 4).
    relative: tau = threshold x the image's maximum; false: tau = threshold.
    masks: "channel": the paper's per-channel masks; "spatial": the authors' notebook variant.
    shard_size: input records per shard (the unit of consolidation and of resumption;
      a stopped job also keeps the finished part of the shard in progress).
    num_threads: parallel decodes per process (None = every core this process may use).
    draft: JPEG reduced-scale decoding (faster, slightly different pixels).
    consolidate: concatenate the shards into one array per kind at the end.
    update: bring an existing output up to date with a changed input: rows of
      unchanged records are kept, new and changed records extracted, removed ones dropped.
    content_digest: identify each file by a SHA-256 of its bytes as well as its size
      and modification time (reads every file once more when listing).
    progress: "auto" (bar on a terminal, log lines otherwise), "bar", "log", "none".
    log_every_s: seconds between progress log lines.
    distributed: call jax.distributed.initialize() (auto-detects on managed clusters).
    coordinator_address: multi-process: host:port of process 0 (implies `distributed`).
    num_processes: multi-process: number of processes.
    process_id: multi-process: this process' index.
  """
  output: str
  images: str | None = None
  tfds: str | None = None
  data_dir: str | None = None
  labels_csv: str | None = None
  model: Model = backbones.DEFAULT_BACKBONE
  weights: str | None = None
  seed: int = 0
  kinds: tuple[Kind, ...] = desc.KINDS
  batch_size: int = 16
  dtype: ComputeDtype = "float32"
  output_dtype: OutputDtype = "float32"
  image_size: int | None = None
  threshold: float = 0.5
  relative: bool = True
  masks: Masks = "channel"
  shard_size: int = 4096
  num_threads: int | None = None
  draft: bool = False
  consolidate: bool = True
  update: bool = False
  content_digest: bool = False
  progress: Progress = "auto"
  log_every_s: float = 30.0
  distributed: bool = False
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def check(self) -> None:
    """Raises ExtractError for settings that cannot work, before anything is touched."""
    if (self.images is None) == (self.tfds is None):
      raise ExtractError("give exactly one input: --images=FOLDER or --tfds=NAME:SPLIT")
    if self.labels_csv and not self.images:
      raise ExtractError("--labels_csv applies to --images folders only")
    if not self.kinds:
      raise ExtractError(f"no descriptor kinds; known: {list(desc.KINDS)}")
    try:
      choices.check(self)  # kinds, dtypes, masks, progress, model: the flags' own lists
    except ValueError as e:
      raise ExtractError(str(e)) from None
    for name in ("batch_size", "shard_size"):
      if getattr(self, name) < 1:
        raise ExtractError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.image_size is not None and self.image_size < 32:
      raise ExtractError(f"image_size must be >= 32 (five stride-2 blocks), got "
                         f"{self.image_size}")
    try:
      backbones.get(self.model)
      desc.DescriptorConfig(self.threshold, self.relative, self.masks)
    except ValueError as e:
      raise ExtractError(str(e)) from None


# Phases of the summary's time breakdown, in the order they happen.
PHASES = ("imports", "startup", "input", "test delay", "compile", "device", "host", "write",
          "waiting for other processes", "assemble", "finish", "stop")


@dataclasses.dataclass
class Summary:
  """What one process did, and where its wall time went (the phases add up to `seconds`)."""
  output: str
  process_index: int
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
  complete: bool = False  # the whole output (all processes) is finished
  update_line: str = ""

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
    return (f"extracted {self.images} images, {self.failed} failed, in {self.seconds:.1f} s "
            f"({self.images_per_s:.1f} images/s; {self.steady_images_per_s:.1f} while "
            f"stepping); waiting for input {100 * share:.0f}%; seconds: {times}; shards "
            f"written {self.shards_written}, skipped (already complete) "
            f"{self.shards_skipped}{update}; output {self.output}")


def _log(msg: str) -> None:
  import sys
  print(f"[extract] {msg}", file=sys.stderr, flush=True)


def run(config: ExtractConfig, *, log: Callable[[str], None] = _log,
        started: float | None = None) -> Summary:
  """Runs (or continues, or with `config.update` updates) an extraction.

  Args:
    config: the job.
    log: where progress and messages go (stderr by default).
    started: `time.perf_counter()` when the program started (launchers pass it so the
      summary's time breakdown covers imports too).

  Returns:
    This process' summary.

  Raises:
    ExtractError: bad settings, unreadable input, a directory of other settings or of
      another input, a locked directory, a write error (disk full), or `Interrupted`.
  """
  from cbir_jax.job import finish, plan as planning, steps

  config.check()
  clock = control.Clock(started)
  if started is not None:
    clock.charge("imports")
  coord = control.init_distributed(
      distributed=config.distributed, coordinator_address=config.coordinator_address,
      num_processes=config.num_processes, process_id=config.process_id)
  summary = Summary(output=str(config.output), process_index=coord.process_index)
  plan = planning.plan_job(config, coord, log)
  clock.charge("startup")
  try:
    summary.shards_skipped = plan.skipped
    _report_plan(plan, coord, log)
    if plan.done:
      summary.complete = True
      return summary
    stopped = steps.StepRunner(plan, config, coord, clock, summary, log).run()
    if stopped:
      raise Interrupted(
          f"interrupted: process {coord.process_index} stopped after writing "
          f"{summary.shards_written} shard(s) and the finished part of the shard in progress; "
          f"they are kept in {plan.out}. Rerun the same command to continue.")
    finish.finish(plan, config, coord, clock, summary, log)
    summary.complete = True
  except store.StoreError as e:
    raise ExtractError(str(e)) from e
  except OSError as e:
    raise ExtractError(f"error writing {plan.out}: {e}; complete shards are kept, rerun the "
                       "same command to continue") from e
  finally:
    clock.charge("finish" if summary.complete else "stop")
    summary.phases, summary.seconds = clock.items(), clock.total
    if plan.update is not None:
      summary.reused, summary.update_line = plan.update.report.reused, plan.update.report.line()
    if plan.lock:
      plan.lock.close()
  return summary


def _report_plan(plan, coord: control.Coordinator, log: Callable[[str], None]) -> None:
  if coord.process_index == 0 and plan.source.labels_report is not None:
    for line in plan.source.labels_report.lines():
      log(line)
  if plan.done:
    log(f"{plan.out} is complete and up to date with its input; nothing to do")
  elif plan.skipped:
    log(f"process {coord.process_index}: {plan.skipped} shard(s) already complete, "
        f"{len(plan.units)} to go")


__all__ = ["ExtractConfig", "ExtractError", "Interrupted", "Summary", "random_params", "run"]
