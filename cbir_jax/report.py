"""Search results to look at: each query beside its top-k, with colour histograms and class marks.

Writes one PNG (a grid, like the paper's Figures 3-10) and one HTML page into a folder that holds
every image it shows (thumbnails and copies): the folder can be moved or sent as it is.
"""
from __future__ import annotations

import dataclasses
import hashlib
import html
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from cbir_jax import evaluation
from cbir_jax.index_images import ImageUnavailable, IndexImages
from cbir_jax.names import shown
from cbir_jax.query import Hit, QueryResult

_CHANNEL_COLOURS = ((220, 40, 40), (40, 170, 40), (40, 80, 230))
_GREY = (70, 70, 70)  # the one histogram of a greyscale image (R = G = B)
# Result frames: the query itself (its own row in the index), same class as the query,
# another class, unknown (no label on either side).
MARKS = {"self": (30, 90, 220), "same": (20, 150, 60), "other": (215, 35, 35),
         "unknown": (175, 175, 175)}
_MARK_TEXT = {"self": "the query itself", "same": "same class as the query",
              "other": "another class", "unknown": "class unknown"}
_QUERY_FRAME = (0, 0, 0)
_COPY_SIZE = 1024  # longest side of the copy a thumbnail links to
_TEXT_LINES = 5  # caption lines under a cell (a result has 4, the query 5)


@dataclasses.dataclass(frozen=True)
class ReportHeader:
  """What the report shows results of: index, model, descriptor kind, k and threshold."""
  index: str
  model: str
  kind: str
  k: int
  threshold: str
  images: str = ""  # where the images were read from

  def title(self) -> str:
    return f"{os.path.basename(os.path.normpath(self.index))}: {self.kind}, top {self.k}"

  def line(self) -> str:
    return (f"index {self.index} | model {self.model} | kind {self.kind} | k = {self.k} | "
            f"threshold {self.threshold}")


def header_of(index_dir: str, manifest: Mapping[str, Any], *, kind: str, k: int,
              images: IndexImages | None = None) -> ReportHeader:
  """The header from an index's manifest (the dict `store.read_manifest` returns)."""
  desc = manifest["settings"]["descriptor"]  # DescriptorConfig.to_dict()
  threshold = f"tau = {desc['threshold']}" + (" x max per image" if desc["relative"] else "")
  return ReportHeader(index=str(index_dir), model=manifest["backbone"], kind=kind, k=k,
                      threshold=f"{threshold}, {desc['masks']} masks",
                      images=images.describe() if images else "")


def mark(query: Hit, hit: Hit, *, self_row: int) -> str:
  """"self" for the query's own row in the index (`self_row`; -1: none), else "same" /
  "other" class as the query, or "unknown" when either has no label."""
  if self_row >= 0 and hit.row == self_row:
    return "self"
  if not query.label or not hit.label:
    return "unknown"
  return "same" if hit.label == query.label else "other"


def _histogram_lines(channels: np.ndarray) -> list[tuple[np.ndarray, tuple[int, int, int], int]]:
  """(values, colour, width) per line: channels with equal histograms share one line, drawn
  in the mean of their colours, so none hides behind another; all three (a greyscale image)
  give one neutral grey line."""
  groups: dict[bytes, list[int]] = {}
  for c in range(3):
    groups.setdefault(channels[c].tobytes(), []).append(c)
  lines = []
  for g in groups.values():
    colour = _GREY if len(g) == 3 else tuple(
        int(np.mean([_CHANNEL_COLOURS[c][i] for c in g])) for i in range(3))
    lines.append((channels[g[0]], colour, 1 if len(g) == 1 else 2))
  return lines


