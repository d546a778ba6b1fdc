"""Hostile images at the decoder: good files decode to their references, bad ones give reasons.

Layers checked here: `decode_image`/`load_images` (one file at a time) and
`image_batches` (the tf.data pipeline the job runs), without a network. The
job-level run over the same folder is in test_robust_jobs.py.
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

from cbir_jax import input_pipeline as ip

import robust_images as ri

CASES = ri.image_cases()
NOBODY = 65534
# Pillow warns about the corrupt-EXIF case; the warning is the expected reaction, not noise
# to report.
pytestmark = pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")


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
  """The real 144 Mpx bomb is refused before any pixel is decoded (peak RSS grows < 40 MB).

  Run in a fresh process so its peak resident size measures this decode alone;
  a full decode would need 144 MB (grey) + 432 MB (RGB).
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


def test_tf_pipeline_over_hostile_folder(tmp_path, hostile):
  """image_batches (the job's tf.data path) over every case at once, plus a file deleted
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
    hostile.check(case.name, not problem, problem or "tf.data pipeline: as decoded alone")
    if problem:
      problems.append((name, problem))
  assert not problems, problems


def test_tfds_style_stream_of_hostile_bytes(tmp_path, hostile):
  """The TFDS path (encoded bytes in a tf.data stream, `encoded_batches`) gets the same
  files' bytes: good rows match their references, bad rows carry reasons, order is kept."""
  import tensorflow as tf

  cases = [c for c in CASES if c.filename.isascii() and "\n" not in c.filename]
  data = []
  for c in cases:
    path = _write(tmp_path, c)
    data.append(path.read_bytes())
  n = len(cases)
  pad = -n % 8
  ds = tf.data.Dataset.from_tensor_slices({
      "index": np.r_[np.arange(n), -np.ones(pad, np.int64)].astype(np.int64),
      "data": data + [b""] * pad,
      "key": [f"tfds:{i}" for i in range(n)] + [""] * pad,
      "label": np.zeros(n + pad, np.int64)})
  rows = {}
  for batch in ip.encoded_batches(ds, image_size=ri.SIZE, batch_size=8, num_threads=2):
    for j in np.flatnonzero(batch.valid):
      rows[int(batch.index[j])] = (batch.images[j], batch.error[j], bool(batch.ok[j]),
                                   batch.key[j])
  assert sorted(rows) == list(range(n))
  problems = []
  for i, c in enumerate(cases):
    img, err, ok, key = rows[i]
    problem = _check_decoded(c, img, err)
    if not problem and (ok != c.good or key != f"tfds:{i}"):
      problem = f"ok flag {ok} / key {key!r}"
    hostile.check(c.name, not problem, problem or "TFDS-style stream: as decoded alone")
    if problem:
      problems.append((c.name, problem))
  assert not problems, problems
