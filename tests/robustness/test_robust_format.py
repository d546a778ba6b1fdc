"""The output format and job defects of issue 18 (item 4), each a hostile case: rows reused
only after their checksum matched, only the tool's own names removed, a toggled setting named
as such, a full disk named, a finished output on a read-only disk answered without writing.

Jobs run in this process (tiny backbone, 60 small images, shards of 20); references are clean
runs of the same job.
"""
from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import pytest

from cbir_jax import extract, store
from cbir_jax.descriptors import KINDS

from robust_common import job_config, write_small_images

N = 60


def _run(images, out, weights, **kw) -> extract.Summary:
  return extract.run(job_config(images, out, weights, **kw), log=lambda m: None)


def _same(out, clean) -> list[str]:
  problems = []
  for k in KINDS:
    a, ma = store.load_descriptors(out, k, verify=True)
    b, mb = store.load_descriptors(clean, k)
    if not np.array_equal(np.asarray(a), np.asarray(b)):
      problems.append(f"{k} differs")
  for c in mb:
    if not np.array_equal(ma[c], mb[c]):
      problems.append(f"column {c} differs")
  return problems


@pytest.fixture
def images(tmp_path):
  folder = tmp_path / "imgs"
  write_small_images(folder, N, seed=5)
  return folder


def _flip(p):
  b = bytearray(p.read_bytes())
  b[-2] ^= 0x40
  p.write_bytes(bytes(b))


def _add(images, tmp_path, n, seed):
  write_small_images(tmp_path / f"more{seed}", n, seed=seed)
  for p in (tmp_path / f"more{seed}").rglob("*.png"):
    shutil.copy(p, images / p.parent.name / f"more{seed}_{p.name}")


def test_update_of_an_unfinished_job_checks_the_rows_it_reuses(images, tiny_weights, tmp_path,
                                                               hostile):
  """An unfinished first generation (worker 0 of 2 done) with a flipped byte in a complete
  shard, then --update: the damaged shard's rows are extracted again, never copied."""
  case = "--update reusing rows of an unfinished job: a flipped byte"
  hostile.declare(case)
  out = tmp_path / "out"
  _run(images, out, tiny_weights, worker=0, workers=2)
  assert not store.load_manifest(out).complete
  _flip(out / "shards" / "000000" / "gem.npy")
  _add(images, tmp_path, 3, 21)
  s = _run(images, out, tiny_weights, update=True)
  _run(images, tmp_path / "clean", tiny_weights)
  problems = _same(out, tmp_path / "clean")
  ok = not problems and s.images == N + 3 - s.reused and s.reused == 20
  hostile.check(case, ok, f"reused {s.reused} verified rows, extracted {s.images}; equal to "
                "a clean run" if ok else str(problems))
  assert ok, (problems, s)


def test_interrupted_update_with_a_damaged_delta_shard(images, tiny_weights, tmp_path, hostile):
  """An update stopped after extracting (its delta shard written), a byte of that delta
  shard flipped: the rerun finds it by its SHA-256 and extracts it again (never copies it)."""
  case = "--update continuing an interrupted update: a flipped byte in its delta"
  hostile.declare(case)
  out = tmp_path / "out"
  _run(images, out, tiny_weights)
  _add(images, tmp_path, 5, 22)
  _run(images, out, tiny_weights, update=True, worker=1, workers=2)  # writes no delta shard
  _run(images, out, tiny_weights, update=True, worker=0, workers=2)  # the delta, and finishes
  _add(images, tmp_path, 4, 23)
  from cbir_jax.job import update
  real = update.assemble

  def stop_before_assembling(*a, **kw):
    raise KeyboardInterrupt  # stands for a kill after the delta was written

  update.assemble = stop_before_assembling
  try:
    with pytest.raises(KeyboardInterrupt):
      _run(images, out, tiny_weights, update=True)
  finally:
    update.assemble = real
  delta = out / "gen-000002" / "delta" / "000000"
  before = delta.stat().st_mtime_ns
  _flip(delta / "fc.npy")
  s = _run(images, out, tiny_weights, update=True)
  _run(images, tmp_path / "clean", tiny_weights)
  problems = _same(out, tmp_path / "clean")
  ok = not problems and s.complete and s.images == 4  # the damaged delta shard, read again
  hostile.check(case, ok, "the damaged delta shard was found by its SHA-256 and extracted "
                "again; equal to a clean run" if ok else f"{s.line()} {problems}")
  assert ok, (problems, s.line(), before)


