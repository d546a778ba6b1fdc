"""Planning a job: input, weights, settings, agreement, the output directory, the work left.

Everything that can refuse a job happens here, before the first image is read: other
settings, a changed input (unless --update), a locked directory, weights that do not fit.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import shutil
from typing import Any, Callable

import numpy as np

from cbir_jax import backbones, checkpoint, store
from cbir_jax import descriptors as desc
from cbir_jax import weights as weights_lib
from cbir_jax.job import identity as ident
from cbir_jax.job import sources, update as upd
from cbir_jax.job.config import ExtractConfig
from cbir_jax.job.control import Worker
from cbir_jax.job.errors import ExtractError, reworded
from cbir_jax.job.rows import Unit
from cbir_jax.job.workers import shard_range
from cbir_jax.manifest import Manifest, Settings


@dataclasses.dataclass
class Plan:
  """What this worker will do."""
  out: pathlib.Path
  source: sources.Source
  loaded: weights_lib.Loaded
  backbone: backbones.Backbone
  image_size: int
  descriptor: desc.DescriptorConfig
  manifest: Manifest  # the generation this run builds or continues
  update: upd.UpdatePlan | None
  units: list[Unit]  # this worker's shards still to write, in order
  skipped: int  # this worker's shards already complete
  batch_rows: int = 0  # rows per step on this worker
  local_steps: int = 0
  lock: store.DirLock | None = None
  done: bool = False  # the output is complete and up to date: nothing to do

  @property
  def kinds(self) -> tuple[str, ...]:
    return self.manifest.settings.kinds

  def positions(self) -> np.ndarray:
    """Record positions of every step, each shard padded to whole steps (-1: padding)."""
    parts = []
    for u in self.units:
      parts += [u.todo, np.full(-len(u.todo) % self.batch_rows, -1, np.int64)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def open_source(config: ExtractConfig) -> sources.Source:
  if config.webdataset:
    # Shard listings kept in the output: other workers and reruns list only new shards.
    cache = str(pathlib.Path(config.output) / store.WEBDATASET_CACHE)
    return sources.webdataset_source(config.webdataset, content_digest=config.content_digest,
                                     cache_dir=cache)
  if config.file_list:
    return sources.file_list_source(config.file_list, config.labels_csv,
                                    content_digest=config.content_digest)
  if config.images:
    refuse_output_inside(config.output, config.images)
    return sources.folder_source(config.images, config.labels_csv,
                                 content_digest=config.content_digest)
  return sources.tfds_source(config.tfds, config.data_dir)


def refuse_output_inside(output: str, images: str) -> None:
  """Refuses an --output inside --images: a rerun would list the output's files as input."""
  out, root = os.path.realpath(output), os.path.realpath(images)
  if os.path.commonpath([out, root]) == root:
    raise ExtractError(f"--output {output} is inside --images {images}: the index's files "
                       "would be read as input by the next run; write it outside the folder")


def load_weights(config: ExtractConfig, backbone: backbones.Backbone, image_size: int
                 ) -> weights_lib.Loaded:
  record = weights_lib.record_for(config.model, config.weights, seed=config.seed)
  try:
    return weights_lib.load_recorded(config.model, record, image_size=image_size)
  except checkpoint.WeightsError as e:
    raise ExtractError(f"{e} (or pass --weights=random for random weights)") from None


def resolve_kinds(kinds: tuple[str, ...] | None, backbone: backbones.Backbone,
                  record: Any) -> tuple[str, ...]:
  """The kinds to write: those asked for, or when none are asked every kind the weights can
  give. The one place where descriptor kinds are checked against the weights: weights without
  the FC layers (a no-top port) cannot give "fc" or "fc_conv", and `weights.check_kinds`
  words the refusal (which file would have them).
  """
  if record.has_fc_head is not False:
    return tuple(kinds or desc.KINDS)
  if not kinds:
    return tuple(k for k in desc.KINDS if k not in desc.FC_KINDS)
  info = checkpoint.WeightsInfo(model=backbone.name, preprocessing=backbone.preprocessing,
                                source=record.source, source_file=record.source_file,
                                has_fc=False)
  with reworded(checkpoint.WeightsError):
    weights_lib.check_kinds(info, kinds)
  return tuple(kinds)


