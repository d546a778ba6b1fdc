"""Hostile images at the decoder: good files decode to their references, bad ones give reasons.

Layers checked here: `decode_image`/`load_images` (one file at a time),
`image_batches` (the threaded pipeline the job runs) and `position_batches` (a real
ArrayRecord TFDS dataset of the same bytes), without a network or TensorFlow.
The job-level run over the same folder is in test_robust_jobs.py.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cbir_jax import input_pipeline as ip

import robust_images as ri

CASES = ri.image_cases()
NOBODY = 65534
# Pillow warns about the corrupt-EXIF case and the bomb; the warnings are the expected
# reaction, not noise to report.
pytestmark = [pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning"),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]


def _write(folder: pathlib.Path, case: ri.ImageCase) -> pathlib.Path:
  path = folder / case.filename
  case.make(path)
  return path


def _check_decoded(case: ri.ImageCase, img: np.ndarray, err: str) -> str:
  """'' when `img`/`err` is what `case` requires, else what is wrong."""
  if case.good:
    if err:
      return f"good file refused: {err}"
    if img.shape != (ri.SIZE, ri.SIZE, 3) or img.dtype != np.uint8:
      return f"shape/dtype {img.shape} {img.dtype}"
    diff = int(np.abs(img.astype(int) - case.expect.astype(int)).max())
    if diff > case.atol:
      return f"pixels differ from the reference by up to {diff} (> {case.atol})"
    return ""
  if not err:
    return "bad file accepted as an image"
  if not re.search(case.reason, err, re.I):
    return f"reason {err!r} does not match {case.reason!r}"
  return ""


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decode_each_file(tmp_path, hostile, case):
  """One file through load_images (the per-file path) and decode_image (for the size)."""
  path = _write(tmp_path, case)
  imgs, errors = ip.load_images([str(path)], ri.SIZE)
  problem = _check_decoded(case, imgs[0], errors[0])
  if case.good and not problem and case.size is not None:
    _, size = ip.decode_image(path.read_bytes(), ri.SIZE)
    if tuple(size) != case.size:
      problem = f"reported size {size}, expected {case.size}"
  how = ("decoded to the reference" if case.good else f"refused: {errors[0]}") if not problem \
      else problem
  hostile.check(case.name, not problem, how)
  assert not problem, problem


def test_exif_rotation_is_applied_not_ignored(tmp_path):
  """The reference for the EXIF case must not also match the unrotated image (test has teeth)."""
  case = next(c for c in CASES if c.name.startswith("EXIF"))
  path = _write(tmp_path, case)
  img, _ = ip.decode_image(path.read_bytes(), ri.SIZE)
  unrotated = ri.resize_ref(ri.rgb_pattern(24, 40, 3))
  counter_clockwise = ri.resize_ref(np.ascontiguousarray(np.rot90(ri.rgb_pattern(24, 40, 3), 1)))
  assert np.abs(img.astype(int) - case.expect.astype(int)).max() <= case.atol
  for wrong in (unrotated, counter_clockwise):
    assert np.abs(img.astype(int) - wrong.astype(int)).max() > 5 * case.atol


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
  """A naive 16-bit -> 8-bit conversion clips everything above 255: check the spread survives."""
  case = next(c for c in CASES if c.name.startswith("16-bit greyscale"))
  img, _ = ip.decode_image(_write(tmp_path, case).read_bytes(), ri.SIZE)
  assert img.min() < 10 and 200 < img.max() < 255
  assert len(np.unique(img)) > 100


def test_bomb_costs_no_memory(tmp_path, hostile):
  """The real 268 Mpx bomb is refused before any pixel is decoded (peak RSS grows < 40 MB).

  Run in a fresh process so its peak resident size measures this decode alone;
  a full decode would need 268 MB (grey) + 805 MB (RGB).
  """
  case = next(c for c in CASES if c.filename == "bomb_real.png")
  path = _write(tmp_path, case)
  assert path.stat().st_size < 1_000_000  # small on disk: that is what makes it a bomb
  code = textwrap.dedent(f"""
      import resource, sys
      from cbir_jax import input_pipeline as ip
      data = open({str(path)!r}, "rb").read()
      before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
      try:
        ip.decode_image(data, 32)
        print("DECODED")
      except ValueError as e:
        print("REFUSED", e)
      after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
      print("GREW_KB", after - before)
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  grew_kb = int(re.search(r"GREW_KB (\d+)", out.stdout).group(1))
  ok = "REFUSED" in out.stdout and grew_kb < 40_000
  hostile.check("decompression bomb: peak memory while refusing it", ok,
                f"refused, peak RSS grew {grew_kb // 1024} MB")
  assert ok, out.stdout


