"""Colour histograms and retrieval metrics against hand-computed values."""
import os

import numpy as np
import pytest
from PIL import Image

from cbir_jax import evaluation as ev
from cbir_jax.index_images import ImageUnavailable, IndexImages, IndexInput


def solid(rgb, h=4, w=5):
  return np.broadcast_to(np.asarray(rgb, np.uint8), (h, w, 3)).copy()


def test_histogram_bins_follow_numpy_histogram_over_0_255():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (31, 17, 3), dtype=np.uint8)
  for bins in (25, 7, 256):
    h = ev.color_histogram(img, bins)
    for c in range(3):
      ref, _ = np.histogram(img[..., c], bins=bins, range=(0, 255))
      np.testing.assert_allclose(h[c * bins:(c + 1) * bins], ref / ref.max(), rtol=1e-6)


def test_histogram_distance_of_constructed_images():
  k = 25  # 3K = 75 values compared
  black, white = solid((0, 0, 0)), solid((255, 255, 255))
  # Solid black vs solid white: each channel has a 1 in bin 0 vs bin 24: L1 = 2 per channel.
  assert ev.histogram_distance(ev.color_histogram(black), ev.color_histogram(white)) == \
      pytest.approx(6 / 75)
  # 3/4 black, 1/4 white: per channel [1, 0, ..., 1/3] after dividing by the largest bin;
  # against solid black that differs by 1/3 in one bin per channel: 3 * (1/3) / 75.
  mixed = solid((0, 0, 0), h=4, w=4)
  mixed[3] = 255
  assert ev.histogram_distance(ev.color_histogram(mixed), ev.color_histogram(black)) == \
      pytest.approx(1 / 75)
  # Bin 0 is [0, 10.2): 0 and 10 share it, 11 is in bin 1. Channels are separate, so
  # (10, 0, 0) vs (11, 0, 0) differs in R only: 2 / 75.
  assert ev.histogram_distance(ev.color_histogram(solid((0, 0, 0))),
                               ev.color_histogram(solid((10, 0, 0)))) == 0
  assert ev.histogram_distance(ev.color_histogram(solid((10, 0, 0))),
                               ev.color_histogram(solid((11, 0, 0)))) == pytest.approx(2 / 75)


def test_histograms_of_files_are_full_size_and_cached(tmp_path):
  img = solid((0, 0, 0), h=40, w=40)
  img[:10] = (255, 128, 0)  # a quarter of the pixels
  Image.fromarray(img).save(tmp_path / "a.png")  # lossless, so the counts are exact
  palette = Image.fromarray(solid((255, 128, 0), 8, 8)).convert("P", palette=Image.Palette.ADAPTIVE)
  palette.save(tmp_path / "b.png")
  cache = {}
  h = ev.image_histograms([str(tmp_path / "a.png"), str(tmp_path / "b.png")], cache=cache)
  expect_a = np.zeros(75)
  expect_a[[0, 24]] = [1, 1 / 3]  # R: 30 black rows, 10 red rows -> 1 and 1/3
  expect_a[25 + 0], expect_a[25 + 12] = 1, 1 / 3  # G: 128 falls in bin 12 (122.4..132.6)
  expect_a[50 + 0] = 1  # B: all zero
  np.testing.assert_allclose(h[0], expect_a, rtol=1e-6)
  assert h[1][24] == 1 and h[1][25 + 12] == 1 and h[1][50] == 1  # palette image -> RGB
  assert set(cache) == {str(tmp_path / "a.png"), str(tmp_path / "b.png")}
  cache[str(tmp_path / "a.png")] = np.full(75, 7.0, np.float32)  # a cached value is reused
  assert ev.image_histograms([str(tmp_path / "a.png")], cache=cache)[0, 0] == 7.0
  with pytest.raises(ImageUnavailable, match="cannot read image .*missing.jpg"):
    ev.image_histograms([str(tmp_path / "missing.jpg")])
  # Several unreadable: one line that counts them and gives the first reason; the readable
  # one is still cached.
  (tmp_path / "bad.png").write_bytes(b"not a png")
  cache = {}
  with pytest.raises(ImageUnavailable, match=r"^2 of 3 images cannot be read \(first: "):
    ev.image_histograms([str(tmp_path / n) for n in ("a.png", "bad.png", "missing.jpg")],
                        cache=cache)
  assert list(cache) == [str(tmp_path / "a.png")]