def new_manifest(config: ExtractConfig, source: sources.Source, loaded: weights_lib.Loaded,
                 backbone: backbones.Backbone, image_size: int, kinds: tuple[str, ...]
                 ) -> Manifest:
  """The manifest of a first generation made with these settings (`kinds` resolved; --resize
  resolved on this process' platform)."""
  import jax

  from cbir_jax import __version__, resize
  dcfg = desc.DescriptorConfig(config.threshold, config.relative, config.masks)
  settings = Settings(
      backbone=config.model, weights=loaded.record.identity(),
      preprocessing=loaded.preprocessing.to_dict(), descriptor=dcfg.to_dict(),
      image_size=image_size, kinds=kinds, dtype=config.dtype, output_dtype=config.output_dtype,
      draft=config.draft, shard_size=config.shard_size, package_version=__version__,
      max_pixels=config.max_pixels, resize=resize.resolve(config.resize, jax.default_backend()))
  dims = desc.dimensions(backbone.block_channels, backbone.fc_dim)
  return Manifest(settings=settings, weights=loaded.record,
                  input=source.input_record(store.RECORDS),
                  num_shards=math.ceil(source.num_records / config.shard_size),
                  dimensions={k: int(dims[k]) for k in kinds})


def report_platform(log: Callable[[str], None], *, warn: bool) -> None:
  """One line: the platform and devices this process runs on; with `warn`, another when an
  NVIDIA GPU is visible but JAX runs on the CPU (launchers warn before JAX starts, except
  with --jax_distributed, which must initialize first: its processes only know once it has)."""
  from cbir_jax import runtime

  info = runtime.platform_info()
  log(runtime.PlatformInfo.from_dict(info).line())
  if warn:
    runtime.warn_if_gpu_unused(log, backend=info["backend"])


def plan_job(config: ExtractConfig, worker: Worker, log: Callable[[str], None]) -> Plan:
  """Opens everything and decides what this worker does; nothing is written before the
  output directory agreed (see `prepare`).

  Raises:
    ExtractError: any refusal, naming what differs or what is wrong.
  """
  report_platform(log, warn=config.jax_distributed)
  backbone = backbones.get(config.model)
  image_size = config.image_size or backbone.image_size
  source = open_source(config)
  loaded = load_weights(config, backbone, image_size)
  kinds = resolve_kinds(config.kinds, backbone, loaded.record)
  if not config.kinds and loaded.record.has_fc_head is False:
    log(f"the weights have no FC layers: extracting {', '.join(kinds)} (not "
        f"{', '.join(desc.FC_KINDS)})")
  target = new_manifest(config, source, loaded, backbone, image_size, kinds)
  out = pathlib.Path(config.output)
  plan = Plan(out=out, source=source, loaded=loaded, backbone=backbone, image_size=image_size,
              descriptor=desc.DescriptorConfig(config.threshold, config.relative, config.masks),
              manifest=target, update=None, units=[], skipped=0)
  finished = _refusal(out, lambda: up_to_date(out, target))
  if finished is not None:  # read only: works on a read-only copy, takes no lock
    plan.manifest, plan.done = finished, True
    plan.skipped = len(shard_range(finished.num_shards, worker.spec))
    return plan
  plan.lock = _refusal(out, lambda: _lock(out, f"worker-{worker.index}"))
  try:
    with _refusal(out, lambda: _lock(out, "job", wait=True)):
      plan.manifest, plan.update, plan.done = _refusal(out, lambda: prepare(
          out, target, source, update=config.update, log=log))
    plan.units, plan.skipped = my_units(plan, config.shard_size, worker)
  except BaseException:
    plan.lock.close()
    raise
  _lay_out_steps(plan, config, log)
  return plan


def up_to_date(out: pathlib.Path, target: Manifest) -> Manifest | None:
  """The current manifest when it is complete, of these settings and of this very input."""
  if not (out / store.MANIFEST).is_file():
    return None
  old = store.load_manifest(out)
  if old.complete and old.settings.digest() == target.settings.digest() and _same_input(
      old, target):
    return old
  return None


