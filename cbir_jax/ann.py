"""Approximate L1 search: a faiss index over an extraction output, then an exact re-rank.

The faiss index (IVF-flat with METRIC_L1 by default, HNSW with METRIC_L1 as an option,
optionally after a PCA learned on the index) only proposes candidates; their distances
and order come from an exact L1 / D re-rank of the stored rows on the device (SPEC.md
section 3), so every distance returned is exact and ties still go to the lower row.

On disk: OUT/ann/<kind>/index.faiss (faiss's own format, no pickle) and ann.json (an
`AnnRecord` naming the output it was built from: refused, with the rebuild command, once
`--update` changed it). Layout, defaults and their measurements: docs/search.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import time
from typing import Annotated, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cbir_jax import search, store
from cbir_jax.choices import Kind, OneOf

ANN_DIR = "ann"
INDEX_FILE = "index.faiss"
RECORD_FILE = "ann.json"
TYPES = ("ivf", "hnsw")
_RECORD_VERSION = 1


class AnnError(ValueError):
  """An ANN index that is missing, stale or unreadable (one line, naming the fix)."""


def import_faiss() -> Any:
  """faiss, or a one-line error naming the extra that installs it."""
  try:
    import faiss  # optional dependency
  except ImportError:
    raise ImportError("the approximate index needs faiss: pip install 'cbir-jax[faiss]' "
                      "(or faiss-cpu)") from None
  return faiss


@dataclasses.dataclass
class IndexConfig:
  """An approximate L1 index over an extraction output (launch/index.py).

  Attributes:
    index: extraction output directory (launch/extract.py --output); the ANN index goes
      to INDEX/ann/KIND/.
    kind: descriptor kind to index; unset: the one cbir-search uses by default (fc_conv
      when the index has it, else conv, ...: `store.choose_kind`).
    type: "ivf" (IVF-flat, METRIC_L1: quick to build, the default) or "hnsw" (HNSW,
      METRIC_L1: slower to build; see docs/search.md).
    pca: dimensions kept by a PCA learned on the index before the faiss index (0: none);
      candidates only, the re-rank uses every dimension.
    nlist: IVF lists; 0 = about 4 sqrt(rows).
    hnsw_m: HNSW neighbours per node.
    train_rows: rows sampled (evenly spaced) to learn the PCA and the IVF lists.
    nprobe: IVF lists searched per query (recorded; search --ann uses it).
    ef_search: HNSW search depth (recorded; search --ann uses it).
    candidates: candidates re-ranked exactly per query (at least 4k are taken).
  """
  index: str
  kind: Kind | None = None
  type: Annotated[str, OneOf(TYPES, "ANN type")] = "ivf"
  pca: int = 128
  nlist: int = 0
  hnsw_m: int = 32
  train_rows: int = 65536
  nprobe: int = 16
  ef_search: int = 128
  candidates: int = 200

  def __post_init__(self):
    low = {"pca": 0, "nlist": 0, "hnsw_m": 2, "train_rows": 1, "nprobe": 1, "ef_search": 1,
           "candidates": 1}
    bad = [f"--{k}={getattr(self, k)} (at least {v})" for k, v in low.items()
           if getattr(self, k) < v]
    if bad:
      raise ValueError(f"invalid index settings: {', '.join(bad)}")


@dataclasses.dataclass(frozen=True)
class AnnRecord:
  """OUT/ann/<kind>/ann.json: what the faiss index is and which index state it was made from."""
  kind: str
  type: str
  identity: str  # `index_identity` of the extraction output when built
  rows: int
  dim: int
  pca: int  # 0: no PCA
  nlist: int  # 0 for HNSW
  hnsw_m: int  # 0 for IVF
  nprobe: int
  ef_search: int
  candidates: int
  build_seconds: float
  faiss_version: str
  version: int = _RECORD_VERSION

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "AnnRecord":
    names = {f.name for f in dataclasses.fields(cls)}
    missing = names - set(d) - {"version"}
    if missing:
      raise ValueError(f"missing fields {sorted(missing)}")
    return cls(**{k: v for k, v in d.items() if k in names})


def ann_dir(index_dir: str | os.PathLike, kind: str) -> pathlib.Path:
  return pathlib.Path(index_dir) / ANN_DIR / kind


def _checksums(node: Any) -> list[str]:
  """Every "sha256" value anywhere in the manifest (files of every shard, part and table)."""
  if isinstance(node, dict):
    own = [str(node["sha256"])] if isinstance(node.get("sha256"), str) else []
    return own + [s for v in node.values() for s in _checksums(v)]
  if isinstance(node, list):
    return [s for v in node for s in _checksums(v)]
  return []


def index_identity(index_dir: str | os.PathLike, kind: str) -> str:
  """A digest of what the extraction output holds: its rows, the kind's dimension and every
  file checksum its manifest records (any layout), so that `--update` (any row, label or
  path changed) gives another identity; a manifest rewritten with the same files does not."""
  m = store.read_manifest(index_dir)
  sums = sorted(set(_checksums(m)))
  if not sums:  # no checksums recorded: the whole manifest stands for the contents
    sums = [hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()]
  key = {"kind": kind, "rows": m.get("rows"), "dim": (m.get("dimensions") or {}).get(kind),
         "sha256": sums}
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# --- building -------------------------------------------------------------------------------


def _sample(database: Any, rows: int) -> np.ndarray:
  """`rows` evenly spaced rows as float32 (a view over parts reads only those rows)."""
  n = database.shape[0]
  return np.asarray(database[np.unique(np.linspace(0, n - 1, min(rows, n)).astype(np.int64))],
                    np.float32)


def default_nlist(rows: int, train_rows: int = 65536) -> int:
  """About 4 sqrt(rows) lists (faiss's guideline), at most (training rows) / 39 so that
  k-means gets the 39 training points per list faiss asks for."""
  return max(1, min(int(4 * math.sqrt(rows)), min(rows, train_rows) // 39))


def _ivf(faiss: Any, sample: np.ndarray, nlist: int, log: Callable[[str], None]) -> Any:
  """An IVF-flat METRIC_L1 index whose lists are trained already.

  The list centres come from faiss's L2 k-means (its assignments are matrix products, which
  a CPU runs far faster than the L1 scans of k-means under L1); rows are then assigned to
  lists, and lists searched, under L1, and the candidates re-ranked exactly anyway.
  """
  nlist = max(1, min(nlist, len(sample)))
  log(f"k-means: {nlist} lists from {len(sample)} rows ...")
  km = faiss.Kmeans(sample.shape[1], nlist, niter=20, seed=1234)
  km.train(np.ascontiguousarray(sample, np.float32))
  quantizer = faiss.IndexFlat(sample.shape[1], faiss.METRIC_L1)
  quantizer.add(km.centroids)
  # A quantizer that holds its nlist centres is not trained again by IndexIVF.train.
  return faiss.IndexIVFFlat(quantizer, sample.shape[1], nlist, faiss.METRIC_L1)


def build_faiss(database: Any, config: IndexConfig, *, block_rows: int = 65536,
                log: Callable[[str], None] = lambda m: None) -> Any:
  """A trained faiss index holding every row of `database` ([N, D], any float dtype)."""
  faiss = import_faiss()
  n, dim = (int(s) for s in database.shape)
  sample = _sample(database, config.train_rows)
  d_in = dim
  pca = None
  if 0 < config.pca < dim:
    pca = faiss.PCAMatrix(dim, config.pca)
    pca.train(sample)
    d_in = config.pca
  if config.type == "hnsw":
    inner = faiss.IndexHNSWFlat(d_in, config.hnsw_m, faiss.METRIC_L1)
    inner.hnsw.efSearch = config.ef_search
  else:
    inner = _ivf(faiss, pca.apply(sample) if pca is not None else sample,
                 config.nlist or default_nlist(n, config.train_rows), log)
    inner.nprobe = config.nprobe
  index = faiss.IndexPreTransform(pca, inner) if pca is not None else inner
  if not index.is_trained:
    log(f"training on {len(sample)} rows ...")
    index.train(sample)
  for start in range(0, n, block_rows):
    index.add(np.ascontiguousarray(database[start:start + block_rows], dtype=np.float32))
  # faiss's Python layer keeps the PCA and the quantizer alive with the index they are in.
  return index


def build(config: IndexConfig, *, log: Callable[[str], None] = print) -> AnnRecord:
  """Builds the ANN index of `config.kind` over an extraction output and writes it beside it."""
  faiss = import_faiss()
  kind, why = store.choose_kind(config.index, config.kind)
  if why:
    log(why)
  config = dataclasses.replace(config, kind=kind)
  identity = index_identity(config.index, config.kind)
  _, database, _ = store.open_index(config.index, config.kind)
  n, dim = (int(s) for s in database.shape)
  t0 = time.perf_counter()
  index = build_faiss(database, config, log=log)
  seconds = time.perf_counter() - t0
  ivf = config.type == "ivf"
  record = AnnRecord(kind=config.kind, type=config.type, identity=identity, rows=n, dim=dim,
                     pca=config.pca if 0 < config.pca < dim else 0,
                     nlist=faiss.extract_index_ivf(index).nlist if ivf else 0,
                     hnsw_m=0 if ivf else config.hnsw_m, nprobe=config.nprobe,
                     ef_search=config.ef_search, candidates=config.candidates,
                     build_seconds=round(seconds, 3), faiss_version=faiss.__version__)
  out = ann_dir(config.index, config.kind)
  out.mkdir(parents=True, exist_ok=True)
  # The record goes last: a build killed half-way leaves no record that names its index.
  (out / RECORD_FILE).unlink(missing_ok=True)
  tmp = out / f".{INDEX_FILE}.tmp"
  faiss.write_index(index, str(tmp))
  os.replace(tmp, out / INDEX_FILE)
  store.write_json_atomic(out / RECORD_FILE, dataclasses.asdict(record))
  return record


# --- opening and searching ------------------------------------------------------------------


@dataclasses.dataclass
class Ann:
  """An opened ANN index: its record and the faiss index."""
  record: AnnRecord
  index: Any
  where: pathlib.Path


def _rebuild_hint(index_dir: str | os.PathLike, kind: str) -> str:
  return f"rebuild it with: python launch/index.py --index={index_dir} --kind={kind}"


def load(index_dir: str | os.PathLike, kind: str) -> Ann:
  """The ANN index of `kind`, checked against the extraction output as it is now.

  Raises:
    AnnError: none was built, it is unreadable, or the output changed since (stale).
    ImportError: faiss is not installed.
  """
  faiss = import_faiss()
  where = ann_dir(index_dir, kind)
  if not (where / RECORD_FILE).is_file() or not (where / INDEX_FILE).is_file():
    raise AnnError(f"{index_dir}: no approximate index for kind {kind!r}; build one with: "
                   f"python launch/index.py --index={index_dir} --kind={kind}")
  try:
    record = AnnRecord.from_dict(json.loads((where / RECORD_FILE).read_text()))
  except (ValueError, TypeError) as e:
    raise AnnError(f"{where / RECORD_FILE}: unreadable ({e}); "
                   f"{_rebuild_hint(index_dir, kind)}") from None
  if record.identity != index_identity(index_dir, kind):
    raise AnnError(f"{where}: the approximate index is stale (the extraction output changed "
                   f"since it was built); {_rebuild_hint(index_dir, kind)}")
  try:
    index = faiss.read_index(str(where / INDEX_FILE))
  except RuntimeError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else "unreadable"
    raise AnnError(f"{where / INDEX_FILE}: {first}; {_rebuild_hint(index_dir, kind)}") from None
  if index.ntotal != record.rows:
    raise AnnError(f"{where / INDEX_FILE}: holds {index.ntotal} rows, its record says "
                   f"{record.rows}; {_rebuild_hint(index_dir, kind)}")
  return Ann(record, index, where)


def set_search_depth(index: Any, *, nprobe: int | None = None, ef_search: int | None = None
                     ) -> None:
  """Sets nprobe (IVF) or efSearch (HNSW) on a faiss index, through a PCA if there is one."""
  faiss = import_faiss()
  params = faiss.ParameterSpace()
  if nprobe and faiss.try_extract_index_ivf(index) is not None:
    params.set_index_parameter(index, "nprobe", int(nprobe))
  if ef_search and "HNSW" in type(faiss.downcast_index(
      index.index if isinstance(index, faiss.IndexPreTransform) else index)).__name__:
    params.set_index_parameter(index, "efSearch", int(ef_search))


@jax.jit
def _rerank_distances(queries: jax.Array, rows: jax.Array) -> jax.Array:
  """[Q, D] x [Q, C, D] (any float dtype) -> L1 / D [Q, C] in float32, on the device."""
  diff = jnp.abs(queries[:, None, :] - rows.astype(jnp.float32))
  return jnp.sum(diff, axis=-1) * np.float32(1.0 / queries.shape[1])


def _gather(database: Any, ids: np.ndarray) -> np.ndarray:
  """database rows `ids` ([Q, C], -1: none -> zeros) in the stored dtype; a memory map, or a
  view over parts (`index.LazyRows`), reads only those rows."""
  out = np.asarray(database[np.maximum(ids, 0)])
  return np.where((ids >= 0)[..., None], out, np.zeros((), out.dtype))


def rerank(queries: np.ndarray, database: Any, ids: np.ndarray, k: int, *,
           exclude: np.ndarray | None = None, query_tile: int = 64) -> search.TopK:
  """The k nearest of each query's candidate rows `ids` ([Q, C], -1 = none), by exact L1 / D
  on the device; ties to the lower row. Fewer than k usable candidates leave -1 / inf."""
  q = np.asarray(queries, np.float32)
  ids = np.where(ids < database.shape[0], ids, -1).astype(np.int64)
  if exclude is not None:
    ids = np.where(ids == np.asarray(exclude)[:, None], -1, ids)
  dist, idx = [], []
  for a in range(0, len(q), query_tile):
    i = ids[a:a + query_tile]
    d = np.asarray(_rerank_distances(q[a:a + query_tile], _gather(database, i)))
    d = np.where(i >= 0, d, np.inf)
    # Two keys, (distance, row): the same tie rule as the exact search; unused slots last.
    key_i = np.where(i >= 0, i, np.iinfo(np.int64).max)
    order = np.lexsort((key_i, d), axis=1)[:, :k]
    dist.append(np.take_along_axis(d, order, 1))
    idx.append(np.where(np.isinf(dist[-1]), -1, np.take_along_axis(i, order, 1)))
  return search.TopK(distances=np.concatenate(dist).astype(np.float32),
                     indices=np.concatenate(idx))


def ann_topk(queries: Any, database: Any, ann: Ann, k: int, *, candidates: int | None = None,
             nprobe: int | None = None, ef_search: int | None = None, exclude: Any = None,
             **exact_kwargs: Any) -> search.TopK:
  """Approximate top-k: candidates from the faiss index, exact L1 / D re-rank on the device.

  At least max(candidates, 4k) candidates are taken per query (one more when a row is
  excluded). A query left with fewer than k candidates (a small index, sparse lists) is
  searched exactly instead, so k results always come back.
  """
  q = np.asarray(queries, np.float32)
  n = database.shape[0]
  ex = None if exclude is None else np.asarray(exclude, np.int64)
  extra = int(ex is not None and (ex >= 0).any())
  c = min(n, max(candidates or ann.record.candidates, 4 * k) + extra)
  set_search_depth(ann.index, nprobe=nprobe or ann.record.nprobe,
                   ef_search=ef_search or ann.record.ef_search)
  _, ids = ann.index.search(np.ascontiguousarray(q), c)
  top = rerank(q, database, ids, k, exclude=ex)
  short = np.flatnonzero((top.indices < 0).any(axis=1))
  if short.size:
    exact = search.l1_topk(q[short], database, k,
                           exclude=None if ex is None else ex[short], **exact_kwargs)
    top.distances[short], top.indices[short] = exact.distances, exact.indices
  return top


__all__ = ["Ann", "AnnError", "AnnRecord", "IndexConfig", "ann_dir", "ann_topk", "build",
           "build_faiss", "default_nlist", "import_faiss", "index_identity", "load", "rerank",
           "set_search_depth"]