def test_precision_and_average_precision_by_hand():
  # Ranked relevance: R N R N N R  (3 relevant of 6).
  rel = np.array([[1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]], bool)
  np.testing.assert_allclose(ev.precision_at_k(rel, 1), [1, 0, 0])
  np.testing.assert_allclose(ev.precision_at_k(rel, 5), [2 / 5, 0, 4 / 5])
  ap = ev.average_precision(rel)
  assert ap[0] == pytest.approx((1 / 1 + 2 / 3 + 3 / 6) / 3)
  assert np.isnan(ap[1])  # no relevant item: undefined, left out of the mean
  assert ap[2] == pytest.approx((1 / 2 + 2 / 3 + 3 / 4 + 4 / 5 + 5 / 6) / 5)
  with pytest.raises(ValueError, match="at least k=7"):
    ev.precision_at_k(rel, 7)


def test_rank_database_breaks_ties_by_index_and_drops_the_query():
  d = np.array([[0.0, 0.5, 0.2, 0.5, 0.2]])
  np.testing.assert_array_equal(ev.rank_database(d), [[0, 2, 4, 1, 3]])
  np.testing.assert_array_equal(ev.rank_database(d, exclude=np.array([0])), [[2, 4, 1, 3]])


def test_select_queries_is_seeded_and_skips_unlabelled():
  labels = np.array([0, -1, 1, 1, -1, 0, 2, 2])
  a = ev.select_queries(labels, 3, seed=5)
  assert np.array_equal(a, ev.select_queries(labels, 3, seed=5))
  assert len(set(a)) == 3 and all(labels[a] >= 0)
  np.testing.assert_array_equal(ev.select_queries(labels, None, 0), [0, 2, 3, 5, 6, 7])
  np.testing.assert_array_equal(ev.select_queries(labels, 0, 0), [0, 2, 3, 5, 6, 7])
  with pytest.raises(ValueError, match="only 6 labelled rows"):
    ev.select_queries(labels, 7, 0)


def test_labels_from_text_column():
  meta = {"group": np.array(["dog", "", "bird", "dog"]), "label": np.array([3, 1, -1, 3])}
  labels, names = ev.labels_from_metadata(meta, "group")
  assert names == ["bird", "dog"] and labels.tolist() == [1, -1, 0, 1]
  assert ev.labels_from_metadata(meta, "label")[0].tolist() == [3, 1, -1, 3]
  with pytest.raises(ValueError, match="no metadata column 'kind'"):
    ev.labels_from_metadata(meta, "kind")


def test_evaluate_arrays_on_a_constructed_collection(tmp_path):
  # Two colour classes of three images. Descriptor "good" separates the classes;
  # "bad" only knows the position j within a class, so it mixes them.
  # Colours of one class share their bins; the classes differ in R and B bins.
  colours = {0: [(200, 5, 5), (201, 6, 4), (199, 4, 6)],
             1: [(5, 5, 200), (6, 4, 201), (4, 6, 199)]}
  paths, labels, good, bad = [], [], [], []
  for c, cols in colours.items():
    for j, rgb in enumerate(cols):
      p = tmp_path / f"{c}_{j}.png"
      Image.fromarray(solid(rgb, 6, 6)).save(p)
      paths.append(str(p))
      labels.append(c)
      good.append([10.0 * c + j, 0.0])
      bad.append([float(j), 0.0])
  out = ev.evaluate_arrays({"good": np.array(good, np.float32), "bad": np.array(bad, np.float32)},
                           np.array(labels), paths, queries=np.array([0, 4]), k=2)
  assert out.cutoffs == (1, 2, 5) and out.histogram_error == ""  # 5 = N - 1: 10 is dropped
  by = {r.kind: r for r in out.results}
  assert list(by) == ["good", "bad", ev.RANDOM]
  # good: query 0 -> rows 1, 2 (class 0); query 4 (11, 0) -> rows 3, 5 tied at 0.5, then
  # the rest; the relevant rows come first in both full rankings.
  assert by["good"].top_k == [[1, 2], [3, 5]]
  assert by["good"].precision == {1: 1.0, 2: 1.0, 5: 0.4} and by["good"].mean_ap == 1.0
  # bad, by hand (distances L1 / 2, ties to the lower row):
  #   query 0 (0,0): row3 0, row1 .5, row4 .5, row2 1, row5 1 -> relevance 0 1 0 1 0
  #     P@2 = 1/2, AP = (1/2 + 2/4) / 2 = 0.5
  #   query 4 (1,0): row1 0, row0 .5, row2 .5, row3 .5, row5 .5 -> relevance 0 0 0 1 1
  #     P@2 = 0, AP = (1/4 + 2/5) / 2 = 0.325
  assert by["bad"].top_k == [[3, 1], [1, 0]]
  assert by["bad"].per_query_precision[2] == [0.5, 0.0]
  assert by["bad"].per_query_precision[1] == [0.0, 0.0]
  assert by["bad"].precision[2] == pytest.approx(0.25)
  assert by["bad"].per_query_ap == pytest.approx([0.5, 0.325])
  assert by["bad"].mean_ap == pytest.approx((0.5 + 0.325) / 2)
  # Table I column: mean over queries of the mean histogram distance of the top-k.
  h = ev.image_histograms(paths)
  d = ev.histogram_distance
  expect = np.mean([(d(h[0], h[3]) + d(h[0], h[1])) / 2, (d(h[4], h[1]) + d(h[4], h[0])) / 2])
  assert by["bad"].hist_distance == pytest.approx(expect)
  # Same class: 0; other class: R and B bins differ, 2 + 2 over 75. Query 0 retrieved one
  # of each, query 4 two of the other class.
  assert by["bad"].hist_distance == pytest.approx(((0 + 4 / 75) / 2 + 4 / 75) / 2)
  assert by["good"].hist_distance == 0
  assert by[ev.RANDOM].dim == 0 and 0 <= by[ev.RANDOM].precision[2] <= 1