def _refusal(out: pathlib.Path, fn: Callable[[], Any]) -> Any:
  """fn(), with the errors preparing a directory can meet as one-line ExtractErrors."""
  try:
    return fn()
  except store.StoreError as e:
    raise ExtractError(str(e)) from None
  except (OSError, ValueError) as e:  # e.g. an unreadable output directory
    raise ExtractError(f"cannot prepare output directory {out}: {describe_os_error(e)}"
                       ) from None


def describe_os_error(e: BaseException) -> str:
  """An OSError said plainly ("the disk is full" rather than errno 28's text alone)."""
  import errno
  if isinstance(e, OSError) and e.errno == errno.ENOSPC:
    return f"the disk is full ({e})"
  if isinstance(e, OSError) and e.errno == errno.EROFS:
    return f"the file system is read-only ({e})"
  return f"{type(e).__name__}: {e}"


def _lay_out_steps(plan: Plan, config: ExtractConfig, log: Callable[[str], None]) -> None:
  """Rows per step on this worker (its local devices only) and its number of steps."""
  import jax

  plan.batch_rows = config.batch_size * len(jax.local_devices())
  plan.local_steps = len(plan.positions()) // plan.batch_rows
  if config.shard_size < plan.batch_rows and plan.units:
    log(f"warning: --shard_size={config.shard_size} is smaller than this worker's batch of "
        f"{plan.batch_rows} images (batch_size x local devices): most of every step is padding")


def _lock(out: pathlib.Path, name: str, wait: bool = False) -> store.DirLock:
  out.mkdir(parents=True, exist_ok=True)  # an error here: `_refusal` words it
  return store.lock(out, name, wait=wait)


# --- deciding what the directory needs --------------------------------------------------------


def prepare(out: pathlib.Path, target: Manifest, source: sources.Source, *, update: bool,
            log: Callable[[str], None]) -> tuple[Manifest, upd.UpdatePlan | None, bool]:
  """(the generation to build or continue, the update plan if any, whether all is done).

  Called under the job lock: the first worker writes the manifest (settings and input
  identity), every later one compares with it before writing anything.
  """
  if not (out / store.MANIFEST).exists():
    store.refuse_orphan_shards(out)
    source.identities.save(out / store.RECORDS)  # before the manifest that names it
    store.prepare(out, target)
    return target, None, False
  old = store.load_manifest(out)  # an earlier format is refused there, with how to rebuild
  store.check_settings(out, old, target)
  if _same_input(old, target):
    remove_replaced(out, old)  # a removal that a kill cut short
    return old, None, old.complete
  if old.input.content_digest != target.input.content_digest and not update:
    was, now = (f"--{'' if v else 'no'}content_digest" for v in
                (old.input.content_digest, target.input.content_digest))
    raise ExtractError(f"{out} was made with {was} and this run has {now}: a setting that "
                       f"decides how files are identified, not a change of the input; rerun "
                       f"with {was}, or use another --output")
  old_ids = _old_identities(out, old)
  if not update:
    raise ExtractError(changed_input_message(out, old, old_ids, source))
  return _prepare_update(out, old, old_ids, target, source, log)


def _same_input(old: Manifest, new: Manifest) -> bool:
  a, b = old.input, new.input
  return (a.identity_sha256, a.root, a.type) == (b.identity_sha256, b.root, b.type)


def _old_identities(out: pathlib.Path, old: Manifest) -> ident.RecordIdentities:
  path = out / old.input.records_file
  try:
    return ident.RecordIdentities.load(path)
  except (OSError, ValueError, KeyError) as e:
    raise ExtractError(f"{out}: cannot read the input identities {path} ({e}); write to "
                       "another --output, or delete the directory to start over") from None


def changed_input_message(out: pathlib.Path, old: Manifest, old_ids: ident.RecordIdentities,
                          source: sources.Source) -> str:
  diff = ident.compare(old_ids, source.identities)
  what = ident.describe(diff, old_ids, source.identities)
  parts = [f"{out} holds descriptors of another input: {what}" if what else
           f"{out} holds descriptors of another input"]
  if old.input.root != source.root:
    same = "the same records, " if diff.same_records else ""
    parts.append(f"the input is now {source.root} ({same}the output was made from "
                 f"{old.input.root}: moved or renamed?)")
  else:
    parts.append(f"input {source.root}")
  if old.input.labels_sha256 != source.labels_sha256:
    parts.append("the labels CSV differs")
  return ("; ".join(parts) + ". Rerun with --update to bring the output up to date (rows of "
          "unchanged records are kept, the others extracted), or use another --output.")


