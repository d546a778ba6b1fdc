"""Running the steps: one jitted step per fixed-size batch, rows assembled and written as they come.

A worker runs equally shaped steps on its local devices only (each shard padded to whole
steps), so nothing recompiles and no worker ever waits on another. A stop request ends the
loop before the next step; the finished part of the shard in progress
is written so a rerun continues there. Finished shards are written by one background thread, in
order and one at a time, while the steps go on (on an H100, writing a Lite0 job's shards took
as long as all its device time, 2.2 s each, when done in the loop); the loop waits for the writer
before it ends, stops or writes a stopped part, and the writer's errors surface in the loop.

The loop never waits on the host: batches reach the device ahead of the step and rows come
back behind it, at most IN_FLIGHT steps behind (feed.py, issue 17 item 3). With
`--resize=device` the batches are canvases and the step resizes them (one compile per bucket).
"""
from __future__ import annotations

import collections
import shutil
import time
from typing import Any, Callable

import numpy as np

from cbir_jax import gpu_decode, input_pipeline, store, turbo_decode
from cbir_jax.job import decoding, jit_cache
from cbir_jax.job import feed as feed_lib
from cbir_jax.job import rows as rows_lib
from cbir_jax.job.config import ExtractConfig
from cbir_jax.job.control import Clock, Progress, Worker
from cbir_jax.job.plan import Plan

AHEAD = 2  # batches whose host->device copies are made before the step needs them
IN_FLIGHT = 2  # dispatched steps whose rows are not read yet


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


