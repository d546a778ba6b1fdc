"""Running the steps: one jitted step per fixed-size batch, rows assembled and written as they come.

A worker runs equally shaped steps on its local devices only (each shard padded to whole
steps), so nothing recompiles and no worker ever waits on another. A stop request ends the
loop before the next step; the finished part of the shard in progress
is written so a rerun continues there. Finished shards are written by one background thread, in
order and one at a time, while the steps go on (on an H100, writing a Lite0 job's shards took
as long as all its device time, 2.2 s each, when done in the loop); the loop waits for the writer
before it ends, stops or writes a stopped part, and the writer's errors surface in the loop.
"""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import time
from typing import Any, Callable

import numpy as np

from cbir_jax import input_pipeline, store
from cbir_jax.job import rows as rows_lib
from cbir_jax.job.config import ExtractConfig
from cbir_jax.job.control import Clock, Progress, Worker
from cbir_jax.job.plan import Plan

# Test-only: seconds to sleep per step, so kill/interrupt tests can land mid-job.
STEP_DELAY_ENV = "CBIR_JAX_TEST_STEP_DELAY_S"


def write_finished(out: Any, f: rows_lib.Finished, kinds: tuple[str, ...], pid: int) -> None:
  """Writes a finished shard, or the finished part of a stopped one, joined to its earlier part."""
  arrays, meta, failures = f.arrays, f.meta, f.failures
  if f.unit.piece is not None:
    prev = store.read_shard(f.unit.piece, kinds)
    arrays, meta = rows_lib.concat([(prev.arrays, prev.meta), (arrays, meta)])
    failures = prev.failures + failures
  pos = f.unit.positions[:f.covered]
  store.write_shard(out, f.unit.index, start=int(pos[0]), stop=int(pos[-1]) + 1, arrays=arrays,
                    meta=meta, failures=failures, process_index=pid, where=f.unit.where,
                    name=None if f.complete else store.piece_name(f.unit.index, f.covered),
                    records=f.covered, positions_digest=store.positions_sha256(pos))
  if f.unit.piece is not None:  # joined into the new folder: the old part goes
    shutil.rmtree(f.unit.piece, ignore_errors=True)


class ShardWriter:
  """Writes finished shards on one background thread, in the order given, one at a time.

  `submit` first waits for the write before it (so at most one finished shard waits in
  memory) and raises that write's error; `wait` does the same for the last one. `close`
  waits too, so no write goes on after the step loop, but drops the error: the loop calls
  `wait` on its normal path, so `close` only meets an error while another one (a stop at
  once) is already on its way up.
  """

  def __init__(self, write: Callable[[rows_lib.Finished], None]):
    self._write = write
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
    self._pending: concurrent.futures.Future | None = None

  def submit(self, f: rows_lib.Finished) -> None:
    self.wait()
    self._pending = self._pool.submit(self._write, f)

  def wait(self) -> None:
    pending, self._pending = self._pending, None
    if pending is not None:
      pending.result()

  def close(self) -> None:
    pending, self._pending = self._pending, None
    try:
      if pending is not None:
        concurrent.futures.wait([pending])
    finally:
      self._pool.shutdown(wait=True)


