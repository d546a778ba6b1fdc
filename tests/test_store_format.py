"""The output format: the shards are the index (parts per kind readable with NumPy alone, one
metadata table, no copy), a lazy view over the parts, earlier formats refused with one line,
no lock left, --update reusing only rows that match their checksums.

Jobs use the test-only backbones with random weights on small inputs. References are
independent of the code under test: image lists from the folder, arrays read from the
shards with plain NumPy, descriptors computed outside the job.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from cbir_jax import backbones, extract, inference, input_pipeline, sharding, store
from cbir_jax import descriptors as desc

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SIZE = 32
COMMON = dict(model="vgg_tiny", weights="random", image_size=SIZE, progress="none",
              batch_size=1, shard_size=4)
CLASSES = ("cats", "dogs")


def _folder(root: pathlib.Path, n: int = 9) -> list[str]:
  """n small images in two class folders and one file that is not an image; good paths."""
  rng = np.random.default_rng(4)
  paths = []
  for i in range(n):
    p = root / CLASSES[i % 2] / f"{i:02d}.png"
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), np.uint8)).resize((30 + i, 36)).save(p)
    paths.append(str(p))
  (root / "dogs" / "broken.jpg").write_bytes(b"not a jpeg")
  return sorted(paths)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  root = tmp_path_factory.mktemp("imgs")
  paths = _folder(root)
  out = tmp_path_factory.mktemp("out") / "index"
  lines = []
  extract.run(extract.ExtractConfig(output=str(out), images=str(root), **{
      **COMMON, "progress": "log"}), log=lines.append)
  return root, paths, out, lines


# Uses numpy and json only (cbir_jax must not be imported): what a user without it can do.
_NUMPY_ONLY = r"""
import glob, json, os, sys
import numpy as np
d, kind = sys.argv[1], sys.argv[2]
parts = [np.load(p, mmap_mode="r", allow_pickle=False)
         for p in sorted(glob.glob(os.path.join(d, kind, "part-*.npy")))]
x = np.concatenate(parts)
metas = []
for p in sorted(glob.glob(os.path.join(d, "shards", "*", "meta.npz"))):
  with np.load(p, allow_pickle=False) as z:
    metas.append({c: z[c] for c in z.files})
meta = {c: np.concatenate([m[c] for m in metas]) for c in metas[0]}
assert "cbir_jax" not in sys.modules
np.save(os.path.join(sys.argv[3], "x.npy"), x)
print(json.dumps({"columns": sorted(meta), "path": meta["path"].tolist(),
                  "label": meta["label"].tolist(), "label_name": meta["label_name"].tolist(),
                  "parts": len(parts)}))
