"""Searching an index on disk, the picture report, and the launchers, on a small fake index.

The index is written with the store API exactly as the extraction job lays it
out, from descriptors computed here with the test-only "vgg_tiny" backbone and
random weights (no weight files needed).
"""
import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from cbir_jax import backbones, checkpoint, evaluation, inference, input_pipeline, report, \
    search, store
from cbir_jax import consolidate
from cbir_jax import manifest as mf
from cbir_jax import preprocessing as pp
from cbir_jax import query as query_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32
KINDS = ("conv", "fc_conv")


def _images(root: pathlib.Path) -> list[str]:
  rng = np.random.default_rng(0)
  paths = []
  for c, channel in (("blue", 2), ("red", 0)):
    (root / c).mkdir(parents=True)
    for j in range(4):
      a = rng.integers(0, 60, (36 + 4 * j, 44, 3)).astype(np.uint8)
      a[..., channel] += np.uint8(140 + 20 * j)
      paths.append(str(root / c / f"{j}.png"))
      Image.fromarray(a).save(paths[-1])
  return paths


@pytest.fixture(scope="module")
def index(tmp_path_factory):
  """(index dir, image paths): 8 images of two colour classes, rows in path order."""
  root = tmp_path_factory.mktemp("fake_index")
  paths = _images(root / "images")
  backbone = backbones.get("vgg_tiny")
  # Weights saved as a weights directory, as users have them (and without Flax's
  # eager init, which compiles dozens of tiny programs).
  rng = np.random.default_rng(3)
  params = jax.tree.map(
      lambda s: (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32),
      backbone.param_shapes(SIZE))
  wdir = root / "weights"
  info = checkpoint.save(wdir, params, checkpoint.WeightsInfo(
      model="vgg_tiny", preprocessing=pp.TORCHVISION, source="test"))
  images, errors = input_pipeline.load_images(paths, SIZE)
  assert not any(errors)
  rows = inference.jit_describe(backbone, preprocessing=pp.TORCHVISION, kinds=KINDS)(
      params, images)
  descriptor = {"threshold": 0.5, "relative": True, "masks": "channel"}
  weights = mf.WeightsRecord(kind="directory", name="weights", dir=str(wdir), source="test",
                             params_sha256=info.params_sha256)
  settings = mf.Settings(
      backbone="vgg_tiny", weights=weights.identity(), preprocessing=pp.TORCHVISION.to_dict(),
      descriptor=descriptor, image_size=SIZE, kinds=KINDS, dtype="float32",
      output_dtype="float32", draft=False, shard_size=len(paths), package_version="")
  out = root / "index"
  store.prepare(out, mf.Manifest(settings=settings, weights=weights, input=mf.InputRecord(
      type="", root="", num_records=0, identity_sha256=""), num_shards=1, dimensions={}))
  n = len(paths)
  meta = {"row": np.arange(n), "path": np.array(paths), "label": np.repeat([0, 1], 4),
          "label_name": np.repeat(["blue", "red"], 4), "width": np.full(n, 44),
          "height": np.full(n, 40), "group": np.array(["sea", "sea", "sky", ""] * 2),
          "uid": np.array([f"u{i}" for i in range(n)])}
  store.write_shard(out, 0, start=0, stop=n, arrays={k: np.asarray(v) for k, v in rows.items()},
                    meta=meta, failures=[])
  store.write_manifest(out, consolidate.seal(out, store.load_manifest(out), workers=1))
  return str(out), paths


def test_query_image_finds_itself_and_rows_search_like_l1_topk(index):
  out, paths = index
  res = query_lib.search_index(out, kind="fc_conv", k=3, query_paths=[paths[5]],
                               query_ids="2,6", exclude_self=True)
  assert [r.query.row for r in res] == [-1, 2, 6]
  # The image is row 5 of the index (same file): recognised, and left out of its results.
  assert res[0].self_row == 5 and 5 not in [h.row for h in res[0].hits]
  # Without exclude_self, the image described again through the recorded model is row 5
  # at distance ~0.
  [alone] = query_lib.search_index(out, kind="fc_conv", k=3, query_paths=[paths[5]])
  assert alone.hits[0].row == 5 and alone.hits[0].distance < 1e-6
  assert alone.hits[0].label == "red" and alone.self_row == 5
  db, _ = store.load_descriptors(out, "fc_conv")
  ref = search.l1_topk(np.asarray(db[[2, 6]]), db, 3, exclude=[2, 6])
  assert [[h.row for h in r.hits] for r in res[1:]] == ref.indices.tolist()
  np.testing.assert_allclose([[h.distance for h in r.hits] for r in res[1:]], ref.distances)
  table = query_lib.format_results(res)
  assert "rank" in table and paths[5] in table


