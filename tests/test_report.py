"""Searching an index on disk, the picture report, and the launchers, on a small fake index.

The index is written with the store API exactly as the extraction job lays it
out, from descriptors computed here with the test-only "vgg_tiny" backbone and
random weights (no weight files needed).
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from cbir_jax import backbones, checkpoint, evaluation, inference, input_pipeline, report, \
    search, store
from cbir_jax import preprocessing as pp

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
  weights = {"dir": str(wdir), "source": "test", "source_file": "", "source_sha256": "",
             "params_sha256": info.params_sha256}
  settings = {"backbone": "vgg_tiny", "weights": weights, "preprocessing":
              pp.TORCHVISION.to_dict(), "descriptor": descriptor, "image_size": SIZE,
              "kinds": list(KINDS), "dtype": "float32", "output_dtype": "float32",
              "draft": False}
  out = root / "index"
  store.prepare(out, dict(settings=settings, backbone="vgg_tiny", weights=weights,
                          preprocessing=pp.TORCHVISION.to_dict(), descriptor=descriptor,
                          image_size=SIZE, kinds=list(KINDS), num_shards=1))
  n = len(paths)
  meta = {"row": np.arange(n), "path": np.array(paths), "label": np.repeat([0, 1], 4),
          "label_name": np.repeat(["blue", "red"], 4), "width": np.full(n, 44),
          "height": np.full(n, 40), "group": np.array(["sea", "sea", "sky", ""] * 2)}
  store.write_shard(out, 0, start=0, stop=n, arrays={k: np.asarray(v) for k, v in rows.items()},
                    meta=meta, failures=[])
  store.finalize(out, num_shards=1, process_count=1)
  return str(out), paths


def test_query_image_finds_itself_and_rows_search_like_l1_topk(index):
  out, paths = index
  res = search.search_index(out, kind="fc_conv", k=3, query_paths=[paths[5]],
                            query_ids="2,6", exclude_self=True)
  assert [r.query.row for r in res] == [-1, 2, 6]
  # The image, described again through the recorded model, is row 5 at distance ~0.
  assert res[0].hits[0].row == 5 and res[0].hits[0].distance < 1e-6
  assert res[0].hits[0].label == "red"
  db, _ = store.load_descriptors(out, "fc_conv")
  ref = search.l1_topk(np.asarray(db[[2, 6]]), db, 3, exclude=[2, 6])
  assert [[h.row for h in r.hits] for r in res[1:]] == ref.indices.tolist()
  np.testing.assert_allclose([[h.distance for h in r.hits] for r in res[1:]], ref.distances)
  assert "rank" in search.format_results(res) and paths[5] in search.format_results(res)


def test_query_with_other_weights_is_refused(index):
  out, paths = index
  manifest = store.read_manifest(out)
  other = dict(manifest, weights=dict(manifest["weights"], params_sha256="0" * 64))
  with pytest.raises(search.IndexMismatch, match="not the ones the index was made with"):
    search.describe_images(other, paths[:1], "conv")
  other = dict(manifest, settings=dict(manifest["settings"], preprocessing=pp.CAFFE.to_dict()))
  with pytest.raises(search.IndexMismatch, match="use preprocessing 'torchvision' but the "
                     "index records 'caffe'"):
    search.describe_images(other, paths[:1], "conv")
  other = dict(manifest, weights=dict(manifest["weights"], dir=str(pathlib.Path(out) / "x")))
  with pytest.raises(search.IndexMismatch, match="cannot load the weights"):
    search.describe_images(other, paths[:1], "conv")
  with pytest.raises(ValueError, match="not rows of the index"):
    search.search_index(out, kind="conv", query_ids=[8])
  with pytest.raises(ValueError, match="cannot decode query images: .*nope.png"):
    search.search_index(out, kind="conv", query_paths=[str(pathlib.Path(out) / "nope.png")])


def test_launch_search_report_references_every_result_image(index, tmp_path):
  out, paths = index
  rep = tmp_path / "report"
  proc = subprocess.run(
      [sys.executable, str(REPO / "launch" / "search.py"), f"--index={out}",
       "--query_ids=0,4", "--kind=conv", "--k=3", f"--report={rep}"],
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("query (row") == 2
  page = (rep / "results.html").read_text()
  with Image.open(rep / "results.png") as png:
    width, height = png.size
  res = search.search_index(out, kind="conv", k=3, query_ids=[0, 4])
  for r in res:
    for h in (r.query, *r.hits):
      assert pathlib.Path(h.path).absolute().as_uri() in page
  shown = [src for src in page.split('src="')[1:]]
  assert len(shown) == 2 * 2 * 4  # per cell: thumbnail and histogram; 2 rows x (1 + 3)
  for src in shown:
    assert (rep / src.split('"')[0]).is_file()
  assert width > 4 * 160 and height > 2 * 160  # 4 columns, 2 rows of cells


def test_draw_histogram_puts_each_channel_where_its_bins_are():
  hist = np.zeros(75, np.float32)
  hist[0] = 1  # R: all in the first bin
  hist[25 + 24] = 1  # G: all in the last bin
  img = np.asarray(report.draw_histogram(hist, (100, 40)))
  top = img[3]  # the row of value 1
  red = np.flatnonzero((top[:, 0] > 200) & (top[:, 1] < 100))
  green = np.flatnonzero((top[:, 1] > 150) & (top[:, 0] < 100))
  assert red.max() < 100 / 25 + 1 and green.min() > 100 * 24 / 25 - 2


def test_evaluate_an_index_with_a_text_label_column(index, tmp_path):
  out, _ = index
  result = evaluation.evaluate(out, num_queries=None, k=2, label_column="group")
  assert result["num_queries"] == 6  # rows with group "" are not queries
  assert set(result["results"]) == {"conv", "fc_conv", evaluation.RANDOM}
  for r in result["results"].values():
    assert 0 <= r["precision_at_k"] <= 1 and 0 <= r["hist_distance"] <= 1
  table = evaluation.format_table(result)
  assert "fc_conv" in table and "hist dist@2" in table
  json.dumps(result)  # JSON-ready
