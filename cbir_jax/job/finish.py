"""Finishing a job: assemble an update's shards, verify and consolidate, switch the manifest.

Process 0 does it alone once every process has written its shards. The manifest switch is
the last write: before it, readers see the previous complete generation; after it, the new
one (whose shards are then removed unless --keep_shards).
"""
from __future__ import annotations

import datetime
import math
import os
import pathlib
from typing import Any, Callable

from cbir_jax import consolidate, store
from cbir_jax.job import update as upd
from cbir_jax.job.control import Clock, Coordinator
from cbir_jax.job.plan import Plan, remove_other_generations
from cbir_jax.manifest import Manifest


def run_info(config: Any, coord: Coordinator) -> dict[str, Any]:
  """How the job ran (not compared on reruns): platform, devices, threads."""
  import jax

  from cbir_jax import input_pipeline, runtime

  devices = jax.devices()
  info = {"platform": jax.default_backend(),
          "device_kinds": sorted({d.device_kind for d in devices}),
          "devices": len(devices), "process_count": coord.process_count,
          "batch_size": config.batch_size,
          "decode": dict(zip(("num_workers", "num_threads"), input_pipeline.decode_parallelism(
              config.num_workers, config.num_threads))),
          "host": os.uname().nodename,
          "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  info.update(runtime.platform_info())
  return info


def write_failures(out: pathlib.Path, m: Manifest, process_count: int) -> None:
  """failures-<p>.tsv for the shards of process p's range; files of other process counts go."""
  per = max(1, math.ceil(len(m.shards) / process_count))
  for p in range(process_count):
    mine = [s.dir for s in m.shards[p * per:(p + 1) * per]]
    store.write_failures(out, mine, p)
  for f in out.glob("failures-*.tsv"):
    n = f.stem.split("-", 1)[1]
    if not (n.isdigit() and int(n) < process_count):
      f.unlink(missing_ok=True)


def finish(plan: Plan, config: Any, coord: Coordinator, clock: Clock, summary: Any,
           log: Callable[[str], None]) -> None:
  """Seals the generation (process 0) once every process is done."""
  coord.barrier("all shards written")
  clock.charge("waiting for other processes")
  if coord.process_index != 0:
    return
  out, m = plan.out, plan.manifest
  if plan.update is not None:
    summary.shards_written += upd.assemble(out, plan.update, m, plan.source, log,
                                           config.shard_size)
    clock.charge("assemble")
  progress = consolidate.FinishProgress(config.progress, log)
  sealed = consolidate.seal(out, m, process_count=coord.process_count,
                            consolidate=config.consolidate, keep_shards=config.keep_shards,
                            progress=progress)
  report = plan.source.labels_report
  sealed = sealed.replace(run=run_info(config, coord),
                          labels=report.to_dict() if report is not None else {})
  write_failures(out, sealed, coord.process_count)
  store.write_manifest(out, sealed)  # the switch
  if plan.update is not None:
    remove_other_generations(out, sealed.base)
  removed = store.remove_shards(out, sealed)
  progress.close(f"verified {len(sealed.shards)} shard(s)"
                 + (f", wrote {sealed.path(store.CONSOLIDATED)}/" if sealed.metadata else "")
                 + ("; shards removed (--keep_shards keeps them)" if removed else ""))
  clock.charge("finish")


__all__ = ["finish", "run_info", "write_failures"]
