"""The extraction job: devices, processes, kills, bad files, TFDS, resume and refusals.

Jobs use the test-only "vgg_tiny" backbone with random weights on 32x32
inputs; the reference descriptors come from `inference.jit_describe` on a
one-device mesh, outside the job.
"""
import dataclasses
import json
import os
import re
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from cbir_jax import backbones, extract, inference, input_pipeline, sharding, store
from cbir_jax import descriptors as desc
from cbir_jax.descriptors import KINDS

import step_delay

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32
COMMON = dict(model="vgg_tiny", weights="random", image_size=SIZE, progress="none")


def _photos(root: pathlib.Path, n: int, seed: int = 0) -> list[str]:
  """n small images in two class folders (smooth colours plus noise, PNG and JPEG)."""
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(n):
    cls = ("cats", "dogs")[i % 2]
    h, w = int(rng.integers(24, 48)), int(rng.integers(24, 48))
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), rng.integers(0, 255))], -1)
    a = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    p = root / cls / f"{i:03d}.{'png' if i % 3 else 'jpg'}"
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(p)
    paths.append(str(p))
  return sorted(paths)


def _bad_files(root: pathlib.Path) -> dict[str, str]:
  """Corrupt, truncated, zero-byte and non-image files; name -> expected reason fragment."""
  (root / "cats").mkdir(parents=True, exist_ok=True)
  good = root / "cats" / "000.png"
  data = good.read_bytes() if good.exists() else b""
  (root / "cats" / "zero.jpg").write_bytes(b"")
  (root / "cats" / "text.jpg").write_text("this is a text file, not a JPEG\n")
  (root / "dogs" / "truncated.png").write_bytes(data[: len(data) // 3])
  (root / "dogs" / "random.png").write_bytes(np.random.default_rng(1).bytes(3000))
  return {"zero.jpg": "empty", "text.jpg": "identify", "truncated.png": "",
          "random.png": "identify"}


def _reference(paths, kinds=desc.KINDS, seed=0):
  """Descriptors of `paths` on ONE device, outside the job."""
  bb = backbones.get("vgg_tiny")
  params = extract.random_params(bb, SIZE, seed)
  fn = inference.jit_describe(bb, mesh=sharding.data_mesh(jax.devices()[:1]),
                              preprocessing=bb.preprocessing, kinds=kinds,
                              config=desc.DescriptorConfig())
  images, errors = input_pipeline.load_images(paths, SIZE)
  out = fn(params, images)
  return {k: np.asarray(v) for k, v in out.items()}, errors


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("photos")
  paths = _photos(root, 21)
  bad = _bad_files(root)
  return root, paths, bad


@pytest.fixture(scope="module")
def reference_run(folder, tmp_path_factory):
  """An uninterrupted in-process run on 8 devices (shared by several tests)."""
  root, _, _ = folder
  out = tmp_path_factory.mktemp("ref") / "out"
  cfg = extract.ExtractConfig(output=str(out), images=str(root), batch_size=1, shard_size=6,
                              **COMMON)
  summary = extract.run(cfg)
  return out, summary, cfg


def test_eight_devices_equal_one_device(folder, reference_run):
  root, paths, bad = folder
  out, summary, _ = reference_run
  assert len(jax.devices()) == 8
  # 25 records, shards of 6 -> 5 shards, each padded to one or more global batches of 8.
  assert summary.images == len(paths) and summary.failed == len(bad)
  assert summary.compiles == 1  # equal shapes every step: compiled once
  ref, errors = _reference(paths)
  assert not any(errors)
  for kind in desc.KINDS:
    got, meta = store.load_descriptors(out, kind)
    assert got.shape == ref[kind].shape and len(got.parts) == 5  # a view over the 5 parts
    assert all(isinstance(p, np.memmap) for p in got.parts)
    np.testing.assert_allclose(np.asarray(got), ref[kind], rtol=1e-5, atol=1e-5, err_msg=kind)
  np.testing.assert_array_equal(meta["path"], paths)  # input order, failures left out
  all_keys = [r.key for r in input_pipeline.folder_records(root)]
  np.testing.assert_array_equal(meta["row"], [all_keys.index(p) for p in paths])
  np.testing.assert_array_equal(meta["label"], [0 if "/cats/" in p else 1 for p in paths])
  np.testing.assert_array_equal(meta["label_name"],
                                ["cats" if "/cats/" in p else "dogs" for p in paths])
  sizes = [Image.open(p).size for p in paths]
  np.testing.assert_array_equal(meta["width"], [s[0] for s in sizes])
  np.testing.assert_array_equal(meta["height"], [s[1] for s in sizes])


def test_bad_files_reported_and_manifest(folder, reference_run):
  root, paths, bad = folder
  out, summary, _ = reference_run
  failures = store.read_failures(out)
  assert sorted(os.path.basename(p) for p, _ in failures) == sorted(bad)
  for p, reason in failures:
    assert reason and bad[os.path.basename(p)] in reason, (p, reason)
  listed = json.loads((out / "failures.json").read_text())
  assert sorted(os.path.basename(f[0]) for f in listed) == sorted(bad)
  m = json.loads((out / "manifest.json").read_text())
  assert m["rows"] == len(paths) and m["failures"] == len(bad) and m["status"] == "complete"
  assert m["num_records"] == len(paths) + len(bad) and len(m["shards"]) == 5
  assert sum(s["rows"] for s in m["shards"]) == len(paths)
  s = m["settings"]
  assert s["backbone"] == "vgg_tiny" and m["weights"]["source"] == "random"
  assert s["descriptor"] == {"threshold": 0.5, "relative": True, "masks": "channel"}
  assert s["image_size"] == SIZE and s["output_dtype"] == "float32"
  assert s["package_version"] and len(m["weights"]["params_sha256"]) == 64
  assert m["weights"]["kind"] == "random" and "dir" not in m["weights"] or not m["weights"]["dir"]
  assert m["verified"]["shards"] == 5 and m["format_version"] == 4
  # The shards are the index: per kind one part per shard, the shard's own file (no copy).
  assert sorted(m["parts"]) == sorted(KINDS)
  for kind, parts in m["parts"].items():
    assert [p["file"] for p in parts] == [f"{kind}/part-{k:06d}.npy" for k in range(5)]
    for p, sh in zip(parts, m["shards"]):
      assert os.path.samefile(out / p["file"], out / sh["dir"] / f"{kind}.npy")
      assert p["rows"] == sh["rows"] and p["sha256"] == store.sha256_file(out / p["file"])
  assert not (out / "descriptors").exists()


def test_rerun_skips_complete_and_refuses_other_settings(folder, reference_run):
  root, _, _ = folder
  out, _, cfg = reference_run
  before = (out / "fc_conv" / "part-000000.npy").stat().st_mtime_ns
  again = extract.run(cfg)
  assert again.shards_written == 0 and again.shards_skipped == 5
  assert again.images == 0
  assert store.load_descriptors(out, "fc")[0].shape[0] == 21
  del before
  for change in (dict(threshold=0.3), dict(seed=1), dict(image_size=48),
                 dict(output_dtype="float16"), dict(kinds=("fc",))):
    bad = extract.ExtractConfig(**{**cfg.__dict__, **change})
    with pytest.raises(extract.ExtractError, match="other settings"):
      extract.run(bad)


def test_lock_refuses_a_second_job(folder, tmp_path):
  root, _, _ = folder
  out = tmp_path / "locked"
  out.mkdir()
  held = store.lock(out, "worker-0")  # a live copy of worker 0 of this job
  try:
    with pytest.raises(extract.ExtractError, match="another job"):
      extract.run(extract.ExtractConfig(output=str(out), images=str(root), **COMMON))
  finally:
    held.close()


def test_disk_full_keeps_complete_shards(folder, tmp_path, monkeypatch):
  root, paths, _ = folder
  out = tmp_path / "full"
  cfg = extract.ExtractConfig(output=str(out), images=str(root), batch_size=1, shard_size=6,
                              **COMMON)
  real_save, calls = np.save, []

  def failing_save(path, a, *args, **kwargs):
    calls.append(path)
    if len(calls) > 2 * len(desc.KINDS):  # the third shard's first file: disk full
      raise OSError(28, "No space left on device")
    return real_save(path, a, *args, **kwargs)

  monkeypatch.setattr(np, "save", failing_save)
  with pytest.raises(extract.ExtractError, match="No space left on device"):
    extract.run(cfg)
  monkeypatch.setattr(np, "save", real_save)
  done = store.complete_shards(out)
  assert sorted(done) == [0, 1]
  assert not [d for d in (out / "shards").iterdir() if d.name.startswith(".tmp")]
  summary = extract.run(cfg)
  assert summary.shards_skipped == 2 and summary.shards_written == 3
  got, meta = store.load_descriptors(out, "fc_conv")
  np.testing.assert_array_equal(meta["path"], paths)


def test_load_validates_the_manifest(folder, reference_run, tmp_path):
  import shutil
  src, _, _ = reference_run
  cases = {
      "checksum": lambda o: _flip_byte(o / "fc_conv" / "part-000002.npy"),
      "missing part": lambda o: (o / "fc_conv" / "part-000004.npy").unlink(),
      "missing metadata": lambda o: (o / "metadata.parquet").unlink(),
      "metadata row count": lambda o: _edit_manifest(o, lambda m: m.update(rows=99)),
      "metadata digest": lambda o: _flip_byte(o / "metadata.parquet"),
      "NaN": lambda o: _nan(o),
  }
  for name, damage in cases.items():
    o = tmp_path / name.replace(" ", "_")
    shutil.copytree(src, o)
    damage(o)
    with pytest.raises(store.StoreError) as e:
      store.load_descriptors(o, "fc_conv", verify=True)
    assert str(e.value), name
  with pytest.raises(store.StoreError, match="not extracted"):
    store.load_descriptors(src, "nope")


def _flip_byte(p):
  b = bytearray(p.read_bytes())
  b[-1] ^= 0xFF
  p.write_bytes(bytes(b))


def _edit_manifest(o, fn):
  m = json.loads((o / "manifest.json").read_text())
  fn(m)
  (o / "manifest.json").write_text(json.dumps(m))


def _nan(o):
  p = o / "fc_conv" / "part-000001.npy"
  a = np.load(p)
  a[3, 5] = np.nan
  np.save(p, a)
  _edit_manifest(o, lambda m: m["parts"]["fc_conv"][1].update(sha256=store.sha256_file(p)))


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _cmd(root, out, *more):
  return [sys.executable, str(REPO / "launch" / "extract.py"), f"--images={root}",
          f"--output={out}", "--model=vgg_tiny", "--weights=random", f"--image_size={SIZE}",
          "--batch_size=1", "--progress=log", *more]


def _check_two_workers(out, root, paths, bad, reference_run):
  m = json.loads((out / "manifest.json").read_text())
  assert m["run"]["workers"] == 2
  assert {s["process"] for s in m["shards"]} == {0, 1}  # both workers wrote shards
  got, meta = store.load_descriptors(out, "fc_conv")
  np.testing.assert_array_equal(meta["path"], paths)  # every image exactly once, in order
  assert len(set(meta["row"].tolist())) == len(paths)
  ref, _ = store.load_descriptors(reference_run[0], "fc_conv")
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  failures = sorted(os.path.basename(p) for p, _ in store.read_failures(out))
  assert failures == sorted(bad)


def test_two_workers_write_every_image_once(folder, reference_run, tmp_path):
  root, paths, bad = folder
  out = tmp_path / "two"
  procs = [subprocess.Popen(_cmd(root, out, "--shard_size=6", f"--worker={i}", "--workers=2"),
                            env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  logs = [p.communicate(timeout=240)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)[-4000:]
  _check_two_workers(out, root, paths, bad, reference_run)


def test_slurm_array_environment_names_the_worker(folder, reference_run, tmp_path):
  """Two workers started one after the other (as a busy scheduler may): the first writes
  its shards and exits 0 without finishing; the second, writing the last shard, finishes."""
  root, paths, bad = folder
  out = tmp_path / "slurm"
  logs = []
  for i in (1, 0):
    env = _env(2, SLURM_ARRAY_TASK_ID=i + 1, SLURM_ARRAY_TASK_MIN=1, SLURM_ARRAY_TASK_COUNT=2)
    p = subprocess.run(_cmd(root, out, "--shard_size=6"), env=env, capture_output=True,
                       text=True, timeout=240)
    logs.append(p.stderr)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"worker {i} of 2 (SLURM array job)" in p.stderr
    if i == 1:
      assert "not finished yet" in p.stdout and "status" in (out / "manifest.json").read_text()
      assert json.loads((out / "manifest.json").read_text())["status"] == "running"
  _check_two_workers(out, root, paths, bad, reference_run)


def _wait_for_shards(out, n, proc, timeout=120):
  t = time.time()
  while time.time() - t < timeout:
    if proc.poll() is not None:
      return False
    if len(store.complete_shards(out)) >= n:
      return True
    time.sleep(0.02)
  return False


def test_interrupt_and_kill_then_resume_equals_uninterrupted(tmp_path, reference_run):
  root = tmp_path / "many"
  paths = _photos(root, 40, seed=3)
  bad = _bad_files(root)
  out = tmp_path / "out"
  cmd = _cmd(root, out, "--shard_size=4")
  env = step_delay.env(0.15, _env(1))
  # SIGINT: stops after the shard in flight, exit status 130, complete shards kept.
  p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
  assert _wait_for_shards(out, 1, p), p.communicate()[0][-3000:]
  p.send_signal(signal.SIGINT)
  log = p.communicate(timeout=120)[0]
  assert p.returncode == 130, log[-3000:]
  assert "interrupted" in log and "Rerun the same command" in log
  after_int = len(store.complete_shards(out))
  assert 1 <= after_int < 11
  # SIGKILL with more shards written and one in flight.
  p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
  assert _wait_for_shards(out, after_int + 2, p), p.communicate()[0][-3000:]
  p.kill()
  p.wait(timeout=60)
  killed_at = len(store.complete_shards(out))
  assert p.returncode == -signal.SIGKILL and after_int + 2 <= killed_at < 11
  assert json.loads((out / "manifest.json").read_text())["status"] == "running"
  with pytest.raises(store.StoreError, match="not finished"):
    store.load_descriptors(out, "fc")
  # Rerun to the end (the dead job's lock went with it).
  done = subprocess.run(cmd, env=_env(1), capture_output=True, text=True, timeout=240)
  assert done.returncode == 0, done.stderr[-3000:]
  summary = done.stdout.strip().splitlines()[-1]
  good, failed = map(int, re.match(r"extracted (\d+) images, (\d+) failed", summary).groups())
  n_records = len(paths) + len(bad)
  assert good + failed == n_records - 4 * killed_at  # exactly the records of pending shards
  assert f"skipped (already complete) {killed_at}" in summary
  got, meta = store.load_descriptors(out, "fc_conv")
  np.testing.assert_array_equal(meta["path"], paths)  # row for row: no duplicates, no gaps
  assert sorted(os.path.basename(f) for f, _ in store.read_failures(out)) == sorted(bad)
  # Same as an uninterrupted run (in-process, 8 devices, other batch layout).
  ref_out = tmp_path / "uninterrupted"
  extract.run(extract.ExtractConfig(output=str(ref_out), images=str(root), batch_size=1,
                                    shard_size=4, kinds=("fc_conv",), **COMMON))
  ref, ref_meta = store.load_descriptors(ref_out, "fc_conv")
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  for c in ("row", "path", "label", "width", "height"):
    np.testing.assert_array_equal(meta[c], ref_meta[c])


def test_labels_csv(folder, tmp_path):
  root, paths, _ = folder
  rows = ["file,class_index,class_name,group"]
  for i, p in enumerate(paths[:5]):
    rows.append(f"{os.path.basename(p)},{100 + i},name{i},g{i % 2}")
  csv = tmp_path / "labels.csv"
  csv.write_text("\n".join(rows) + "\n")
  out = tmp_path / "out"
  extract.run(extract.ExtractConfig(output=str(out), images=str(root), labels_csv=str(csv),
                                    kinds=("mac",), **COMMON))
  _, meta = store.load_descriptors(out, "mac")
  np.testing.assert_array_equal(meta["label"][:5], np.arange(100, 105))
  np.testing.assert_array_equal(meta["label"][5:], -1)
  assert list(meta["group"][:5]) == ["g0", "g1", "g0", "g1", "g0"]
  assert meta["label_name"][2] == "name2"


def test_config_errors(tmp_path):
  for bad, msg in ((dict(), "exactly one input"),
                   (dict(images="x", tfds="a:b"), "exactly one input"),
                   (dict(images="x", kinds=("fc", "bogus")), "unknown descriptor kinds"),
                   (dict(images="x", output_dtype="int8"), "output dtype"),
                   (dict(images=str(tmp_path / "none")), "does not exist")):
    with pytest.raises(extract.ExtractError, match=msg):
      extract.run(extract.ExtractConfig(output=str(tmp_path / "o"), **{**COMMON, **bad}))


def test_non_finite_descriptors_become_failures(tmp_path, monkeypatch):
  """float16 output of activations beyond 65504: reported as failures, never stored as inf."""
  root = tmp_path / "imgs"
  paths = _photos(root, 3)
  from cbir_jax import weights
  real = weights.random_params

  def huge(backbone, size, seed=0):  # a ReLU net without biases scales with its first kernel
    p = real(backbone, size, seed)
    p["conv1_1"]["kernel"] = p["conv1_1"]["kernel"] * 1e7
    return p

  monkeypatch.setattr(weights, "random_params", huge)
  out = tmp_path / "out"
  summary = extract.run(extract.ExtractConfig(output=str(out), images=str(root),
                                              output_dtype="float16", kinds=("fc", "mac"),
                                              **COMMON))
  assert summary.images == 0 and summary.failed == len(paths)
  reasons = [r for _, r in store.read_failures(out)]
  assert len(reasons) == 3 and all("not finite" in r for r in reasons)
  x, meta = store.load_descriptors(out, "fc")
  assert x.shape == (0, 64) and len(meta["path"]) == 0


def test_checksums_verified_once_when_the_job_finishes(reference_run, tmp_path, monkeypatch):
  """The job verifies and records; loading checks sizes and shapes, and hashes only when asked."""
  import shutil
  out, _, _ = reference_run
  m = store.read_manifest(out)
  assert m["verified"]["shards"] == len(m["shards"])
  for kind, parts in m["parts"].items():  # recorded digests are the files' own
    for c in parts:
      assert c["sha256"] == store.sha256_file(out / c["file"]), kind
      assert c["bytes"] == (out / c["file"]).stat().st_size
  hashed = []
  real = store.sha256_file
  monkeypatch.setattr(store, "sha256_file", lambda p, *a: hashed.append(p) or real(p, *a))
  store.load_descriptors(out, "fc_conv")
  assert hashed == []
  store.load_descriptors(out, "fc_conv", verify=True)
  assert sorted(pathlib.Path(p).name for p in hashed) == sorted(
      [f"part-{k:06d}.npy" for k in range(len(m["shards"]))] + ["metadata.parquet"])
  # A file cut short is caught without hashing (its size), named with its row count.
  cut = tmp_path / "cut"
  shutil.copytree(out, cut)
  p = cut / "fc_conv" / "part-000003.npy"
  p.write_bytes(p.read_bytes()[:-4])
  with pytest.raises(store.StoreError, match=r"part-000003\.npy has \d+ bytes, the manifest says"):
    store.load_descriptors(cut, "fc_conv")


def test_fc_kinds_refused_on_weights_without_fc_layers():
  """The planner's one kinds-vs-weights check: a no-top port cannot give fc / fc_conv."""
  from cbir_jax.job import plan
  from cbir_jax.manifest import WeightsRecord

  bb = backbones.get("vgg_tiny")
  notop = WeightsRecord(kind="directory", name="vgg16-notop", has_fc_head=False)
  with pytest.raises(extract.ExtractError, match=r"fc, fc_conv need the network's FC layers.*no FC layers"):
    plan.resolve_kinds(("fc", "conv", "fc_conv"), bb, notop)
  assert plan.resolve_kinds(("conv", "mac", "spoc"), bb, notop) == ("conv", "mac", "spoc")
  assert plan.resolve_kinds((), bb, notop) == ("conv", "mac", "spoc", "gem")
  assert plan.resolve_kinds((), bb, WeightsRecord(kind="random", name="random")) == desc.KINDS


def test_default_kinds_follow_the_weights(folder, tmp_path):
  """Without --kinds, weights lacking the FC layers give every other kind; asking for an FC
  kind from them is refused before the output directory is touched."""
  from cbir_jax import checkpoint
  from cbir_jax import preprocessing as pp

  root, paths, _ = folder
  bb = backbones.get("vgg_tiny")
  conv_only = {k: v for k, v in extract.random_params(bb, SIZE, 0).items()
               if not k.startswith("fc")}
  wdir = tmp_path / "notop"
  checkpoint.save(wdir, conv_only, checkpoint.WeightsInfo("vgg_tiny", pp.TORCHVISION,
                                                          has_fc=False))
  cfg = extract.ExtractConfig(output=str(tmp_path / "out"), images=str(root), model="vgg_tiny",
                              weights=str(wdir), image_size=SIZE, progress="none")
  assert cfg.kinds == ()
  lines = []
  extract.run(cfg, log=lines.append)
  kinds = store.load_manifest(cfg.output).settings.kinds
  assert kinds == tuple(k for k in desc.KINDS if k not in ("fc", "fc_conv"))
  # Said at the start, naming what is extracted and what is not.
  said = [ln for ln in lines if "no FC layers" in ln]
  assert said == [f"the weights have no FC layers: extracting {', '.join(kinds)} (not fc, "
                  "fc_conv)"]
  assert store.load_descriptors(cfg.output, "conv")[0].shape[0] == len(paths)
  asked = dataclasses.replace(cfg, output=str(tmp_path / "asked"), kinds=("conv", "fc"))
  with pytest.raises(extract.ExtractError, match="no FC layers"):
    extract.run(asked, log=lambda m: None)
  assert not pathlib.Path(asked.output).exists()


def test_files_that_are_not_images_are_counted(tmp_path):
  """Other files are not read: counted by extension in the summary and the manifest, and
  outside the input's identity (another one coming changes no row)."""
  root = tmp_path / "imgs"
  paths = _photos(root, 4)
  for name in ("notes.txt", "cats/captions.TXT", "dogs/IMG_1.heic"):
    (root / name).write_text("not read")
  cfg = extract.ExtractConfig(output=str(tmp_path / "out"), images=str(root), **COMMON)
  s = extract.run(cfg, log=lambda m: None)
  assert s.images == len(paths) and s.failed == 0
  assert "4 images, 0 failed, skipped 3 files: .txt 2, .heic 1, in " in s.line()
  assert store.load_manifest(cfg.output).input.skipped == {".heic": 1, ".txt": 2}
  (root / "more.pdf").write_text("not read")
  again = extract.run(cfg, log=lambda m: None)
  assert again.complete and again.images == 0 and "skipped 4 files" in again.line()


def test_decoding_options_settings_and_run_info(folder, tmp_path):
  """draft and max_pixels change rows (settings, compared); num_threads does not (run info)."""
  root, paths, bad = folder
  base = dict(output=str(tmp_path / "t1"), images=str(root), kinds=("mac",), **COMMON)
  one = extract.run(extract.ExtractConfig(num_threads=1, **base), log=lambda m: None)
  m = store.load_manifest(base["output"])
  assert m.settings.draft is True and m.settings.max_pixels == extract.decode.MAX_PIXELS
  assert m.run["decode"] == {"num_workers": 0, "num_threads": 1} and one.images == len(paths)
  again = extract.run(extract.ExtractConfig(num_threads=2, **base), log=lambda m: None)
  assert again.complete and again.images == 0  # another thread count: nothing to redo
  two = dict(base, output=str(tmp_path / "t2"))
  extract.run(extract.ExtractConfig(num_threads=2, **two), log=lambda m: None)
  np.testing.assert_array_equal(store.load_descriptors(base["output"], "mac")[0],
                                store.load_descriptors(two["output"], "mac")[0])
  # Decoding in 2 worker processes (1 thread each) instead of threads: the same rows.
  procs = dict(base, output=str(tmp_path / "t3"))
  extract.run(extract.ExtractConfig(num_workers=2, num_threads=1, **procs), log=lambda m: None)
  assert store.load_manifest(procs["output"]).run["decode"] == {"num_workers": 2,
                                                               "num_threads": 1}
  for k in ("mac",):
    a, meta_a = store.load_descriptors(base["output"], k)
    b, meta_b = store.load_descriptors(procs["output"], k)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(meta_a["path"], meta_b["path"])
  for change, what in ((dict(draft=False), "draft"), (dict(max_pixels=10_000), "max_pixels")):
    with pytest.raises(extract.ExtractError, match=f"other settings.*{what}"):
      extract.run(extract.ExtractConfig(**{**base, **change}), log=lambda m: None)
  # A pixel limit below the photos' sizes (24-48 px a side): those over it become failures.
  small = dict(base, output=str(tmp_path / "limit"), max_pixels=40 * 40)
  s = extract.run(extract.ExtractConfig(**small), log=lambda m: None)
  over = [p for p in paths if np.prod(Image.open(p).size) > 40 * 40]
  assert over and s.failed == len(bad) + len(over)
  reasons = dict(store.read_failures(small["output"]))
  assert all("pixels" in reasons[p] for p in over)


def test_shard_writer_writes_in_order_one_at_a_time_while_the_caller_goes_on():
  """Shards are written on one background thread: submit returns while its write runs,
  writes never overlap and keep their order, and drain returns once the last is done."""
  import threading

  from cbir_jax.job import feed

  events, release, started = [], threading.Event(), threading.Event()

  def write(name):
    events.append(("start", name))
    started.set()
    if name == "a":
      assert release.wait(10)  # held until the caller has gone on
    time.sleep(0.01)
    events.append(("end", name))

  w = feed.Rows(in_flight=1, name="shard-writer")  # as the step loop makes its writer
  w.submit(write, "a")
  assert started.wait(10)
  assert events == [("start", "a")]  # the caller got here while "a" was being written
  release.set()
  w.submit(write, "b")  # waits for "a" first
  w.submit(write, "c")
  w.drain()
  w.close()
  assert events == [(e, n) for n in "abc" for e in ("start", "end")]


def test_shard_writer_errors_reach_the_caller_at_its_next_submit_or_drain():
  from cbir_jax.job import feed

  written = []

  def write(name):
    if name == "bad":
      raise store.StoreError("cannot write shard 1: No space left on device")
    written.append(name)

  w = feed.Rows(in_flight=1, name="shard-writer")
  w.submit(write, "bad")
  with pytest.raises(store.StoreError, match="No space left"):
    w.submit(write, "next")  # the error of the write before; "next" is not started
  w.drain()
  w.close()
  assert written == []
  # close() waits for a write in progress without raising (another error is on its way up)
  w = feed.Rows(in_flight=1, name="shard-writer")
  w.submit(write, "bad")
  w.close()
  with pytest.raises(RuntimeError):  # the pool is shut down: nothing runs after close
    w.submit(write, "late")
