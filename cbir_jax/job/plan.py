"""Planning a job: input, weights, settings, agreement, the output directory, the work left.

Everything that can refuse a job happens here, before the first image is read: other
settings, a changed input (unless --update), a locked directory, weights that do not fit.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import shutil
from typing import Any, Callable

import numpy as np

from cbir_jax import backbones, checkpoint, store
from cbir_jax import descriptors as desc
from cbir_jax import weights as weights_lib
from cbir_jax.job import identity as ident
from cbir_jax.job import agreement, sources, update as upd
from cbir_jax.job.control import Coordinator
from cbir_jax.job.errors import ExtractError
from cbir_jax.job.rows import Unit
from cbir_jax.manifest import Manifest, Settings


@dataclasses.dataclass
class Plan:
  """What this process will do."""
  out: pathlib.Path
  source: sources.Source
  loaded: weights_lib.Loaded
  backbone: backbones.Backbone
  image_size: int
  descriptor: desc.DescriptorConfig
  manifest: Manifest  # the generation this run builds or continues
  update: upd.UpdatePlan | None
  units: list[Unit]  # this process' shards still to write, in order
  skipped: int  # this process' shards already complete
  batch_rows: int = 0  # rows per step on this process
  local_steps: int = 0
  global_steps: int = 0
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


def open_source(config: Any) -> sources.Source:
  if config.images:
    return sources.folder_source(config.images, config.labels_csv,
                                 content_digest=config.content_digest)
  return sources.tfds_source(config.tfds, config.data_dir)


def load_weights(config: Any, backbone: backbones.Backbone, image_size: int
                 ) -> weights_lib.Loaded:
  record = weights_lib.record_for(config.model, config.weights, seed=config.seed)
  try:
    return weights_lib.load_recorded(config.model, record, image_size=image_size)
  except checkpoint.WeightsError as e:
    raise ExtractError(f"{e} (or pass --weights=random for random weights)") from None


def resolve_kinds(kinds: tuple[str, ...] | None, backbone: backbones.Backbone,
                  record: Any) -> tuple[str, ...]:
  """The kinds to write: those asked for (checked against the weights), or when none are
  asked every kind the weights can give (no FC kinds from weights without the FC layers)."""
  if not kinds:
    return tuple(k for k in desc.KINDS
                 if record.has_fc_head is not False or k not in desc.FC_KINDS)
  check_kinds(tuple(kinds), backbone, record)
  return tuple(kinds)


def check_kinds(kinds: tuple[str, ...], backbone: backbones.Backbone,
                record: Any) -> None:
  """The one place where descriptor kinds are checked against the weights.

  Weights without the FC layers (a no-top port) cannot give "fc" or "fc_conv";
  `weights.check_kinds` words the refusal (which file would have them).
  """
  if record.has_fc_head is not False:
    return
  info = checkpoint.WeightsInfo(model=backbone.name, preprocessing=backbone.preprocessing,
                                source=record.source, source_file=record.source_file,
                                has_fc=False)
  try:
    weights_lib.check_kinds(info, kinds)
  except checkpoint.WeightsError as e:
    raise ExtractError(str(e)) from None


def _version() -> str:
  from cbir_jax import __version__
  return __version__


def new_manifest(config: Any, source: sources.Source, loaded: weights_lib.Loaded,
                 backbone: backbones.Backbone, image_size: int, kinds: tuple[str, ...]
                 ) -> Manifest:
  """The manifest of a first generation made with these settings (`kinds` resolved)."""
  dcfg = desc.DescriptorConfig(config.threshold, config.relative, config.masks)
  settings = Settings(
      backbone=config.model, weights=loaded.record.identity(),
      preprocessing=loaded.preprocessing.to_dict(), descriptor=dcfg.to_dict(),
      image_size=image_size, kinds=kinds, dtype=config.dtype, output_dtype=config.output_dtype,
      draft=config.draft, shard_size=config.shard_size, package_version=_version(),
      max_pixels=config.max_pixels)
  dims = desc.dimensions(backbone.block_channels, backbone.fc_dim)
  return Manifest(settings=settings, weights=loaded.record,
                  input=source.input_record(store.RECORDS),
                  num_shards=math.ceil(source.num_records / config.shard_size),
                  dimensions={k: int(dims[k]) for k in kinds})


def report_platform(log: Callable[[str], None], *, warn: bool) -> None:
  """One line: the platform and devices this process runs on; with `warn`, another when an
  NVIDIA GPU is visible but JAX runs on the CPU (launchers warn for single-process jobs
  before JAX starts; processes of a multi-process job only know once it has)."""
  from cbir_jax import runtime

  info = runtime.platform_info()
  log(runtime.PlatformInfo.from_dict(info).line())
  if warn:
    runtime.warn_if_gpu_unused(log, backend=info["backend"])


def plan_job(config: Any, coord: Coordinator, log: Callable[[str], None]) -> Plan:
  """Opens everything and decides what this process does; nothing is written before all agree.

  Raises:
    ExtractError: any refusal (this process' or another's), on every process.
  """
  report_platform(log, warn=coord.process_count > 1)
  error = ""
  try:
    backbone = backbones.get(config.model)
    image_size = config.image_size or backbone.image_size
    source = open_source(config)
    loaded = load_weights(config, backbone, image_size)
    kinds = resolve_kinds(config.kinds, backbone, loaded.record)
    target = new_manifest(config, source, loaded, backbone, image_size, kinds)
  except ExtractError as e:
    error = str(e)
  coord.all_started(error, "opening the input and the weights")
  coord.agree(*agreement.fields(config, target, source), records=source.identities,
              noun="files" if source.type == "folder" else "records")
  out = pathlib.Path(config.output)
  lock, (manifest, update, done) = _prepare_all(out, target, source, config, coord, log)
  plan = Plan(out=out, source=source, loaded=loaded, backbone=backbone, image_size=image_size,
              descriptor=desc.DescriptorConfig(config.threshold, config.relative, config.masks),
              manifest=manifest, update=update, units=[], skipped=0, lock=lock, done=done)
  plan.units, plan.skipped = my_units(plan, config.shard_size, coord)
  _lay_out_steps(plan, config, coord, log)
  return plan


def _refusal(out: pathlib.Path, fn: Callable[[], Any]) -> tuple[Any, str]:
  """(fn(), '') or (None, why it failed) for the errors preparing a directory can meet."""
  try:
    return fn(), ""
  except (ExtractError, store.StoreError) as e:
    return None, str(e)
  except (OSError, ValueError) as e:  # e.g. an unreadable output directory
    return None, f"cannot prepare output directory {out}: {type(e).__name__}: {e}"


def _prepare_all(out: pathlib.Path, target: Manifest, source: sources.Source, config: Any,
                 coord: Coordinator, log: Callable[[str], None]) -> tuple[IO[str] | None, Any]:
  """(this process' lock, `prepare`'s answer). Process 0 prepares the directory (it alone
  writes manifests), then the others read what it decided; an error stops every process."""
  first = coord.process_index == 0
  lock, error = _refusal(out, lambda: _lock(out, coord.process_index))
  state = None
  try:
    if first and not error:
      state, error = _refusal(out, lambda: prepare(out, target, source, update=config.update,
                                                   write=True, log=log))
    coord.all_started(error, "preparing the output directory")
    if not first:
      state, error = _refusal(out, lambda: prepare(out, target, source, update=config.update,
                                                   write=False, log=log))
    coord.all_started(error, "reading the prepared output directory")
  except BaseException:
    if lock:
      lock.close()
    raise
  return lock, state


def _lay_out_steps(plan: Plan, config: Any, coord: Coordinator, log: Callable[[str], None]
                   ) -> None:
  """Rows per step on this process, and the steps every process runs (the most any needs)."""
  from cbir_jax import sharding

  plan.batch_rows = sharding.local_batch_size(config.batch_size, sharding.data_mesh())
  plan.local_steps = len(plan.positions()) // plan.batch_rows
  plan.global_steps = coord.max(plan.local_steps)
  if config.shard_size < plan.batch_rows and plan.units:
    log(f"warning: --shard_size={config.shard_size} is smaller than this process' batch of "
        f"{plan.batch_rows} images (batch_size x local devices): most of every step is padding")


def _lock(out: pathlib.Path, pid: int) -> store.DirLock:
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ExtractError(f"cannot prepare output directory {out}: {e}") from e
  return store.lock(out, pid)


# --- deciding what the directory needs --------------------------------------------------------


def prepare(out: pathlib.Path, target: Manifest, source: sources.Source, *, update: bool,
            write: bool, log: Callable[[str], None]
            ) -> tuple[Manifest, upd.UpdatePlan | None, bool]:
  """(the generation to build or continue, the update plan if any, whether all is done).

  With write=False (processes other than 0) only reads what process 0 wrote.
  """
  if not (out / store.MANIFEST).exists():
    if write:
      store.refuse_orphan_shards(out)
      source.identities.save(out / store.RECORDS)  # before the manifest that names it
      store.prepare(out, target)
    return target, None, False
  old = store.load_manifest(out)
  if old.format_version < 2:
    raise ExtractError(f"{out} was written by an earlier cbir_jax (format {old.format_version}) "
                       "that recorded no per-file identities, so it cannot be continued or "
                       "updated safely; write to another --output (it still loads for search)")
  store.check_settings(out, old, target)
  if _same_input(old, target):
    if write:
      remove_other_generations(out, old.base)
      store.remove_shards(out, old)  # a removal that a kill cut short
    return old, None, old.complete
  old_ids = _old_identities(out, old)
  if not update:
    raise ExtractError(changed_input_message(out, old, old_ids, source))
  return _prepare_update(out, old, old_ids, target, source, write, log)


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
                    target: Manifest, source: sources.Source, write: bool,
                    log: Callable[[str], None]
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
    elif write:
      shutil.rmtree(build)  # an update of another input, never switched to: start over
  plan = upd.plan_update(out, old, old_ids, source, verify=write)
  target = target.replace(update=plan.report)
  if write:
    remove_other_generations(out, old.base, keep=(base,))
    if not (build / store.MANIFEST).exists():
      build.mkdir(parents=True, exist_ok=True)
      source.identities.save(build / store.RECORDS)
      store.write_manifest(build, target)
    log(plan.report.line())
  return target, plan, False


def remove_other_generations(out: pathlib.Path, current: str, keep: tuple[str, ...] = ()
                             ) -> None:
  """Deletes generations the manifest no longer names (left by a switch cut short)."""
  for d in out.glob("gen-*"):
    if d.name != current and d.name not in keep and d.is_dir():
      shutil.rmtree(d, ignore_errors=True)
  if current:  # the first generation lives at the top; an update's build files are done with
    for name in (store.SHARDS, store.CONSOLIDATED):
      shutil.rmtree(out / name, ignore_errors=True)
    (out / store.RECORDS).unlink(missing_ok=True)
    shutil.rmtree(out / current / store.DELTA, ignore_errors=True)
    (out / current / store.MANIFEST).unlink(missing_ok=True)


# --- this process' share of the work ---------------------------------------------------------


def my_units(plan: Plan, shard_size: int, coord: Coordinator) -> tuple[list[Unit], int]:
  """This process' shards still to write (a contiguous range), resuming stopped ones."""
  m = plan.manifest
  if plan.update is not None:
    positions, where = plan.update.delta, m.path(store.DELTA)
  else:
    positions, where = np.arange(plan.source.num_records, dtype=np.int64), m.path(store.SHARDS)
  count = math.ceil(len(positions) / shard_size)
  per = math.ceil(count / coord.process_count)
  mine = range(coord.process_index * per, min((coord.process_index + 1) * per, count))
  if plan.done:  # complete (its shards may be removed): nothing to look at
    return [], len(mine)
  done = store.complete_shards(plan.out, where)
  pieces = store.shard_pieces(plan.out, where)
  units, skipped = [], 0
  for k in mine:
    pos = positions[k * shard_size:(k + 1) * shard_size]
    digest = store.positions_sha256(pos)
    if k in done and done[k].get("positions_sha256", digest) in ("", digest):
      skipped += 1
      continue
    unit = Unit(index=k, positions=pos, where=where)
    for n, d, info in reversed(pieces.get(k, [])):  # the longest piece of this plan
      if n < len(pos) and info.get("positions_sha256") == store.positions_sha256(pos[:n]):
        unit.done, unit.piece = n, d
        break
    units.append(unit)
  store.remove_partial(plan.out, list(mine), where, keep=[u.piece for u in units if u.piece])
  return units, skipped


__all__ = ["Plan", "changed_input_message", "check_kinds", "load_weights", "my_units",
           "new_manifest", "open_source", "plan_job", "prepare", "remove_other_generations",
           "report_platform", "resolve_kinds"]