def test_query_with_other_weights_is_refused(index):
  out, paths = index
  manifest = store.read_manifest(out)
  other = dict(manifest, weights=dict(manifest["weights"], params_sha256="0" * 64))
  with pytest.raises(query_lib.IndexMismatch, match="not the ones the index was made with"):
    query_lib.describe_images(other, paths[:1], "conv")
  other = dict(manifest, settings=dict(manifest["settings"], preprocessing=pp.CAFFE.to_dict()))
  with pytest.raises(query_lib.IndexMismatch, match="use preprocessing 'torchvision' but the "
                     "index records 'caffe'"):
    query_lib.describe_images(other, paths[:1], "conv")
  other = dict(manifest, weights=dict(manifest["weights"], dir=str(pathlib.Path(out) / "x")))
  with pytest.raises(query_lib.IndexMismatch, match="cannot load the weights"):
    query_lib.describe_images(other, paths[:1], "conv")
  with pytest.raises(ValueError, match="not rows of the index"):
    query_lib.search_index(out, kind="conv", query_ids=[8])
  with pytest.raises(ValueError, match="cannot decode query images: .*nope.png"):
    query_lib.search_index(out, kind="conv",
                           query_paths=[str(pathlib.Path(out) / "nope.png")])


def _links(page: str) -> list[str]:
  return re.findall(r'(?:src|href)="([^"]*)"', page)


