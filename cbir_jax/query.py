"""Searching an extraction output: query images described as the index was, ranked results, JSON.

The index and query layer over the L1 kernel of search.py: it opens an index, runs query
images through the weights the index was made with, finds a query image that is itself in
the index (same file, or same pixels), and formats results as a table or as JSON.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import numpy as np

from cbir_jax import decode, index_images, search, store
from cbir_jax.choices import Kind
from cbir_jax.index_images import ImageUnavailable, IndexImages
from cbir_jax.names import shown

# A hit this close to the query (relative to the query's mean value) may be the query image
# itself; its pixels decide. The same image described alone or in a batch differs by float
# rounding only, far below this.
_SAME_IMAGE_RTOL = 1e-3


@dataclasses.dataclass(frozen=True)
class Hit:
  """One image of a result row."""
  path: str
  distance: float = float("nan")  # descriptor distance to the query (L1 / D)
  label: str = ""
  row: int = -1  # database row; -1 for a query image given as a file


@dataclasses.dataclass(frozen=True)
class QueryResult:
  """A query and its ranked results, nearest first.

  Attributes:
    self_row: the index row that is the query itself (a row query's own row, or the row of
      a query image found in the index), -1 if none.
    self_match: how it was found: "row", "same file" or "same pixels" ("" if not).
    self_excluded: the self row was left out of `hits` (exclude_self).
  """
  query: Hit
  hits: tuple[Hit, ...]
  kind: str = ""
  self_row: int = -1
  self_match: str = ""
  self_excluded: bool = False


class IndexMismatch(ValueError):
  """A query cannot be described the way the index was (other weights, preprocessing, ...)."""


@dataclasses.dataclass
class SearchConfig:
  """One search of an extraction output (launch/search.py).

  Attributes:
    index: extraction output directory (launch/extract.py --output).
    query: a query image file; repeat the flag for more (--query=a.jpg --query=b,c.jpg:
      each value is one name, commas and all; a value that is no file but whose
      comma-separated pieces all are files is taken as that list). Described with the
      backbone, weights and preprocessing the index records (other weights are refused).
    query_ids: rows of the index used as queries, comma-separated.
    kind: descriptor kind to search with; unset: fc_conv when the index has it, else the
      first it has of conv, fc, gem, mac, spoc (an index of weights without FC layers:
      conv), and a note names the kind used.
    k: results per query; more than the index holds gives all of it, with a note.
    exclude_self: leave the query itself out of its results: a row query's own row, or the
      row of a query image that is in the index (same file, or same pixels).
    image_root: where the index's image folder (or TFDS data_dir) is now, if it moved since
      the extraction: query images are matched against it, and --report reads from it.
    report: folder for a picture report (results.png, results.html and the images shown).
    json: print the results as JSON (query, rank, row, distance, path, label) instead of a
      table.
    ann: search through the approximate index built by launch/index.py (INDEX/ann/KIND/):
      candidates from faiss, re-ranked by exact L1 on the device; refused if the index
      changed since it was built. Off: exact search of every row.
    weights: the folder of the weights the index was made with, when they moved since the
      extraction (the index records where they were): used only if they are the same
      weights (their params_sha256 equals the one the index records).
  """
  index: str
  query: tuple[str, ...] = ()
  query_ids: tuple[int, ...] = ()
  kind: Kind | None = None
  k: int = 5
  exclude_self: bool = False
  image_root: str | None = None
  report: str | None = None
  json: bool = False
  ann: bool = False
  weights: str | None = None


class Describer:
  """Query images described exactly as the index's rows were, the weights loaded once.

  The backbone, preprocessing, input size, decoding, descriptor settings and compute dtype
  the manifest (a `manifest.Manifest` or its dict) records, and the rows' rounding (float16
  output), so an image of the index finds itself at distance ~0. The weights are those the
  manifest records, found by digest (`weights.load_recorded`), or read from `weights_dir`
  when given (they moved) and checked to be the same (`weights.load_from`).

  Raises:
    IndexMismatch: the weights are missing or other weights, or their preprocessing differs
      from the recorded one.
  """

  def __init__(self, manifest: Any, kind: str, *, max_pixels: int = decode.MAX_PIXELS,
               weights_dir: str | None = None):
    from cbir_jax import backbones, checkpoint, inference
    from cbir_jax import descriptors as desc
    from cbir_jax import preprocessing as pp
    from cbir_jax import weights as weights_lib
    from cbir_jax.manifest import Manifest

    m = manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest)
    self.settings = s = m.settings
    backbone, prep = backbones.get(s.backbone), pp.Preprocessing.from_dict(s.preprocessing)
    try:
      if weights_dir is not None:
        loaded = weights_lib.load_from(backbone.name, m.weights, weights_dir,
                                       image_size=s.image_size)
      else:
        loaded = weights_lib.load_recorded(backbone.name, m.weights, image_size=s.image_size)
    except weights_lib.WeightsNotFound as e:
      if e.found:
        raise IndexMismatch(
            f"the weights found for {backbone.name} (params_sha256 {e.found[0][:12]}) are not "
            f"the ones the index was made with ({m.weights.params_sha256[:12]}); restore them, "
            "give their folder with --weights, or extract the collection again") from None
      raise IndexMismatch(f"cannot load the weights the index was made with: {e}; if they "
                          "moved, give their folder with --weights") from None
    except checkpoint.WeightsError as e:  # load_from's own messages say what to give instead
      hint = "" if weights_dir is not None else "; restore them or extract the collection again"
      raise IndexMismatch(f"cannot load the weights the index was made with: {e}{hint}"
                          ) from None
    if loaded.preprocessing != prep:
      raise IndexMismatch(f"the weights found for the index use preprocessing "
                          f"{loaded.preprocessing.name!r} but the index records {prep.name!r}")
    self._params, self._max_pixels, self._kind = loaded.params, max_pixels, kind
    self._fn = inference.jit_describe(backbone, preprocessing=prep, kinds=(kind,),
                                      config=desc.DescriptorConfig(**s.descriptor),
                                      dtype=inference.compute_dtype(s.dtype))

  def pixels(self, data: bytes) -> np.ndarray:
    """The network input of encoded bytes (uint8 [H, W, 3]); ValueError: not an image, bomb."""
    s = self.settings
    return decode.decode_image(data, s.image_size, draft=s.draft, max_pixels=self._max_pixels)[0]

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """Descriptors [N, D] float32 of network inputs [N, H, W, 3], rounded like stored rows."""
    out = np.asarray(self._fn(self._params, images)[self._kind], np.float32)
    if self.settings.output_dtype == "float16":
      out = out.astype(np.float16).astype(np.float32)
    return out


def describe_images(manifest: Any, paths: Any, kind: str, *, weights_dir: str | None = None
                    ) -> np.ndarray:
  """Descriptors of image files made exactly as the index's were (see `Describer`).

  Raises:
    IndexMismatch: the weights are missing, other weights or other preprocessing.
    ValueError: an image cannot be decoded (names the file).
  """
  from cbir_jax import input_pipeline

  describe = Describer(manifest, kind, weights_dir=weights_dir)
  s = describe.settings
  images, errors = input_pipeline.load_images(list(paths), s.image_size, draft=s.draft)
  bad = [f"{p}: {e}" for p, e in zip(paths, errors) if e]
  if bad:
    raise ValueError("cannot decode query images: " + "; ".join(bad))
  return describe(images)


# --- an open index --------------------------------------------------------------------------


@dataclasses.dataclass
class OpenIndex:
  """An index opened for searching (by search_index, and once by the query service):
  manifest, descriptors, metadata, and its images."""
  manifest: Any
  database: np.ndarray
  meta: dict[str, np.ndarray]
  images: IndexImages

  @classmethod
  def open(cls, index_dir: str, kind: str, image_root: str | None) -> "OpenIndex":
    manifest, database, meta = store.open_index(index_dir, kind)
    # A bad image_root is an error before anything is computed.
    return cls(manifest, database, meta,
               IndexImages(index_images.input_of(manifest), image_root=image_root))

  def label_of(self, row: int) -> str:
    """A row's label as shown: its class name, else its label number, else "" (unlabelled)."""
    names, labels = self.meta.get("label_name"), self.meta.get("label")
    if names is not None and str(names[row]):
      return str(names[row])
    return str(labels[row]) if labels is not None and labels[row] >= 0 else ""

  def hit(self, row: int, distance: float = float("nan")) -> Hit:
    return Hit(path=str(self.meta["path"][row]), distance=distance, label=self.label_of(row),
               row=row)

  @functools.cached_property
  def _rows_by_path(self) -> dict[str, int]:
    found: dict[str, int] = {}
    for row, stored in enumerate(self.meta["path"]):  # the job stores absolute, normal paths
      found.setdefault(str(stored), row)
    return found

  def row_of(self, path: str) -> int:
    """The row whose stored file is the query file `path`, -1 if none: as given, with links
    resolved, or placed back under the recorded folder when it is under --image_root (the
    folder moved). TFDS rows are ids, not files."""
    if self.images.source.type == index_images.TFDS:
      return -1
    forms = [os.path.abspath(path), os.path.realpath(path)]
    root, now = self.images.source.root, self.images.image_root
    if root and now:
      for f in forms[:2]:
        rel = os.path.relpath(f, now)
        if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
          forms.append(os.path.join(root, rel))
    keys = [os.path.normpath(f) for f in forms]
    return next((self._rows_by_path[k] for k in keys if k in self._rows_by_path), -1)

  def _self_by_pixels(self, read: Callable[[], bytes], q: np.ndarray, distances: np.ndarray,
                      rows: np.ndarray) -> int:
    """The first result at (nearly) distance 0 that is the query image itself (equal bytes or
    equal pixels; `read` gives the query's bytes), or -1."""
    tol = max(_SAME_IMAGE_RTOL * float(np.mean(np.abs(q))), 1e-6)
    for d, row in zip(distances, rows):
      if d > tol:
        break
      try:
        mine, theirs = read(), self.images.read_bytes(str(self.meta["path"][int(row)]))
      except (OSError, ImageUnavailable):
        continue
      if mine == theirs:
        return int(row)
      try:
        a, b = index_images.decode_rgb(mine), index_images.decode_rgb(theirs)
      except ValueError:
        continue
      if a.shape == b.shape and np.array_equal(a, b):
        return int(row)
    return -1

  def result(self, q: np.ndarray, distances: np.ndarray, rows: np.ndarray, *, query: Hit,
             own: int, kind: str, k: int, exclude_self: bool,
             read: Callable[[], bytes] | None = None) -> QueryResult:
    """One query's QueryResult from its nearest rows.

    `own` is the query's row known before searching (a row query's row, or the row of its
    stored file, else -1: then it is looked for by pixels, `read` giving the query image's
    bytes); it is left out of the k hits with `exclude_self`.
    """
    how = ("row" if query.row >= 0 else "same file") if own >= 0 else ""
    if own < 0:
      own = self._self_by_pixels(read, q, distances, rows)
      how = "same pixels" if own >= 0 else ""
    if query.row < 0 and own >= 0:
      query = dataclasses.replace(query, label=self.label_of(own))
    hits = [self.hit(int(i), float(x)) for x, i in zip(distances, rows)
            if not (exclude_self and int(i) == own)][:k]
    return QueryResult(query=query, hits=tuple(hits), kind=kind, self_row=own, self_match=how,
                       self_excluded=exclude_self and own >= 0)


