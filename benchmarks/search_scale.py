r"""Search at scale, one run prints all: exact L1 search vs faiss, and the approximate index.

  python -m benchmarks.search_scale --real=/tmp/food7_lite0 --json=/tmp/scale.json

Part 1, exact: `search.l1_topk` vs faiss `IndexFlat(D, METRIC_L1)` on uniform [0, 1) rows at
100k and 1M rows (D=256) and a synthetic 10M rows (D=64: 2.6 GB of float32, which faiss
copies once more; what fits a 24 GiB machine shared with other jobs), the two alternated
call by call (benchmark/search.py).

Part 2, approximate, on a 1M-row float16 index: the real rows of an extraction (`--real`,
kind `--kind`) and synthetic rows made from them (`mixed_rows`); half the queries are real
rows (their own row excluded), half new synthetic rows that are not in the index.
Recall@10 against exact L1, queries/s of both (alternated), build time; IVF-flat settings
at 1M rows, and at 100k rows HNSW vs IVF, and IVF with and without PCA (an HNSW build, or
an IVF build without PCA, of 1M rows takes longer than this run may on 2 cores). Flags are
the fields of ScaleConfig; docs/search.md has a recorded run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks import search as exact_bench
from benchmarks import timing


@dataclasses.dataclass
class ScaleConfig:
  """Settings of one benchmark run.

  Attributes:
    real: extraction output whose rows seed the approximate part (launch/extract.py).
    kind: descriptor kind of `real` used.
    rows: rows of the approximate part's index (real + synthetic).
    queries: queries of the approximate part (real rows).
    exact_queries: queries per exact search in part 1.
    repeats: timed repeats, alternated between the contenders.
    work_dir: where the synthetic index is written (removed at the end).
    skip_exact: leave part 1 out.
    json: write every figure here.
  """
  real: str
  kind: str = "gem"
  rows: int = 1_000_000
  queries: int = 32
  exact_queries: int = 16
  repeats: int = 2
  work_dir: str | None = None
  skip_exact: bool = False
  json: str | None = None


def synthetic(real: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
  """m rows max(0, (1 - a) r_i + a r_j + e), see `mixed_rows`; float32."""
  sd = real.std(axis=0)
  i, j = rng.integers(0, len(real), m), rng.integers(0, len(real), m)
  a = rng.uniform(0, 0.5, (m, 1)).astype(np.float32)
  rows = (1 - a) * real[i] + a * real[j] + 0.1 * sd * rng.standard_normal(
      (m, real.shape[1]), dtype=np.float32)
  return np.maximum(rows, 0)


def mixed_rows(real: np.ndarray, n: int, path: pathlib.Path, *, seed: int = 0,
               chunk: int = 65536) -> np.ndarray:
  """An [n, D] float16 .npy (memory-mapped) starting with the real rows, then synthetic ones.

  Synthetic row = max(0, (1 - a) r_i + a r_j + e): r_i, r_j random real rows, a ~ U(0, 0.5),
  e ~ N(0, (0.1 sd_d)^2) per dimension d (sd: the real rows' spread). So the index has real
  rows' structure (mixtures of photos' descriptors) with dense neighbourhoods around each
  real row, the hard case for an ANN index; exact search does not care what rows hold.
  """
  rng = np.random.default_rng(seed)
  real = np.asarray(real, np.float32)
  out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, real.shape[1]))
  out[:len(real)] = real
  for start in range(len(real), n, chunk):
    out[start:start + min(chunk, n - start)] = synthetic(real, min(chunk, n - start), rng)
  out.flush()
  return np.load(path, mmap_mode="r")


def _recall(got: np.ndarray, ref: np.ndarray) -> float:
  return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, ref)]))


def _ann_index(db: Any, s: dict[str, Any], log: Callable[[str], None]) -> Any:
  """An `ann.Ann` over `db` for one setting (type, pca, nlist, hnsw_m, nprobe, ef_search,
  candidates), its build time in its record."""
  from cbir_jax import ann

  fields = {f.name for f in dataclasses.fields(ann.IndexConfig)}
  cfg = ann.IndexConfig(index="-", **{k: v for k, v in s.items() if k in fields})
  log(f"[scale] building {cfg.type} (pca {cfg.pca}, nlist {cfg.nlist}, M {cfg.hnsw_m}) over "
      f"{db.shape[0]} rows ...")
  t0 = time.perf_counter()
  index = ann.build_faiss(db, cfg, log=log)
  rec = ann.AnnRecord(kind="", type=cfg.type, identity="", rows=db.shape[0], dim=db.shape[1],
                      pca=cfg.pca, nlist=cfg.nlist or ann.default_nlist(db.shape[0]),
                      hnsw_m=cfg.hnsw_m, nprobe=cfg.nprobe, ef_search=cfg.ef_search,
                      candidates=cfg.candidates, build_seconds=time.perf_counter() - t0,
                      faiss_version="")
  return ann.Ann(rec, index, pathlib.Path("-"))


def _settings_rows(db: Any, q: np.ndarray, own: np.ndarray, builds: Sequence[dict[str, Any]],
                   probes: Sequence[dict[str, Any]], *, k: int, repeats: int,
                   log: Callable[[str], None]) -> list[dict[str, Any]]:
  """Exact search (the reference) alternated with the first setting, then every build x
  search setting: build seconds, recall@k vs exact, queries/s of both, speed-up."""
  from cbir_jax import ann, search

  exact = search.l1_topk(q, db, k, exclude=own)  # warm-up and the reference
  rows = []
  exact_s = None
  for b in builds:
    a = _ann_index(db, b, log)
    for p in probes:
      if ("nprobe" in p) != (a.record.type == "ivf"):
        continue
      fns = {"ann": lambda: ann.ann_topk(q, db, a, k, exclude=own, **p)}
      if exact_s is None:  # exact and ANN alternated once, under the same load
        fns["exact"] = lambda: search.l1_topk(q, db, k, exclude=own)
      top = fns["ann"]()  # warm-up (compiles the re-rank)
      # ANN calls take a fraction of a second: more repeats steady their median.
      times = timing.interleaved(fns, repeats=repeats if "exact" in fns else 5 * repeats,
                                 warmup=0)
      exact_s = exact_s or timing.median(times["exact"])
      qps = timing.rate(len(q), times["ann"])
      real_q = own >= 0
      rows.append({**b, **p, "rows": db.shape[0], "dim": db.shape[1], "queries": len(q),
                   "build_seconds": round(a.record.build_seconds, 1),
                   "recall_at_10": round(_recall(top.indices, exact.indices), 4),
                   "recall_real_queries": round(
                       _recall(top.indices[real_q], exact.indices[real_q]), 4),
                   "recall_new_queries": round(
                       _recall(top.indices[~real_q], exact.indices[~real_q]), 4),
                   "ann_queries_per_s": round(qps, 1),
                   "exact_queries_per_s": round(len(q) / exact_s, 2),
                   "speedup": round(qps * exact_s / len(q), 1)})
      log(f"[scale] {json.dumps(rows[-1])}")
  return rows


def approximate(config: ScaleConfig, work: pathlib.Path, log: Callable[[str], None]
                ) -> dict[str, Any]:
  """Part 2: the mixed 1M-row index; IVF settings at 1M rows, IVF vs HNSW at 100k."""
  from cbir_jax import store

  real, _ = store.load_descriptors(config.real, config.kind)
  t0 = time.perf_counter()
  db = mixed_rows(real, config.rows, work / "mixed.npy")
  log(f"[scale] {config.rows} rows x {db.shape[1]} (float16) written in "
      f"{time.perf_counter() - t0:.0f} s")
  # Half the queries are real rows of the index (their own row excluded), half new rows
  # made like the synthetic ones but not in the index (nothing to exclude).
  half = config.queries // 2
  rng = np.random.default_rng(1)
  mine = np.sort(rng.choice(len(real), config.queries - half, replace=False)).astype(np.int64)
  real32 = np.asarray(real, np.float32)
  q = np.concatenate([real32[mine], synthetic(real32, half, rng)])
  own = np.concatenate([mine, np.full(half, -1, np.int64)])
  k, r = 10, config.repeats
  # One IVF build at 1M rows (a build takes minutes here); PCA 64 vs 128 and more
  # candidates were measured at 120k rows (docs/search.md).
  ivf = [dict(type="ivf", pca=128, nlist=1024)]
  probes = [dict(nprobe=8, candidates=100), dict(nprobe=16, candidates=100),
            dict(nprobe=16, candidates=200), dict(nprobe=32, candidates=200)]
  out = {"index": f"{len(real)} real {config.kind} rows of {config.real} + "
                  f"{config.rows - len(real)} synthetic (mixed_rows)",
         "at_1m": _settings_rows(db, q, own, ivf, probes, k=k, repeats=r, log=log)}
  small = db[:100_000]
  hnsw = [dict(type="hnsw", pca=128, hnsw_m=32), dict(type="ivf", pca=128, nlist=256),
          dict(type="ivf", pca=0, nlist=256)]
  out["at_100k"] = _settings_rows(
      small, q, own, hnsw, [dict(ef_search=128, candidates=200), dict(nprobe=16, candidates=200)],
      k=k, repeats=r, log=log)
  return out


def exact_part(config: ScaleConfig, log: Callable[[str], None]) -> list[dict[str, Any]]:
  """Part 1: l1_topk vs faiss IndexFlat L1, alternated, at 100k, 1M (D=256) and 10M (D=64)."""
  kw = dict(num_queries=config.exact_queries, k=10, repeats=config.repeats, max_gb=4.0, log=log)
  return (exact_bench.run(sizes=[100_000, 1_000_000], dims=[256], **kw)
          + exact_bench.run(sizes=[10_000_000], dims=[64], **kw))


def _table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
  lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
  for row in rows:
    lines.append(" | ".join(f"{row.get(c, '-'):.3g}" if isinstance(row.get(c), float)
                            else str(row.get(c, "-")) for c in cols))
  return "\n".join(lines)


def run(config: ScaleConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
  import faiss

  faiss.omp_set_num_threads(os.cpu_count() or 1)
  result: dict[str, Any] = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                            "cpu": timing.cpu_info()["model"], "cores": os.cpu_count(),
                            "load_average": os.getloadavg(), "python": platform.python_version(),
                            "faiss": faiss.__version__, "config": dataclasses.asdict(config)}
  t0 = time.perf_counter()
  if not config.skip_exact:
    result["exact"] = exact_part(config, log)
  with tempfile.TemporaryDirectory(dir=config.work_dir) as work:
    result["approximate"] = approximate(config, pathlib.Path(work), log)
  result["seconds"] = time.perf_counter() - t0
  result["load_average_end"] = os.getloadavg()
  return result


def report(result: dict[str, Any]) -> str:
  parts = [f"{result['date_utc']} UTC, {result['cpu']} ({result['cores']} cores), faiss "
           f"{result['faiss']}, load average {result['load_average'][0]:.1f} at the start, "
           f"{result['load_average_end'][0]:.1f} at the end, {result['seconds']:.0f} s"]
  if "exact" in result:
    parts.append("Exact top-10, l1_topk vs faiss IndexFlat METRIC_L1 (alternated):\n" + _table(
        result["exact"], ["n", "dim", "queries", "jax_queries_per_s", "faiss_queries_per_s",
                          "jax_over_faiss", "topk_set_agreement"]))
  a = result["approximate"]
  cols = ["type", "pca", "nlist", "hnsw_m", "nprobe", "ef_search", "candidates", "rows",
          "build_seconds", "recall_at_10", "recall_real_queries", "recall_new_queries",
          "ann_queries_per_s", "exact_queries_per_s", "speedup"]
  parts.append(f"Approximate top-10 ({a['index']}):\n" + _table(a["at_1m"] + a["at_100k"], cols))
  return "\n\n".join(parts)


def main() -> None:
  from cbir_jax import cli

  config = FLAGS.config()
  result = run(config, log=cli.printer("search_scale"))
  print(report(result))
  if config.json:
    pathlib.Path(config.json).write_text(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
  from cbir_jax import cli

  FLAGS = cli.define(ScaleConfig)
  cli.run("search_scale", main)
