"""`--update`: keep the rows of unchanged records, extract the others, build the next generation.

The next generation is built beside the current one (gen-NNNNNN/: delta/ holds the records
read again, shards/ the assembled result) and becomes current only when the manifest is
switched at the very end, so the previous output stays whole and readable until then.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import shutil
from typing import Callable, Mapping, Sequence

import numpy as np

from cbir_jax import meta_columns, store
from cbir_jax.job import identity as ident
from cbir_jax.job.errors import ExtractError
from cbir_jax.job.sources import LISTED_TYPES, Source
from cbir_jax.manifest import Manifest, UpdateReport


@dataclasses.dataclass(frozen=True)
class RowIndex:
  """Where each record of some shards is: its shard folder and row, or its failure."""
  dirs: list[str]  # shard folders, relative to the output directory
  shard_of: np.ndarray  # [records] index into dirs; -1: not in a complete shard
  row_of: np.ndarray  # [records] row within the shard; -1: the record failed
  failures: dict[int, tuple[str, str]]  # record -> (path, reason)


def row_index(out: pathlib.Path, where: str, num_records: int, *, verify: bool = False
              ) -> RowIndex:
  """Indexes the complete shards in `out/where` (rows by record position); with `verify`
  a shard whose files do not match the SHA-256 in its shard.json is left out, so its records
  are extracted again (reused rows are copied as they are: an update checks them once, when
  it plans)."""
  done = store.complete_shards(out, where)
  dirs, failures = [], {}
  shard_of = np.full(num_records, -1, np.int32)
  row_of = np.full(num_records, -1, np.int64)
  for k in sorted(done):
    d = f"{where}/{store.shard_name(k)}"
    if verify and not store.shard_intact(out / d, done[k]):
      continue
    with np.load(out / d / "meta.npz", allow_pickle=False) as z:
      rows = z["row"].astype(np.int64)
    fails = store.read_failures_json(out / d / "failures.json")
    if any(p < 0 for _, _, p in fails) or (rows >= num_records).any():
      continue  # not of this input's numbering: not reused
    shard_of[rows] = len(dirs)
    row_of[rows] = np.arange(len(rows))
    for path, reason, p in fails:
      shard_of[p], row_of[p], failures[p] = len(dirs), -1, (path, reason)
    dirs.append(d)
  return RowIndex(dirs=dirs, shard_of=shard_of, row_of=row_of, failures=failures)


def _remove_damaged(out: pathlib.Path, where: str) -> None:
  """Deletes shards of `where` whose files differ from their SHA-256, and says to rerun."""
  bad = [k for k, info in sorted(store.complete_shards(out, where).items())
         if not store.shard_intact(out / where / store.shard_name(k), info)]
  for k in bad:
    shutil.rmtree(out / where / store.shard_name(k), ignore_errors=True)
  if bad:
    raise ExtractError(f"{len(bad)} shard(s) of {out / where} did not match their SHA-256 "
                       f"(first: {store.shard_name(bad[0])}; damaged after they were written) "
                       "and were removed; rerun the same command to extract them again")


@dataclasses.dataclass(frozen=True)
class UpdatePlan:
  """Which records of the new input come from the previous generation, which are read again."""
  old: Manifest
  reused_from: np.ndarray  # [new records] old position, or -1: extracted again
  delta: np.ndarray  # new positions extracted again, ascending
  report: UpdateReport


def plan_update(out: pathlib.Path, old: Manifest, old_ids: ident.RecordIdentities,
                source: Source) -> UpdatePlan:
  """Compares identities; unchanged records whose rows (or failures) exist in intact shards
  of the current generation are reused."""
  diff = ident.compare(old_ids, source.identities)
  have = row_index(out, old.path(store.SHARDS), len(old_ids), verify=True)
  reused_from = np.full(source.num_records, -1, np.int64)
  ok = have.shard_of[diff.kept_old] >= 0
  reused_from[diff.kept_new[ok]] = diff.kept_old[ok]
  delta = np.flatnonzero(reused_from < 0).astype(np.int64)
  ex = {name: ident.examples(keys, pos) for name, keys, pos in (
      ("added", source.identities.keys, diff.added), ("removed", old_ids.keys, diff.removed),
      ("changed", source.identities.keys, diff.changed))}
  report = UpdateReport(
      from_generation=old.generation, reused=int(ok.sum()), extracted=len(delta),
      added=len(diff.added), removed=len(diff.removed), changed=len(diff.changed),
      root_moved_from=old.input.root if old.input.root != source.root else "",
      labels_changed=old.input.labels_sha256 != source.labels_sha256, examples=ex)
  return UpdatePlan(old=old, reused_from=reused_from, delta=delta, report=report)


class _ShardCache:
  """Recently used shards' metadata and memory-mapped arrays (assembly reads them in order)."""

  def __init__(self, out: pathlib.Path, kinds: int, size: int = 4):
    self.out = out
    self.meta = functools.lru_cache(size)(self._meta)
    self.array = functools.lru_cache(size * kinds)(self._array)

  def _meta(self, d: str) -> dict[str, np.ndarray]:
    with np.load(self.out / d / "meta.npz", allow_pickle=False) as z:
      return {c: z[c] for c in z.files}

  def _array(self, d: str, kind: str) -> np.ndarray:
    return np.load(self.out / d / f"{kind}.npy", mmap_mode="r", allow_pickle=False)