class StepRunner:
  """The step loop of one worker; counts go to `summary`, times to `clock`."""

  def __init__(self, plan: Plan, config: ExtractConfig, worker: Worker, clock: Clock, summary: Any,
               log: Callable[[str], None]):
    import jax

    from cbir_jax import inference, sharding

    self.plan, self.config, self.worker = plan, config, worker
    self.clock, self.summary, self.log = clock, summary, log
    self.mesh = sharding.data_mesh(jax.local_devices())  # this worker's devices only
    self.fn = inference.jit_describe(
        plan.backbone, mesh=self.mesh, preprocessing=plan.loaded.preprocessing,
        kinds=plan.kinds, config=plan.descriptor, dtype=inference.compute_dtype(config.dtype))
    self.params = sharding.replicate(plan.loaded.params, self.mesh)
    self.assembler = rows_lib.ShardAssembler(
        plan.units, kinds=plan.kinds, dims=plan.manifest.dimensions,
        out_dtype=config.output_dtype, source=plan.source, columns=plan.source.columns,
        nonfinite_reason=(f"descriptor not finite (NaN or overflow; compute dtype "
                          f"{config.dtype}, output dtype {config.output_dtype})"))
    self.writer = ShardWriter(self._write)  # its thread starts with the first shard

  def _consume(self, batch: input_pipeline.Batch, result: Any, progress: Progress) -> None:
    rows = {k: np.asarray(result[k]) for k in self.plan.kinds}  # local mesh: all addressable
    self.clock.charge("device")
    finished = self.assembler.add(rows_lib.StepRows(
        descriptors=rows, positions=batch.index, valid=batch.valid, ok=batch.ok,
        error=batch.error, width=batch.width, height=batch.height, keys=batch.key,
        labels=batch.label))
    self.summary.images, self.summary.failed = self.assembler.images, self.assembler.failed
    progress.update(int(np.count_nonzero(batch.valid)))
    self.clock.charge("host")
    for f in finished:
      self.writer.submit(f)  # waits only while the shard before is still being written
    if finished:
      self.clock.charge("write")

  def _write(self, f: rows_lib.Finished) -> None:
    """On the writer thread."""
    write_finished(self.plan.out, f, self.plan.kinds, self.worker.index)
    self.summary.shards_written += 1

  def run(self) -> str | None:
    """Runs every step of this worker; returns None when it finished its shards, else why
    it stopped early (SIGINT/SIGTERM; the rows written so far are kept)."""
    plan, config = self.plan, self.config
    positions = plan.positions()
    batches = plan.source.batches(positions, batch_size=plan.batch_rows,
                                  image_size=plan.image_size, num_threads=config.num_threads,
                                  num_workers=config.num_workers, draft=config.draft,
                                  max_pixels=config.max_pixels)
    try:
      return self._steps(batches, positions)
    finally:  # decode threads, worker processes and writes never outlive the steps
      _close(batches)
      self.writer.close()

  def _steps(self, batches: Any, positions: np.ndarray) -> str | None:
    from cbir_jax import sharding

    plan, config = self.plan, self.config
    progress = Progress(int(np.count_nonzero(positions >= 0)), config.progress,
                        config.log_every_s, self.log)
    delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    self.clock.charge("startup")
    stopped, prev = False, None
    with self.worker.stepping():
      for _ in range(plan.local_steps):
        if self.worker.stop_requested():
          stopped = True
          break
        batch = next(batches)
        self.clock.charge("input")
        if delay:
          time.sleep(delay)
          self.clock.charge("test delay")
        result = self.fn(self.params, sharding.shard_batch(batch.images, self.mesh))
        self.clock.charge("compile" if prev is None else "device")
        if prev is not None:  # the previous step's rows are read while this one runs
          self._consume(*prev, progress)
        prev = (batch, result)
      if prev is not None:
        self._consume(*prev, progress)
      self.writer.wait()
      self.clock.charge("write")
      left = self.assembler.remaining  # units not complete (the stopped one included)
      if stopped:
        self._write_stopped_part()
      progress.close()
      _close(batches)
      self.clock.charge("input")
      self._count_compiles()
      return self.worker.stop_reason if stopped and left else None

  def _write_stopped_part(self) -> None:
    part = self.assembler.stop()
    if part is not None:
      write_finished(self.plan.out, part, self.plan.kinds, self.worker.index)
      self.summary.parts_written += 1
      self.clock.charge("write")
    if self.worker.stop_noticed_at:
      self.summary.stop_s = time.perf_counter() - self.worker.stop_noticed_at

  def _count_compiles(self) -> None:
    try:
      self.summary.compiles = int(self.fn._cache_size())  # pylint: disable=protected-access
    except Exception:  # private API: absent in some jax versions
      pass


def _close(batches: Any) -> None:
  """Ends the input early and at once (a suspended tf.data generator is otherwise torn down
  whenever garbage collection reaches it, which was seen to take tens of seconds)."""
  close = getattr(batches, "close", None)
  if close is not None:
    close()


__all__ = ["ShardWriter", "StepRunner", "write_finished"]
