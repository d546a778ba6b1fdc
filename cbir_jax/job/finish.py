"""Finishing a job: assemble an update's shards, list them as the index, switch the manifest.

Done once, under the job lock, by the worker that finds every shard written when its own
are (the last to finish), or by a `--finish` run. The manifest switch is the last write:
before it, readers see the previous complete generation; after it, the new one.
"""
from __future__ import annotations

import datetime
import math
import os
import pathlib
from typing import Any, Callable

from cbir_jax import consolidate, store
from cbir_jax.job import update as upd
from cbir_jax.job.config import ExtractConfig
from cbir_jax.job.control import Clock, Worker
from cbir_jax.job.plan import Plan, remove_replaced
from cbir_jax.manifest import Manifest


def run_info(config: ExtractConfig, worker: Worker, summary: Any) -> dict[str, Any]:
  """How the job ran (not compared on reruns): platform, devices, threads; from the finishing
  worker's `summary`, its canvas buckets (device resize), compilation cache use and decoder."""
  import jax

  from cbir_jax import input_pipeline, runtime

  devices = jax.devices()
  return {"platform": jax.default_backend(),
          "device_kinds": sorted({d.device_kind for d in devices}),
          "devices": len(devices), "workers": worker.count,
          "batch_size": config.batch_size,
          "decode": dict(zip(("num_workers", "num_threads"), input_pipeline.decode_parallelism(
              config.num_workers, config.num_threads))),
          "host": os.uname().nodename,
          "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          **runtime.platform_info(),
          "resize": {"mode": summary.resize,
                     "buckets": {str(b): n for b, n in sorted(summary.buckets.items())}},
          "compilation_cache": {"used": bool(summary.compilation_cache),
                                "hits": summary.cache_hits, "misses": summary.cache_misses},
          "decoder": summary.decoder}


def missing_shards(out: pathlib.Path, plan: Plan, shard_size: int) -> list[int]:
  """Shards of the generation being built that no worker has written yet."""
  if plan.update is not None:
    where, count = plan.manifest.path(store.DELTA), len(plan.update.delta)
  else:
    where, count = plan.manifest.path(store.SHARDS), plan.source.num_records
  done = store.complete_shards(out, where)
  return [k for k in range(math.ceil(count / shard_size)) if k not in done]


def _already_switched(out: pathlib.Path, m: Manifest) -> bool:
  try:
    now = store.load_manifest(out)
  except store.StoreError:
    return False
  return now.complete and now.base == m.base and now.generation == m.generation


def finish(plan: Plan, config: ExtractConfig, worker: Worker, clock: Clock, summary: Any,
           log: Callable[[str], None]) -> list[int]:
  """Seals the generation if every shard is written; returns the shards still missing
  (then another worker, still running or to be rerun, finishes the job)."""
  out, m = plan.out, plan.manifest
  with store.lock(out, "job", wait=True):
    clock.charge("waiting for other workers")
    if _already_switched(out, m):  # another worker finished it a moment ago
      return []
    missing = missing_shards(out, plan, config.shard_size)
    if missing:
      return missing
    _seal(plan, config, worker, clock, summary, log)
  return []


def _seal(plan: Plan, config: ExtractConfig, worker: Worker, clock: Clock, summary: Any,
          log: Callable[[str], None]) -> None:
  out, m = plan.out, plan.manifest
  if plan.update is not None:
    summary.shards_written += upd.assemble(out, plan.update, m, plan.source, log,
                                           config.shard_size)
    clock.charge("assemble")
  progress = consolidate.FinishProgress(config.progress, log)
  sealed = consolidate.seal(out, m, workers=worker.count, progress=progress)
  report = plan.source.labels_report
  sealed = sealed.replace(run=run_info(config, worker, summary),
                          labels=report.to_dict() if report is not None else {},
                          replaces=plan.update.old.made if plan.update is not None else ())
  store.write_manifest(out, sealed)  # the switch
  remove_replaced(out, sealed)
  progress.close(f"{len(sealed.shards)} shard(s) listed as the index "
                 f"({sealed.rows} rows, {len(sealed.parts)} kind(s))")
  clock.charge("finish")


__all__ = ["finish", "missing_shards", "run_info"]