@dataclasses.dataclass(frozen=True)
class _Origins:
  """Where the records of one new shard come from."""
  positions: np.ndarray  # new record positions
  dirs: np.ndarray  # str: shard folder of each record
  rows: np.ndarray  # row in that shard; -1: the record failed
  failures: list[tuple[str, str, int]]  # (stored path, reason, new position)


def _origins(plan: UpdatePlan, old: RowIndex, delta: RowIndex, positions: np.ndarray
             ) -> _Origins:
  reused = plan.reused_from[positions]
  dirs, rows, failures = [], np.zeros(len(positions), np.int64), []
  for i, (p, o) in enumerate(zip(positions.tolist(), reused.tolist())):
    idx, q = (old, o) if o >= 0 else (delta, p)
    if idx.shard_of[q] < 0:
      raise ExtractError(f"internal error: record {p} has no row to assemble from; rerun with "
                         "--update to extract it")
    dirs.append(idx.dirs[idx.shard_of[q]])
    rows[i] = idx.row_of[q]
    if rows[i] < 0:
      failures.append((*idx.failures[q], p))
  return _Origins(positions, np.asarray(dirs, dtype=str), rows, failures)


def build_shard(cache: _ShardCache, source: Source, kinds: Sequence[str],
                dims: Mapping[str, int], origins: _Origins) -> store.ShardData:
  """The rows of one new shard, gathered from the old generation and the delta."""
  good = origins.rows >= 0
  dirs, rows = origins.dirs[good], origins.rows[good]
  groups = [(d, np.flatnonzero(dirs == d)) for d in dict.fromkeys(dirs.tolist())]
  arrays = {}
  for kind in kinds:
    dtype = cache.array(groups[0][0], kind).dtype if groups else np.dtype(np.float32)
    a = np.zeros((len(rows), dims[kind]), dtype)
    for d, at in groups:
      a[at] = cache.array(d, kind)[rows[at]]
    arrays[kind] = a
  meta = _gather_meta(cache, source, groups, rows, origins.positions[good])
  folder = source.type in LISTED_TYPES  # failures name records as the input does now
  failures = [(source.keys[p] if folder else path, reason, p)
              for path, reason, p in origins.failures]
  return store.ShardData(arrays, meta, failures)


def _gather_meta(cache: _ShardCache, source: Source, groups: list, rows: np.ndarray,
                 positions: np.ndarray) -> dict[str, np.ndarray]:
  from cbir_jax.job.rows import _meta_arrays
  if not groups:
    return _meta_arrays({c: [] for c in source.columns})
  folder = source.type in LISTED_TYPES
  names = ["width", "height"] if folder else list(cache.meta(groups[0][0]))
  cols = {}
  for c in names:
    typed = meta_columns.common([cache.meta(d)[c][rows[at]] for d, at in groups])
    col = np.empty(len(rows), dtype=np.result_type(*[v.dtype for v in typed]))
    for (_, at), part in zip(groups, typed):
      col[at] = part
    cols[c] = [col]
  cols["row"] = [positions]
  if folder:  # paths, labels and CSV columns as the input is now (moved, relabelled)
    for c, v in source.rows_meta(positions, None, None).items():
      cols[c] = [np.asarray(v)]
  order = source.columns if folder else names
  return _meta_arrays({c: cols[c] for c in order if c in cols})


def assemble(out: pathlib.Path, plan: UpdatePlan, new: Manifest, source: Source,
             log: Callable[[str], None], shard_size: int) -> int:
  """Writes the new generation's shards (skipping complete ones); returns how many it wrote."""
  kinds = list(new.settings.kinds)
  old = row_index(out, plan.old.path(store.SHARDS), plan.old.num_records)  # checked when planned
  _remove_damaged(out, new.path(store.DELTA))
  delta = row_index(out, new.path(store.DELTA), source.num_records)
  where = new.path(store.SHARDS)
  done = store.complete_shards(out, where)
  cache, written = _ShardCache(out, len(kinds)), 0
  for k in range(new.num_shards):
    positions = np.arange(k * shard_size, min((k + 1) * shard_size, source.num_records))
    digest = store.positions_sha256(positions)
    if k in done and done[k].get("positions_sha256") == digest:
      continue
    data = build_shard(cache, source, kinds, new.dimensions,
                       _origins(plan, old, delta, positions))
    store.write_shard(out, k, start=int(positions[0]), stop=int(positions[-1]) + 1,
                      arrays=data.arrays, meta=data.meta, failures=data.failures,
                      where=where, positions_digest=digest)
    written += 1
  if written:
    log(f"update: assembled {written} shard(s) from {plan.report.reused} reused and "
        f"{plan.report.extracted} extracted records")
  return written


__all__ = ["RowIndex", "UpdatePlan", "assemble", "plan_update", "row_index"]