def test_launch_search_report_is_self_contained_and_marks_classes(index, tmp_path):
  out, paths = index
  rep = tmp_path / "report"
  proc = subprocess.run(
      [sys.executable, str(REPO / "launch" / "search.py"), f"--index={out}",
       "--query_ids=0,5", "--kind=conv", "--k=4", "--exclude_self", f"--report={rep}"],
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("query (row") == 2
  page = (rep / "results.html").read_text()
  # Header: the index's model, kind, k and threshold (as the manifest records them).
  assert "model vgg_tiny | kind conv | k = 4 | threshold tau = 0.5 x max per image, " \
      "channel masks" in page
  # Every link and image is relative and inside the folder, also after moving it.
  moved = tmp_path / "elsewhere" / "moved_report"
  moved.parent.mkdir()
  shutil.move(str(rep), str(moved))
  links = _links(page)
  assert len(links) == 2 * 5 * 3 + 1  # per cell: link, thumbnail, histogram; the PNG
  for link in links:
    assert not re.match(r"^(/|[a-z]+:)", link), link
    target = (moved / link).resolve()
    assert target.is_file() and moved.resolve() in target.parents, link
  # Class marks: same / other class as the query, from the index's labels.
  _, meta = store.load_descriptors(out, "conv")
  res = query_lib.search_index(out, kind="conv", k=4, query_ids=[0, 5], exclude_self=True)
  expect = [["same" if meta["label"][h.row] == meta["label"][r.query.row] else "other"
             for h in r.hits] for r in res]
  assert {m for row in expect for m in row} == {"same", "other"}  # both kinds are shown
  assert re.findall(r'class="hit (\w+)"', page) == [m for row in expect for m in row]
  with Image.open(moved / "results.png") as png:
    sheet = np.asarray(png.convert("RGB"))
  written = report.write_index_report(tmp_path / "again", out, res, k=4)  # as the launcher
  for row, cells in zip(expect, written["cells"]):
    assert [c["mark"] for c in cells] == ["query", *row]
    for m, c in zip(row, cells[1:]):
      x0, y0, x1, y1 = c["box"]
      for x, y in ((x0 + 1, (y0 + y1) // 2), ((x0 + x1) // 2, y1 - 1)):  # left and bottom
        assert tuple(sheet[y, x]) == report.MARKS[m], (m, x, y)


def test_report_header_and_unreadable_images(index, tmp_path):
  out, paths = index
  res = query_lib.search_index(out, kind="fc_conv", k=2, query_ids=[1])
  gone = tmp_path / "gone.png"
  shutil.copy(res[0].hits[1].path, gone)
  hits = (res[0].hits[0], dataclasses.replace(res[0].hits[1], path=str(gone)))
  gone.unlink()
  broken = [dataclasses.replace(res[0], hits=hits)]
  header = report.header_of(out, store.read_manifest(out), kind="fc_conv", k=2)
  written = report.write_report(tmp_path / "rep", broken, header=header)
  assert len(written["missing"]) == 1 and "gone.png" in written["missing"][0]
  page = pathlib.Path(written["html"]).read_text()
  assert page.count("image not readable") == 1 and "model vgg_tiny" in page
  with Image.open(written["png"]) as png:
    assert png.size[0] > 3 * 160


@pytest.mark.parametrize("k", [1, 3, 10])
def test_legend_fits_the_picture_for_any_k(index, tmp_path, k):
  """The legend wraps to the sheet's width: its box lies inside the PNG and above the cells,
  and nothing is drawn in the right margin of its lines (text cut at the edge would be)."""
  out, paths = index
  [r] = query_lib.search_index(out, kind="fc_conv", k=3, query_ids=[1])
  hits = tuple(r.hits[i % len(r.hits)] for i in range(k))  # k results, some shown twice
  header = report.header_of(out, store.read_manifest(out), kind="fc_conv", k=k)
  written = report.write_report(tmp_path / "rep", [dataclasses.replace(r, hits=hits)],
                                header=header)
  x0, y0, x1, y1 = written["legend"]
  with Image.open(written["png"]) as png:
    width, height = png.size
    pixels = np.asarray(png.convert("L"))
  assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
  assert y1 <= min(c["box"][1] for row in written["cells"] for c in row)
  band = pixels[y0:y1]
  assert (band[:, x0:x1] < 128).any()  # the legend is drawn there
  margin = 5  # of the report's 10-pixel margin
  assert (band[:, width - margin:] == 255).all()
  assert x1 <= width - margin


def test_draw_histogram_puts_each_channel_where_its_bins_are():
  hist = np.zeros(75, np.float32)
  hist[0] = 1  # R: all in the first bin
  hist[25 + 24] = 1  # G: all in the last bin
  img = np.asarray(report.draw_histogram(hist, (100, 40)))
  top = img[3]  # the row of value 1
  red = np.flatnonzero((top[:, 0] > 200) & (top[:, 1] < 100))
  green = np.flatnonzero((top[:, 1] > 150) & (top[:, 0] < 100))
  assert red.max() < 100 / 25 + 1 and green.min() > 100 * 24 / 25 - 2


def test_greyscale_histogram_is_one_visible_grey_line():
  rng = np.random.default_rng(0)
  grey = np.repeat(rng.integers(0, 256, (20, 30, 1), dtype=np.uint8), 3, axis=2)
  img = np.asarray(report.draw_histogram(evaluation.color_histogram(grey), (100, 40)), int)
  chroma = img.max(-1) - img.min(-1)
  assert chroma.max() < 10  # no colour: not three lines hiding behind the blue one
  drawn = (img.max(-1) < 120)[:-1]  # dark pixels above the axis line
  assert drawn.any(axis=0).mean() > 0.95  # the line runs across the whole width
  colour = grey.copy()
  colour[..., 0] //= 2
  colour[..., 2] = 255 - colour[..., 2]
  img = np.asarray(report.draw_histogram(evaluation.color_histogram(colour), (100, 40)), int)
  for c in range(3):  # each channel's own colour is there
    other = [o for o in range(3) if o != c]
    assert ((img[..., c] > 150) & (img[..., other].max(-1) < 120)).any()
  # Two equal channels (G = B) share one line in their mixed colour, not blue over green.
  colour[..., 2] = colour[..., 1]
  img = np.asarray(report.draw_histogram(evaluation.color_histogram(colour), (100, 40)), int)
  red = (img[..., 0] > 150) & (img[..., 1:].max(-1) < 120)
  teal = (img[..., 0] < 80) & (np.abs(img[..., 1] - img[..., 2]) < 30) & (img[..., 1] < 160)
  pure_blue = (img[..., 2] > 180) & (img[..., :2].max(-1) < 120)
  assert red.any() and teal.any() and not pure_blue.any()


def test_evaluate_explains_undefined_precision(index):
  out, _ = index
  result = evaluation.evaluate(out, k=2, label_column="uid")
  assert result["num_queries"] == 8 and result["queries_without_relevant"] == 8
  note = result["notes"]["undefined"]
  assert "8 distinct labels among 8" in note
  assert "--label_column=group" in note and "--label_column=label" in note
  for r in result["results"].values():
    assert r["map"] is None and set(r["precision"].values()) == {None}
    assert r["hist_distance"] is not None
  table = evaluation.format_table(result)
  assert "nan" not in table.lower() and note in table
  assert "each left out of its own ranking" in table and "lower = closer in colour" in table
  json.dumps(result, allow_nan=False)  # strict JSON: undefined is null, not NaN


def test_evaluate_an_index_with_a_text_label_column(index, tmp_path):
  out, _ = index
  result = evaluation.evaluate(out, num_queries=None, k=2, label_column="group")
  assert result["num_queries"] == 6  # rows with group "" are not queries
  assert set(result["results"]) == {"conv", "fc_conv", evaluation.RANDOM}
  for r in result["results"].values():
    assert 0 <= r["precision_at_k"] <= 1 and 0 <= r["hist_distance"] <= 1
    assert r["precision_at_k"] == r["precision"]["2"]
  assert result["cutoffs"] == [1, 2, 5]  # 10 > N - 1 = 7
  table = evaluation.format_table(result)
  header = table.splitlines()[2].split()
  assert header == ["descriptor", "dim", "P@1", "P@2", "P@5", "mAP", "hist", "dist@2"]
  fc_conv = next(ln for ln in table.splitlines() if ln.startswith("fc_conv")).split()
  r = result["results"]["fc_conv"]
  assert fc_conv[2:] == [f"{r['precision'][c]:.3f}" for c in ("1", "2", "5")] + [
      f"{r['map']:.3f}", f"{r['hist_distance']:.4f}"]
  json.dumps(result, allow_nan=False)  # JSON-ready


def test_kinds_report_has_one_row_per_kind_for_the_same_query(index, tmp_path):
  out, paths = index
  kinds = ["fc_conv", "conv"]
  written = report.write_kinds_report(tmp_path / "kinds", out, 5, kinds=kinds, k=3)
  expected_captions = []
  _, meta = store.load_descriptors(out, "conv")
  assert len(written["cells"]) == len(kinds)
  for kind, cells in zip(kinds, written["cells"]):
    # Each row is the query followed by that kind's own ranking (its row left out).
    db, _ = store.load_descriptors(out, kind)
    ref = search.l1_topk(np.asarray(db[[5]]), db, 3, exclude=[5]).indices[0]
    assert [c["path"] for c in cells] == [paths[5], *(paths[r] for r in ref)]
    assert [c["mark"] for c in cells] == ["query", *(
        "same" if meta["label"][r] == meta["label"][5] else "other" for r in ref)]
    # The query's cell gives the row's Table I figure: its mean histogram distance.
    hist = [evaluation.color_histogram(np.asarray(Image.open(paths[r]).convert("RGB")))
            for r in (5, *ref)]
    mean = np.mean([evaluation.histogram_distance(hist[0], h) for h in hist[1:]])
    name = "/".join(pathlib.PurePath(paths[5]).parts[-2:])
    expected_captions.append(f"{kind}: query<br>{name}<br>red<br>row 5<br>"
                             f"mean hist d={mean:.4f}")
  page = pathlib.Path(written["html"]).read_text()
  assert [h for h in re.findall(r"<h2>([^:<]+):", page)] == kinds
  for captions in expected_captions:
    assert f"<figcaption>{captions}<br><small>" in page
  assert "kind fc_conv, conv | k = 3" in page  # the header names every kind shown
  with pytest.raises(ValueError, match="1 row titles for 2 result rows"):
    report.write_report(tmp_path / "bad", query_lib.search_index(out, kind="conv", k=2,
                                                                 query_ids=[1, 2]),
                        row_titles=["x"])
