"""The approximate L1 index (cbir_jax.ann, launch/index.py, search --ann) against exact search."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cbir_jax import ann, query, search

faiss = pytest.importorskip("faiss", reason="faiss is in the test extra")
REPO = pathlib.Path(__file__).resolve().parents[1]


def clustered(rng, n, dim, rank=8, centres=30):
  """Non-negative rows of low intrinsic dimension around a few centres, like descriptors of
  photos of a few kinds (what a PCA keeps): clusters in a `rank`-dim space, mapped up."""
  mix = np.random.default_rng(123).random((rank, dim), dtype=np.float32)  # same for all calls
  c = rng.normal(size=(centres, rank)).astype(np.float32)
  z = c[rng.integers(0, centres, n)] + 0.3 * rng.normal(size=(n, rank)).astype(np.float32)
  return (np.abs(z @ mix) + 0.01 * rng.random((n, dim), dtype=np.float32)).astype(np.float32)


def brute(q, db, k, exclude=None):
  """Literal float64 L1 / D, ties to the lower row (SPEC.md section 3)."""
  d = np.abs(q[:, None, :].astype(np.float64) - db[None].astype(np.float64)).sum(-1) / db.shape[1]
  if exclude is not None:
    d[np.arange(len(q)), exclude] = np.inf
  order = np.stack([np.lexsort((np.arange(len(db)), row)) for row in d])[:, :k]
  return np.take_along_axis(d, order, 1), order


def recall(got, ref):
  return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, ref)])


@pytest.mark.parametrize("kind, pca", [("ivf", 0), ("ivf", 16), ("hnsw", 0)])
def test_candidates_reranked_exactly_find_the_true_neighbours(kind, pca):
  rng = np.random.default_rng(0)
  db = clustered(rng, 6000, 48).astype(np.float16)  # float16 storage, re-ranked as float32
  q = clustered(rng, 20, 48)
  cfg = ann.IndexConfig(index="-", type=kind, pca=pca, nlist=64, nprobe=16, hnsw_m=16,
                        ef_search=64, candidates=80, train_rows=4000)
  a = ann.Ann(ann.AnnRecord(kind="x", type=kind, identity="", rows=6000, dim=48, pca=pca,
                            nlist=64, hnsw_m=16, nprobe=16, ef_search=64, candidates=80,
                            build_seconds=0, faiss_version=""),
              ann.build_faiss(db, cfg), pathlib.Path("-"))
  top = ann.ann_topk(q, db, a, 10)
  d_ref, i_ref = brute(q, db.astype(np.float32), 10)
  assert recall(top.indices, i_ref) >= 0.95  # measured 0.975 (PCA 16) to 1.0 here
  # Every distance returned is the exact one of its row (the re-rank), ascending.
  exact = np.abs(q[:, None, :] - db[top.indices].astype(np.float32)).sum(-1) / 48
  np.testing.assert_allclose(top.distances, exact, rtol=1e-5)
  assert np.all(np.diff(top.distances, axis=1) >= 0)


def test_rerank_ties_go_to_the_lower_row_and_exclusions_drop():
  rng = np.random.default_rng(1)
  db = rng.integers(0, 3, (50, 6)).astype(np.float32)
  db[[7, 20, 33]] = db[3]  # exact ties with row 3
  q = db[[3]]
  ids = np.array([[33, 20, 7, 3, 12, -1, 49]])  # candidates in any order, one empty slot
  top = ann.rerank(q, db, ids, 3)
  assert top.indices.tolist() == [[3, 7, 20]] and top.distances[0, 0] == 0
  top = ann.rerank(q, db, ids, 3, exclude=np.array([3]))
  assert top.indices.tolist() == [[7, 20, 33]]
  top = ann.rerank(q, db, ids, 7)
  assert top.indices[0, -1] == -1 and np.isinf(top.distances[0, -1])  # only 6 candidates


def _png_folder(folder, n, seed=3):
  from PIL import Image

  rng = np.random.default_rng(seed)
  for i in range(n):
    p = folder / f"class{i % 3}" / f"img{i:03d}.png"
    p.parent.mkdir(parents=True, exist_ok=True)
    base = np.full((30, 40, 3), 60 * (i % 3), np.uint8)
    Image.fromarray(base + rng.integers(0, 90, (30, 40, 3), dtype=np.uint8)).save(p)


def _extract(images, out, **kw):
  from cbir_jax import extract

  extract.run(extract.ExtractConfig(output=str(out), images=str(images), model="vgg_tiny",
                                    weights="random", image_size=32, batch_size=8,
                                    kinds=("conv", "mac"), progress="none", **kw),
              log=lambda m: None)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
  root = tmp_path_factory.mktemp("ann")
  _png_folder(root / "imgs", 60)
  _extract(root / "imgs", root / "index")
  return root


def _launch(script, *args, env=None):
  return subprocess.run([sys.executable, str(REPO / "launch" / script), *args],
                        capture_output=True, text=True, timeout=300, cwd=REPO,
                        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_index_launcher_then_search_ann_equals_exact_search(index):
  out = index / "index"
  proc = _launch("index.py", f"--index={out}", "--kind=conv", "--nlist=4", "--pca=16",
                 "--nprobe=4")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "IVF-flat L1, 4 lists, PCA to 16" in proc.stderr
  where = ann.ann_dir(out, "conv")
  record = json.loads((where / ann.RECORD_FILE).read_text())
  assert record["identity"] == ann.index_identity(out, "conv") and record["rows"] == 60
  assert isinstance(faiss.read_index(str(where / ann.INDEX_FILE)), faiss.IndexPreTransform)
  # Every list probed: the candidates hold the exact top-k, so the results are the same.
  exact = query.search_index(str(out), kind="conv", k=5, query_ids=[0, 17, 59],
                             exclude_self=True)
  notes = []
  approx = query.search_index(str(out), kind="conv", k=5, query_ids=[0, 17, 59],
                              exclude_self=True, ann=True, note=notes.append)
  assert [[h.row for h in r.hits] for r in approx] == [[h.row for h in r.hits] for r in exact]
  # The same L1 / D summed in another order: equal to float32 rounding over D terms.
  np.testing.assert_allclose([[h.distance for h in r.hits] for r in approx],
                             [[h.distance for h in r.hits] for r in exact], rtol=1e-5)
  assert any("approximate search: ivf index of 60 rows" in n for n in notes)


def test_stale_index_after_update_is_refused_with_one_line(index, tmp_path):
  src = tmp_path / "imgs"
  shutil.copytree(index / "imgs", src)
  out = tmp_path / "index"
  _extract(src, out)
  ann.build(ann.IndexConfig(index=str(out), kind="mac", nlist=2, pca=0), log=lambda m: None)
  ann.load(out, "mac")  # fresh: accepted
  (src / "class0" / "img000.png").unlink()
  _png_folder(src / "new", 2, seed=9)
  _extract(src, out, update=True)
  with pytest.raises(ann.AnnError, match=r"stale.*launch/index\.py --index=.* --kind=mac"):
    ann.load(out, "mac")
  proc = _launch("search.py", f"--index={out}", "--kind=mac", "--query_ids=0", "--ann")
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert last.startswith("search: error:") and "stale" in last and "launch/index.py" in last
  with pytest.raises(ann.AnnError, match="no approximate index for kind 'conv'"):
    ann.load(out, "conv")


def test_without_faiss_one_line_names_the_extra(index, tmp_path):
  fake = tmp_path / "nofaiss" / "faiss"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("raise ImportError('No module named faiss')\n")
  proc = _launch("index.py", f"--index={index / 'index'}", "--kind=mac",
                 env={"PYTHONPATH": f"{fake.parent}{os.pathsep}{REPO}"})
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert last == "index: error: the approximate index needs faiss: pip install " \
                 "'cbir-jax[faiss]' (or faiss-cpu)"


def test_damaged_ann_files_are_refused_with_a_rebuild_line(index, tmp_path):
  out = tmp_path / "index"
  shutil.copytree(index / "index", out, ignore=shutil.ignore_patterns(ann.ANN_DIR))
  ann.build(ann.IndexConfig(index=str(out), kind="mac", type="hnsw", pca=0, hnsw_m=8),
            log=lambda m: None)
  where = ann.ann_dir(out, "mac")
  assert ann.load(out, "mac").index.ntotal == 60
  good = (where / ann.INDEX_FILE).read_bytes()
  (where / ann.INDEX_FILE).write_bytes(good[:len(good) // 2])  # truncated
  with pytest.raises(ann.AnnError, match=r"index\.faiss: .*rebuild it with"):
    ann.load(out, "mac")
  (where / ann.INDEX_FILE).write_bytes(good)
  (where / ann.RECORD_FILE).write_text("{not json")
  with pytest.raises(ann.AnnError, match=r"ann\.json: unreadable.*rebuild it with"):
    ann.load(out, "mac")


@pytest.mark.parametrize("field, value", [("pca", -1), ("nlist", -3), ("candidates", 0),
                                          ("nprobe", 0), ("hnsw_m", 1)])
def test_bad_index_settings_are_refused_in_one_line(field, value):
  with pytest.raises(ValueError, match=rf"^invalid index settings: --{field}={value} "):
    ann.IndexConfig(index="x", **{field: value})
