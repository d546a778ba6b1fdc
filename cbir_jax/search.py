"""Exact L1 nearest-neighbour search (SPEC.md section 3) on the accelerator: the kernel alone.

The database is streamed to the devices in fixed-shape blocks, split over a
"data" mesh axis, and scanned in tiles with a running top-k per device, so
memory stays bounded whatever N is and nothing recompiles between blocks.
Arrays in, arrays out; searching an extraction output is query.py.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from cbir_jax import sharding

# Index given to padded or excluded rows: it loses every tie against a real row.
_NO_INDEX = np.iinfo(np.int32).max
_DEFAULT_BLOCK_BYTES = 256 << 20


class TopK(NamedTuple):
  """Search results, nearest first."""
  distances: np.ndarray  # float32 [Q, k]: L1 / D
  indices: np.ndarray  # int64 [Q, k]: database rows


METHODS = ("loop", "chunks")


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How one search is cut up; every size is fixed for the whole search.

  Attributes:
    tile: database rows each device compares at once.
    query_tile: queries compared at once.
    d_chunk: dimensions summed at once by the "chunks" method.
    block_rows: database rows sent to the devices per step (a multiple of
      devices x tile); the last block is padded and its padding masked.
    method: how |q - x| is summed over the dimension, see `_l1_sums`.
  """
  tile: int
  query_tile: int
  d_chunk: int
  block_rows: int
  method: str = "loop"


