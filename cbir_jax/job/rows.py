"""Assembling step outputs into shards, on the host (no JAX here: unit-tested with plain arrays).

Each step hands over a fixed-size batch of rows; the assembler checks every valid row is the
record the plan expects next, turns non-finite rows into failures, and hands back finished
shards, or on a stop the finished part of the shard in progress.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from cbir_jax import meta_columns
from cbir_jax.job.errors import ExtractError

META_TYPES = {"row": np.int64, "label": np.int64, "width": np.int32, "height": np.int32}


@dataclasses.dataclass
class Unit:
  """A shard to write: the records it covers and how many a stopped run already wrote."""
  index: int
  positions: np.ndarray  # record positions of the whole shard, in order
  where: str  # its folder in the output (shards/, or an update's delta/)
  done: int = 0  # records at the start already written as a piece (`piece`)
  piece: pathlib.Path | None = None

  @property
  def todo(self) -> np.ndarray:
    return self.positions[self.done:]


@dataclasses.dataclass
class StepRows:
  """One step's rows on the host. `valid` is the only padding mark read."""
  descriptors: Mapping[str, np.ndarray]  # kind -> [B, D]
  positions: np.ndarray  # [B] record positions (padding: anything)
  valid: np.ndarray  # [B] bool
  ok: np.ndarray  # [B] bool: decoded
  error: Sequence[str]
  width: np.ndarray
  height: np.ndarray
  keys: Sequence[str] | None = None  # per row, when the data carries them (TFDS)
  labels: np.ndarray | None = None


class RowSource(Protocol):
  def rows_meta(self, positions: np.ndarray, keys: Sequence[str] | None,
                labels: np.ndarray | None) -> Mapping[str, Sequence[Any]]:
    """Metadata of the records at `positions`: "path", "label", "label_name", extra columns.

    `keys` and `labels` are the rows' own, when the data carries them (TFDS).
    """


@dataclasses.dataclass
class Finished:
  """Rows of a unit to write: complete, or (on a stop) its first `covered` records."""
  unit: Unit
  covered: int  # records of the unit these rows cover, from its start (incl. `unit.done`)
  arrays: dict[str, np.ndarray]
  meta: dict[str, np.ndarray]
  failures: list[tuple[str, str, int]]

  @property
  def complete(self) -> bool:
    return self.covered == len(self.unit.positions)