def test_integer_labels_are_named_by_label_name():
  meta = {"label": np.array([2, 0, 2, -1, 5]),
          "label_name": np.array(["satay", "apam", "satay", "", "rojak"])}
  labels, names = ev.labels_from_metadata(meta, "label")
  np.testing.assert_array_equal(labels, [2, 0, 2, -1, 5])
  assert [names[v] for v in (0, 2, 5)] == ["apam", "satay", "rojak"]
  text_labels, text_names = ev.labels_from_metadata(
      {"group": np.array(["dog", "", "bird", "dog"])}, "group")
  np.testing.assert_array_equal(text_labels, [1, -1, 0, 1])
  assert text_names == ["bird", "dog"]


class _SolidImages(IndexImages):
  """Row key "r<i>" is a solid image of colour COLOURS[i]; "r<broken>" cannot be read."""

  def __init__(self, colours, broken=()):
    super().__init__(IndexInput())
    self.colours, self.broken = colours, set(broken)

  def read_rgb(self, stored):
    i = int(stored[1:])
    if i in self.broken:
      raise ImageUnavailable(f"cannot read image {stored}: gone")
    return solid(self.colours[i])


def _literal(x, labels, q, cutoffs):
  """P@c and AP of query q by plain loops (float64 distances; no ties in random data)."""
  others = sorted((float(np.abs(x[q].astype(np.float64) - x[j]).mean()), j)
                  for j in range(len(x)) if j != q)
  rel = [labels[j] >= 0 and labels[j] == labels[q] for _, j in others]
  if not any(rel):
    return None, None, [j for _, j in others]
  p = {c: sum(rel[:c]) / c for c in cutoffs}
  hits, total = 0, 0.0
  for r, is_rel in enumerate(rel, 1):
    if is_rel:
      hits += 1
      total += hits / r
  return p, total / sum(rel), [j for _, j in others]


def test_precision_ap_and_hist_distance_against_literal_loops():
  rng = np.random.default_rng(1)
  n = 30
  labels = rng.integers(0, 4, n)
  labels[3] = 9  # a label no other row has: its query's P@c and AP are undefined
  labels[[5, 9]] = -1  # unknown: never relevant
  x = rng.normal(size=(n, 6)).astype(np.float32)
  colours = rng.integers(0, 256, (n, 3))
  queries = np.array([0, 3, 4, 10, 22, 29])
  out = ev.evaluate_arrays({"x": x}, labels, [f"r{i}" for i in range(n)], queries=queries, k=3,
                           images=_SolidImages(colours), random_baseline=False)
  assert out.cutoffs == (1, 3, 5, 10)
  assert out.has_relevant == [q != 3 for q in queries]
  [r] = out.results
  refs = [_literal(x, labels, q, out.cutoffs) for q in queries]
  for c in out.cutoffs:
    per = [ref[0][c] if ref[0] else None for ref in refs]
    assert r.per_query_precision[c] == pytest.approx(per)
    assert r.precision[c] == pytest.approx(np.mean([v for v in per if v is not None]))
  assert r.per_query_ap == pytest.approx([ref[1] for ref in refs])
  assert r.mean_ap == pytest.approx(np.mean([ref[1] for ref in refs if ref[1] is not None]))
  assert r.top_k == [ref[2][:3] for ref in refs]
  # Histogram column: solid colours, so each distance is (bins that differ) * 2 / 75.
  h = [ev.color_histogram(solid(c)) for c in colours]
  expect = [np.mean([ev.histogram_distance(h[q], h[j]) for j in ref[2][:3]])
            for q, ref in zip(queries, refs)]
  assert r.per_query_hist_distance == pytest.approx(expect)
  assert r.hist_distance == pytest.approx(np.mean(expect))


