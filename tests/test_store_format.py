"""The output format: descriptors/ readable with NumPy alone, identical kinds stored once,
earlier formats still loading, shards removed after a verified consolidation, no lock left.

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
d = sys.argv[1]
with np.load(os.path.join(d, "meta.npz"), allow_pickle=False) as z:
  meta = {c: z[c] for c in z.files}
arrays = {os.path.basename(p)[:-4]: np.load(p, mmap_mode="r", allow_pickle=False)
          for p in sorted(glob.glob(os.path.join(d, "*.npy")))}
assert "cbir_jax" not in sys.modules
print(json.dumps({"columns": sorted(meta), "path": meta["path"].tolist(),
                  "label": meta["label"].tolist(), "label_name": meta["label_name"].tolist(),
                  "rows": {k: a.shape[0] for k, a in arrays.items()}}))
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


def test_descriptors_folder_alone_gives_rows_with_numpy_only(finished, tmp_path):
  _, paths, out, _ = finished
  alone = tmp_path / "copied" / "descriptors"
  shutil.copytree(out / "descriptors", alone)  # nothing else of the output
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  r = subprocess.run([sys.executable, "-c", _NUMPY_ONLY, str(alone)], capture_output=True,
                     text=True, env=env, cwd=tmp_path, timeout=120)
  assert r.returncode == 0, r.stderr
  got = json.loads(r.stdout)
  assert set(store.META_COLUMNS) <= set(got["columns"])
  assert got["path"] == paths  # input order; the file that is not an image has no row
  want_class = [pathlib.Path(p).parent.name for p in paths]
  assert got["label_name"] == want_class
  assert got["label"] == [CLASSES.index(c) for c in want_class]
  assert set(got["rows"].values()) == {len(paths)}
  manifest = json.loads((out / "manifest.json").read_text())
  stored = set(got["rows"])
  assert stored | set(manifest["aliases"]) == set(desc.KINDS)
  assert not stored & set(manifest["aliases"])
  ref = _reference(paths, desc.KINDS)
  for kind in desc.KINDS:  # an alias' rows are those of the kind it names
    a = np.load(alone / f"{manifest['aliases'].get(kind, kind)}.npy", allow_pickle=False)
    np.testing.assert_allclose(a, ref[kind], rtol=1e-5, atol=1e-5, err_msg=kind)


def test_finished_output_has_no_shards_no_lock_and_showed_finishing(finished):
  _, paths, out, lines = finished
  assert not (out / store.SHARDS).exists() and not list(out.glob(".lock*"))
  m = store.load_manifest(out)
  assert not m.shards_kept and m.complete and len(m.shards) == 3
  assert m.metadata.rows == len(paths) and m.failures_file.rows == 1
  assert [p for p, _ in store.read_failures(out)] == [str(pathlib.Path(paths[0]).parents[1]
                                                          / "dogs" / "broken.jpg")]
  store.verify_consolidated(out, m)
  finishing = [ln for ln in lines if ln.startswith("finishing:")]
  assert len(finishing) >= 2 and "shards removed" in finishing[-1], lines
  # The platform: one line first, and the same in the manifest's run info.
  assert lines[0].startswith(f"JAX {jax.__version__} on cpu: {jax.local_device_count()} x ")
  assert m.run["backend"] == "cpu" and m.run["local_device_count"] == jax.local_device_count()


def _shard_arrays(out: pathlib.Path, m: dict, kind: str) -> np.ndarray:
  return np.concatenate([np.load(out / s["dir"] / f"{kind}.npy", allow_pickle=False)
                         for s in m["shards"]])


def _shard_meta(out: pathlib.Path, m: dict) -> dict[str, np.ndarray]:
  parts = []
  for s in m["shards"]:
    with np.load(out / s["dir"] / "meta.npz", allow_pickle=False) as z:
      parts.append({c: z[c] for c in z.files})
  return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def _expected_aliases(arrays: dict[str, np.ndarray], kinds) -> dict[str, str]:
  """Literal loop: each kind's first earlier kind with byte-identical rows."""
  out = {}
  for i, k in enumerate(kinds):
    for j in kinds[:i]:
      if j not in out and arrays[j].dtype == arrays[k].dtype and \
          arrays[j].tobytes() == arrays[k].tobytes() and arrays[j].shape == arrays[k].shape:
        out[k] = j
        break
  return out