def wanted(k: int, num_rows: int, exclude_self: bool, own: Sequence[int]) -> int:
  """How many nearest rows to search for: k, one more when an excluded query may be found by
  its pixels only (dropped afterwards), at most what the search can return."""
  return min(k + int(exclude_self and min(own) < 0),
             num_rows - int(exclude_self and max(own) >= 0))


def _values(values: Any) -> list[str]:
  """A flag's values as given from Python: one string, or a sequence (of strings, numbers)."""
  return [str(v) for v in ([values] if isinstance(values, str) else values or ())]


def query_names(values: Any) -> list[str]:
  """Query file names from --query values: each value is one file name, commas and all.

  A value that is not a file but whose comma-separated pieces all are is taken as a list
  (`--query=a.jpg,b.jpg`, as before); anything else stays whole, so a name with a comma
  is never split (and a missing file is reported under the name given).
  """
  out = []
  for v in _values(values):
    pieces = [p.strip() for p in v.split(",")]
    if "," in v and not os.path.lexists(v) and all(p and os.path.lexists(p) for p in pieces):
      out += pieces
    elif v.strip():
      out.append(v)
  return out


def clamp_k(k: int, num_rows: int, *, exclude_self: bool,
            note: Callable[[str], None] | None = None) -> int:
  """k, or all the index offers (its rows, minus the query itself when excluded), with a note.

  Raises:
    ValueError: k < 1, or nothing is left to return.
  """
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive integer, got {k!r}")
  limit = num_rows - (1 if exclude_self else 0)
  if limit < 1:
    raise ValueError(f"the index has {num_rows} row(s): nothing is left once the query itself "
                     "is excluded")
  if k > limit and note is not None:
    note(f"k={k} is more than the index has ({num_rows} rows"
         f"{', minus the query itself' if exclude_self else ''}): showing all {limit}")
  return min(int(k), limit)