def test_unreadable_images_leave_class_figures_and_say_why():
  rng = np.random.default_rng(2)
  labels = np.array([0, 0, 1, 1, 2, 2])
  x = rng.normal(size=(6, 4)).astype(np.float32)
  keys = [f"r{i}" for i in range(6)]
  colours = rng.integers(0, 256, (6, 3))
  whole = ev.evaluate_arrays({"x": x}, labels, keys, queries=np.arange(6), k=2,
                             images=_SolidImages(colours))
  part = ev.evaluate_arrays({"x": x}, labels, keys, queries=np.arange(6), k=2,
                            images=_SolidImages(colours, broken=[4]))
  assert part.histogram_error == "cannot read image r4: gone"
  for a, b in zip(whole.results, part.results):
    assert b.hist_distance is None and b.per_query_hist_distance is None
    assert a.hist_distance is not None
    assert (a.precision, a.mean_ap, a.top_k) == (b.precision, b.mean_ap, b.top_k)


def test_every_label_unique_gives_undefined_not_zero():
  x = np.random.default_rng(3).normal(size=(5, 3)).astype(np.float32)
  out = ev.evaluate_arrays({"x": x}, np.arange(5), [f"r{i}" for i in range(5)],
                           queries=np.arange(5), k=2, images=_SolidImages([(0, 0, 0)] * 5))
  assert out.has_relevant == [False] * 5
  for r in out.results:
    assert r.mean_ap is None and set(r.precision.values()) == {None}
    assert r.hist_distance == 0.0  # colour needs no labels
  meta = {"label": np.arange(5), "group": np.array(["a", "a", "b", "b", "c"]),
          "wnid": np.array(["n1", "n2", "n3", "n4", "n5"]), "path": np.array(list("abcde"))}
  assert ev.coarser_label_columns(meta, "label") == ["group"]
  assert ev.coarser_label_columns(meta, "group") == []  # label and wnid are unique
  assert ev.coarser_label_columns(meta, "wnid") == ["group"]


def test_topk_overlap_and_agreement_against_a_literal_loop():
  rng = np.random.default_rng(4)
  q, k, n = 40, 5, 12
  a = np.stack([rng.choice(n, k, replace=False) for _ in range(q)])
  b = a.copy()
  for i in range(q):  # keep, reorder, or swap in 1-3 other rows
    change = i % 4
    if change == 1:
      b[i] = rng.permutation(b[i])
    elif change >= 2:
      spare = [r for r in range(n) if r not in a[i]]
      pos = rng.choice(k, change - 1, replace=False)
      b[i, pos] = rng.choice(spare, len(pos), replace=False)
  overlap = ev.topk_overlap(a, b)
  same = ev.topk_agreement(a, b)
  for i in range(q):
    shared = sum(1 for r in a[i] if r in set(b[i].tolist()))
    assert overlap[i] == pytest.approx(shared / k)
    assert same[i] == (set(a[i].tolist()) == set(b[i].tolist()))
  assert same.sum() == q // 2 and overlap[same].min() == 1.0 and overlap[~same].max() < 1.0
  with pytest.raises(ValueError, match="of one shape"):
    ev.topk_agreement(a, b[:, :4])


def test_paired_difference_against_a_closed_form():
  a = [0.2, 0.4, None, 0.1, 0.5, float("nan")]
  b = [0.1, 0.5, 0.3, 0.1, 0.2, 0.7]
  d = np.array([-0.1, 0.1, 0.0, -0.3])  # queries 0, 1, 3, 4: both defined
  mean, se, n = ev.paired_difference(a, b)
  assert n == 4
  assert mean == pytest.approx(d.sum() / 4)
  assert se == pytest.approx(np.sqrt(np.sum((d - d.mean()) ** 2) / 3) / 2)
  with pytest.raises(ValueError, match="not the same queries"):
    ev.paired_difference(a, b[:5])