def default_method(platform: str) -> str:
  """"loop" on CPUs, "chunks" on accelerators.

  On a CPU, a loop over the dimension that updates a [queries, rows]
  accumulator vectorises along the rows and ran about 4x faster than a
  reduction over the minor axis (notes/c_micro.py); on a GPU or TPU that loop
  would be thousands of tiny kernels, while the chunked reduction fuses into
  one kernel per chunk.
  """
  return "loop" if platform == "cpu" else "chunks"


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def plan(num_queries: int, num_rows: int, dim: int, *, num_devices: int = 1,
         tile: int = 512, query_tile: int = 128, d_chunk: int = 256,
         block_rows: int | None = None, itemsize: int = 4, method: str = "loop") -> Tiling:
  """Chooses tile sizes for Q queries over N rows of D dimensions split over `num_devices`.

  `tile`, `query_tile` and `d_chunk` are upper bounds (see `Tiling`), shrunk for small
  inputs; `block_rows` defaults to as many rows as fit in 256 MiB of the database's dtype
  (`itemsize` bytes per value); `method`: "loop" or "chunks" (see `default_method`).
  """
  for name, v in (("tile", tile), ("query_tile", query_tile), ("d_chunk", d_chunk),
                  ("block_rows", 1 if block_rows is None else block_rows)):
    if v < 1:
      raise ValueError(f"{name} must be >= 1, got {v}")
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  # Small inputs: smaller tiles rather than mostly-padding tiles.
  tile = max(1, min(tile, _round_up(-(-num_rows // num_devices), 8)))
  query_tile = max(1, min(query_tile, num_queries))
  d_chunk = max(1, min(d_chunk, dim))
  step = num_devices * tile
  if block_rows is None:
    block_rows = max(step, (_DEFAULT_BLOCK_BYTES // max(1, dim * itemsize)) // step * step)
  block_rows = min(_round_up(block_rows, step), _round_up(num_rows, step))
  return Tiling(tile=tile, query_tile=query_tile, d_chunk=d_chunk, block_rows=block_rows,
                method=method)


def _prepare_rows(x: jax.Array, tiling: Tiling) -> jax.Array:
  """The layout `_l1_sums` wants for a database tile [T, D] (done once per tile)."""
  return x.T if tiling.method == "loop" else x


def _prepare_queries(q: jax.Array, tiling: Tiling) -> jax.Array:
  """[num_query_tiles, query_tile, D] -> the layout `_l1_sums` wants."""
  return jnp.swapaxes(q, 1, 2) if tiling.method == "loop" else q


def _l1_sums(q: jax.Array, x: jax.Array, tiling: Tiling) -> jax.Array:
  """sum_d |q_i,d - x_j,d| -> [Qt, T] float32, holding at most Qt x T (x d_chunk) values.

  Args:
    q: queries, [D, Qt] for "loop", [Qt, D] for "chunks" (`_prepare_queries`).
    x: database tile, [D, T] for "loop", [T, D] for "chunks" (`_prepare_rows`).
    tiling: the method and d_chunk.
  """
  if tiling.method == "loop":
    # One dimension per step: acc[i, j] += |q[d, i] - x[d, j]|, vectorised over j.
    dim = q.shape[0]

    def body(d: Any, acc: jax.Array) -> jax.Array:
      qd = q[d].astype(jnp.float32)
      xd = x[d].astype(jnp.float32)
      return acc + jnp.abs(qd[:, None] - xd[None, :])

    acc = jnp.zeros((q.shape[1], x.shape[1]), jnp.float32)
    return jax.lax.fori_loop(0, dim, body, acc, unroll=8)

  # "chunks": d_chunk dimensions per step, so even an unfused lowering never
  # holds more than Qt x T x d_chunk values (a fusing compiler holds less).
  dim, d_chunk = q.shape[1], tiling.d_chunk
  n_full, rem = divmod(dim, d_chunk)

  def add_chunk(acc: jax.Array, start: Any, size: int) -> jax.Array:
    qs = jax.lax.dynamic_slice_in_dim(q, start, size, axis=1).astype(jnp.float32)
    xs = jax.lax.dynamic_slice_in_dim(x, start, size, axis=1).astype(jnp.float32)
    return acc + jnp.sum(jnp.abs(qs[:, None, :] - xs[None, :, :]), axis=-1)

  acc = jnp.zeros((q.shape[0], x.shape[0]), jnp.float32)
  if n_full == 1:
    acc = add_chunk(acc, 0, d_chunk)
  elif n_full > 1:
    acc = jax.lax.fori_loop(0, n_full, lambda j, a: add_chunk(a, j * d_chunk, d_chunk), acc)
  if rem:
    acc = add_chunk(acc, n_full * d_chunk, rem)
  return acc


def merge_topk(d: jax.Array, i: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The k smallest (distance, index) pairs along the last axis, ascending.

  A two-key sort, so ties go to the lower index whatever order the candidates
  arrive in (tiles, devices and blocks are merged in any order).
  """
  d, i = jax.lax.sort((d, i), dimension=-1, num_keys=2)
  return d[..., :k], i[..., :k]


def _scan_rows(queries: jax.Array, exclude: jax.Array, rows: jax.Array, first_index: jax.Array,
               num_valid: jax.Array, *, k: int, tiling: Tiling, dim: int
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-k of `rows` (one device's share of a block) for every query.

  Args:
    queries: [Qp, D], Qp a multiple of tiling.query_tile.
    exclude: int32 [Qp]: a global row index each query must not return (-1: none).
    rows: [R, D], R a multiple of tiling.tile.
    first_index: global index of rows[0].
    num_valid: rows[:num_valid] are real; the rest is padding.

  Returns:
    (distances [Qp, k], indices [Qp, k], any non-finite distance among real rows).
  """
  qt, t = tiling.query_tile, tiling.tile
  num_qt = queries.shape[0] // qt
  q_tiles = _prepare_queries(queries.reshape(num_qt, qt, dim), tiling)
  ex_tiles = exclude.reshape(num_qt, qt)
  kk = min(k, t)
  inv_dim = np.float32(1.0 / dim)

  def tile_step(ti: Any, carry: tuple) -> tuple:
    best_d, best_i, bad = carry
    x = _prepare_rows(jax.lax.dynamic_slice_in_dim(rows, ti * t, t, axis=0), tiling)
    local = ti * t + jnp.arange(t, dtype=jnp.int32)
    index = first_index + local
    real = local < num_valid

    def query_step(args: tuple) -> tuple:
      q, ex, bd, bi = args
      dist = _l1_sums(q, x, tiling) * inv_dim
      nonfinite = jnp.any(~jnp.isfinite(dist) & real[None, :])
      keep = real[None, :] & (index[None, :] != ex[:, None])
      dist = jnp.where(keep, dist, jnp.inf)
      neg, pos = jax.lax.top_k(-dist, kk)  # ties: lower position first (documented)
      cand_i = jnp.where(jnp.isinf(neg), _NO_INDEX, index[pos])
      d, i = merge_topk(jnp.concatenate([bd, -neg], axis=1),
                        jnp.concatenate([bi, cand_i], axis=1), k)
      return d, i, nonfinite

    d, i, nonfinite = jax.lax.map(
        query_step, (q_tiles, ex_tiles, best_d.reshape(num_qt, qt, k),
                     best_i.reshape(num_qt, qt, k)))
    return d.reshape(-1, k), i.reshape(-1, k), bad | jnp.any(nonfinite)

  init = (jnp.full((queries.shape[0], k), jnp.inf, jnp.float32),
          jnp.full((queries.shape[0], k), _NO_INDEX, jnp.int32), jnp.zeros((), bool))
  return jax.lax.fori_loop(0, rows.shape[0] // t, tile_step, init)


@functools.lru_cache(maxsize=32)
def _block_fn(mesh: Mesh, k: int, tiling: Tiling, dim: int):
  """Jitted `(queries, exclude, block, offset, num_valid, best_d, best_i) -> merged top-k`.

  The block is split over the mesh's "data" axis; each device keeps its own
  top-k over its rows and the per-device lists are merged with the running
  result of earlier blocks.
  """
  num_devices = mesh.devices.size
  rows_per_device = tiling.block_rows // num_devices
  axis = sharding.DATA_AXIS

  def local(queries, exclude, rows, offset, num_valid):
    dev = jax.lax.axis_index(axis)
    start = dev * rows_per_device  # position of this device's first row in the block
    d, i, bad = _scan_rows(queries, exclude, rows, offset + start, num_valid - start,
                           k=k, tiling=tiling, dim=dim)
    return d[None], i[None], bad[None]

  scan = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(axis), P(), P()),
                       out_specs=(P(axis), P(axis), P(axis)),
                       # Loop carries start replicated and become per-device; the
                       # outputs are declared per-device above, so skip the check.
                       check_vma=False)

  def step(queries, exclude, block, offset, num_valid, best_d, best_i, bad):
    d, i, block_bad = scan(queries, exclude, block, offset, num_valid)
    # [devices, Qp, k] -> [Qp, devices * k], then merge with the earlier blocks.
    d = jnp.concatenate([best_d, jnp.moveaxis(d, 0, 1).reshape(d.shape[1], -1)], axis=1)
    i = jnp.concatenate([best_i, jnp.moveaxis(i, 0, 1).reshape(i.shape[1], -1)], axis=1)
    d, i = merge_topk(d, i, k)
    return d, i, bad | jnp.any(block_bad)

  rep = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(rep, rep, sharding.batch_sharding(mesh), *[rep] * 5),
                 out_shardings=(rep, rep, rep), donate_argnums=(5, 6))


def _nonfinite(database: Any, block_rows: int) -> ValueError:
  """The error for distances that came out NaN or infinite: names the database's first bad
  row, if there is one."""
  for start in range(0, database.shape[0], block_rows):
    bad = ~np.isfinite(np.asarray(database[start:start + block_rows], np.float32)).all(axis=1)
    if bad.any():
      row = start + int(np.flatnonzero(bad)[0])
      return ValueError(f"database contains NaN or infinite values (first at row {row})")
  return ValueError("distances overflowed to infinity (database values too large for float32 "
                    "sums)")


def _host_dtype(database: Any) -> np.dtype:
  """The dtype blocks travel in: half-precision databases stay half on the host and the
  device (half the memory and the bytes moved; `_l1_sums` casts each tile to float32 on
  the device), everything else travels as float32."""
  dtype = getattr(database, "dtype", None)
  # A lazy concatenation of parts may not carry a dtype: its first row tells.
  dtype = np.dtype(dtype) if dtype is not None else np.asarray(database[0:1]).dtype
  return dtype if dtype in (np.dtype(np.float16), np.dtype(jnp.bfloat16)) else np.dtype(np.float32)


def read_block(database: Any, start: int, rows: int, dtype: np.dtype) -> np.ndarray:
  """database[start:start + rows] as a [rows, D] array of `dtype`, zero-padded at the end.

  Only a row slice is asked of the database (a memory-mapped .npy, or a lazy
  concatenation of parts reading just the parts it covers); a slice already of `dtype`
  is not copied.
  """
  part = np.asarray(database[start:start + rows], dtype=dtype)
  if part.shape[0] < rows:  # fixed block shape: pad, and mask via num_valid
    part = np.pad(part, ((0, rows - part.shape[0]), (0, 0)))
  return part


def _check_pair(queries: Any, database: Any) -> tuple[np.ndarray, int, int]:
  """Checked queries and the database's (N, D); clear errors for mismatches."""
  q = np.asarray(queries)
  if q.ndim != 2:
    hint = "; use queries[None] for a single query" if q.ndim == 1 else ""
    raise ValueError(f"queries must be [Q, D], got shape {q.shape}{hint}")
  if q.shape[0] < 1:
    raise ValueError("no queries (Q = 0)")
  if not np.issubdtype(q.dtype, np.number):
    raise ValueError(f"queries must be numeric, got dtype {q.dtype}")
  bad = ~np.isfinite(q.astype(np.float32)).all(axis=1)
  if bad.any():
    raise ValueError(f"queries contain NaN or infinite values (query rows "
                     f"{np.flatnonzero(bad)[:10].tolist()})")
  if len(getattr(database, "shape", ())) != 2:
    raise ValueError(f"database must be [N, D], got shape {getattr(database, 'shape', None)}")
  n, dim = (int(s) for s in database.shape)
  if q.shape[1] != dim:
    raise ValueError(f"query dimension {q.shape[1]} != database dimension {dim}: "
                     "queries and database must be the same descriptor kind")
  return q, n, dim


def l1_topk(queries: Any, database: Any, k: int, *, tile: int = 512, query_tile: int = 128,
            d_chunk: int = 256, block_rows: int | None = None, mesh: Mesh | None = None,
            exclude: Any = None, method: str | None = None) -> TopK:
  """The k nearest database rows of each query under L1 / D (SPEC.md section 3).

  Exact search: distances ascending, ties to the lower database index. The
  database may be a NumPy array, a memory-mapped array (`np.load(...,
  mmap_mode="r")`, `store.load_descriptors`, a lazy concatenation of parts) or
  anything with a shape that gives rows by slicing `x[a:b]`; it is read in blocks
  of `block_rows` rows, each block split over the mesh's devices, so it never has
  to fit on one device (or in host memory). float16 and bfloat16 databases are
  read and sent as they are stored, and cast to float32 on the device.

  Args:
    queries: [Q, D] query descriptors.
    database: [N, D] database descriptors.
    k: results per query, 1 <= k <= N (minus one when excluding).
    tile, query_tile, d_chunk, block_rows: bounds on the work done at once,
      see `Tiling` and `plan`.
    mesh: a mesh with a "data" axis to split the database over; default: all
      local devices.
    method: distance kernel, "loop" or "chunks"; default by platform
      (`default_method`).
    exclude: optional int [Q], a database row per query that must not be
      returned (-1 for none); e.g. the query's own row in evaluation.

  Returns:
    TopK(distances float32 [Q, k], indices int64 [Q, k]).

  Raises:
    ValueError: dimensions differ, k out of range, or NaN/inf in the inputs.
  """
  q, n, dim = _check_pair(queries, database)
  if n >= _NO_INDEX:
    raise ValueError(f"database of {n} rows is too large for int32 indices")
  num_q = q.shape[0]
  ex = np.full(num_q, -1, np.int64) if exclude is None else np.asarray(exclude, np.int64)
  if ex.shape != (num_q,):
    raise ValueError(f"exclude must have one entry per query ({num_q}), got shape {ex.shape}")
  if ((ex < -1) | (ex >= n)).any():
    raise ValueError(f"exclude entries must be -1 or a row in [0, {n}), got {ex.min()}..{ex.max()}")
  limit = n - (1 if (ex >= 0).any() else 0)
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= limit:
    raise ValueError(f"k must be an integer in [1, {limit}] for a database of {n} rows"
                     f"{' with one row excluded per query' if limit < n else ''}, got {k!r}")
  k = int(k)

  mesh = mesh if mesh is not None else sharding.data_mesh(jax.local_devices())
  host_dtype = _host_dtype(database)
  method = method or default_method(mesh.devices.flat[0].platform)
  tiling = plan(num_q, n, dim, num_devices=mesh.devices.size, tile=tile, query_tile=query_tile,
                d_chunk=d_chunk, block_rows=block_rows, itemsize=host_dtype.itemsize,
                method=method)
  fn = _block_fn(mesh, k, tiling, dim)

  qp = _round_up(num_q, tiling.query_tile)
  q_pad = np.pad(q.astype(np.float32), ((0, qp - num_q), (0, 0)))
  ex_pad = np.pad(ex.astype(np.int32), (0, qp - num_q), constant_values=-1)
  # Queries and the running top-k (nothing found yet) on every device; blocks split.
  q_dev, ex_dev, best_d, best_i, bad = jax.device_put(
      (q_pad, ex_pad, np.full((qp, k), np.inf, np.float32), np.full((qp, k), _NO_INDEX, np.int32),
       np.zeros((), bool)), sharding.replicated(mesh))
  block_sharding = sharding.batch_sharding(mesh)

  rows = tiling.block_rows
  for start in range(0, n, rows):
    part = read_block(database, start, rows, host_dtype)
    # Dispatch is asynchronous: the next block is read from disk while this one runs.
    best_d, best_i, bad = fn(q_dev, ex_dev, jax.device_put(part, block_sharding),
                             np.int32(start), np.int32(min(rows, n - start)), best_d, best_i,
                             bad)
  if bool(bad):
    raise _nonfinite(database, rows)
  return TopK(distances=np.asarray(best_d)[:num_q],
              indices=np.asarray(best_i)[:num_q].astype(np.int64))


@functools.lru_cache(maxsize=16)
def _distance_fn(tiling: Tiling, dim: int):
  def tile_distances(queries, rows):
    q_tiles = _prepare_queries(queries.reshape(-1, tiling.query_tile, dim), tiling)
    x = _prepare_rows(rows, tiling)
    d = jax.lax.map(lambda q: _l1_sums(q, x, tiling), q_tiles)
    return d.reshape(queries.shape[0], rows.shape[0]) * np.float32(1.0 / dim)
  return jax.jit(tile_distances)


def l1_distances(queries: Any, database: Any, *, tile: int = 1024, query_tile: int = 128,
                 d_chunk: int = 256, method: str | None = None) -> np.ndarray:
  """Every query-to-row distance (L1 / D), [Q, N] float32, on the default device.

  For evaluation over the full ranking (average precision), where the
  output is Q x N anyway; the database is streamed `tile` rows at a time
  through the same kernel as `l1_topk`, so both give the same values.
  """
  q, n, dim = _check_pair(queries, database)
  method = method or default_method(jax.devices()[0].platform)
  tiling = plan(q.shape[0], n, dim, tile=tile, query_tile=query_tile, d_chunk=d_chunk,
                method=method)
  pad = _round_up(q.shape[0], tiling.query_tile) - q.shape[0]
  q_dev = jnp.asarray(np.pad(q.astype(np.float32), ((0, pad), (0, 0))))
  fn = _distance_fn(tiling, dim)
  t = tiling.tile
  out = np.empty((q.shape[0], n), np.float32)
  for start in range(0, n, t):
    m = min(t, n - start)
    d = fn(q_dev, read_block(database, start, t, np.float32))
    out[:, start:start + m] = np.asarray(d)[:q.shape[0], :m]
  if not np.isfinite(out).all():
    raise _nonfinite(database, t)
  return out


def to_faiss(database: Any, *, block_rows: int = 65536) -> Any:
  """A `faiss.IndexFlat(D, faiss.METRIC_L1)` holding the database, for faiss users.

  Note: faiss reports raw L1 sums; divide its distances by D to get the
  distances of `l1_topk` (SPEC.md section 3). faiss does not promise the
  lower-index tie rule.

  Raises:
    ImportError: faiss is not installed (`pip install cbir-jax[faiss]`).
  """
  try:
    import faiss  # optional dependency
  except ImportError as e:
    raise ImportError("to_faiss needs faiss: pip install faiss-cpu "
                      "(or cbir-jax[faiss])") from e
  n, dim = (int(s) for s in database.shape)
  index = faiss.IndexFlat(dim, faiss.METRIC_L1)
  for start in range(0, n, block_rows):
    index.add(np.ascontiguousarray(database[start:start + block_rows], dtype=np.float32))
  return index


__all__ = ["METHODS", "TopK", "Tiling", "default_method", "l1_distances", "l1_topk", "merge_topk",
           "plan", "to_faiss"]