class ShardAssembler:
  """Collects rows in unit order; `add` returns the units a step completed."""

  def __init__(self, units: Sequence[Unit], *, kinds: Sequence[str], dims: Mapping[str, int],
               out_dtype: Any, source: RowSource, columns: Sequence[str],
               nonfinite_reason: str = "descriptor not finite (NaN or overflow)"):
    self._queue = list(units)
    self._kinds, self._dims = tuple(kinds), dict(dims)
    self._dtype = np.dtype(out_dtype)
    self._source, self._columns = source, tuple(columns)
    self._reason = nonfinite_reason
    self.images = self.failed = 0
    self._current: Unit | None = None
    self._filled = 0
    self._reset()

  def _reset(self) -> None:
    self._arrays: dict[str, list[np.ndarray]] = {k: [] for k in self._kinds}
    self._meta: dict[str, list] = {c: [] for c in self._columns}
    self._failures: list[tuple[str, str, int]] = []

  def _next_unit(self) -> Unit | None:
    if self._current is None and self._queue:
      self._current, self._filled = self._queue.pop(0), 0
    return self._current

  @property
  def remaining(self) -> int:
    """Units not finished yet (the one in progress included)."""
    return len(self._queue) + (self._current is not None)

  def add(self, step: StepRows) -> list[Finished]:
    """Takes one step's rows; returns the units they completed, in order.

    Raises:
      ExtractError: a row is not the record the plan expects next (a bug or an
        input that changed under the job: never written).
    """
    rows = {k: self._cast(step.descriptors[k]) for k in self._kinds}
    finite = np.logical_and.reduce([np.isfinite(r).all(axis=1) for r in rows.values()])
    good = np.asarray(step.ok, bool) & finite
    valid = np.flatnonzero(step.valid)
    out, i = self._flush_empty(), 0
    while i < len(valid):
      unit = self._next_unit()
      if unit is None:
        raise ExtractError(f"internal error: step row holds record {int(step.positions[valid[i]])}"
                           " after every planned shard is complete; nothing of it was written")
      take = min(len(valid) - i, len(unit.todo) - self._filled)
      idx = valid[i:i + take]
      want = unit.todo[self._filled:self._filled + take]
      got = np.asarray(step.positions)[idx]
      if not np.array_equal(got, want):
        bad = int(np.flatnonzero(got != want)[0])
        raise ExtractError(f"internal error: step row holds record {int(got[bad])}, the plan "
                           f"expects {int(want[bad])}; nothing of it was written")
      self._take(step, idx, rows, good[idx])
      self._filled += take
      i += take
      if self._filled == len(unit.todo):
        out.append(self._emit(len(unit.positions)))
        out += self._flush_empty()
    return out

  def _cast(self, a: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes a failure below
      return np.asarray(a).astype(self._dtype)

  def _take(self, step: StepRows, idx: np.ndarray, rows: Mapping[str, np.ndarray],
            good: np.ndarray) -> None:
    pos = np.asarray(step.positions)[idx].astype(np.int64)
    keys = [step.keys[j] for j in idx] if step.keys is not None else None
    labels = np.asarray(step.labels)[idx] if step.labels is not None else None
    meta = self._source.rows_meta(pos, keys, labels)
    for n in np.flatnonzero(~good):
      j = idx[n]
      reason = step.error[j] if not step.ok[j] else self._reason
      self._failures.append((str(meta["path"][n]), reason or "unknown error", int(pos[n])))
    self.failed += int((~good).sum())
    self.images += int(good.sum())
    keep = idx[good]
    for k in self._kinds:
      self._arrays[k].append(rows[k][keep])
    values = dict(meta, row=pos, width=np.asarray(step.width)[idx],
                  height=np.asarray(step.height)[idx])
    for c in self._columns:
      col = values.get(c)
      if col is None:
        self._meta[c].append(np.full(int(good.sum()), ""))
      elif c in META_TYPES:
        self._meta[c].append(np.asarray(col)[good])
      else:  # typed from the values themselves: np.asarray would turn [True, 2] into ints
        self._meta[c].append(meta_columns.column(col)[good])

  def _flush_empty(self) -> list[Finished]:
    """Units with nothing left to read (all written as a piece before a stop)."""
    out = []
    while (u := self._next_unit()) is not None and not len(u.todo):
      out.append(self._emit(len(u.positions)))
    return out

  def _emit(self, covered: int) -> Finished:
    unit = self._current
    assert unit is not None
    arrays = {k: (np.concatenate(v) if v else np.zeros((0, self._dims[k]), self._dtype))
              for k, v in self._arrays.items()}
    done = Finished(unit=unit, covered=covered, arrays=arrays, meta=_meta_arrays(self._meta),
                    failures=self._failures)
    self._current = None
    self._reset()
    return done

  def stop(self) -> Finished | None:
    """On a stop: the finished part of the unit in progress (None if it has no new rows)."""
    unit = self._current
    if unit is None or self._filled == 0:
      return None
    return self._emit(unit.done + self._filled)


def _meta_arrays(cols: Mapping[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
  """Each column's parts joined: the job's own columns in their types, the others bool,
  int64, float64 when every value is one, else text (`meta_columns`; no pickle needed)."""
  out = {}
  for c, parts in cols.items():
    if c in META_TYPES:
      v = np.concatenate([np.asarray(p) for p in parts]) if parts else np.zeros(0)
      out[c] = v.astype(META_TYPES[c]).reshape(-1)
    else:
      out[c] = meta_columns.join([meta_columns.column(p) for p in parts])
  return out


def concat(parts: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]
           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Joins (arrays, meta) parts row-wise (a piece and the rest of its shard)."""
  arrays = {k: np.concatenate([a[k] for a, _ in parts]) for k in parts[0][0]}
  meta = {}
  for c in parts[0][1]:
    cols = [m[c] for _, m in parts]
    meta[c] = meta_columns.join(cols) if any(len(x) for x in cols) else cols[0]
  return arrays, meta


__all__ = ["Finished", "RowSource", "ShardAssembler", "StepRows", "Unit", "concat"]