def _call_with_fifo_watchdog(fn, fifo_paths, timeout=20.0):
  """Runs fn(); if it is still blocked on a FIFO after `timeout` s, unblocks it and says so."""
  result, error = [], []
  t = threading.Thread(target=lambda: _capture(fn, result, error), daemon=True)
  t.start()
  t.join(timeout)
  blocked = t.is_alive()
  if blocked:  # a reader stuck in open(): give it a writer that closes at once (EOF)
    for p in fifo_paths:
      with contextlib.suppress(OSError):
        os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
    t.join(30)
  if error:
    raise error[0]
  return (result[0] if result else None), blocked


def _capture(fn, result, error):
  try:
    result.append(fn())
  except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
    error.append(e)


GOOD_PNG = ri.encode(ri.Image.fromarray(ri.rgb_pattern(20, 20)), "PNG")
SPECIALS = ri.special_cases(GOOD_PNG)


def test_directory_symlink_loop(tmp_path, hostile):
  """A subfolder linking to its parent: the listing ends and holds every file once."""
  folder = tmp_path / "imgs"
  folder.mkdir()
  (folder / "good.png").write_bytes(GOOD_PNG)
  (folder / "sub" / "deeper").mkdir(parents=True)
  (folder / "sub" / "deeper" / "inner.png").write_bytes(GOOD_PNG)
  ri.dir_loop(folder)
  records, blocked = _call_with_fifo_watchdog(lambda: ip.folder_records(folder), [])
  names = sorted(os.path.relpath(r.key, folder) for r in records)
  ok = not blocked and names == ["good.png", "sub/deeper/inner.png"]
  hostile.check("directory symlink loop in the input tree", ok,
                "listing ends; directory links are not followed, each file listed once"
                if ok else f"listed {names}")
  assert ok, names


@pytest.mark.parametrize("special", SPECIALS, ids=[s.name for s in SPECIALS])
def test_special_entries(tmp_path, hostile, special):
  """File symlink loops, dangling links, a FIFO: listed, then each fails with a reason."""
  folder = tmp_path / "imgs"
  folder.mkdir()
  (folder / "good.png").write_bytes(GOOD_PNG)
  special.make(folder)
  keys = [r.key for r in ip.folder_records(folder)]
  names = [os.path.relpath(k, folder) for k in keys]
  assert sorted(names) == sorted(("good.png",) + special.filenames)
  fifos = [k for k in keys if k.endswith("pipe.jpg")]
  result, blocked = _call_with_fifo_watchdog(lambda: ip.load_images(keys, ri.SIZE), fifos)
  errors = dict(zip(names, result[1])) if result else {}
  errs = [errors.get(f, "") for f in special.filenames]
  ok = (not blocked and errors.get("good.png") == ""
        and all(e and re.search(special.reason, e, re.I) for e in errs))
  hostile.check(special.name, ok, f"refused: {errs[0]}" if ok else
                ("reader blocked until the test unblocked it" if blocked else f"errors {errs}"))
  assert ok, (errs, "blocked" if blocked else "")


