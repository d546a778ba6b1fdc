"""The paper's evaluation protocol: class agreement (P@k, mAP) and colour agreement of results.

The colour figure is the mean RGB-histogram distance of the top-k (SPEC.md section 5, Table I),
on the full-size images (files or TFDS records, read through `index_images`), as the paper does.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Annotated, Any, Mapping, MutableMapping, NamedTuple, Sequence

import numpy as np

from cbir_jax import balance, search
from cbir_jax.choices import OneOf
from cbir_jax.descriptors import KINDS
from cbir_jax.index_images import ImageUnavailable, IndexImages, input_of

DEFAULT_BINS = 25
RANDOM = "random"  # the baseline row: k database rows drawn at random per query
# What can be evaluated: the stored kinds and those derived from them (balance.DERIVED_KINDS).
EVAL_KINDS: tuple[str, ...] = (*KINDS, *balance.DERIVED_KINDS)
EvalKind = Annotated[str, OneOf(EVAL_KINDS, "descriptor kind")]


# --- colour histograms (SPEC.md section 5) -----------------------------------------------


def _bin_lut(bins: int) -> np.ndarray:
  """Bin of each pixel value 0..255, as np.histogram(bins=K, range=(0, 255)) assigns it."""
  if bins < 1:
    raise ValueError(f"bins must be >= 1, got {bins}")
  edges = np.histogram_bin_edges(np.zeros(0), bins=bins, range=(0, 255))
  return np.clip(np.searchsorted(edges, np.arange(256), side="right") - 1, 0, bins - 1)


def color_histogram(image: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
  """The paper's colour histogram of a uint8 RGB image [H, W, 3]: float32 [3K], the R, G and
  B histograms over K = `bins` equal-width bins of [0, 255], each divided by its largest bin."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
  if image.shape[0] * image.shape[1] == 0:
    raise ValueError("empty image")
  binned = _bin_lut(bins)[image.reshape(-1, 3)]
  h = np.stack([np.bincount(binned[:, c], minlength=bins) for c in range(3)]).astype(np.float64)
  return (h / h.max(axis=1, keepdims=True)).ravel().astype(np.float32)