@pytest.mark.parametrize("model,size", [("efficientnet_lite_tiny", 64), ("vgg_tiny", 32)])
def test_identical_kinds_stored_once_and_named(tmp_path, model, size):
  """EfficientNet-Lite's fc is its spoc (by definition); vgg_tiny at 32 px has a 1x1 last
  block, so mac equals spoc (by the data). Kept shards are the reference."""
  root = tmp_path / "imgs"
  paths = _folder(root, 5)
  out = tmp_path / "out"
  extract.run(extract.ExtractConfig(output=str(out), images=str(root), **{
      **COMMON, "model": model, "image_size": size, "keep_shards": True}))
  m = json.loads((out / "manifest.json").read_text())
  assert m["shards_kept"] and (out / "shards").is_dir()
  shards = {k: _shard_arrays(out, m, k) for k in desc.KINDS}
  want = _expected_aliases(shards, desc.KINDS)
  assert m["aliases"] == want
  assert want.get("spoc") == ("fc" if model.startswith("efficientnet") else "mac")
  for kind in desc.KINDS:
    assert (out / "descriptors" / f"{kind}.npy").exists() == (kind not in want)
    got, meta = store.load_descriptors(out, kind, verify=True)
    np.testing.assert_array_equal(got, shards[kind])
  assert meta["path"].tolist() == paths
  for c, v in _shard_meta(out, m).items():
    np.testing.assert_array_equal(meta[c], v)


@pytest.mark.parametrize("version", [1, 2])
def test_earlier_formats_still_load(version):
  """Indexes written by version one (format 1) and by the job engine (format 2) load as
  they are: rows and metadata equal their shards joined with NumPy."""
  out = FIXTURES / f"index_format{version}"
  m = json.loads((out / "manifest.json").read_text())
  assert m["format_version"] == version
  want_meta = _shard_meta(out, m)
  for kind in m["settings"]["kinds"]:
    got, meta = store.load_descriptors(out, kind, verify=True)
    np.testing.assert_array_equal(got, _shard_arrays(out, m, kind))
    assert got.shape == (5, m["dimensions"][kind])
  assert sorted(meta) == sorted(want_meta)
  for c, v in want_meta.items():
    np.testing.assert_array_equal(meta[c], v)
  assert [os.path.basename(p) for p in meta["path"]] == [f"img_{i}.png" for i in (0, 2, 4, 1, 3)]
  assert meta["group"].tolist() == ["g0", "g0", "g0", "g1", "g1"]
  assert [os.path.basename(p) for p, _ in store.read_failures(out)] == ["broken.png"]


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


def test_update_of_an_output_left_in_shards(tmp_path):
  """--consolidate=false keeps rows in the shards (as formats 1-2 did): --update reuses them
  from there and its result equals a clean run."""
  root = tmp_path / "imgs"
  _folder(root, 6)
  out, clean = tmp_path / "out", tmp_path / "clean"
  cfg = extract.ExtractConfig(output=str(out), images=str(root), consolidate=False, **COMMON)
  extract.run(cfg)
  m = store.load_manifest(out)
  assert m.metadata is None and m.shards_kept and not (out / "descriptors").exists()
  extra = _folder(tmp_path / "more", 2)
  for i, p in enumerate(extra):
    shutil.copy(p, root / "cats" / f"new{i}.png")
  s = extract.run(extract.ExtractConfig(**{**cfg.__dict__, "update": True}))
  assert s.images == 2 and s.reused == 7  # 6 rows and 1 failure kept
  extract.run(extract.ExtractConfig(**{**cfg.__dict__, "output": str(clean)}))
  for kind in desc.KINDS:
    a, ma = store.load_descriptors(out, kind)
    b, mb = store.load_descriptors(clean, kind)
    np.testing.assert_array_equal(a, b)
  for c in mb:
    np.testing.assert_array_equal(ma[c], mb[c])