"""


def _reference(paths, kinds):
  """Descriptors of `paths` on one device, outside the job."""
  bb = backbones.get("vgg_tiny")
  fn = inference.jit_describe(bb, mesh=sharding.data_mesh(jax.devices()[:1]),
                              preprocessing=bb.preprocessing, kinds=kinds,
                              config=desc.DescriptorConfig())
  images, errors = input_pipeline.load_images(paths, SIZE)
  assert not any(errors)
  return {k: np.asarray(v) for k, v in fn(extract.random_params(bb, SIZE, 0), images).items()}


@pytest.mark.parametrize("kind", ["fc", "gem"])
def test_parts_read_with_numpy_only(finished, tmp_path, kind):
  _, paths, out, _ = finished
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  r = subprocess.run([sys.executable, "-c", _NUMPY_ONLY, str(out), kind, str(tmp_path)],
                     capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
  assert r.returncode == 0, r.stderr
  got = json.loads(r.stdout)
  assert set(store.META_COLUMNS) <= set(got["columns"]) and got["parts"] == 3
  assert got["path"] == paths  # input order; the file that is not an image has no row
  want_class = [pathlib.Path(p).parent.name for p in paths]
  assert got["label_name"] == want_class
  assert got["label"] == [CLASSES.index(c) for c in want_class]
  ref = _reference(paths, (kind,))
  np.testing.assert_allclose(np.load(tmp_path / "x.npy"), ref[kind], rtol=1e-5, atol=1e-5)


def test_finished_output_is_its_shards_with_one_table_and_no_lock(finished):
  _, paths, out, lines = finished
  assert not list(out.glob(".lock*")) and not (out / "descriptors").exists()
  m = store.load_manifest(out)
  assert m.complete and len(m.shards) == 3 and m.format_version == 4
  assert m.metadata.rows == len(paths) and m.failures_file.rows == 1
  assert [p for p, _ in store.read_failures(out)] == [str(pathlib.Path(paths[0]).parents[1]
                                                          / "dogs" / "broken.jpg")]
  # The metadata table equals the shards' own meta.npz, joined with NumPy.
  _, meta = store.load_descriptors(out, "fc")
  want = _shard_meta(out, m.to_dict())
  assert sorted(meta) == sorted(want)
  for c, v in want.items():
    np.testing.assert_array_equal(meta[c], v)
  for kind in desc.KINDS:  # each part is its shard's file: a second name, not a copy
    for e, sh in zip(m.parts[kind], m.shards):
      assert os.path.samefile(out / e.file, out / sh.dir / f"{kind}.npy")
  assert set(m.made) >= {"shards", "records.npz", "metadata.parquet", "failures.json",
                         *desc.KINDS}
  finishing = [ln for ln in lines if ln.startswith("finishing:")]
  assert len(finishing) >= 2 and "listed as the index" in finishing[-1], lines
  # The platform: one line first, and the same in the manifest's run info.
  assert lines[0].startswith(f"JAX {jax.__version__} on cpu: {jax.local_device_count()} x ")
  assert m.run["backend"] == "cpu" and m.run["local_device_count"] == jax.local_device_count()


def _shard_meta(out: pathlib.Path, m: dict) -> dict[str, np.ndarray]:
  parts = []
  for s in m["shards"]:
    with np.load(out / s["dir"] / "meta.npz", allow_pickle=False) as z:
      parts.append({c: z[c] for c in z.files})
  return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def test_lazy_rows_index_like_the_concatenated_array():
  from cbir_jax.index import LazyRows, part_view
  rng = np.random.default_rng(0)
  parts = [rng.standard_normal((n, 3)).astype(np.float32) for n in (4, 0, 1, 5)]
  whole = np.concatenate(parts)
  x = LazyRows(parts)
  assert x.shape == whole.shape and len(x) == 10 and x.dtype == np.float32 and x.ndim == 2
  np.testing.assert_array_equal(np.asarray(x), whole)
  for key in (0, 4, 9, -1, -10, slice(None), slice(2, 7), slice(None, None, -3), slice(8, 2),
              [9, 0, 4, 4], np.array([[1, 5], [6, -2]]), whole[:, 0] > 0, (slice(1, 6), 2),
              (3, slice(0, 2)), ([2, 7], [0, 2])):
    np.testing.assert_array_equal(x[key], whole[key], err_msg=repr(key))
  for bad in (10, -11, [10], np.ones(3, bool)):
    with pytest.raises(IndexError):
      x[bad]
  assert part_view(parts[:1]) is parts[0]  # one part: the array itself


@pytest.mark.parametrize("version", [1, 2])
def test_earlier_formats_get_one_line_saying_how_to_rebuild(version):
  out = FIXTURES / f"index_format{version}"
  with pytest.raises(store.StoreError) as e:
    store.load_descriptors(out, "fc")
  assert "\n" not in str(e.value) and "rebuild it" in str(e.value)


def test_lock_file_removed_at_the_end_and_still_exclusive(tmp_path):
  held = store.lock(tmp_path, 0)
  path = tmp_path / ".lock-0"
  assert path.exists()
  with pytest.raises(store.StoreError, match="another job"):
    store.lock(tmp_path, 0)
  stale = open(path)  # a job that opened the file just before the holder removed it
  held.close()
  assert not path.exists()
  again = store.lock(tmp_path, 0)  # a new file: the stale handle's lock protects nothing
  try:
    assert os.fstat(stale.fileno()).st_ino != path.stat().st_ino
    with pytest.raises(store.StoreError, match="another job"):
      store.lock(tmp_path, 0)
  finally:
    again.close()
    stale.close()
  assert not path.exists()


def test_lock_taken_again_when_its_file_was_removed_meanwhile(tmp_path, monkeypatch):
  """The file this job opened is removed by the job ending before its flock succeeds: the
  lock it would get is on a file no longer there, so it takes the lock on a new one."""
  import builtins
  real_open, calls = builtins.open, []

  def open_then_removed(path, *a, **kw):
    f = real_open(path, *a, **kw)
    calls.append(path)
    if len(calls) == 1:
      os.unlink(path)
    return f

  monkeypatch.setattr(builtins, "open", open_then_removed)
  held = store.lock(tmp_path, 0)
  monkeypatch.setattr(builtins, "open", real_open)
  try:
    assert len(calls) == 2
    assert os.fstat(held._f.fileno()).st_ino == (tmp_path / ".lock-0").stat().st_ino
    with pytest.raises(store.StoreError, match="another job"):
      store.lock(tmp_path, 0)
  finally:
    held.close()


def test_finish_progress_log_lines():
  lines = []
  from cbir_jax.consolidate import FinishProgress
  p = FinishProgress("log", lines.append, every_s=0.0)
  p.start(3_000_000, "verifying 2 shard(s)")
  p.step(1_000_000, "fc consolidated")
  p.step(2_000_000, "row metadata")
  p.close("done")
  assert lines[0] == "finishing: verifying 2 shard(s) (3.0 MB)"
  assert lines[1].startswith("finishing: fc consolidated (1.0/3.0 MB")
  assert lines[2].startswith("finishing: row metadata (3.0/3.0 MB")
  assert lines[-1].startswith("finishing: done (")
  quiet = []
  FinishProgress("none", quiet.append).close("done")
  assert quiet == []


def test_update_reuses_only_rows_that_match_their_checksums(tmp_path):
  """A flipped byte in a part of the previous index: --update does not copy that shard's
  rows into the new generation (they are extracted again); the result equals a clean run,
  and the previous generation's files go, user folders named like ours stay."""
  root = tmp_path / "imgs"
  _folder(root, 6)
  out, clean = tmp_path / "out", tmp_path / "clean"
  cfg = extract.ExtractConfig(output=str(out), images=str(root), **COMMON)
  extract.run(cfg)
  m = store.load_manifest(out)
  part = out / m.parts["mac"][0].file
  a = np.load(part)
  a[1, 0] += 1.0  # damage after the fact: same size, different bytes
  np.save(part, a)
  (out / "gen-000007").mkdir()  # a user's folder that only looks like ours
  (out / "gen-000007" / "keep.txt").write_text("mine")
  extra = _folder(tmp_path / "more", 2)
  for i, p in enumerate(extra):
    shutil.copy(p, root / "cats" / f"new{i}.png")
  s = extract.run(extract.ExtractConfig(**{**cfg.__dict__, "update": True}))
  assert s.images == 2 + 4 and s.reused == 3  # shard 0 (4 records) read again
  extract.run(extract.ExtractConfig(**{**cfg.__dict__, "output": str(clean)}))
  for kind in desc.KINDS:
    a, ma = store.load_descriptors(out, kind, verify=True)
    b, mb = store.load_descriptors(clean, kind)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for c in mb:
    np.testing.assert_array_equal(ma[c], mb[c])
  assert not (out / "shards").exists() and not (out / "mac").exists()  # the old generation
  assert (out / "gen-000007" / "keep.txt").read_text() == "mine"