def histogram_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """L1 / 3K between histograms (SPEC.md sections 3 and 5), over the last axis."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape[-1] != b.shape[-1]:
    raise ValueError(f"histograms of different sizes: {a.shape[-1]} and {b.shape[-1]}")
  return np.mean(np.abs(a - b), axis=-1)


def image_histograms(keys: Sequence[str], *, images: IndexImages | None = None,
                     bins: int = DEFAULT_BINS,
                     cache: MutableMapping[str, np.ndarray] | None = None) -> np.ndarray:
  """Colour histograms of an index's images, [len(keys), 3K], decoded in parallel.

  `keys` are the rows' stored paths (file paths or TFDS ids), read through `images` (default:
  files at the stored paths); `cache` (key -> histogram of this K) is filled and reused.

  Raises:
    ImageUnavailable: some images cannot be read; one line, how many and the first reason.
      Histograms that could be made are still cached.
  """
  images = images or IndexImages()
  cache = {} if cache is None else cache
  todo = sorted({k for k in keys if k not in cache})
  if todo:
    images.prefetch(todo)

    def one(key: str) -> tuple[np.ndarray | None, str]:
      try:
        return color_histogram(images.read_rgb(key), bins), ""
      except ImageUnavailable as e:
        return None, str(e)

    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
      # Pillow releases the GIL while decoding, so threads run in parallel.
      done = list(zip(todo, pool.map(one, todo)))
    bad = [err for _, (_, err) in done if err]
    cache.update((key, h) for key, (h, err) in done if not err)
    if bad:
      raise ImageUnavailable(bad[0] if len(bad) == 1 else
                             f"{len(bad)} of {len(todo)} images cannot be read (first: {bad[0]})")
  if not len(keys):
    return np.zeros((0, 3 * bins), np.float32)
  return np.stack([cache[k] for k in keys])


# --- retrieval metrics ---------------------------------------------------------------------


def precision_at_k(relevant: np.ndarray, k: int) -> np.ndarray:
  """Per query, the share of its first k ranked results that are relevant (bool [Q, >= k])."""
  relevant = np.asarray(relevant, bool)
  if relevant.shape[-1] < k:
    raise ValueError(f"need at least k={k} ranked results, got {relevant.shape[-1]}")
  return relevant[..., :k].mean(axis=-1)


def average_precision(relevant: np.ndarray) -> np.ndarray:
  """Average precision of full rankings: mean of precision@r over the relevant ranks r.

  `relevant` is bool [Q, M], every ranked result (the whole database except the query).
  Returns float64 [Q]; NaN for a query with no relevant item (AP is undefined).
  """
  relevant = np.asarray(relevant, bool)
  hits = np.cumsum(relevant, axis=-1)
  ranks = np.arange(1, relevant.shape[-1] + 1)
  total = hits[..., -1] if relevant.shape[-1] else np.zeros(relevant.shape[:-1], int)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, np.sum(relevant * hits / ranks, axis=-1) / total, np.nan)


def rank_database(distances: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
  """Database rows by ascending distance [Q, N] -> int [Q, N], ties to the lower index;
  `exclude` (int [Q]) drops one row per query (its own row), giving [Q, N - 1]."""
  order = np.argsort(distances, axis=1, kind="stable")  # stable: equal distances keep index order
  if exclude is None:
    return order
  keep = order != np.asarray(exclude)[:, None]
  return order[keep].reshape(order.shape[0], order.shape[1] - 1)


# --- comparing two runs on the same queries -------------------------------------------------


def topk_overlap(a_indices: Any, b_indices: Any) -> np.ndarray:
  """Per query, the share of one top-k that is also in the other (order ignored): float64
  [Q] in [0, 1], 1 where the two top-k sets are equal.

  `a_indices` and `b_indices` are int [Q, k], the rows retrieved for the same Q queries by two
  runs (e.g. float32 and bfloat16 extractions), each row without repeats.
  """
  a, b = np.asarray(a_indices), np.asarray(b_indices)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"expected two top-k index arrays [Q, k] of one shape, got {a.shape} "
                     f"and {b.shape}")
  if a.shape[1] == 0:
    return np.ones(a.shape[0])
  return (a[:, :, None] == b[:, None, :]).any(axis=2).sum(axis=1) / a.shape[1]


def topk_agreement(a_indices: Any, b_indices: Any) -> np.ndarray:
  """Per query (bool [Q]), whether the two top-k sets (int [Q, k] as in `topk_overlap`) are
  the same, order inside the top-k ignored: all of one is in the other."""
  return topk_overlap(a_indices, b_indices) == 1.0


class PairedDifference(NamedTuple):
  """Mean of per-query differences and its standard error (queries taken as independent)."""
  mean: float
  se: float
  n: int  # queries where both values are defined


def paired_difference(a: Sequence[float | None], b: Sequence[float | None]
                      ) -> PairedDifference:
  """b - a per query, over the queries where both are defined (not None, not NaN).

  The standard error is std(b - a, ddof=1) / sqrt(n): how far the mean difference would
  move with another draw of queries, if queries were independent (neighbouring queries
  share results, so it is a rough figure).
  """
  if len(a) != len(b):
    raise ValueError(f"{len(a)} and {len(b)} per-query values: not the same queries")
  pairs = np.array([(x, y) for x, y in zip(a, b) if x is not None and y is not None],
                   np.float64).reshape(-1, 2)
  pairs = pairs[~np.isnan(pairs).any(axis=1)]
  d = pairs[:, 1] - pairs[:, 0]
  if len(d) < 2:
    raise ValueError(f"need at least 2 queries with both values, got {len(d)}")
  return PairedDifference(float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))), len(d))


# --- the protocol ----------------------------------------------------------------------------


PRECISION_CUTOFFS = (1, 5, 10)  # P@1, P@5, P@10 are always reported (with P@k)


@dataclasses.dataclass
class KindResult:
  """One row of the table. None marks a figure that is undefined or was not computed.

  Attributes:
    precision: cutoff c -> mean P@c over the queries that have another row of their label.
    mean_ap: mean average precision over the same queries.
    hist_distance: mean over queries of the mean histogram distance of the top-k (Table I);
      None when the images could not be read.
  """
  kind: str
  dim: int
  precision: dict[int, float | None]
  mean_ap: float | None
  hist_distance: float | None
  per_query_precision: dict[int, list[float | None]]
  per_query_ap: list[float | None]
  per_query_hist_distance: list[float] | None
  top_k: list[list[int]]  # retrieved rows per query


@dataclasses.dataclass
class Evaluation:
  """The table and what the reader needs to read it.

  Attributes:
    cutoffs: the P@c columns (P@1, P@5, P@10 and P@k, those below the database size).
    has_relevant: per query, whether another row has its label (else its P@c and AP are
      undefined and left out of the means).
    histogram_error: why the hist dist column is missing ("" when it is there).
  """
  results: list[KindResult]
  k: int
  cutoffs: tuple[int, ...]
  has_relevant: list[bool]
  histogram_error: str = ""


def select_queries(labels: np.ndarray, num_queries: int | None, seed: int) -> np.ndarray:
  """Query rows drawn without replacement (seeded) among rows with a known label (>= 0);
  every labelled row when `num_queries` is None or 0."""
  candidates = np.flatnonzero(np.asarray(labels) >= 0)
  if len(candidates) == 0:
    raise ValueError("no labelled rows to draw queries from (every label is -1); choose "
                     "another label column")
  if num_queries is None or num_queries <= 0:
    return candidates
  if num_queries > len(candidates):
    raise ValueError(f"num_queries={num_queries} but only {len(candidates)} labelled rows")
  return np.sort(np.random.default_rng(seed).choice(candidates, size=num_queries, replace=False))


def _rankings(descriptors: Mapping[str, Any], queries: np.ndarray, n: int,
              random_baseline: bool, seed: int) -> dict[str, tuple[int, np.ndarray]]:
  """kind -> (dimension, full ranking [Q, N - 1] without the query's own row)."""
  rankings = {}
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
  return rankings


def _histogram_distances(tops: Mapping[str, np.ndarray], queries: np.ndarray,
                         keys: Sequence[str], images: IndexImages | None, bins: int,
                         cache: MutableMapping[str, np.ndarray]
                         ) -> tuple[dict[str, np.ndarray] | None, str]:
  """(kind -> per-query mean histogram distance to its top-k, "") or (None, why not)."""
  needed = np.unique(np.concatenate([queries, *(top.ravel() for top in tops.values())]))
  try:
    hists = image_histograms([keys[r] for r in needed], images=images, bins=bins, cache=cache)
  except ImageUnavailable as e:
    return None, str(e)
  q_hist = hists[np.searchsorted(needed, queries)][:, None, :]
  return {kind: histogram_distance(q_hist, hists[np.searchsorted(needed, top)]).mean(axis=1)
          for kind, top in tops.items()}, ""


def _defined(values: np.ndarray, mask: np.ndarray) -> list[float | None]:
  return [float(v) if m else None for v, m in zip(values, mask)]


def evaluate_arrays(descriptors: Mapping[str, Any], labels: np.ndarray, keys: Sequence[str],
                    *, queries: np.ndarray, k: int = 5, bins: int = DEFAULT_BINS,
                    images: IndexImages | None = None,
                    histogram_cache: MutableMapping[str, np.ndarray] | None = None,
                    random_baseline: bool = True, seed: int = 0) -> Evaluation:
  """The protocol on in-memory (or memory-mapped) descriptors.

  Args:
    descriptors: kind -> [N, D], rows aligned with `labels` (int [N], the class of each row;
      -1 = unknown, never relevant) and `keys` (stored path or TFDS id of each row).
    queries: rows used as queries; each is left out of its own ranking.
    k: results per query for the histogram distance (and one more P@k column).
    images, bins, histogram_cache: where the images are read (default: files at the stored
      paths), the histograms' K, key -> histogram reused across calls. When the images
      cannot be read, everything but the histogram distance is still computed.
    random_baseline, seed: add a "random" row (a seeded random ranking per query).

  Returns:
    One KindResult per kind (and the baseline), in the order given, with the cutoffs.
  """
  labels = np.asarray(labels)
  n = len(labels)
  queries = np.asarray(queries, np.int64)
  if len(keys) != n:
    raise ValueError(f"{len(keys)} paths for {n} labels")
  if not 1 <= k <= n - 1:
    raise ValueError(f"k must be in [1, {n - 1}] (the database minus the query), got {k}")
  cutoffs = tuple(sorted({c for c in (*PRECISION_CUTOFFS, k) if c <= n - 1}))
  rankings = _rankings(descriptors, queries, n, random_baseline, seed)
  tops = {kind: ranking[:, :k] for kind, (_, ranking) in rankings.items()}
  hist, error = _histogram_distances(tops, queries, keys, images, bins,
                                     {} if histogram_cache is None else histogram_cache)
  # A query whose label no other row has: its P@c would be 0 and its AP undefined, whatever
  # the descriptor; both are left out of the means instead of dragging them to 0 / NaN.
  same = np.bincount(labels[labels >= 0], minlength=max(1, int(labels.max(initial=-1)) + 1))
  q_labels = labels[queries]
  has_relevant = (q_labels >= 0) & (same[np.maximum(q_labels, 0)] > 1)
  results = []
  for kind, (dim, ranking) in rankings.items():
    relevant = (labels[ranking] == q_labels[:, None]) & (labels[ranking] >= 0)
    p = {c: precision_at_k(relevant, c) for c in cutoffs}
    ap = average_precision(relevant)
    some = bool(has_relevant.any())
    results.append(KindResult(
        kind=kind, dim=dim,
        precision={c: float(v[has_relevant].mean()) if some else None for c, v in p.items()},
        mean_ap=float(ap[has_relevant].mean()) if some else None,
        hist_distance=float(hist[kind].mean()) if hist is not None else None,
        per_query_precision={c: _defined(v, has_relevant) for c, v in p.items()},
        per_query_ap=_defined(ap, has_relevant),
        per_query_hist_distance=hist[kind].tolist() if hist is not None else None,
        top_k=tops[kind].tolist()))
  return Evaluation(results=results, k=k, cutoffs=cutoffs,
                    has_relevant=has_relevant.tolist(), histogram_error=error)


def labels_from_metadata(meta: Mapping[str, np.ndarray], column: str = "label"
                         ) -> tuple[np.ndarray, list[str]]:
  """(int64 [N] labels, names of the label values) from a metadata column.

  The job's "label" column is used as it is (-1 = unknown); other columns (text such as
  imagenet-sample's "group", or the numbers of a TFDS feature or a webdataset json field)
  are numbered in sorted order of their values ("" and NaN = unknown).
  """
  if column not in meta:
    raise ValueError(f"no metadata column {column!r}; available: {sorted(meta)} (extra "
                     "columns come from the --labels_csv given to launch/extract.py)")
  values = np.asarray(meta[column])
  if column == "label" and np.issubdtype(values.dtype, np.integer):
    # names[v] names label value v: the extraction's label_name when it has one
    # (folder or CSV class names), else the number itself.
    names = [str(v) for v in range(int(values.max(initial=-1)) + 1)]
    for v, t in zip(values.tolist(), np.asarray(meta.get("label_name", ())).astype(str).tolist()):
      if v >= 0 and t:
        names[v] = t
    return values.astype(np.int64), names
  if values.dtype.kind not in "biuf":  # text; numbers of an extra column stay numbers
    values = values.astype(str)
  known = (~np.isnan(values) if values.dtype.kind == "f" else values != ""
           if values.dtype.kind == "U" else np.ones(len(values), bool))
  distinct, at = np.unique(values[known], return_inverse=True)  # sorted distinct values
  labels = np.full(len(values), -1, np.int64)
  labels[known] = at.reshape(-1)
  return labels, [str(v) for v in distinct.tolist()]


_NOT_LABELS = ("row", "path", "label_name", "width", "height")


def coarser_label_columns(meta: Mapping[str, np.ndarray], column: str) -> list[str]:
  """Metadata columns other than `column` in which some label value is shared by two rows."""
  out = []
  for c in sorted(set(meta) - {column, *_NOT_LABELS}):
    labels, _ = labels_from_metadata(meta, c)
    known = labels[labels >= 0]
    if len(np.unique(known)) < len(known):
      out.append(c)
  return out


def _undefined_reason(labels: np.ndarray, column: str, others: Sequence[str]) -> str:
  known = labels[labels >= 0]
  hint = (f"; a column where labels repeat: {', '.join('--label_column=' + c for c in others)}"
          if others else "; extract with a labels CSV that has a coarser column "
          "(launch/extract.py --labels_csv) to evaluate class agreement")
  return (f"P@k and mAP are undefined: no query has another row with its label in "
          f"{column!r} ({len(np.unique(known))} distinct labels among {len(known)} labelled "
          f"rows){hint}")


def _load_kinds(index_dir: str, kinds: Sequence[str],
                balance_from: str | None
                ) -> tuple[dict[str, Any], dict[str, np.ndarray], balance.BlockScales | None]:
  """(kind -> rows, metadata, the block scales when a derived kind is asked for)."""
  from cbir_jax import store

  stored, metas = {}, []

  def load(kind: str) -> Any:
    if kind not in stored:
      stored[kind], m = store.load_descriptors(index_dir, kind)
      metas.append(m)
    return stored[kind]

  derived = [k for k in kinds if k in balance.DERIVED_KINDS]
  for kind in derived:
    for need in balance.DERIVED_KINDS[kind]:
      try:
        load(need)
      except store.StoreError as e:
        raise ValueError(f"{kind} is made from the stored kind {need}: {e}") from None
  scales = (balance.index_scales(index_dir, balance_from, conv=stored["conv"]) if derived
            else None)
  arrays = {k: balance.derive(k, stored, scales) if k in balance.DERIVED_KINDS else load(k)
            for k in kinds}
  return arrays, metas[0], scales


def evaluate(index_dir: str, *, kinds: Sequence[str] | None = None,
             num_queries: int | None = None, k: int = 5, seed: int = 0,
             label_column: str = "label", bins: int = DEFAULT_BINS,
             random_baseline: bool = True, image_root: str | None = None,
             balance_from: str | None = None) -> dict[str, Any]:
  """The protocol on an extraction output directory (see `evaluate_arrays`).

  The arguments are the fields of `EvaluateConfig` (`index_dir` is its `index`, and
  `num_queries` None means every labelled row), plus `random_baseline`: add the "random" row.

  Returns:
    A JSON-ready dict: settings, the query rows and paths, and one entry per kind
    (undefined or missing figures are None, with the reason under "notes"); with a
    balanced kind, "balance" holds the block scales used (balance.BlockScales).
  """
  from cbir_jax import store

  manifest = store.read_manifest(index_dir)
  kinds = list(kinds or manifest["settings"]["kinds"])
  arrays, meta, scales = _load_kinds(index_dir, kinds, balance_from)  # refuses old formats
  images = IndexImages(input_of(manifest), image_root=image_root)
  labels, names = labels_from_metadata(meta, label_column)
  keys = [str(p) for p in meta["path"]]
  queries = select_queries(labels, num_queries, seed)
  ev = evaluate_arrays(arrays, labels, keys, queries=queries, k=k, bins=bins, images=images,
                       random_baseline=random_baseline, seed=seed)
  undefined = "" if any(ev.has_relevant) else _undefined_reason(
      labels, label_column, coarser_label_columns(meta, label_column))
  return {
      "index": os.path.abspath(index_dir), "backbone": manifest.get("backbone"),
      "images": images.describe(), "label_column": label_column,
      "num_labels": int(len(np.unique(labels[labels >= 0]))), "num_rows": len(labels),
      "num_labelled": int((labels >= 0).sum()), "num_queries": int(len(queries)),
      "all_queries": not num_queries, "k": k, "cutoffs": list(ev.cutoffs), "seed": seed,
      "bins": bins, "queries_without_relevant": int(len(queries) - sum(ev.has_relevant)),
      "notes": {"undefined": undefined, "histograms": ev.histogram_error},
      "queries": [{"row": int(r), "path": keys[r], "label": names[labels[r]]} for r in queries],
      "results": {r.kind: _result_dict(r, k) for r in ev.results},
      **({"balance": scales.to_dict()} if scales is not None else {})}


@dataclasses.dataclass
class EvaluateConfig:
  """One run of launch/evaluate.py: the arguments of `evaluate`, and where the JSON goes.

  Attributes:
    index: extraction output directory.
    kinds: descriptor kinds (default: every extracted kind).
    num_queries: queries drawn (seeded) from the labelled rows (0: every labelled row).
    k: results per query for the histogram distance (P@1, P@5 and P@10 are always shown,
      with P@k).
    seed: seed of the query draw and of the random baseline.
    label_column: metadata column giving the class (e.g. group, an extra column of a
      labels CSV).
    bins: histogram bins per channel.
    image_root: where the index's image folder (or TFDS data_dir) is now, if it moved
      since the extraction.
    balance_from: learn the block scales of conv_balanced / fc_conv_balanced from this
      index (same backbone) instead of the evaluated one.
    json: write the numbers (and per-query results) to this file.
  """
  index: str
  kinds: tuple[EvalKind, ...] | None = None
  num_queries: int = 0
  k: int = 5
  seed: int = 0
  label_column: str = "label"
  bins: int = DEFAULT_BINS
  image_root: str | None = None
  balance_from: str | None = None
  json: str | None = None


def _result_dict(r: KindResult, k: int) -> dict[str, Any]:
  return {"dim": r.dim, "precision": {str(c): v for c, v in r.precision.items()},
          "precision_at_k": r.precision.get(k), "map": r.mean_ap,
          "hist_distance": r.hist_distance, "per_query_hist_distance": r.per_query_hist_distance,
          "per_query_precision": r.per_query_precision.get(k), "per_query_ap": r.per_query_ap,
          "top_k": r.top_k}


def format_table(report: Mapping[str, Any]) -> str:
  """The paper's Table I (mean histogram distance of the top-k) with P@c and mAP, plus the
  lines that say how to read it and what is missing."""
  k, cutoffs = report["k"], report["cutoffs"]
  drawn = ("every labelled row" if report["all_queries"] else
           f"drawn with seed {report['seed']} from {report['num_labelled']} labelled rows")
  hist_head = f"hist dist@{k}"
  name_width = max([12, *(len(kind) + 1 for kind in report["results"])])  # fc_conv_balanced
  lines = [f"{report['index']}: {report['backbone']}, {report['num_rows']} rows; labels from "
           f"{report['label_column']!r} ({report['num_labels']} classes)",
           f"{report['num_queries']} queries ({drawn}), each left out of its own ranking",
           f"{'descriptor':<{name_width}}{'dim':>6}"
           + "".join(f"{'P@' + str(c):>8}" for c in cutoffs) + f"{'mAP':>8}{hist_head:>14}"]

  def num(v: float | None, width: int, digits: int) -> str:
    return f"{'-' if v is None else format(v, f'.{digits}f'):>{width}}"

  for kind, r in report["results"].items():
    lines.append(f"{kind:<{name_width}}{str(r['dim']) if r['dim'] else '-':>6}"
                 + "".join(num(r["precision"][str(c)], 8, 3) for c in cutoffs)
                 + num(r["map"], 8, 3) + num(r["hist_distance"], 14, 4))
  notes = report["notes"]
  without = report["queries_without_relevant"]
  if notes["undefined"]:
    lines.append(notes["undefined"])
  elif without:
    lines.append(f"P@k and mAP: over the {report['num_queries'] - without} queries that have "
                 f"another row of their label ({without} have none)")
  if notes["histograms"]:
    lines.append(f"{hist_head}: not computed: {notes['histograms']}")
  else:
    lines.append(f"{hist_head}: RGB-histogram distance (L1 / {3 * report['bins']}) of a query "
                 f"to its top {k}, averaged; lower = closer in colour")
  if RANDOM in report["results"]:
    lines.append(f"{RANDOM}: the other rows in random order per query (seed {report['seed']}): "
                 "the floor")
  return "\n".join(lines)
