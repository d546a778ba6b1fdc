"""Near-duplicate groups of an index: rows whose descriptors are closer than a threshold.

Two rows are linked when their L1/D distance (the search metric, SPEC.md section 3) is below
`threshold`; groups are the connected components of those links (single linkage: a chain of
close pairs is one group). Rows whose image files have equal bytes are linked too (exact
copies, by SHA-256), whatever their descriptors. Each row's neighbours come from one exact
k-nearest search of the index against itself (`search.l1_topk`), so a group larger than
`k + 1` is still found through its chains, and the cost is one search pass.

  groups = find_groups(x, threshold=0.02, k=8)            # arrays in, groups out
  groups = run(DedupConfig(index="out/food7"))              # an index: printed, --json, --report
"""
from __future__ import annotations

import dataclasses
import hashlib
import html
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from cbir_jax import search
from cbir_jax.choices import Kind
from cbir_jax.names import shown


@dataclasses.dataclass(frozen=True)
class Group:
  """One group of near-duplicates."""
  rows: tuple[int, ...]  # index rows, ascending
  max_distance: float  # the largest L1/D distance of a link inside (0 for exact copies only)
  exact: bool  # whether every row of the group has the same file bytes


def _find(parent: np.ndarray, i: int) -> int:
  while parent[i] != i:
    parent[i] = parent[parent[i]]  # path halving keeps the trees flat
    i = parent[i]
  return i


def link_groups(num_rows: int, pairs: Sequence[tuple[int, int]]) -> list[tuple[int, ...]]:
  """Connected components of `pairs` over rows 0..num_rows-1 with two or more rows.

  Components come ordered by their first row; rows inside ascend.
  """
  parent = np.arange(num_rows)
  for a, b in pairs:
    ra, rb = _find(parent, int(a)), _find(parent, int(b))
    parent[max(ra, rb)] = min(ra, rb)  # the root of a component is its first row
  members: dict[int, list[int]] = {}
  for i in range(num_rows):
    members.setdefault(_find(parent, i), []).append(i)
  return sorted((tuple(m) for m in members.values() if len(m) > 1), key=lambda g: g[0])


def close_pairs(x: Any, *, threshold: float, k: int) -> list[tuple[int, int, float]]:
  """(a, b, distance) for every row a and each of its k nearest rows b with distance < threshold.

  Exact L1/D search of `x` against itself, each row's own row excluded.
  """
  n = x.shape[0]
  if n < 2:
    return []
  k = min(k, n - 1)
  pairs = []
  for start in range(0, n, 4096):  # query blocks keep the result arrays small
    stop = min(n, start + 4096)
    q = np.asarray(x[start:stop], np.float32)
    top = search.l1_topk(q, x, k, exclude=np.arange(start, stop))
    for a, (ds, bs) in enumerate(zip(np.asarray(top.distances), np.asarray(top.indices)),
                                 start=start):
      pairs += [(a, int(b), float(d)) for d, b in zip(ds, bs) if d < threshold]
  return pairs


def find_groups(x: Any, *, threshold: float, k: int = 8,
                digests: Sequence[str] | None = None) -> list[Group]:
  """Groups of rows of `x` closer than `threshold` (L1/D, exclusive), plus rows with equal
  `digests`, ordered by their first row.

  `x` is [N, D] (any sliceable array, e.g. `load_descriptors`' view), searched for the k
  nearest rows of each; `digests` are per-row content digests ("" for unknown).
  """
  pairs = close_pairs(x, threshold=threshold, k=k)
  links = [(a, b) for a, b, _ in pairs]
  if digests is not None:
    first: dict[str, int] = {}
    for i, d in enumerate(digests):
      if d:
        links.append((first.setdefault(d, i), i))
  dist = {(min(a, b), max(a, b)): d for a, b, d in pairs}
  groups = []
  for rows in link_groups(x.shape[0], links):
    inside = set(rows)
    ds = [d for (a, b), d in dist.items() if a in inside and b in inside]
    exact = digests is not None and len({digests[r] for r in rows}) == 1 and bool(digests[rows[0]])
    groups.append(Group(rows=rows, max_distance=max(ds, default=0.0), exact=exact))
  return groups


def file_digests(paths: Sequence[str], read_bytes) -> list[str]:
  """SHA-256 of each image's bytes ("" where it cannot be read: no exact-copy link)."""
  out = []
  for p in paths:
    try:
      out.append(hashlib.sha256(read_bytes(p)).hexdigest())
    except (OSError, ValueError):
      out.append("")
  return out


def summary_line(groups: Sequence[Group], num_rows: int) -> str:
  in_groups = sum(len(g.rows) for g in groups)
  exact = sum(g.exact for g in groups)
  return (f"{len(groups)} groups ({exact} of exact copies) holding {in_groups} of {num_rows} rows; "
          f"{in_groups - len(groups)} rows could be dropped keeping one per group")


def format_groups(groups: Sequence[Group], paths: Sequence[str], *, limit: int | None = None) -> str:
  """One block per group: its header, then one row per member (row, path)."""
  lines = []
  for n, g in enumerate(groups[:limit], start=1):
    what = "exact copies" if g.exact else f"max distance {g.max_distance:.4f}"
    lines.append(f"group {n}: {len(g.rows)} rows, {what}")
    lines += [f"  {r:>7}  {shown(paths[r])}" for r in g.rows]
  return "\n".join(lines)


