"""The paper's evaluation protocol: class agreement and colour agreement of retrieved images.

Precision@k and mean average precision of class labels, and the mean RGB
colour-histogram distance of the top-k (SPEC.md section 5, the paper's Table I),
with histograms taken from the full-size image files, as the paper does.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any, Mapping, MutableMapping, Sequence

import numpy as np
from PIL import Image

from cbir_jax import search

DEFAULT_BINS = 25
RANDOM = "random"  # the baseline row: k database rows drawn at random per query


# --- colour histograms (SPEC.md section 5) -----------------------------------------------


def _bin_lut(bins: int) -> np.ndarray:
  """Bin of each pixel value 0..255, as np.histogram(bins=K, range=(0, 255)) assigns it."""
  if bins < 1:
    raise ValueError(f"bins must be >= 1, got {bins}")
  edges = np.histogram_bin_edges(np.zeros(0), bins=bins, range=(0, 255))
  return np.clip(np.searchsorted(edges, np.arange(256), side="right") - 1, 0, bins - 1)


def color_histogram(image: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
  """The paper's colour histogram of one image.

  Args:
    image: uint8 RGB [H, W, 3].
    bins: K, equal-width bins over [0, 255] per channel.

  Returns:
    float32 [3K]: the R, G and B histograms, each divided by its largest bin.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
  if image.shape[0] * image.shape[1] == 0:
    raise ValueError("empty image")
  lut = _bin_lut(bins)
  pixels = image.reshape(-1, 3)
  out = []
  for c in range(3):
    h = np.bincount(lut[pixels[:, c]], minlength=bins).astype(np.float64)
    out.append(h / h.max())
  return np.concatenate(out).astype(np.float32)