class StepRunner:
  """The step loop of one worker; counts go to `summary`, times to `clock` (see feed.py)."""

  def __init__(self, plan: Plan, config: ExtractConfig, worker: Worker, clock: Clock, summary: Any,
               log: Callable[[str], None]):
    import jax

    from cbir_jax import canvas, inference, sharding

    self.plan, self.config, self.worker = plan, config, worker
    self.clock, self.summary, self.log = clock, summary, log
    mesh = sharding.data_mesh(jax.local_devices())  # this worker's devices only
    self.in_sharding = sharding.batch_sharding(mesh)
    common = dict(mesh=mesh, preprocessing=plan.loaded.preprocessing, kinds=plan.kinds,
                  config=plan.descriptor, dtype=inference.compute_dtype(config.dtype))
    self.buckets: tuple[int, ...] | None = None
    if plan.manifest.settings.resize == "device":  # resolved: "host" or "device"
      # Canvases in, resized in the step (one compile per bucket).
      self.buckets = canvas.BUCKETS
      self.fn = inference.jit_describe_canvas(plan.backbone, image_size=plan.image_size,
                                              **common)
    else:
      self.fn = inference.jit_describe(plan.backbone, **common)
    self.params = sharding.replicate(plan.loaded.params, mesh)
    self.assembler = rows_lib.ShardAssembler(
        plan.units, kinds=plan.kinds, dims=plan.manifest.dimensions,
        out_dtype=config.output_dtype, source=plan.source, columns=plan.source.columns,
        nonfinite_reason=(f"descriptor not finite (NaN or overflow; compute dtype "
                          f"{config.dtype}, output dtype {config.output_dtype})"))
    # One writer thread, shards in order: a submit waits for the write before it (at most one
    # finished shard waits in memory) and raises its error. Its thread starts with a shard.
    self.writer = feed_lib.Rows(in_flight=1, name="shard-writer")
    self.decoding = decoding.select(config.decoder, plan.source.type)
    description = self.decoding.description
    if self.buckets and self.decoding.decoder is None:
      description += ("; canvases: JPEGs by simplejpeg (libjpeg-turbo, Pillow's draft scale), "
                      "the rest by Pillow" if turbo_decode.available() else
                      f"; canvases: every image by Pillow ({turbo_decode.MISSING})")
    self.tally = gpu_decode.DecoderTally(description)
    self.timeline = feed_lib.DeviceTimeline()
    self.bucket_steps: collections.Counter = collections.Counter()
    self.compiles = jit_cache.CompileCounter()

  def _put(self, batch: input_pipeline.Batch) -> tuple[Any, ...]:
    """On the feed thread: starts the batch's host->device copies, split as the step takes it."""
    import jax

    args = (batch.images, batch.sizes) if self.buckets else (batch.images,)
    return jax.device_put(args, self.in_sharding)

  def _consume(self, batch: input_pipeline.Batch, result: Any, dispatched: float,
               progress: Progress) -> None:
    """On the rows thread, in step order: waits for the step, assembles rows, hands shards on."""
    for k in self.plan.kinds:
      result[k].block_until_ready()
    self.timeline.step(dispatched, time.perf_counter())
    # The step has read its canvases (a CPU device array may alias them): the stream may
    # decode later batches into them now.
    batch.recycle()
    rows = {k: np.asarray(result[k]) for k in self.plan.kinds}  # local mesh: all addressable
    finished = self.assembler.add(rows_lib.StepRows(
        descriptors=rows, positions=batch.index, valid=batch.valid, ok=batch.ok,
        error=batch.error, width=batch.width, height=batch.height, keys=batch.key,
        labels=batch.label))
    self.summary.images, self.summary.failed = self.assembler.images, self.assembler.failed
    progress.update(int(np.count_nonzero(batch.valid)))
    if batch.decoders is not None:  # canvas mode: per row, simplejpeg or Pillow and why
      self.tally.add(batch.decoders, batch.routes)
    elif self.decoding.decoder is None:  # the Pillow stream: every record read is Pillow's
      n = int(np.count_nonzero(batch.valid))
      self.tally.add([gpu_decode.PILLOW] * n, [""] * n)
    for f in finished:
      self.writer.submit(self._write, f)  # waits only while the shard before is being written

  def _write(self, f: rows_lib.Finished) -> None:
    """On the writer thread."""
    write_finished(self.plan.out, f, self.plan.kinds, self.worker.index)
    self.summary.shards_written += 1

  def run(self) -> str | None:
    """Runs every step of this worker; returns None when it finished its shards, else why
    it stopped early (SIGINT/SIGTERM; the rows written so far are kept)."""
    plan, config = self.plan, self.config
    positions = plan.positions()
    if self.decoding.decoder is not None:  # nvImageCodec, a batch at a time
      batches = decoding.nv_batches(
          plan.source.keys, positions, decoder=self.decoding.decoder, tally=self.tally,
          batch_size=plan.batch_rows, image_size=plan.image_size, draft=config.draft,
          max_pixels=config.max_pixels, buckets=self.buckets)
    else:
      batches = plan.source.batches(positions, batch_size=plan.batch_rows,
                                    image_size=plan.image_size, num_threads=config.num_threads,
                                    num_workers=config.num_workers, draft=config.draft,
                                    max_pixels=config.max_pixels, buckets=self.buckets)
    feeder = feed_lib.Feed(batches, plan.local_steps, self._put, ahead=AHEAD)
    rows = feed_lib.Rows(in_flight=IN_FLIGHT)
    try:
      return self._steps(feeder, rows, positions)
    finally:  # decode threads, worker processes and writes never outlive the steps
      feeder.close()  # before the stream: its thread reads the stream
      rows.close()
      # Ends the input early and at once (a suspended tf.data generator is otherwise torn down
      # whenever garbage collection reaches it, which was seen to take tens of seconds).
      getattr(batches, "close", lambda: None)()
      self.writer.close()
      self.summary.buckets = {int(b): n for b, n in sorted(self.bucket_steps.items())}
      self.summary.decoder = self.tally.to_dict()

  def _steps(self, feeder: feed_lib.Feed, rows: feed_lib.Rows, positions: np.ndarray
             ) -> str | None:
    plan, config = self.plan, self.config
    progress = Progress(int(np.count_nonzero(positions >= 0)), config.progress,
                        config.log_every_s, self.log)
    self.clock.charge("startup")
    stopped = False
    with self.worker.stepping():
      for step in range(plan.local_steps):
        stop = self.worker.stop_requested
        got = None if stop() else feeder.get(stop=stop)
        self.clock.charge("input")
        if got is None:  # asked to stop, before or while waiting for input (a hung read)
          stopped = True
          break
        batch, args = got
        dispatched = time.perf_counter()
        with self.compiles.watch():
          result = self.fn(self.params, *args)
        if step == 0:  # the first call compiles (or loads the persistent cache) before it runs
          self.clock.charge("compile")
          dispatched = time.perf_counter()
        for k in plan.kinds:  # the copies back start now; the rows thread reads them later
          result[k].copy_to_host_async()
        if self.buckets:
          self.bucket_steps[batch.bucket] += 1
        rows.submit(self._consume, batch, result, dispatched, progress)
        self.clock.charge("device")  # dispatching, and waiting for the step before last
      rows.drain()
      self.clock.charge("device")
      self.writer.drain()
      self.clock.charge("write")
      self.summary.device_busy = self.timeline.busy_in(self.clock.spans)
      left = self.assembler.remaining  # units not complete (the stopped one included)
      if stopped:
        self._write_stopped_part()
      progress.close()
      self.clock.charge("input")
      self.summary.compiles = self.compiles.count
      return self.worker.stop_reason if stopped and left else None

  def _write_stopped_part(self) -> None:
    part = self.assembler.stop()
    if part is not None:
      write_finished(self.plan.out, part, self.plan.kinds, self.worker.index)
      self.clock.charge("write")


__all__ = ["StepRunner", "write_finished"]