def test_reruns_and_updates_touch_only_what_the_tool_made(images, tiny_weights, tmp_path,
                                                         hostile):
  case = "rerun or update removing user gen-* folders or files it did not make"
  hostile.declare(case)
  out = tmp_path / "out"
  _run(images, out, tiny_weights, worker=0, workers=3)
  mine = {"gen-000001/notes.txt": "mine", "gen-x/a.txt": "a", "descriptors/keep.txt": "d",
          "README.txt": "r"}
  for rel, text in mine.items():
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    (out / rel).write_text(text)
  _run(images, out, tiny_weights)  # the rest of the job, and a rerun of the finished one
  _run(images, out, tiny_weights)
  _add(images, tmp_path, 2, 24)
  refused = ""
  try:
    _run(images, out, tiny_weights, update=True)  # gen-000001 is the user's: refused
  except extract.ExtractError as e:
    refused = str(e)
  shutil.move(out / "gen-000001", tmp_path / "moved")
  _run(images, out, tiny_weights, update=True)
  _add(images, tmp_path, 2, 25)
  _run(images, out, tiny_weights, update=True)  # gen 2 replaces gen 1: only ours removed
  kept = {rel: (out / rel).read_text() if (out / rel).exists() else None
          for rel in mine if not rel.startswith("gen-000001")}
  ok = ("was not made by cbir_jax" in refused and kept == {
      k: v for k, v in mine.items() if not k.startswith("gen-000001")}
        and not (out / "gen-000001").exists() and (out / "gen-000002").is_dir()
        and not (out / "shards").exists())
  hostile.check(case, ok, f"user files kept; update refused to build in the user's "
                f"gen-000001: {refused[:80]}" if ok else f"{kept} {refused}")
  assert ok, (kept, refused, sorted(p.name for p in out.iterdir()))


def test_content_digest_toggled_is_named_as_a_setting(images, tiny_weights, tmp_path, hostile):
  case = "--content_digest toggled on a rerun"
  hostile.declare(case)
  out = tmp_path / "out"
  _run(images, out, tiny_weights)
  with pytest.raises(extract.ExtractError) as e:
    _run(images, out, tiny_weights, content_digest=True)
  msg = str(e.value)
  ok = "--content_digest" in msg and "--nocontent_digest" in msg and "changed" not in msg
  hostile.check(case, ok, msg[:160])
  assert ok, msg


def test_full_disk_is_named(images, tiny_weights, tmp_path, hostile, monkeypatch):
  case = "disk full while writing a shard: named as such"
  hostile.declare(case)
  real = np.save

  def full(path, *a, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(np, "save", full)
  with pytest.raises(extract.ExtractError) as e:
    _run(images, tmp_path / "out", tiny_weights)
  monkeypatch.setattr(np, "save", real)
  msg = str(e.value)
  ok = "the disk is full" in msg and "rerun" in msg
  hostile.check(case, ok, msg[:160])
  assert ok, msg


def test_finished_output_on_a_read_only_disk_is_up_to_date(images, tiny_weights, tmp_path,
                                                            hostile, monkeypatch):
  """A finished output on a read-only file system (simulated: every lock and write fails
  with EROFS): the rerun says it is complete and up to date, writing nothing."""
  case = "finished output on a read-only disk rerun"
  hostile.declare(case)
  out = tmp_path / "out"
  _run(images, out, tiny_weights)
  before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

  def read_only(*a, **kw):
    raise OSError(errno.EROFS, "Read-only file system")

  monkeypatch.setattr(store, "lock", read_only)
  monkeypatch.setattr(store, "write_atomic", read_only)
  s = _run(images, out, tiny_weights)
  ok = s.complete and s.images == 0 and before == {p: p.stat().st_mtime_ns
                                                   for p in out.rglob("*")}
  hostile.check(case, ok, "complete and up to date; nothing written, no lock taken")
  assert ok, s