def histogram_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """L1 / 3K between histograms (SPEC.md sections 3 and 5), over the last axis."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape[-1] != b.shape[-1]:
    raise ValueError(f"histograms of different sizes: {a.shape[-1]} and {b.shape[-1]}")
  return np.mean(np.abs(a - b), axis=-1)


def read_rgb(path: str) -> np.ndarray:
  """A file decoded at full size to uint8 RGB [H, W, 3] (EXIF rotation does not matter here)."""
  # The paper computes the histograms on the images themselves, so no resizing:
  # a resize would blend colours and shift the histograms.
  from cbir_jax.input_pipeline import _to_rgb  # the same mode handling as extraction

  try:
    with Image.open(path) as img:
      img.seek(0)
      return np.asarray(_to_rgb(img), dtype=np.uint8)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read image {path} for its colour histogram: {e}") from e


def image_histograms(paths: Sequence[str], *, bins: int = DEFAULT_BINS,
                     cache: MutableMapping[str, np.ndarray] | None = None,
                     num_threads: int | None = None) -> np.ndarray:
  """Colour histograms of image files, [len(paths), 3K], decoded in parallel.

  Args:
    paths: image files.
    bins: K.
    cache: path -> histogram of this K, filled and reused (one run's cache).
    num_threads: decoding threads (default: CPU count, at most 8).
  """
  cache = {} if cache is None else cache
  todo = sorted({p for p in paths if p not in cache})
  if todo:
    workers = num_threads or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      # Pillow releases the GIL while decoding, so threads run in parallel.
      for p, h in zip(todo, pool.map(lambda p: color_histogram(read_rgb(p), bins), todo)):
        cache[p] = h
  if not len(paths):
    return np.zeros((0, 3 * bins), np.float32)
  return np.stack([cache[p] for p in paths])


# --- retrieval metrics ---------------------------------------------------------------------


def precision_at_k(relevant: np.ndarray, k: int) -> np.ndarray:
  """Share of the first k results that are relevant, per query.

  Args:
    relevant: bool [Q, >= k], relevance of the ranked results.
    k: cutoff.
  """
  relevant = np.asarray(relevant, bool)
  if relevant.shape[-1] < k:
    raise ValueError(f"need at least k={k} ranked results, got {relevant.shape[-1]}")
  return relevant[..., :k].mean(axis=-1)


def average_precision(relevant: np.ndarray) -> np.ndarray:
  """Average precision of full rankings: mean of precision@r over the relevant ranks r.

  Args:
    relevant: bool [Q, M], relevance of every ranked result (the whole
      database except the query).

  Returns:
    float64 [Q]; NaN for a query with no relevant item (AP is undefined).
  """
  relevant = np.asarray(relevant, bool)
  hits = np.cumsum(relevant, axis=-1)
  ranks = np.arange(1, relevant.shape[-1] + 1)
  total = hits[..., -1] if relevant.shape[-1] else np.zeros(relevant.shape[:-1], int)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, np.sum(relevant * hits / ranks, axis=-1) / total, np.nan)


def rank_database(distances: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
  """Database rows by ascending distance, ties to the lower index, excluded rows dropped.

  Args:
    distances: [Q, N].
    exclude: int [Q], a row to drop per query (its own row), or None.

  Returns:
    int [Q, N] (or [Q, N - 1] with `exclude`).
  """
  order = np.argsort(distances, axis=1, kind="stable")  # stable: equal distances keep index order
  if exclude is None:
    return order
  keep = order != np.asarray(exclude)[:, None]
  return order[keep].reshape(order.shape[0], order.shape[1] - 1)


# --- the protocol ----------------------------------------------------------------------------


@dataclasses.dataclass
class KindResult:
  """One row of the table."""
  kind: str
  dim: int
  precision_at_k: float
  mean_ap: float
  hist_distance: float  # mean over queries of the mean over the top-k (Table I)
  per_query_hist_distance: list[float]
  per_query_precision: list[float]
  top_k: list[list[int]]  # retrieved rows per query


def select_queries(labels: np.ndarray, num_queries: int | None, seed: int) -> np.ndarray:
  """Query rows drawn without replacement (seeded) among rows with a known label (>= 0)."""
  candidates = np.flatnonzero(np.asarray(labels) >= 0)
  if len(candidates) == 0:
    raise ValueError("no labelled rows to draw queries from (every label is -1); choose "
                     "another label column")
  if num_queries is None or num_queries <= 0:
    return candidates
  if num_queries > len(candidates):
    raise ValueError(f"num_queries={num_queries} but only {len(candidates)} labelled rows")
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(candidates, size=num_queries, replace=False))


def evaluate_arrays(descriptors: Mapping[str, Any], labels: np.ndarray, paths: Sequence[str],
                    *, queries: np.ndarray, k: int = 5, bins: int = DEFAULT_BINS,
                    histogram_cache: MutableMapping[str, np.ndarray] | None = None,
                    random_baseline: bool = True, seed: int = 0) -> list[KindResult]:
  """The protocol on in-memory (or memory-mapped) descriptors.

  Args:
    descriptors: kind -> [N, D], rows aligned with `labels` and `paths`.
    labels: int [N], class of each row; -1 = unknown (never relevant).
    paths: image file of each row (for the colour histograms).
    queries: rows used as queries; each is excluded from its own ranking.
    k: results per query for precision@k and the histogram distance.
    bins: K of the colour histograms.
    histogram_cache: path -> histogram, reused across calls.
    random_baseline: add a "random" row (k random other rows per query).
    seed: seed of the random baseline.

  Returns:
    One KindResult per kind (and the baseline), in the order given.
  """
  labels = np.asarray(labels)
  n = len(labels)
  queries = np.asarray(queries, np.int64)
  if len(paths) != n:
    raise ValueError(f"{len(paths)} paths for {n} labels")
  if not 1 <= k <= n - 1:
    raise ValueError(f"k must be in [1, {n - 1}] (the database minus the query), got {k}")
  cache = {} if histogram_cache is None else histogram_cache
  rankings: dict[str, tuple[int, np.ndarray]] = {}
  for kind, array in descriptors.items():
    if array.shape[0] != n:
      raise ValueError(f"{kind}: {array.shape[0]} rows for {n} labels")
    q = np.asarray(array[queries], np.float32)
    rankings[kind] = (int(array.shape[1]),
                      rank_database(search.l1_distances(q, array), exclude=queries))
  if random_baseline:
    rng = np.random.default_rng(seed)
    order = np.stack([rng.permutation(n) for _ in queries])
    keep = order != queries[:, None]
    rankings[RANDOM] = (0, order[keep].reshape(len(queries), n - 1))

  needed = sorted({int(r) for _, ranking in rankings.values() for r in ranking[:, :k].ravel()}
                  | {int(r) for r in queries})
  hists = dict(zip(needed, image_histograms([paths[r] for r in needed], bins=bins,
                                            cache=cache)))
  q_hist = np.stack([hists[int(r)] for r in queries])
  results = []
  for kind, (dim, ranking) in rankings.items():
    relevant = (labels[ranking] == labels[queries][:, None]) & (labels[ranking] >= 0)
    top = ranking[:, :k]
    top_hist = np.stack([[hists[int(r)] for r in row] for row in top])
    hd = histogram_distance(q_hist[:, None, :], top_hist).mean(axis=1)
    p = precision_at_k(relevant, k)
    ap = average_precision(relevant)
    results.append(KindResult(
        kind=kind, dim=dim, precision_at_k=float(p.mean()),
        mean_ap=float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
        hist_distance=float(hd.mean()), per_query_hist_distance=hd.tolist(),
        per_query_precision=p.tolist(), top_k=top.tolist()))
  return results


def labels_from_metadata(meta: Mapping[str, np.ndarray], column: str = "label"
                         ) -> tuple[np.ndarray, list[str]]:
  """Integer labels from a metadata column.

  Integer columns are used as they are (-1 = unknown); text columns (such as
  imagenet-sample's "group") are numbered in sorted order, "" = unknown.

  Returns:
    (int64 [N] labels, names of the label values).
  """
  if column not in meta:
    raise ValueError(f"no metadata column {column!r}; available: {sorted(meta)} (extra "
                     "columns come from the --labels_csv given to launch/extract.py)")
  values = np.asarray(meta[column])
  if np.issubdtype(values.dtype, np.integer):
    # names[v] names label value v: the extraction's label_name when it has one
    # (folder or CSV class names), else the number itself.
    text = np.asarray(meta["label_name"]).astype(str) if "label_name" in meta else None
    names = [str(v) for v in range(int(values.max(initial=-1)) + 1)]
    if text is not None:
      for v, t in zip(values.tolist(), text.tolist()):
        if v >= 0 and t:
          names[v] = t
    return values.astype(np.int64), names
  values = values.astype(str)
  names = sorted(set(values.tolist()) - {""})
  index = {v: i for i, v in enumerate(names)}
  return np.array([index.get(v, -1) for v in values], np.int64), names


def evaluate(index_dir: str, *, kinds: Sequence[str] | None = None,
             num_queries: int | None = 100, k: int = 5, seed: int = 0,
             label_column: str = "label", bins: int = DEFAULT_BINS,
             random_baseline: bool = True) -> dict[str, Any]:
  """The protocol on an extraction output directory (see `evaluate_arrays`).

  Args:
    index_dir: output of launch/extract.py.
    kinds: descriptor kinds to evaluate; default: every extracted kind.
    num_queries: queries drawn (seeded) from the labelled rows; None = all.
    k: cutoff for precision and the histogram distance.
    seed: query draw (and random baseline) seed.
    label_column: metadata column giving the class ("label", or e.g. "group"
      from a labels CSV's extra columns).
    bins: K of the colour histograms.
    random_baseline: add the "random" row.

  Returns:
    A JSON-ready dict: settings, the query rows and paths, and one entry per kind.
  """
  from cbir_jax import store

  manifest = store.read_manifest(index_dir)
  kinds = list(kinds or manifest["settings"]["kinds"])
  arrays, meta = {}, None
  for kind in kinds:
    arrays[kind], m = store.load_descriptors(index_dir, kind)
    meta = meta if meta is not None else m
  labels, names = labels_from_metadata(meta, label_column)
  paths = [str(p) for p in meta["path"]]
  queries = select_queries(labels, num_queries, seed)
  results = evaluate_arrays(arrays, labels, paths, queries=queries, k=k, bins=bins,
                            random_baseline=random_baseline, seed=seed)
  return {
      "index": os.path.abspath(index_dir), "backbone": manifest.get("backbone"),
      "label_column": label_column, "num_labels": int(len(np.unique(labels[labels >= 0]))),
      "num_rows": len(labels),
      "num_queries": int(len(queries)), "k": k, "seed": seed, "bins": bins,
      "queries": [{"row": int(r), "path": paths[r], "label": names[labels[r]]} for r in queries],
      "results": {r.kind: {"dim": r.dim, "precision_at_k": r.precision_at_k,
                           "map": r.mean_ap, "hist_distance": r.hist_distance,
                           "per_query_hist_distance": r.per_query_hist_distance,
                           "per_query_precision": r.per_query_precision, "top_k": r.top_k}
                  for r in results}}


def format_table(report: Mapping[str, Any]) -> str:
  """The paper's Table I layout (mean histogram distance of the top-k) plus P@k and mAP."""
  k = report["k"]
  lines = [f"{report['num_queries']} queries, top-{k}, labels from {report['label_column']!r} "
           f"({report['num_labels']} classes, {report['num_rows']} images)",
           f"{'descriptor':<12}{'dim':>7}{'hist dist@' + str(k):>14}{'P@' + str(k):>9}"
           f"{'mAP':>9}"]
  for kind, r in report["results"].items():
    dim = str(r["dim"]) if r["dim"] else "-"
    lines.append(f"{kind:<12}{dim:>7}{r['hist_distance']:>14.4f}{r['precision_at_k']:>9.3f}"
                 f"{r['map']:>9.3f}")
  return "\n".join(lines)