# --- balanced Conv, a kind derived from the stored conv rows ------------------------------


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
  """A vgg_tiny index (random weights, 32 px) of 8 noisy colour photos in two folders."""
  from cbir_jax import extract

  base = tmp_path_factory.mktemp("balanced")
  rng = np.random.default_rng(0)
  for c, rgb in enumerate(((200, 40, 30), (30, 60, 210))):
    (base / "photos" / f"class{c}").mkdir(parents=True)
    for j in range(4):
      img = np.clip(np.asarray(rgb) + rng.normal(0, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(img).save(base / "photos" / f"class{c}" / f"{j}.png")
  out = base / "index"
  extract.run(extract.ExtractConfig(output=str(out), images=str(base / "photos"),
                                    kinds=("fc", "conv", "mac"), model="vgg_tiny",
                                    weights="random", image_size=32, progress="none"))
  return str(out)


def test_balanced_kinds_end_to_end_equal_the_arrays_they_are_made_of(tiny_index):
  from cbir_jax import backbones, balance, store

  report = ev.evaluate(tiny_index, kinds=["conv", "conv_balanced", "fc_conv_balanced"], k=2)
  conv, meta = store.load_descriptors(tiny_index, "conv")
  fc, _ = store.load_descriptors(tiny_index, "fc")
  dims = backbones.get("vgg_tiny").block_channels
  scales = balance.block_scales(conv, dims)  # the defaults: 20000 pairs, seed 0
  assert report["balance"] == {**scales.to_dict(), "source": report["index"]}
  # The same protocol on the arrays made by hand gives the same table.
  labels, _ = ev.labels_from_metadata(meta)
  ref = ev.evaluate_arrays(
      {"conv_balanced": balance.apply(conv, scales),
       "fc_conv_balanced": np.concatenate([fc, balance.apply(conv, scales)], axis=1)},
      labels, [str(p) for p in meta["path"]], queries=np.arange(len(labels)), k=2)
  for r in ref.results[:2]:
    got = report["results"][r.kind]
    assert got["dim"] == r.dim == (sum(dims) if r.kind == "conv_balanced" else
                                   sum(dims) + fc.shape[1])
    assert got["top_k"] == r.top_k and got["map"] == pytest.approx(r.mean_ap)
    assert got["hist_distance"] == pytest.approx(r.hist_distance)
  # The table stays aligned with the long kind names: header and rows of one width.
  lines = ev.format_table(report).splitlines()[2:2 + 1 + len(report["results"])]
  assert lines[-1].startswith(ev.RANDOM) and len({len(ln) for ln in lines}) == 1
  # Scales learned from another index of the same backbone are used as given.
  again = ev.evaluate(tiny_index, kinds=["conv_balanced"], k=2, balance_from=tiny_index)
  assert again["balance"]["scales"] == report["balance"]["scales"]
  assert "balance" not in ev.evaluate(tiny_index, kinds=["conv"], k=2)


def test_balanced_kind_errors(tiny_index, tmp_path):
  from cbir_jax import extract

  # Another backbone, conv only (no fc): its scales do not carry over, and it cannot make
  # fc_conv_balanced.
  other = tmp_path / "lite"
  photos = os.path.join(os.path.dirname(tiny_index), "photos")
  extract.run(extract.ExtractConfig(output=str(other), images=photos, kinds=("conv",),
                                    model="efficientnet_lite_tiny", weights="random",
                                    image_size=32, progress="none"))
  with pytest.raises(ValueError, match="fc_conv_balanced is made from the stored kind fc: "):
    ev.evaluate(str(other), kinds=["fc_conv_balanced"], k=2)
  with pytest.raises(ValueError, match="only carry over within one backbone"):
    ev.evaluate(tiny_index, kinds=["conv_balanced"], k=2, balance_from=str(other))


def test_docs_sweep_at_equal_shares_is_conv_balanced(tiny_index):
  """docs/compare.py's sweep (results.md part 8): w = 1 / B gives conv_balanced's row."""
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).resolve().parents[1] / "docs" / "compare.py"
  spec = importlib.util.spec_from_file_location("docs_compare", path)
  compare = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(compare)
  rows = compare.sweep(tiny_index, [0.2, 1.0], k=2).splitlines()
  r = ev.evaluate(tiny_index, kinds=["conv_balanced"], k=2)["results"]["conv_balanced"]
  expect = [f"{r['hist_distance']:.4f}"] + [f"{r['precision'][c]:.3f}" for c in ("1", "5")]
  cells = [c.strip() for c in rows[2].strip("|").split("|")]
  assert cells[0] == "20%" and cells[1:4] == expect and cells[-1] == f"{r['map']:.3f}"
  assert rows[3].startswith("| 100% |")