def draw_histogram(hist: np.ndarray, size: tuple[int, int]) -> Image.Image:
  """The R, G and B histograms `hist` ([3K] as `evaluation.color_histogram` returns it, each
  channel scaled to its largest bin) as step lines in an image of `size` (width, height)."""
  w, h = size
  bins = len(hist) // 3
  img = Image.new("RGB", size, (255, 255, 255))
  draw = ImageDraw.Draw(img)
  top, bottom = 3, h - 3
  for values, colour, width in _histogram_lines(np.asarray(hist, np.float64).reshape(3, bins)):
    points = []
    for b, v in enumerate(values):
      y = bottom - v * (bottom - top)
      points += [(b * (w - 1) / bins, y), ((b + 1) * (w - 1) / bins, y)]
    draw.line(points, fill=colour, width=width)
  draw.line([(0, h - 1), (w - 1, h - 1)], fill=(150, 150, 150))
  return img


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
  except (TypeError, OSError, ImportError):
    return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
  """`text`, shortened in the middle ("ab...yz") until it fits `width` pixels."""
  if draw.textlength(text, font=font) <= width:
    return text
  for keep in range(len(text) - 1, 1, -1):
    short = text[:keep // 2] + "..." + text[len(text) - (keep - keep // 2):]
    if draw.textlength(short, font=font) <= width:
      return short
  return "..."


def _name(hit: Hit) -> str:
  """A short name for the caption: class folder and file name, or the TFDS id."""
  return shown("/".join(pathlib.PurePath(hit.path).parts[-2:]))


@dataclasses.dataclass(frozen=True)
class _Picture:
  """One image of the report: its files under images/ and its histogram, or why it is missing."""
  stem: str
  thumb: Image.Image | None  # fits the thumbnail box
  hist: np.ndarray | None
  error: str = ""


def _picture(hit: Hit, images: IndexImages, out: pathlib.Path, *, bins: int, thumb: int
             ) -> _Picture:
  """Reads one image (an index row through `images`; a query file from outside the index as
  it is) and writes its thumbnail, its copy and its histogram into `out`/images."""
  outside = hit.row < 0
  key = ("file:" if outside else "row:") + hit.path
  stem = hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]
  try:
    rgb = (IndexImages() if outside else images).read_rgb(hit.path)
  except ImageUnavailable as e:
    return _Picture(stem, None, None, str(e))
  hist = evaluation.color_histogram(rgb, bins)  # the orientation does not change it
  full = Image.fromarray(rgb)
  copy = ImageOps.contain(full, (_COPY_SIZE, _COPY_SIZE), Image.BILINEAR) \
      if max(full.size) > _COPY_SIZE else full
  copy.save(out / "images" / f"{stem}.jpg", quality=90)
  small = ImageOps.contain(full, (thumb, thumb), Image.BILINEAR)
  small.save(out / "images" / f"{stem}_thumb.jpg", quality=90)
  draw_histogram(hist, (thumb, _hist_height(thumb))).save(out / "images" / f"{stem}_hist.png")
  return _Picture(stem, small, hist)


def _captions(hit: Hit, rank: int, hist_distance: float | None, *, self_row: int = -1,
              row_title: str = "") -> list[str]:
  hd = "-" if hist_distance is None else f"{hist_distance:.4f}"
  if rank == 0:  # hist_distance: the mean over the row's results (the Table I figure)
    where = (f"row {hit.row}" if hit.row >= 0 else f"in the index: row {self_row}"
             if self_row >= 0 else "outside the index")
    return [f"{row_title}: query" if row_title else "query", _name(hit),
            shown(hit.label) or "(no label)", where, f"mean hist d={hd}"]
  return [f"#{rank}  d={hit.distance:.4f}", f"hist d={hd}", shown(hit.label) or "(no label)",
          _name(hit)]


@dataclasses.dataclass(frozen=True)
class _Cell:
  hit: Hit
  rank: int  # 0 = the query
  picture: _Picture
  mark: str  # "query", or a key of MARKS
  captions: list[str]  # the lines under the image (`_captions`)


def _cells(results: Sequence[QueryResult], images: IndexImages, out: pathlib.Path, *,
           bins: int, thumb: int, row_titles: Sequence[str]) -> list[list[_Cell]]:
  """Every image read once (a result shown twice is one file), with its caption figures."""
  pictures: dict[tuple[bool, str], _Picture] = {}
  rows = []
  for r, row_title in zip(results, row_titles):
    row = []
    for rank, hit in enumerate((r.query, *r.hits)):
      key = (hit.row < 0, hit.path)
      if key not in pictures:
        pictures[key] = _picture(hit, images, out, bins=bins, thumb=thumb)
      row.append((rank, hit, pictures[key]))
    q_hist = row[0][2].hist
    dists = [None if q_hist is None or pic.hist is None else
             float(evaluation.histogram_distance(q_hist, pic.hist)) for _, _, pic in row[1:]]
    mean = float(np.mean(dists)) if dists and None not in dists else None
    rows.append([_Cell(hit, rank, pic,
                       "query" if rank == 0 else mark(r.query, hit, self_row=r.self_row),
                       _captions(hit, rank, mean if rank == 0 else dists[rank - 1],
                                 self_row=r.self_row, row_title=row_title))
                 for rank, hit, pic in row])
  return rows