@contextlib.contextmanager
def _as_user(uid: int):
  """Temporarily drops the effective uid (root only), so file permissions apply again."""
  os.seteuid(uid)
  try:
    yield
  finally:
    os.seteuid(0)


def _world_readable_dir() -> pathlib.Path:
  d = pathlib.Path(tempfile.mkdtemp(prefix="cbir_perm_"))
  d.chmod(0o755)
  return d


def test_unreadable_file(hostile, monkeypatch):
  """chmod 000: reported as a permission error. As root, reads ignore permissions, so the
  read runs with the effective uid dropped to `nobody` (a real EACCES). Where even that
  is not permitted, the read is made to raise EACCES (a simulation, and it says so)."""
  folder = _world_readable_dir()
  try:
    png = ri.encode(ri.Image.fromarray(ri.rgb_pattern(20, 20)), "PNG")
    (folder / "readable.png").write_bytes(png)
    (folder / "readable.png").chmod(0o644)
    locked = folder / "locked.png"
    locked.write_bytes(png)
    locked.chmod(0o000)
    paths = [str(folder / "readable.png"), str(locked)]
    how = "as a normal user"
    if os.geteuid() == 0:
      try:
        with _as_user(NOBODY):
          _, errors = ip.load_images(paths, ri.SIZE)
        how = "as root with euid dropped to nobody"
      except PermissionError:  # seteuid itself refused: simulate the denied read
        real = ip.read_file

        def denied(path):
          if path == str(locked):
            raise PermissionError(13, "Permission denied", path)
          return real(path)
        monkeypatch.setattr(ip, "read_file", denied)
        _, errors = ip.load_images(paths, ri.SIZE)
        how = "SIMULATED: read made to raise EACCES (seteuid not permitted)"
    else:
      _, errors = ip.load_images(paths, ri.SIZE)
    ok = errors[0] == "" and bool(re.search(r"permission", errors[1], re.I))
    hostile.check("unreadable file (chmod 000)", ok, f"refused ({how}): {errors[1]}")
    assert ok, errors
  finally:
    shutil.rmtree(folder, ignore_errors=True)


def test_pipeline_over_hostile_folder(tmp_path, hostile):
  """image_batches (the job's threaded path) over every case at once, plus a file deleted
  between listing and reading: rows stay in order, good rows match, bad rows carry reasons."""
  folder = tmp_path / "imgs"
  folder.mkdir()
  for c in CASES:
    _write(folder, c)
  (folder / "deleted_later.png").write_bytes((folder / "control.jpg").read_bytes())
  keys = [r.key for r in ip.folder_records(folder)]
  by_file = {c.filename: c for c in CASES}
  assert sorted(os.path.basename(k) for k in keys) == sorted(list(by_file) + ["deleted_later.png"])

  def read(key: str) -> bytes:
    if key.endswith("deleted_later.png"):
      os.remove(key)  # deleted after listing, just before reading
    return ip.read_file(key)

  rows = {}
  for batch in ip.image_batches(keys, image_size=ri.SIZE, batch_size=8, read=read,
                                num_threads=2):
    for j in range(len(batch.index)):
      if batch.valid[j]:
        assert batch.index[j] not in rows
        rows[int(batch.index[j])] = (batch.images[j], batch.error[j], bool(batch.ok[j]),
                                     (int(batch.width[j]), int(batch.height[j])))
  assert sorted(rows) == list(range(len(keys)))
  problems = []
  for i, key in enumerate(keys):
    img, err, ok, size = rows[i]
    name = os.path.basename(key)
    if name == "deleted_later.png":
      good = (not ok) and re.search(r"No such file", err)
      hostile.check("file deleted between listing and reading", bool(good), f"refused: {err}")
      if not good:
        problems.append((name, err))
      continue
    case = by_file[name]
    problem = _check_decoded(case, img, err)
    if not problem and ok != case.good:
      problem = f"ok flag {ok}"
    if not problem and case.good and case.size and size != case.size:
      problem = f"size {size} != {case.size}"
    hostile.check(case.name, not problem, problem or "threaded pipeline: as decoded alone")
    if problem:
      problems.append((name, problem))
  assert not problems, problems


