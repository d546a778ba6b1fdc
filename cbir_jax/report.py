"""Search results to look at: each query beside its top-k, with colour histograms.

Writes one PNG (a grid, like the paper's Figures 3-10) and one HTML page that
links every image file; under each image its RGB histogram, its histogram
distance to the query (SPEC.md section 5) and its descriptor distance.
"""
from __future__ import annotations

import html
import os
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from cbir_jax import evaluation
from cbir_jax.search import Hit, QueryResult

_CHANNEL_COLOURS = ((220, 40, 40), (40, 170, 40), (40, 80, 230))
_TEXT_LINES = 3


def draw_histogram(hist: np.ndarray, size: tuple[int, int]) -> Image.Image:
  """The R, G and B histograms (each scaled to its largest bin) as step lines.

  Args:
    hist: [3K] as `evaluation.color_histogram` returns it.
    size: (width, height) in pixels.
  """
  w, h = size
  bins = len(hist) // 3
  img = Image.new("RGB", size, (255, 255, 255))
  draw = ImageDraw.Draw(img)
  top, bottom = 3, h - 2
  for c, colour in enumerate(_CHANNEL_COLOURS):
    values = np.asarray(hist[c * bins:(c + 1) * bins], np.float64)
    points = []
    for b, v in enumerate(values):
      y = bottom - v * (bottom - top)
      points += [(b * (w - 1) / bins, y), ((b + 1) * (w - 1) / bins, y)]
    draw.line(points, fill=colour, width=1)
  draw.line([(0, bottom + 1), (w - 1, bottom + 1)], fill=(150, 150, 150))
  return img


def _thumbnail(path: str, box: int) -> Image.Image:
  rgb = evaluation.read_rgb(path)
  img = ImageOps.contain(Image.fromarray(rgb), (box, box), Image.BILINEAR)
  canvas = Image.new("RGB", (box, box), (255, 255, 255))
  canvas.paste(img, ((box - img.width) // 2, (box - img.height) // 2))
  return canvas


def _captions(hit: Hit, rank: int, hist_distance: float) -> list[str]:
  if rank == 0:
    return ["query", hit.label[:24], f"row {hit.row}" if hit.row >= 0 else "outside the index"]
  return [f"#{rank} d={hit.distance:.4f}", f"hist d={hist_distance:.4f}", hit.label[:24]]


def write_report(out_dir: str | os.PathLike, results: Sequence[QueryResult], *,
                 bins: int = evaluation.DEFAULT_BINS, thumb: int = 160,
                 title: str = "cbir_jax search") -> dict[str, str]:
  """Writes results.png and results.html (plus the thumbnails the page shows) to out_dir.

  Args:
    out_dir: output folder (created).
    results: queries and their hits, in display order.
    bins: K of the colour histograms.
    thumb: size of the square thumbnail box, in pixels.
    title: page title.

  Returns:
    {"png": path, "html": path}.
  """
  if not results:
    raise ValueError("no query results to report")
  out = pathlib.Path(out_dir)
  (out / "images").mkdir(parents=True, exist_ok=True)
  paths = [h.path for r in results for h in (r.query, *r.hits)]
  cache: dict[str, np.ndarray] = {}
  evaluation.image_histograms(paths, bins=bins, cache=cache)

  font = ImageFont.load_default()
  hist_h, line_h, pad = max(40, thumb // 3), 14, 6
  cell_w, cell_h = thumb + pad, thumb + hist_h + _TEXT_LINES * line_h + 2 * pad
  cols = 1 + max(len(r.hits) for r in results)
  sheet = Image.new("RGB", (cols * cell_w + pad, len(results) * cell_h + pad), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  rows_html = []
  for qi, r in enumerate(results):
    q_hist = cache[r.query.path]
    figures = []
    for rank, hit in enumerate((r.query, *r.hits)):
      hd = float(evaluation.histogram_distance(q_hist, cache[hit.path]))
      x, y = pad + rank * cell_w, pad + qi * cell_h
      thumb_img = _thumbnail(hit.path, thumb)
      hist_img = draw_histogram(cache[hit.path], (thumb, hist_h))
      sheet.paste(thumb_img, (x, y))
      sheet.paste(hist_img, (x, y + thumb))
      if rank == 0:  # frame the query
        draw.rectangle([x - 2, y - 2, x + thumb + 1, y + thumb + hist_h + 1], outline=(0, 0, 0))
      captions = _captions(hit, rank, hd)
      for li, text in enumerate(captions):
        draw.text((x, y + thumb + hist_h + 2 + li * line_h), text, fill=(0, 0, 0), font=font)
      name = f"q{qi:03d}_{rank:03d}"
      thumb_img.save(out / "images" / f"{name}.jpg", quality=90)
      hist_img.save(out / "images" / f"{name}_hist.png")
      uri = pathlib.Path(hit.path).absolute().as_uri()
      figures.append(
          f'<figure class="{"query" if rank == 0 else "hit"}"><a href="{html.escape(uri)}">'
          f'<img src="images/{name}.jpg" alt="{html.escape(hit.path)}"></a>'
          f'<img src="images/{name}_hist.png" alt="RGB histogram">'
          f'<figcaption>{"<br>".join(html.escape(c) for c in captions if c)}<br>'
          f'<small>{html.escape(hit.path)}</small></figcaption></figure>')
    rows_html.append(f'<section><h2>Query {qi + 1}: {html.escape(r.query.path)}'
                     f'{" (" + html.escape(r.kind) + ")" if r.kind else ""}</h2>'
                     f'<div class="row">{"".join(figures)}</div></section>')
  png = out / "results.png"
  sheet.save(png)
  page = out / "results.html"
  page.write_text(
      "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
      f"<title>{html.escape(title)}</title><style>"
      "body{font-family:sans-serif} .row{display:flex;flex-wrap:wrap;gap:8px}"
      f"figure{{margin:0;width:{thumb}px;font-size:12px;word-break:break-all}}"
      "figure img{display:block} figure.query{outline:2px solid #000}"
      "</style></head><body>"
      f"<h1>{html.escape(title)}</h1><p>Under each image: its RGB histogram (each channel "
      "scaled to its largest bin), the descriptor distance d (L1 / D) and the histogram "
      f"distance to the query (L1 / 3K, K = {bins}). <a href=\"results.png\">One picture</a>."
      f"</p>{''.join(rows_html)}</body></html>\n")
  return {"png": str(png), "html": str(page)}
