"""The bulk extraction job: images (folder, TFDS, webdataset shards, file list) -> an index of
descriptor parts (index.py).

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
import sys
from typing import Callable

from cbir_jax import decode, store  # noqa: F401 (extract.decode: for callers)
from cbir_jax.job import control, jit_cache, workers
from cbir_jax.job.config import ExtractConfig
from cbir_jax.job.errors import ExtractError, Interrupted
from cbir_jax.weights import random_params


# Phases of the summary's time breakdown, in the order they happen.
PHASES = ("imports", "startup", "input", "compile", "device", "write", "waiting for other workers",
          "assemble", "finish", "stop")


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
  seconds: float = 0.0
  phases: dict[str, float] = dataclasses.field(default_factory=dict)
  # Executables made for the step in this process (compiled, or loaded from the persistent
  # cache): 1 per input shape, so 1 with host resize and 1 per bucket used with device resize.
  compiles: int = -1  # -1: the steps did not run
  complete: bool = False  # the whole output (all workers) is finished
  missing: int = 0  # shards of other workers still to be written (the job is not finished)
  update_line: str = ""
  skipped_line: str = ""  # files of the input folder not read ("skipped 3 files: .txt 2, ...")
  # The device's timeline laid over the phases: seconds it computed within each (the rest of
  # each phase it waited); from the steps' dispatch and completion times (job/feed.py).
  device_busy: dict[str, float] = dataclasses.field(default_factory=dict)
  resize: str = ""  # "host" or "device"
  buckets: dict[int, int] = dataclasses.field(default_factory=dict)  # canvas side -> steps
  compilation_cache: str = ""  # the persistent cache's directory ("" off)
  cache_hits: int = 0  # compilations loaded from it
  cache_misses: int = 0  # compilations it did not hold (compiled, then stored)
  decoder: dict = dataclasses.field(default_factory=dict)  # gpu_decode.DecoderTally.to_dict()

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
  def finish_s(self) -> float:
    return self._phase("assemble") + self._phase("finish")

  @property
  def device_busy_s(self) -> float:
    return sum(self.device_busy.values())

  def device_line(self) -> str:
    """"device busy 80% of the wall time; busy/waited s: compile 0.0/2.1, device 9.0/0.5"."""
    if not self.seconds:
      return ""
    per = ", ".join(f"{name} {self.device_busy.get(name, 0.0):.1f}/"
                    f"{self.phases[name] - self.device_busy.get(name, 0.0):.1f}"
                    for name in PHASES if self.phases.get(name, 0.0) >= 0.05)
    return (f"device busy {100 * self.device_busy_s / self.seconds:.0f}% of the wall time "
            f"(seconds busy/waited per phase: {per})")

  @property
  def images_per_s(self) -> float:
    return (self.images + self.failed) / self.seconds if self.seconds > 0 else 0.0

  @property
  def steady_images_per_s(self) -> float:
    """Throughput of the steps alone (no startup, compiling or finishing)."""
    t = self.seconds - self.finish_s - sum(map(self._phase, ("imports", "startup", "compile")))
    return (self.images + self.failed) / t if t > 0 else 0.0

  def _pixels_line(self) -> str:
    buckets = ", ".join(f"{side}: {n}" for side, n in sorted(self.buckets.items()))
    where = f"; resize on the {self.resize}" if self.resize else ""
    if self.decoder:
      counts = ", ".join(f"{k} {v}" for k, v in sorted(self.decoder["counts"].items()))
      where += f"; decoder {self.decoder['description']} ({counts or 'nothing decoded'})"
    return where + (f" (canvas steps {buckets})" if buckets else "")

  def line(self) -> str:
    """The result in one short line: images, failures, time, throughput, the output."""
    skipped = f", {self.skipped_line}" if self.skipped_line else ""
    resumed = (f"; shards skipped (already complete) {self.shards_skipped}"
               if self.shards_skipped else "")
    update = f"; {self.update_line}" if self.update_line else ""
    return (f"extracted {self.images} images, {self.failed} failed{skipped}, in "
            f"{self.seconds:.1f} s ({self.images_per_s:.1f} images/s){resumed}{update}; "
            f"output {self.output}" + (
                f" (not finished yet: {self.missing} shard(s) of other workers to go; the "
                "worker that writes the last one finishes the job)" if self.missing else ""))

  def details(self) -> str:
    """Where the time went, for tuning: throughput while stepping, input wait, phases."""
    share = self.input_wait_s / self.seconds if self.seconds > 0 else 0.0
    times = ", ".join(f"{name} {self.phases[name]:.1f}" for name in PHASES
                      if self.phases.get(name, 0.0) >= 0.05)
    return (f"details: {self.steady_images_per_s:.1f} images/s while stepping; waiting for "
            f"input {100 * share:.0f}%; seconds: {times}; shards written "
            f"{self.shards_written}, already complete {self.shards_skipped}; "
            f"{self.device_line()}{self._pixels_line()}")


def _log(msg: str) -> None:
  print(f"[extract] {msg}", file=sys.stderr, flush=True)


def run(config: ExtractConfig, *, log: Callable[[str], None] = _log,
        started: float | None = None, worker: control.Worker | None = None) -> Summary:
  """Runs (or continues, or with `config.update` updates) this worker's part of an extraction;
  returns its summary (`complete`: the whole job is finished).

  `started`: `time.perf_counter()` at program start (launchers pass it so the time breakdown
  covers imports); `worker`: this process' place in the job with its signal handling (`main`
  passes it; None: from `config` and the environment, without signal handling). Raises
  ExtractError: bad settings, unreadable input, a directory of other settings or of another
  input, a locked directory, a write error (disk full), or `Interrupted`.
  """
  config.check()
  clock = control.Clock(started)
  if started is not None:
    clock.charge("imports")
  if worker is None:
    worker = control.Worker(_worker_spec(config), log)
  cache = jit_cache.enable(config.compilation_cache)  # before anything compiles
  return _run(config, worker, clock, log, cache or "")


def _worker_spec(config: ExtractConfig) -> workers.WorkerSpec:
  """The worker's index and count; with --jax_distributed, JAX's process index and count."""
  if not config.jax_distributed:
    return config.worker_spec()
  import jax

  jax.distributed.initialize()  # public API; finds the TPU slice's processes itself
  return workers.WorkerSpec(jax.process_index(), jax.process_count(), "jax.distributed")


def _run(config: ExtractConfig, worker: control.Worker, clock: control.Clock,
         log: Callable[[str], None], cache: str) -> Summary:
  from cbir_jax.job import finish, plan as planning, steps

  summary = Summary(output=str(config.output), worker=worker.index, compilation_cache=cache)
  hits, misses = jit_cache.counts()
  plan = planning.plan_job(config, worker, log)
  clock.charge("startup")
  summary.resize = plan.manifest.settings.resize
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
    _count_cache(summary, hits, misses)  # for the run info, before the manifest is sealed
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
    summary.phases, summary.seconds = dict(clock.seconds), clock.total
    _count_cache(summary, hits, misses)
    if plan.update is not None:
      summary.reused, summary.update_line = plan.update.report.reused, plan.update.report.line()
    if plan.lock:
      plan.lock.close()
  return summary


def _count_cache(summary: Summary, hits: int, misses: int) -> None:
  now_hits, now_misses = jit_cache.counts()
  summary.cache_hits, summary.cache_misses = now_hits - hits, now_misses - misses


def _who(worker: control.Worker) -> str:
  return "the job" if worker.count == 1 else f"worker {worker.index} of {worker.count}"


def main(config: ExtractConfig, *, started: float | None = None) -> int:
  """Runs this worker as launch/extract.py does and returns its exit status.

  0: this worker's part done (the summary line on stdout; the whole job is finished when
  every worker's is). 1: an error, one line "extract: error: ..." on stderr. 130: stopped by
  SIGINT/SIGTERM (finished rows kept; rerun to continue). Workers never wait for each
  other: one that fails, dies or hangs stops no other.
  """
  worker = None
  try:
    config.check()
    worker = control.Worker(_worker_spec(config), _log)
    with worker:
      summary = run(config, started=started, worker=worker)
  except Interrupted as e:
    print(f"extract: {e}", file=sys.stderr, flush=True)
    return e.exit_code
  except KeyboardInterrupt:  # a second signal, or one outside the steps: nothing is lost
    why = worker.at_once if worker is not None else ""
    print(f"extract: stopped at once ({why or 'interrupted'}); {control.HINT}", file=sys.stderr,
          flush=True)
    return control.EXIT_INTERRUPTED
  except ExtractError as e:
    print(f"extract: error: {e}", file=sys.stderr, flush=True)
    return e.exit_code
  _log(summary.details())
  print(summary.line(), flush=True)
  return 0


def _report_plan(plan, worker: control.Worker, log: Callable[[str], None]) -> None:
  if worker.count > 1:
    log(worker.spec.line())
  if worker.index == 0:
    labels = plan.source.labels_report
    for line in plan.source.notes + (labels.lines() if labels is not None else []):
      log(line)
  if plan.done:
    log(f"{plan.out} is complete and up to date with its input; nothing to do")
  elif plan.skipped:
    log(f"{_who(worker)}: {plan.skipped} shard(s) already complete, "
        f"{len(plan.units)} to go")


__all__ = ["ExtractConfig", "ExtractError", "Interrupted", "Summary", "main", "random_params",
           "run"]