def _prepare_update(out: pathlib.Path, old: Manifest, old_ids: ident.RecordIdentities,
                    target: Manifest, source: sources.Source, log: Callable[[str], None]
                    ) -> tuple[Manifest, upd.UpdatePlan, bool]:
  gen = old.generation + 1
  base = store.generation_base(gen)
  target = target.replace(generation=gen, base=base,
                          input=dataclasses.replace(target.input,
                                                    records_file=f"{base}/{store.RECORDS}"))
  build = out / base
  if (build / store.MANIFEST).exists():
    started = store.load_manifest(build)
    if (started.settings.digest() == target.settings.digest()
        and started.input.same_records(target.input)):
      target = started  # an interrupted update of this same input: continue it
    else:
      shutil.rmtree(build)  # our update of another input, never switched to: start over
  elif build.exists():
    raise ExtractError(f"{build} exists but was not made by cbir_jax (no {store.MANIFEST}); "
                       "the update would build the next generation there: move it away")
  plan = upd.plan_update(out, old, old_ids, source)
  target = target.replace(update=plan.report)
  if not (build / store.MANIFEST).exists():
    build.mkdir(parents=True, exist_ok=True)
    source.identities.save(build / store.RECORDS)
    store.write_manifest(build, target)
  log(plan.report.line())
  return target, plan, False


def remove_replaced(out: pathlib.Path, current: Manifest) -> None:
  """Deletes the previous generation's files once `current` replaced it: only the names
  the manifest records the tool made (`replaces`), never anything else in the directory."""
  if not current.complete:
    return
  for name in current.replaces:
    p = out / name
    if name in ("", ".", store.MANIFEST) or name == current.base or ".." in name.split("/"):
      continue
    if p.is_dir() and not p.is_symlink():
      shutil.rmtree(p, ignore_errors=True)
    else:
      p.unlink(missing_ok=True)
  if current.base:  # the build's own manifest: the top-level one is now the record
    (out / current.base / store.MANIFEST).unlink(missing_ok=True)


# --- this process' share of the work ---------------------------------------------------------


def my_units(plan: Plan, shard_size: int, worker: Worker) -> tuple[list[Unit], int]:
  """This worker's shards still to write (a contiguous range), resuming stopped ones."""
  m = plan.manifest
  if plan.update is not None:
    positions, where = plan.update.delta, m.path(store.DELTA)
  else:
    positions, where = np.arange(plan.source.num_records, dtype=np.int64), m.path(store.SHARDS)
  mine = shard_range(math.ceil(len(positions) / shard_size), worker.spec)
  if plan.done:  # complete (its shards may be removed): nothing to look at
    return [], len(mine)
  done = store.complete_shards(plan.out, where)
  pieces = store.shard_pieces(plan.out, where)
  units, skipped = [], 0
  for k in mine:
    pos = positions[k * shard_size:(k + 1) * shard_size]
    digest = store.positions_sha256(pos)
    if k in done and done[k].get("positions_sha256", digest) in ("", digest):
      # Reused as it is (finishing does not re-read descriptor bytes): check it once here.
      d = plan.out / where / store.shard_name(k)
      if store.shard_intact(d, done[k]):
        skipped += 1
        continue
      shutil.rmtree(d, ignore_errors=True)  # damaged since it was written: computed again
    unit = Unit(index=k, positions=pos, where=where)
    for n, d, info in reversed(pieces.get(k, [])):  # the longest piece of this plan
      if n < len(pos) and info.get("positions_sha256") == store.positions_sha256(pos[:n]):
        unit.done, unit.piece = n, d
        break
    units.append(unit)
  store.remove_partial(plan.out, list(mine), where, keep=[u.piece for u in units if u.piece])
  return units, skipped


__all__ = ["Plan", "changed_input_message", "load_weights", "my_units",
           "new_manifest", "open_source", "plan_job", "prepare", "remove_replaced",
           "report_platform", "resolve_kinds"]