def _hist_height(thumb: int) -> int:
  return max(40, thumb // 3)


_LEGEND_LINE = 16  # pixels per legend line
_LEGEND_GAP = 8  # pixels between two legend items on a line


@dataclasses.dataclass(frozen=True)
class _LegendItem:
  """One key of the legend: its swatch (a frame of a mark, the histogram lines, or none)
  and its text."""
  text: str
  mark: str = ""  # a key of MARKS: a frame swatch
  lines: bool = False  # the histogram line swatches

  def swatch_width(self) -> int:
    return 16 if self.mark else 16 * (len(_CHANNEL_COLOURS) + 1) if self.lines else 0


# The histogram key is two items, so that a narrow sheet wraps between them.
_LEGEND_ITEMS = (*(_LegendItem(_MARK_TEXT[m], mark=m) for m in MARKS),
                 _LegendItem("histograms R, G, B;", lines=True),
                 _LegendItem("equal channels share a line (grey: all three)"))


def _legend_lines(draw: ImageDraw.ImageDraw, font: Any, width: int
                  ) -> list[list[tuple[_LegendItem, str]]]:
  """The legend's items (with their text as drawn) wrapped into lines of at most `width`
  pixels, so a narrow sheet (small k) shows all of it; a text wider than a line is
  shortened (`_fit`)."""
  lines: list[list[tuple[_LegendItem, str]]] = [[]]
  used = 0
  for item in _LEGEND_ITEMS:
    text = _fit(draw, item.text, font, width - item.swatch_width())
    need = item.swatch_width() + int(np.ceil(draw.textlength(text, font=font)))
    if lines[-1] and used + _LEGEND_GAP + need > width:
      lines.append([])
      used = 0
    used += (_LEGEND_GAP if lines[-1] else 0) + need
    lines[-1].append((item, text))
  return lines


def _legend(draw: ImageDraw.ImageDraw, x0: int, y0: int, font: Any,
            lines: list[list[tuple[_LegendItem, str]]]) -> tuple[int, int, int, int]:
  """Draws the legend lines from (x0, y0); returns the box (x0, y0, x1, y1) it covers."""
  right = x0
  for n, line in enumerate(lines):
    x, y = x0, y0 + n * _LEGEND_LINE
    for item, text in line:
      if item.mark:
        draw.rectangle([x, y + 2, x + 11, y + 13], outline=MARKS[item.mark], width=3)
      elif item.lines:
        for i, colour in enumerate((*_CHANNEL_COLOURS, _GREY)):
          draw.line([(x + 16 * i, y + 8), (x + 16 * i + 12, y + 8)], fill=colour, width=2)
      x += item.swatch_width()
      draw.text((x, y), text, fill=(0, 0, 0), font=font)
      x = draw.textbbox((x, y), text, font=font)[2]
      right = max(right, x)
      x += _LEGEND_GAP
  return x0, y0, right, y0 + len(lines) * _LEGEND_LINE


def _sheet(cells: list[list[_Cell]], header: ReportHeader | None, title: str, *, thumb: int
           ) -> tuple[Image.Image, list[list[dict[str, Any]]], tuple[int, int, int, int]]:
  """The PNG: title, header and legend lines, then one row of cells per query.

  Returns the image, per cell its stored path, mark and frame box (x0, y0, x1, y1), and
  the legend's box.
  """
  font, big = _font(11), _font(15)
  hist_h, line_h, pad, frame = _hist_height(thumb), 14, 10, 3
  cell_w, cell_h = thumb + 2 * pad, thumb + hist_h + _TEXT_LINES * line_h + 3 * pad
  size_w = max(len(row) for row in cells) * cell_w + pad
  width = size_w - 2 * pad
  # The legend wraps to the sheet's width (set by k), so the header grows by its lines.
  legend = _legend_lines(ImageDraw.Draw(Image.new("RGB", (1, 1))), font, width)
  legend_y = pad + 22 + (16 if header else 0)
  top = legend_y + len(legend) * _LEGEND_LINE + 4
  sheet = Image.new("RGB", (size_w, top + len(cells) * cell_h), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  draw.text((pad, pad), _fit(draw, title, big, width), fill=(0, 0, 0), font=big)
  if header:
    draw.text((pad, pad + 22), _fit(draw, header.line(), font, width), fill=(60, 60, 60),
              font=font)
  legend_box = _legend(draw, pad, legend_y, font, legend)
  boxes = []
  for qi, row in enumerate(cells):
    boxes.append([])
    for c in row:
      x, y = pad + c.rank * cell_w, top + pad + qi * cell_h
      box = (x - frame, y - frame, x + thumb + frame - 1, y + thumb + hist_h + frame - 1)
      if c.picture.thumb is not None:
        t = c.picture.thumb
        sheet.paste(t, (x + (thumb - t.width) // 2, y + (thumb - t.height) // 2))
        sheet.paste(draw_histogram(c.picture.hist, (thumb, hist_h)), (x, y + thumb))
      else:
        draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=(225, 225, 225))
        draw.text((x + 6, y + thumb // 2 - 6), "image not readable", fill=(90, 90, 90),
                  font=font)
      colour = _QUERY_FRAME if c.mark == "query" else MARKS[c.mark]
      draw.rectangle(box, outline=colour, width=frame)
      for li, text in enumerate(c.captions):
        draw.text((x, y + thumb + hist_h + frame + 2 + li * line_h), _fit(draw, text, font, thumb),
                  fill=(0, 0, 0), font=font)
      boxes[-1].append({"path": c.hit.path, "mark": c.mark, "box": box})
  return sheet, boxes, legend_box


def _figure(c: _Cell) -> str:
  captions = "<br>".join(html.escape(t) for t in c.captions)
  where = html.escape(shown(c.hit.path))
  if c.picture.thumb is None:
    image = f'<div class="missing">image not readable: {html.escape(c.picture.error)}</div>'
  else:
    stem = c.picture.stem
    image = (f'<a href="images/{stem}.jpg"><img src="images/{stem}_thumb.jpg" alt="{where}">'
             f'</a><img src="images/{stem}_hist.png" alt="colour histogram">')
  cls = "query" if c.mark == "query" else f"hit {c.mark}"
  return (f'<figure class="{cls}">{image}<figcaption>{captions}<br><small>{where}</small>'
          "</figcaption></figure>")


def _page(cells: list[list[_Cell]], results: Sequence[QueryResult], header: ReportHeader | None,
          title: str, *, row_titles: Sequence[str], bins: int, thumb: int) -> str:
  """The HTML page; every link and image in it is relative to the report folder."""
  sections = []
  for qi, (r, row) in enumerate(zip(results, cells)):
    name = row_titles[qi] or f"Query {qi + 1}"
    sections.append(f"<section><h2>{html.escape(name)}: {html.escape(shown(r.query.path))}</h2>"
                    f'<div class="row">{"".join(_figure(c) for c in row)}</div></section>')
  meta = "" if header is None else (
      f'<p class="meta">{html.escape(header.line())}'
      f'{"<br>images read from " + html.escape(header.images) if header.images else ""}</p>')
  legend = " ".join(f'<span class="key {m}"></span> {_MARK_TEXT[m]}' for m in MARKS)
  style = ("body{font-family:sans-serif} .row{display:flex;flex-wrap:wrap;gap:12px}"
           f"figure{{margin:4px;width:{thumb}px;font-size:12px;word-break:break-all}}"
           "figure img{display:block;max-width:100%} figure.query{outline:3px solid #000}"
           ".missing{height:" + str(thumb) + "px;background:#e1e1e1;font-size:11px}"
           ".key{display:inline-block;width:10px;height:10px;border:3px solid}"
           + "".join(f"figure.{m}{{outline:3px solid rgb{MARKS[m]}}} .key.{m}"
                     f"{{border-color:rgb{MARKS[m]}}}" for m in MARKS))
  return (
      "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
      f"<title>{html.escape(title)}</title><style>{style}</style></head><body>"
      f"<h1>{html.escape(title)}</h1>{meta}<p>Frames: {legend}. Under each image: its RGB "
      "histogram (each channel scaled to its largest bin; channels with equal histograms share "
      "one line in their mixed colour, grey for a greyscale image), the descriptor distance d "
      f"(L1 / D) and the histogram distance to the query (L1 / 3K, K = {bins}). A thumbnail "
      f"links to a copy of the image (at most {_COPY_SIZE} px); this folder holds every image "
      "it shows. "
      f'<a href="results.png">One picture</a>.</p>{"".join(sections)}</body></html>\n')


def write_report(out_dir: str | os.PathLike, results: Sequence[QueryResult], *,
                 images: IndexImages | None = None, header: ReportHeader | None = None,
                 bins: int = evaluation.DEFAULT_BINS, thumb: int = 160,
                 title: str | None = None, row_titles: Sequence[str] | None = None
                 ) -> dict[str, Any]:
  """Writes results.png, results.html and images/ (thumbnails, copies, histograms) to out_dir
  (created), one row per query of `results`, in their order.

  Args:
    images: where the index's images are read (default: files at their stored paths).
    header: the index, model, kind, k and threshold shown on top (`header_of`); the
      default title comes from it.
    bins, thumb: K of the colour histograms; the square thumbnail box, in pixels.
    row_titles: one per result row, shown on its query's cell (e.g. the descriptor kind when
      the rows are one query searched with several kinds); default "query".

  Returns:
    {"png": path, "html": path, "missing": why each image that could not be read is missing,
     "cells": per query, per image, {"path", "mark", "box"} of the PNG, "legend": the
     legend's box (x0, y0, x1, y1) in the PNG}.
  """
  if not results:
    raise ValueError("no query results to report")
  row_titles = [""] * len(results) if row_titles is None else list(row_titles)
  if len(row_titles) != len(results):
    raise ValueError(f"{len(row_titles)} row titles for {len(results)} result rows")
  out = pathlib.Path(out_dir)
  (out / "images").mkdir(parents=True, exist_ok=True)
  title = title or (header.title() if header else "cbir_jax search")
  cells = _cells(results, images or IndexImages(), out, bins=bins, thumb=thumb,
                 row_titles=row_titles)
  sheet, boxes, legend = _sheet(cells, header, title, thumb=thumb)
  png, page = out / "results.png", out / "results.html"
  sheet.save(png)
  page.write_text(_page(cells, results, header, title, row_titles=row_titles, bins=bins,
                        thumb=thumb),
                  encoding="utf-8")
  unread = {(c.hit.row < 0, c.hit.path): c.picture.error for row in cells for c in row}
  return {"png": str(png), "html": str(page), "missing": [e for e in unread.values() if e],
          "cells": boxes, "legend": legend}


def write_index_report(out_dir: str | os.PathLike, index_dir: str,
                       results: Sequence[QueryResult], *, k: int,
                       images: IndexImages | None = None, **kwargs: Any) -> dict[str, Any]:
  """`write_report` (**kwargs: bins, thumb, title, row_titles) for results of
  `query.search_index`, with the index's header; `images` default to where its manifest
  records them."""
  from cbir_jax import store

  manifest = store.read_manifest(index_dir)
  images = images or IndexImages.of_index(index_dir)
  kind = ", ".join(dict.fromkeys(r.kind for r in results))  # the header names every kind shown
  return write_report(out_dir, results, images=images, header=header_of(
      index_dir, manifest, kind=kind, k=k, images=images), **kwargs)


def write_kinds_report(out_dir: str | os.PathLike, index_dir: str, query_row: int, *,
                       kinds: Sequence[str], k: int, exclude_self: bool = True,
                       images: IndexImages | None = None, **kwargs: Any) -> dict[str, Any]:
  """Index row `query_row` searched with each of `kinds`, one report row per kind in that
  order: the layout of the paper's Figures 3-10 (the same query, its top-k under each
  descriptor). `exclude_self` leaves the query's own row out of its results (as the
  evaluation does); the rest is as `write_index_report`.
  """
  from cbir_jax.query import search_index

  if not kinds:
    raise ValueError("no descriptor kinds to show")
  results = [search_index(index_dir, kind=kind, k=k, query_ids=[query_row],
                          exclude_self=exclude_self)[0] for kind in kinds]
  return write_index_report(out_dir, index_dir, results, k=k, images=images,
                            row_titles=list(kinds), **kwargs)