def search_index(index_dir: str, *, kind: str | None = None, k: int = 5,
                 query_paths: Any = (), query_ids: Any = (), exclude_self: bool = False,
                 image_root: str | None = None, note: Callable[[str], None] | None = None,
                 ann: bool = False, weights: str | None = None, **search_kwargs: Any
                 ) -> list[QueryResult]:
  """Searches an extraction output with image files and/or rows of the index.

  The arguments mean what `SearchConfig`'s fields of the same names do (`query_paths` is its
  `query`: see `query_names`); `note` receives one line each for a kind chosen by
  `store.choose_kind` other than fc_conv, a k clamped by `clamp_k` and the approximate index
  used; `search_kwargs` go to `search.l1_topk` (tiling, mesh). A query image that is itself
  in the index (its stored file, also under `image_root`, or an image with the same pixels)
  is recognised: `QueryResult.self_row` names its row.

  Returns:
    One QueryResult per query: image files first, then rows, in the order given. A query
    file's path is absolute, like the stored paths of its results.
  """
  paths = query_names(query_paths)
  ids = [int(s) for v in _values(query_ids) for s in v.split(",") if s.strip()]
  if not paths and not ids:
    raise ValueError("no queries: give image files (--query) or index rows (--query_ids)")
  note = note or (lambda line: None)
  kind, why = store.choose_kind(index_dir, kind)
  if why:
    note(why)
  index = OpenIndex.open(index_dir, kind, image_root)
  topk = search.l1_topk
  if ann:
    from cbir_jax import ann as ann_lib  # faiss: only when asked for

    approx = ann_lib.load(index_dir, kind)
    topk = functools.partial(ann_lib.ann_topk, ann=approx)
    r = approx.record
    note(f"approximate search: {r.type} index of {r.rows} rows ({approx.where}), "
         f"{r.candidates} candidates re-ranked exactly")
  n = index.database.shape[0]
  bad = [i for i in ids if not 0 <= i < n]
  if bad:
    raise ValueError(f"query ids {bad} are not rows of the index (0..{n - 1})")
  k = clamp_k(k, n, exclude_self=exclude_self, note=note)
  own = [index.row_of(p) for p in paths] + ids  # the self row known before searching
  exclude = np.asarray([r if exclude_self else -1 for r in own], np.int64)
  queries = np.concatenate(
      ([describe_images(index.manifest, paths, kind, weights_dir=weights)] if paths else [])
      + ([np.asarray(index.database[ids], np.float32)] if ids else []))
  want = wanted(k, n, exclude_self, own)
  top = topk(queries, index.database, k=want, exclude=exclude, **search_kwargs)
  # A query file is shown absolute, as the job stores its results' paths: one form to read
  # and to copy, whatever folder the command ran in.
  asked = [Hit(path=os.path.abspath(p)) for p in paths] + [index.hit(i) for i in ids]
  reads = [functools.partial(decode.read_file, p) for p in paths] + [None] * len(ids)
  return [index.result(q, top.distances[a], top.indices[a], query=asked[a], own=own[a],
                       kind=kind, k=k, exclude_self=exclude_self, read=reads[a])
          for a, q in enumerate(queries)]