def write_page(out_dir: str | os.PathLike, groups: Sequence[Group], paths: Sequence[str],
               read_rgb, *, title: str, thumb: int = 160, limit: int = 200) -> pathlib.Path:
  """groups.html in `out_dir`: one row of thumbnails per group (at most `limit` groups).

  Thumbnails are written beside the page (thumbs/ROW.jpg) and the page links only inside
  `out_dir`, so the folder can be moved or sent. An unreadable image is a grey box.
  """
  from PIL import Image  # only the page needs Pillow's encoder here

  out = pathlib.Path(out_dir)
  (out / "thumbs").mkdir(parents=True, exist_ok=True)
  body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(summary_line(groups, len(paths)))}</p>"]
  for n, g in enumerate(groups[:limit], start=1):
    what = "exact copies" if g.exact else f"max L1/D distance {g.max_distance:.4f}"
    cells = []
    for r in g.rows:
      try:
        img = Image.fromarray(read_rgb(paths[r]))
        img.thumbnail((thumb, thumb))
      except (OSError, ValueError):
        img = Image.new("RGB", (thumb, thumb), (128, 128, 128))
      img.save(out / "thumbs" / f"{r}.jpg", quality=85)
      name = html.escape(shown(os.path.basename(paths[r])))
      cells.append(f'<figure><img src="thumbs/{r}.jpg" alt="row {r}"><figcaption>row {r}<br>'
                   f"{name}</figcaption></figure>")
    body.append(f"<section><h2>group {n}: {len(g.rows)} rows, {what}</h2>{''.join(cells)}</section>")
  if len(groups) > limit:
    body.append(f"<p>{len(groups) - limit} more groups not shown (see the console or --json).</p>")
  style = ("body{font-family:sans-serif;margin:1em} section{margin-bottom:1.5em} "
           "figure{display:inline-block;margin:4px;text-align:center;font-size:12px;"
           f"max-width:{thumb}px;overflow-wrap:anywhere}}")
  page = out / "groups.html"
  page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>"
                  f"{html.escape(title)}</title><style>{style}</style></head><body>"
                  + "\n".join(body) + "</body></html>", encoding="utf-8")
  return page


def typical_distance(x: Any, *, pairs: int = 2000, seed: int = 0) -> float:
  """Median L1/D distance of random row pairs: the scale a relative threshold refers to."""
  n = x.shape[0]
  if n < 2:
    return 0.0
  rng = np.random.default_rng(seed)
  a = rng.integers(0, n, pairs)
  b = (a + rng.integers(1, n, pairs)) % n  # never a row with itself
  rows = np.unique(np.concatenate([a, b]))
  vals = {r: np.asarray(x[r], np.float64) for r in rows}
  return float(np.median([np.abs(vals[i] - vals[j]).mean() for i, j in zip(a, b)]))


@dataclasses.dataclass
class DedupConfig:
  """Near-duplicate groups of an extraction output.

  Attributes:
    index: extraction output directory.
    kind: descriptor kind compared; unset: fc_conv when the index has it, else conv, ...
      (`store.choose_kind`, as cbir-search).
    threshold: L1/D distance below which two rows are near-duplicates; unset: `fraction`
      times the median distance of random row pairs (scale-free across kinds and models).
    fraction: the relative threshold when `threshold` is unset.
    k: nearest neighbours looked at per row (groups larger than k+1 are still found
      through chains of close pairs).
    exact: also link rows whose image files have equal bytes (SHA-256; reads every image).
    report: folder for groups.html with thumbnails of each group (unset: none).
    image_root: where the index's images are now, if they moved since the extraction.
    json: write the groups as JSON to this file.
    show: groups printed on the console (all are in --json and the page).
  """
  index: str
  kind: Kind | None = None
  threshold: float | None = None
  fraction: float = 0.2
  k: int = 8
  exact: bool = True
  report: str | None = None
  image_root: str | None = None
  json: str | None = None
  show: int = 20


def run(c: DedupConfig, *, log=print) -> list[Group]:
  """Finds, prints and (optionally) writes the groups of one index."""
  import json as json_lib

  from cbir_jax import store
  from cbir_jax.index_images import IndexImages

  if c.k < 1 or c.fraction <= 0 or (c.threshold is not None and c.threshold <= 0):
    raise ValueError("k, fraction and threshold must be positive")
  kind, why = store.choose_kind(c.index, c.kind)
  if why:
    log(why)
  x, meta = store.load_descriptors(c.index, kind=kind)
  paths = [str(p) for p in meta["path"]]
  images = IndexImages.of_index(c.index, image_root=c.image_root)
  typical = typical_distance(x)
  threshold = c.threshold if c.threshold is not None else c.fraction * typical
  digests = file_digests(paths, images.read_bytes) if c.exact else None
  if digests is not None and not any(digests):
    log(f"dedup: images not readable under {images.describe()}: no exact-copy check")
  groups = find_groups(x, threshold=threshold, k=c.k, digests=digests)
  print(f"{c.index} ({kind}, {len(paths)} rows): threshold {threshold:.4f} L1/D "
        f"(median pair distance {typical:.4f})")
  print(summary_line(groups, len(paths)))
  if groups:
    print(format_groups(groups, paths, limit=c.show))
    if len(groups) > c.show:
      print(f"... {len(groups) - c.show} more groups (--show, --json, --report)")
  if c.json:
    doc = {"index": c.index, "kind": kind, "threshold": threshold, "median_distance": typical,
           "groups": [{"rows": list(g.rows), "paths": [paths[r] for r in g.rows],
                       "max_distance": g.max_distance, "exact": g.exact} for g in groups]}
    pathlib.Path(c.json).write_text(json_lib.dumps(doc, indent=1))
    print(f"json: {c.json}")
  if c.report:
    page = write_page(c.report, groups, paths, images.read_rgb,
                      title=f"Near-duplicates in {c.index} ({kind}, threshold {threshold:.4f})")
    print(f"report: {page}")
  return groups


__all__ = ["DedupConfig", "Group", "run", "typical_distance", "close_pairs", "file_digests", "find_groups", "format_groups",
           "link_groups", "summary_line", "write_page"]
