"""Section 5: exact L1 top-k, `cbir_jax.search.l1_topk` vs faiss `IndexFlat(D, METRIC_L1)`.

Same database and queries, same machine, same threads (faiss' OpenMP threads
= the cores XLA uses). Descriptors are non-negative like real ones (uniform
[0, 1) float32); queries are separate random rows, so there are no exact ties
and both must return the same indices. faiss' time includes neither building
the index nor our NumPy-to-device copies, which l1_topk does inside its call
(it streams the database from host memory in blocks).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from benchmarks import timing


def aligned_empty(shape: tuple[int, ...], dtype: Any = np.float32, align: int = 64) -> np.ndarray:
  """An uninitialised array whose data starts on an `align`-byte boundary."""
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  buf = np.empty(nbytes + align, np.uint8)
  start = (-buf.ctypes.data) % align
  return buf[start:start + nbytes].view(dtype).reshape(shape)


def _data(n: int, dim: int, num_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(database, queries). The database is 64-byte aligned, as a memory-mapped
  .npy store is (NumPy pads .npy headers to 64 bytes): XLA:CPU then reads it in
  place, where a 16-byte-aligned fresh NumPy array is copied on every search."""
  rng = np.random.default_rng(seed)
  db = aligned_empty((n, dim))
  for start in range(0, n, 65536):  # in chunks: no second full-size temporary
    db[start:start + 65536] = rng.random((min(65536, n - start), dim), dtype=np.float32)
  q = rng.random((num_queries, dim), dtype=np.float32)
  return db, q


def run(*, sizes: Sequence[int], dims: Sequence[int], num_queries: int, k: int, repeats: int,
        max_gb: float, faiss_peer: bool = True, log=print) -> list[dict[str, Any]]:
  """One row per (N, D): queries/s of both, their ratio, and top-k agreement."""
  from cbir_jax import search as search_lib

  faiss = None
  if faiss_peer:
    try:
      import faiss  # optional peer
      faiss.omp_set_num_threads(timing.cpu_info()["cores"])
    except ImportError:
      faiss = None
  rows = []
  for dim in dims:
    for n in sizes:
      gb = n * dim * 4 / 1e9
      row: dict[str, Any] = {"n": n, "dim": dim, "queries": num_queries, "k": k,
                             "database_gb": gb}
      if gb > max_gb:
        row["skipped"] = f"database {gb:.1f} GB > --search_max_gb={max_gb}"
        rows.append(row)
        continue
      log(f"[search] N={n} D={dim} Q={num_queries} k={k} ...")
      db, q = _data(n, dim, num_queries, seed=n + dim)
      fns = {"jax": lambda: search_lib.l1_topk(q, db, k)}
      index = None
      if faiss is not None:
        index = faiss.IndexFlat(dim, faiss.METRIC_L1)
        index.add(db)
        fns["faiss"] = lambda: index.search(q, k)
      res_j = fns["jax"]()  # warm-up (compiles), kept for the agreement check
      if index is not None:
        dist_f, idx_f = fns["faiss"]()
      times = timing.interleaved(fns, repeats=repeats, warmup=0)
      row["jax_queries_per_s"] = timing.rate(num_queries, times["jax"])
      row["jax_seconds"] = times["jax"]
      if index is not None:
        row["faiss_queries_per_s"] = timing.rate(num_queries, times["faiss"])
        row["faiss_seconds"] = times["faiss"]
        row["jax_over_faiss"] = row["jax_queries_per_s"] / row["faiss_queries_per_s"]
        row["topk_index_agreement"] = float(np.mean(res_j.indices == idx_f))
        # Same members in any order: ranks can swap where two distances agree to
        # float32 rounding (sums over thousands of dimensions), and faiss does not
        # promise SPEC's lower-index tie rule.
        row["topk_set_agreement"] = float(np.mean(
            [len(set(a) & set(b)) / k for a, b in zip(res_j.indices, idx_f)]))
        # faiss returns raw L1 sums; ours are divided by D (SPEC.md section 3).
        row["max_distance_diff_rel"] = float(
            np.max(np.abs(res_j.distances - dist_f / dim) / np.maximum(dist_f / dim, 1e-30)))
      else:
        row["faiss"] = "faiss not installed"
      rows.append(row)
      del db, q, index
  return rows