# --- output ---------------------------------------------------------------------------------


def _header(r: QueryResult) -> str:
  where = f"row {r.query.row}" if r.query.row >= 0 else "image"
  line = f"query ({where}, {r.kind}): {shown(r.query.path)}"
  if r.query.row < 0 and r.self_row >= 0:
    line += f"  [in the index: row {r.self_row}, {r.self_match}"
    return line + ("; left out]" if r.self_excluded else "]")
  return line + ("  [own row left out]" if r.self_excluded else "")


def format_results(results: Sequence[QueryResult]) -> str:
  """Ranked table per query: rank, distance, path, label; the query's own row is marked.

  An unlabelled row shows no label (and a table of unlabelled rows no label column). One
  line per result whatever the names hold: see `names.shown`.
  """
  lines = []
  for r in results:
    lines.append(_header(r))
    labelled = any(h.label for h in r.hits)
    lines.append(f"{'rank':>4}  {'distance':>10}  path" + ("  [label]" if labelled else ""))
    for rank, h in enumerate(r.hits, 1):
      label = f"  [{shown(h.label)}]" if h.label else ""
      own = "  (the query itself)" if h.row == r.self_row >= 0 else ""
      lines.append(f"{rank:>4}  {h.distance:>10.6f}  {shown(h.path)}{label}{own}")
  return "\n".join(lines)


def results_json(results: Sequence[QueryResult], *, index: str, notes: Sequence[str] = ()
                 ) -> dict[str, Any]:
  """The results as one JSON-ready dict: a flat list of result rows under "results".

  Each row: query (file or stored path), query_row (a row query's row, else null), self_row
  (the query's own row in the index, else null), rank (1 = nearest), row, distance (L1 / D),
  path, label ("" if none) and self (the row is the query itself).
  """
  rows = []
  for r in results:
    for rank, h in enumerate(r.hits, 1):
      rows.append({"query": r.query.path, "query_row": r.query.row if r.query.row >= 0 else None,
                   "self_row": r.self_row if r.self_row >= 0 else None, "rank": rank,
                   "row": h.row, "distance": h.distance, "path": h.path, "label": h.label,
                   "self": h.row == r.self_row >= 0})
  kinds = sorted({r.kind for r in results})
  return {"index": index, "kind": kinds[0] if len(kinds) == 1 else kinds,
          "k": max((len(r.hits) for r in results), default=0), "notes": list(notes),
          "results": rows}


__all__ = ["Describer", "Hit", "IndexMismatch", "OpenIndex", "QueryResult", "SearchConfig",
           "clamp_k", "describe_images", "format_results", "results_json", "search_index",
           "wanted"]