class CbirHostileBytes(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset whose images are the hostile files' bytes (TFDS stores bytes as given);
  the label is the case's number, so each record can be matched to its case."""
  VERSION = tfds.core.Version("1.0.0")
  CASES: list[ri.ImageCase] = []
  FOLDER = pathlib.Path()

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=len(self.CASES))}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, c in enumerate(self.CASES):
      yield i, {"image": (self.FOLDER / c.filename).read_bytes(), "label": i}


def test_tfds_style_stream_of_hostile_bytes(tmp_path, hostile):
  """The TFDS path (`position_batches` over an ArrayRecord dataset, read without TensorFlow)
  gets the same files' bytes: good rows match their references, bad rows carry reasons,
  every record comes once with its TFDS id and label."""
  from cbir_jax import tfds_input

  folder = tmp_path / "files"
  folder.mkdir()
  for c in CASES:
    _write(folder, c)
  CbirHostileBytes.CASES, CbirHostileBytes.FOLDER = CASES, folder
  data_dir = str(tmp_path / "tfds")
  CbirHostileBytes(data_dir=data_dir, file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=2))
  src = tfds_input.open_tfds("cbir_hostile_bytes:train", data_dir)
  n = len(CASES)
  assert src.num_records == n
  rows = {}
  for batch in tfds_input.position_batches(src, np.arange(n), image_size=ri.SIZE, batch_size=8,
                                          num_threads=2):
    for j in np.flatnonzero(batch.valid):
      assert int(batch.index[j]) not in rows
      rows[int(batch.index[j])] = (batch.images[j], batch.error[j], bool(batch.ok[j]),
                                   batch.key[j], int(batch.label[j]))
  assert sorted(rows) == list(range(n))
  # Which case each record holds, read by TFDS itself (the split's order is TFDS's own).
  by_tfds = [int(ex["label"]) for ex in tfds.data_source(
      "cbir_hostile_bytes", split="train", data_dir=data_dir, download=False,
      decoders={"image": tfds.decode.SkipDecoding()})]
  assert sorted(by_tfds) == list(range(n))
  problems = []
  for i in range(n):
    img, err, ok, key, label = rows[i]
    c = CASES[by_tfds[i]]
    problem = _check_decoded(c, img, err)
    if not problem and (ok != c.good or key != src.keys[i] or label != by_tfds[i]):
      problem = f"ok flag {ok} / key {key!r} / label {label}"
    hostile.check(c.name, not problem, problem or "TFDS ArrayRecord path: as decoded alone")
    if problem:
      problems.append((c.name, problem))
  assert not problems, problems


def test_96_megapixel_camera_jpeg_is_not_a_bomb(tmp_path, hostile):
  """A legitimate 12000x8000 camera JPEG is decoded with the defaults, not refused."""
  a = np.full((8000, 12000, 3), 70, np.uint8)
  a[:4000, 6000:] = (30, 200, 60)  # top-right quadrant green
  path = tmp_path / "camera_96mpx.jpg"
  path.write_bytes(ri.encode(ri.Image.fromarray(a), "JPEG", quality=30))
  imgs, errors = ip.load_images([str(path)], ri.SIZE)
  _, size = ip.decode_image(path.read_bytes(), ri.SIZE)
  q = ri.SIZE // 4
  ok = (errors == [""] and size == (12000, 8000)
        and np.abs(imgs[0, q, 3 * q].astype(int) - (30, 200, 60)).max() < 12
        and np.abs(imgs[0, 3 * q, q].astype(int) - 70).max() < 12)
  hostile.check("legitimate 96-megapixel camera JPEG (12000x8000)", ok,
                "decoded with the default limit" if ok else f"errors {errors}, size {size}")
  assert ok, (errors, size)
