"""Exact search against a brute-force NumPy reference (ties, edge sizes, devices, streaming)."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from cbir_jax import query, search, sharding
from cbir_jax.job import jit_cache


def brute_force(q, db, k, exclude=None):
  """Literal reference: float64 L1 / D, then sort by (distance, index)."""
  q = np.asarray(q, np.float64)
  db = np.asarray(db, np.float64)
  d = np.abs(q[:, None, :] - db[None, :, :]).sum(-1) / db.shape[1]
  if exclude is not None:
    for a, e in enumerate(exclude):
      if e >= 0:
        d[a, e] = np.inf
  order = np.stack([np.lexsort((np.arange(db.shape[0]), row)) for row in d])[:, :k]
  return np.take_along_axis(d, order, 1), order


def tie_data(rng, n, dim, q):
  """Small integers: every sum is exact in float32, so equal distances are truly equal."""
  db = rng.integers(0, 3, (n, dim)).astype(np.float32)
  db[n // 2] = db[1]  # duplicated rows: exact ties at every query
  db[n - 1] = db[1]
  queries = np.concatenate([db[[1]], rng.integers(0, 3, (q - 1, dim)).astype(np.float32)])
  return queries, db


def one_device():
  return sharding.data_mesh(jax.local_devices()[:1])


@pytest.mark.parametrize("method", ["loop", "chunks"])
@pytest.mark.parametrize("k", [1, 9])
def test_ties_go_to_lower_index(method, k):
  rng = np.random.default_rng(0)
  q, db = tie_data(rng, n=203, dim=29, q=5)  # D=29, N=203: multiples of no tile size
  r = search.l1_topk(q, db, k, tile=16, query_tile=3, d_chunk=8, method=method)
  d_ref, i_ref = brute_force(q, db, k)
  np.testing.assert_array_equal(r.indices, i_ref)
  np.testing.assert_allclose(r.distances, d_ref, rtol=1e-6)
  # The query is row 1 and its duplicates 101 and 202: distance 0, lower index first.
  np.testing.assert_array_equal(r.indices[0, :min(k, 3)], [1, 101, 202][:k])
  assert r.distances[0, 0] == 0.0


def test_k_equals_n_and_single_query_on_eight_devices():
  assert len(jax.devices()) == 8, "conftest should give 8 fake CPU devices"
  rng = np.random.default_rng(1)
  q, db = tie_data(rng, n=77, dim=13, q=1)
  r = search.l1_topk(q, db, 77, tile=8, d_chunk=5)  # default mesh: all 8 devices
  d_ref, i_ref = brute_force(q, db, 77)
  np.testing.assert_array_equal(r.indices, i_ref)
  np.testing.assert_allclose(r.distances, d_ref, rtol=1e-6)
  assert sorted(r.indices[0].tolist()) == list(range(77))  # every row once, no padding


def test_random_floats_match_brute_force_and_one_vs_eight_devices():
  rng = np.random.default_rng(2)
  db = rng.normal(size=(300, 37)).astype(np.float32)
  q = rng.normal(size=(11, 37)).astype(np.float32)
  d_ref, i_ref = brute_force(q, db, 6)
  r8 = search.l1_topk(q, db, 6, tile=16, query_tile=4)
  r1 = search.l1_topk(q, db, 6, tile=16, query_tile=4, mesh=one_device())
  for r in (r8, r1):
    np.testing.assert_allclose(r.distances, d_ref, rtol=1e-5)
    # Random normals: the gaps between neighbours are far above float32 rounding.
    np.testing.assert_array_equal(r.indices, i_ref)
  assert r8.distances.dtype == np.float32 and r8.indices.dtype == np.int64


def test_memmap_streams_in_fixed_blocks_without_recompiling(tmp_path):
  rng = np.random.default_rng(3)
  q, db = tie_data(rng, n=1000, dim=21, q=4)
  np.save(tmp_path / "db.npy", db)
  mm = np.load(tmp_path / "db.npy", mmap_mode="r")
  # 8 devices x tile 8 = 64-row steps; blocks of 128 rows: 8 blocks, the last one
  # (1000 - 896 = 104 rows) padded and masked.
  tiling = search.plan(4, 1000, 21, num_devices=8, tile=8, block_rows=128, d_chunk=4,
                       method="loop")
  assert tiling.block_rows == 128 and 1000 % tiling.block_rows
  # Executables made, counted from JAX's public compile events: all 8 blocks (the padded
  # last one included) take as many as a single unpadded block of another width, and a
  # second search of the same shapes takes none.
  topk = lambda queries, rows: search.l1_topk(  # noqa: E731
      queries, rows, 5, tile=8, block_rows=128, d_chunk=4, method="loop")
  eight, one, again = jit_cache.CompileCounter(), jit_cache.CompileCounter(), \
      jit_cache.CompileCounter()
  with eight.watch():
    r = topk(q, mm)
  q1, db1 = tie_data(np.random.default_rng(4), n=128, dim=22, q=4)
  with one.watch():
    topk(q1, db1)
  with again.watch():
    topk(q, mm)
  assert eight.count >= 1 and eight.count == one.count and again.count == 0
  d_ref, i_ref = brute_force(q, db, 5)
  np.testing.assert_array_equal(r.indices, i_ref)
  np.testing.assert_allclose(r.distances, d_ref, rtol=1e-6)


def test_exclude_drops_the_query_row():
  rng = np.random.default_rng(4)
  q, db = tie_data(rng, n=60, dim=7, q=3)
  exclude = [1, -1, 30]
  r = search.l1_topk(q, db, 59, exclude=exclude, tile=8)
  d_ref, i_ref = brute_force(q, db, 59, exclude)
  np.testing.assert_array_equal(r.indices, i_ref)
  assert 1 not in r.indices[0] and 30 not in r.indices[2]
  with pytest.raises(ValueError, match=r"k must be an integer in \[1, 59\].*excluded"):
    search.l1_topk(q, db, 60, exclude=exclude)


def _tensor_sizes(hlo_text):
  sizes = []
  for dims in re.findall(r"tensor<((?:\d+x)+)[a-z]", hlo_text):
    sizes.append(int(np.prod([int(v) for v in dims.rstrip("x").split("x")])))
  return sizes


@pytest.mark.parametrize("method", ["loop", "chunks"])
def test_working_set_is_bounded_by_the_tiling(method):
  """The lowered program holds tiles of the query x row x dimension work, never all of it."""
  q_n, dim, k, block, devices = 64, 96, 3, 128, 8
  tiling = search.plan(q_n, 4096, dim, num_devices=devices, tile=16, query_tile=16,
                       d_chunk=8, block_rows=block, method=method)
  assert (tiling.tile, tiling.query_tile, tiling.block_rows) == (16, 16, block)
  fn = search._block_fn(sharding.data_mesh(jax.local_devices()), k, tiling, dim)
  f32, i32 = np.float32, np.int32
  args = (np.zeros((q_n, dim), f32), np.zeros(q_n, i32), np.zeros((block, dim), f32), i32(0),
          i32(block), np.zeros((q_n, k), f32), np.zeros((q_n, k), i32), np.zeros((), bool))
  sizes = _tensor_sizes(fn.lower(*args).as_text())
  # Arrays that are the inputs (or a device's share of them) may be large; every
  # intermediate is at most the kernel's working set, one tile of rows, or the
  # per-device candidate lists being merged.
  data = {block * dim, block // devices * dim, q_n * dim}
  # The kernel's largest intermediate: query tile x row tile (x d_chunk for "chunks").
  working = 16 * 16 if method == "loop" else 16 * 16 * 8
  bound = max(working, tiling.tile * dim, q_n * k * (devices + 1))
  others = [s for s in sizes if s not in data]
  assert max(others) <= bound, (max(others), bound)
  # One untiled query-tile x device-rows x D comparison would exceed every array present.
  assert max(sizes) < tiling.query_tile * (block // devices) * dim


def test_l1_distances_match_reference_and_topk():
  rng = np.random.default_rng(5)
  q, db = tie_data(rng, n=130, dim=19, q=6)
  d = search.l1_distances(q, db, tile=32, query_tile=4)
  ref = np.abs(q[:, None].astype(np.float64) - db[None]).sum(-1) / 19
  np.testing.assert_allclose(d, ref, rtol=1e-6)
  order = np.argsort(d, axis=1, kind="stable")[:, :10]
  np.testing.assert_array_equal(order, search.l1_topk(q, db, 10, tile=8).indices)


@pytest.mark.parametrize("bad, match", [
    (dict(q=np.zeros((2, 5))), "query dimension 5 != database dimension 4"),
    (dict(k=0), r"k must be an integer in \[1, 10\]"),
    (dict(k=11), r"k must be an integer in \[1, 10\]"),
    (dict(q=np.zeros(4)), "queries must be \\[Q, D\\]"),
    (dict(q=np.array([[0, 0, np.nan, 0.]])), r"queries contain NaN.*rows \[0\]"),
    (dict(db_nan=7), "database contains NaN or infinite values \\(first at row 7\\)"),
])
def test_clear_errors(bad, match):
  db = np.arange(40, dtype=np.float32).reshape(10, 4)
  if "db_nan" in bad:
    db[bad["db_nan"], 2] = np.nan
  q = bad.get("q", np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError, match=match):
    search.l1_topk(q, db, bad.get("k", 3), tile=4)


def test_faiss_export_agrees_after_dividing_by_d():
  faiss = pytest.importorskip("faiss", reason="faiss is an optional dependency")
  rng = np.random.default_rng(6)
  db = rng.random((500, 24), dtype=np.float32)
  q = rng.random((7, 24), dtype=np.float32)
  index = search.to_faiss(db, block_rows=128)
  assert isinstance(index, faiss.IndexFlat) and index.metric_type == faiss.METRIC_L1
  assert index.ntotal == 500
  fd, fi = index.search(q, 5)
  r = search.l1_topk(q, db, 5, mesh=one_device())
  np.testing.assert_array_equal(fi, r.indices)
  np.testing.assert_allclose(fd / 24, r.distances, rtol=1e-5)


# --- the query layer (cbir_jax.query): an index searched with images and rows ----------------


def test_clamp_k_notes_what_it_does():
  notes = []
  assert query.clamp_k(50, 12, exclude_self=False, note=notes.append) == 12
  assert query.clamp_k(50, 12, exclude_self=True, note=notes.append) == 11
  assert query.clamp_k(3, 12, exclude_self=True, note=notes.append) == 3
  assert notes == ["k=50 is more than the index has (12 rows): showing all 12",
                   "k=50 is more than the index has (12 rows, minus the query itself): "
                   "showing all 11"]
  for k in (0, -1, 2.5, True):
    with pytest.raises(ValueError, match="positive integer"):
      query.clamp_k(k, 12, exclude_self=False)
  with pytest.raises(ValueError, match="nothing is left"):
    query.clamp_k(1, 1, exclude_self=True)


def _png_folder(folder, n):
  """n random 40x30 PNGs in two class folders, plus dup.png: a byte copy of the fourth."""
  from PIL import Image

  rng = np.random.default_rng(7)
  paths = []
  for i in range(n):
    p = folder / f"class{i % 2}" / f"img{i:02d}.png"
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(p)
    paths.append(p)
  shutil.copy(paths[3], folder / "class1" / "dup.png")
  return paths


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
  from cbir_jax import extract

  root = tmp_path_factory.mktemp("query")
  paths = _png_folder(root / "imgs", 10)
  out = root / "index"
  extract.run(extract.ExtractConfig(output=str(out), images=str(root / "imgs"),
                                    model="vgg_tiny", weights="random", image_size=32,
                                    batch_size=4, kinds=("conv", "mac"), progress="none"),
              log=lambda m: None)
  return out, root, paths


def _reference(index_dir, path, k, exclude=-1, kind="conv"):
  """Literal ranking of the index for one query image: L1 / D in float64, ties to the lower row."""
  from cbir_jax import store

  manifest, db, meta = store.open_index(index_dir, kind)
  q = query.describe_images(manifest, [str(path)], kind)
  _, order = brute_force(q, np.asarray(db), len(db), [exclude])
  rows = {str(p): i for i, p in enumerate(meta["path"])}
  return [int(i) for i in order[0] if i != exclude][:k], rows


def test_query_image_in_the_index_is_found_by_its_file_or_its_pixels(small_index, tmp_path):
  from PIL import Image

  out, root, paths = small_index
  _, rows = _reference(out, paths[0], 1)
  dup = str(root / "imgs" / "class1" / "dup.png")
  copy = tmp_path / "elsewhere" / "copy.png"
  copy.parent.mkdir()
  shutil.copy(paths[5], copy)
  bmp = tmp_path / "same_pixels.bmp"  # other bytes, same pixels
  Image.open(paths[6]).save(bmp)
  changed = np.asarray(Image.open(paths[7])).copy()
  changed[0, 0] ^= 1  # one pixel differs: not the same image
  Image.fromarray(changed).save(tmp_path / "changed.png")
  cases = [  # query, expected self row, how
      (str(paths[2]), rows[str(paths[2])], "same file"),
      (dup, rows[dup], "same file"),  # a byte copy of img03 in the index: its own row wins
      (str(copy), rows[str(paths[5])], "same pixels"),
      (str(bmp), rows[str(paths[6])], "same pixels"),
      (str(tmp_path / "changed.png"), -1, ""),
  ]
  k = 4
  for exclude in (False, True):
    results = query.search_index(str(out), kind="conv", k=k, query_paths=[c[0] for c in cases],
                                 exclude_self=exclude)
    for (path, own, how), r in zip(cases, results):
      assert (r.self_row, r.self_match, r.self_excluded) == (own, how, exclude and own >= 0)
      expect, _ = _reference(out, path, k, own if exclude else -1)
      assert [h.row for h in r.hits] == expect, (path, exclude)
      if own >= 0 and not exclude:
        assert r.hits[0].row == own and r.hits[0].distance < 1e-5
  # img03 and dup.png are the same image at two rows: excluding one keeps the other at d=0.
  [r] = query.search_index(str(out), kind="conv", k=2, query_paths=[dup], exclude_self=True)
  assert r.hits[0].row == rows[str(paths[3])] and r.hits[0].distance < 1e-5


def test_moved_folder_query_is_found_through_image_root(small_index, tmp_path):
  out, root, paths = small_index
  moved = tmp_path / "moved"
  shutil.copytree(root / "imgs", moved)  # the index still records root / "imgs"
  _, rows = _reference(out, paths[4], 1)
  query_file = str(moved / paths[4].relative_to(root / "imgs"))
  [r] = query.search_index(str(out), kind="mac", k=3, query_paths=[query_file],
                           exclude_self=True, image_root=str(moved))
  assert (r.self_row, r.self_match) == (rows[str(paths[4])], "same file")
  assert r.self_row not in [h.row for h in r.hits] and len(r.hits) == 3


def test_table_json_and_report_mark_the_query_itself(small_index, tmp_path):
  from cbir_jax import report

  out, root, paths = small_index
  _, rows = _reference(out, paths[1], 1)
  results = query.search_index(str(out), kind="conv", k=3, query_paths=[str(paths[1])],
                               query_ids=[8])
  table = query.format_results(results).splitlines()
  assert table[0].endswith(f"[in the index: row {rows[str(paths[1])]}, same file]")
  assert table[2].endswith("(the query itself)") and table[7].endswith("(the query itself)")
  assert sum(line.endswith("(the query itself)") for line in table) == 2
  got = query.results_json(results, index=str(out))
  assert [(r["rank"], r["row"], r["self"]) for r in got["results"]] == [
      (i + 1, h.row, h.row == res.self_row) for res in results for i, h in enumerate(res.hits)]
  written = report.write_report(tmp_path / "rep", results)
  assert [[c["mark"] for c in row][:2] for row in written["cells"]] == [["query", "self"]] * 2
  assert "the query itself" in pathlib.Path(written["html"]).read_text()


def test_the_query_layer_does_not_import_the_job():
  code = ("import sys; import cbir_jax.query, cbir_jax.report; "
          "print(sorted(m for m in sys.modules if m == 'cbir_jax.extract' "
          "or m.startswith('cbir_jax.job')))")
  repo = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]"


# --- an index in memory-mapped parts, float32 and float16, over 8 devices ---------------------


class LazyParts:
  """A lazy concatenation of memory-mapped .npy parts, as the index format may hand out:
  numpy-like row slicing reads only the parts a slice covers. Records every slice asked."""

  def __init__(self, paths):
    self.parts = [np.load(p, mmap_mode="r") for p in paths]
    self.starts = np.cumsum([0] + [len(p) for p in self.parts])
    self.shape = (int(self.starts[-1]), self.parts[0].shape[1])
    self.dtype = self.parts[0].dtype
    self.slices = []

  def __getitem__(self, key):
    assert isinstance(key, slice) and key.step is None, f"only row slices, got {key!r}"
    start, stop, _ = key.indices(self.shape[0])
    self.slices.append((start, stop))
    pieces = []
    for part, first in zip(self.parts, self.starts[:-1]):
      a, b = max(start, first), min(stop, first + len(part))
      if a < b:
        pieces.append(part[a - first:b - first])
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _parts(tmp_path, db, sizes):
  paths, start = [], 0
  for j, size in enumerate(sizes):
    paths.append(tmp_path / f"part-{j}.npy")
    np.save(paths[-1], db[start:start + size])
    start += size
  assert start == len(db)
  return LazyParts(paths)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_index_in_parts_on_eight_devices_equals_the_numpy_reference(tmp_path, dtype):
  assert len(jax.local_devices()) == 8
  rng = np.random.default_rng(7)
  exact = rng.random((701, 33), dtype=np.float32) * 4  # non-negative, like descriptors
  stored = exact.astype(dtype)
  db = _parts(tmp_path, stored, [250, 13, 438])  # blocks straddle the parts
  q = rng.random((9, 33), dtype=np.float32) * 4
  r = search.l1_topk(q, db, 7, tile=8, block_rows=128)
  assert all(b - a <= 128 for a, b in db.slices) and len(db.slices) >= 6
  # Against the stored values read as float32: the device sums the same float32 values
  # in another order, so distances agree to float32 summation rounding (D = 33 terms);
  # random floats have gaps far above that, so the ranking is the same.
  d_ref, i_ref = brute_force(q, stored.astype(np.float32), 7)
  np.testing.assert_array_equal(r.indices, i_ref)
  np.testing.assert_allclose(r.distances, d_ref, rtol=1e-5)
  # Against the float32 values before storage: float16 rounds each value by at most
  # 2^-11 of itself (its unit roundoff; all values are normal here), so | |q-x16| - |q-x| |
  # <= 2^-11 |x| and a distance (L1 / D) moves by at most 2^-11 mean|x| of its row.
  u = 2.0 ** -11 if dtype == np.float16 else 0.0
  move = u * np.abs(exact).mean(axis=1) + 1e-6
  d_exact, i_exact = brute_force(q, exact, 7)
  true_d = np.abs(q[:, None, :].astype(np.float64) - exact[r.indices]).sum(-1) / 33
  assert np.all(np.abs(r.distances - true_d) <= move[r.indices])
  # Every returned row is a true top-7 row unless it lies within the rounding of the 7th.
  assert np.all(true_d <= d_exact[:, -1:] + 2 * move.max())
  if dtype == np.float32:
    np.testing.assert_array_equal(r.indices, i_exact)


def test_float16_parts_are_not_copied_to_float32_on_the_host(tmp_path):
  import tracemalloc

  rng = np.random.default_rng(8)
  db16 = (rng.random((4096, 64), dtype=np.float32)).astype(np.float16)
  db = _parts(tmp_path, db16, [4096])
  q = rng.random((3, 64), dtype=np.float32)
  search.l1_topk(q, db, 5, tile=64, block_rows=2048)  # compile outside the measurement
  tracemalloc.start()
  try:
    r = search.l1_topk(q, db, 5, tile=64, block_rows=2048)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  # NumPy reports its buffers to tracemalloc: a float32 copy of one 2048-row block is
  # 512 KiB (of all 4096 rows 1 MiB); a float16 memory-mapped slice allocates nothing.
  assert peak < 2048 * 64 * 4 // 2, peak
  d_ref, i_ref = brute_force(q, db16.astype(np.float32), 5)
  np.testing.assert_array_equal(r.indices, i_ref)


# --- names: commas in --query, control characters in what is shown (issue 18 item 4) ----------


def test_query_names_split_only_unambiguous_comma_lists(tmp_path):
  a, b, ab = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "a.png,b.png"
  for p in (a, b, ab):
    p.write_bytes(b"x")
  c = tmp_path / "c,d.png"
  c.write_bytes(b"x")
  # A file named with a comma is one name even where its pieces are files too.
  assert query.query_names([str(ab)]) == [str(ab)]
  assert query.query_names([str(c), str(a)]) == [str(c), str(a)]
  assert query.query_names(f"{a},{b}") == [str(a), str(b)]  # a list: every piece is a file
  ab.unlink()
  assert query.query_names([f"{a},{b}"]) == [str(a), str(b)]
  # Not every piece is a file: kept whole, so the error names what was given.
  assert query.query_names([f"{a},{tmp_path}/nope.png"]) == [f"{a},{tmp_path}/nope.png"]


def test_query_flag_is_repeatable_and_keeps_a_name_with_a_comma(small_index, tmp_path):
  import json

  out, root, paths = small_index
  comma = tmp_path / "one,two.png"
  shutil.copy(paths[2], comma)
  repo = pathlib.Path(__file__).resolve().parents[1]
  proc = subprocess.run(
      [sys.executable, str(repo / "launch" / "search.py"), f"--index={out}", "--kind=conv",
       "--k=2", "--json", f"--query={comma}", f"--query={paths[0]},{paths[1]}"],
      capture_output=True, text=True, timeout=300, cwd=repo,
      env={**os.environ, "PYTHONPATH": str(repo)})
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = json.loads(proc.stdout)["results"]
  assert [r["query"] for r in got if r["rank"] == 1] == [str(comma), str(paths[0]),
                                                       str(paths[1])]
  # The comma-named copy of img02 has its pixels: found as the index's img02 row.
  expect, rows = _reference(out, paths[2], 2)
  assert [r["row"] for r in got[:2]] == expect and got[0]["self_row"] == rows[str(paths[2])]


def test_control_characters_in_names_are_shown_escaped(tmp_path):
  from PIL import Image

  from cbir_jax import report

  names = ["line\nbreak.png", "tab\there.png", "plain é.png"]
  for i, name in enumerate(names):
    Image.new("RGB", (20, 16), (40 * i, 90, 200)).save(tmp_path / name)
  hits = tuple(query.Hit(path=str(tmp_path / n), distance=0.1 * i, label=f"class\n{i}")
               for i, n in enumerate(names))
  r = query.QueryResult(query=query.Hit(path=str(tmp_path / names[0])), hits=hits, kind="conv")
  table = query.format_results([r]).splitlines()
  assert len(table) == 2 + len(hits)  # a header, a column line, one line per result
  assert table[2].endswith(f"{tmp_path}/line\\nbreak.png  [class\\n0]")
  assert f"{tmp_path}/tab\\there.png" in table[3] and "plain é.png" in table[4]
  written = report.write_report(tmp_path / "rep", [r])
  page = pathlib.Path(written["html"]).read_text()
  assert "line\\nbreak.png" in page and "tab\\there.png" in page and "class\\n1" in page
  assert "\n" not in "".join(re.findall(r"<figcaption>(.*?)</figcaption>", page, re.S))
  # The PNG's captions, line by line: none holds a line break.
  captions = [t for i, h in enumerate(hits) for t in report._captions(h, i + 1, None)]
  assert all("\n" not in t and "\t" not in t for t in captions)
  assert query.results_json([r], index="x")["results"][0]["path"].endswith("line\nbreak.png")
