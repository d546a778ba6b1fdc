"""The job when its input changes between runs, and --update (single process).

Every case ends with a clear refusal or an output equal to a clean run over the input as it
is now, row for row (descriptors, paths, labels, sizes); the rows lost and duplicated
against that clean run go to the ledger. Runs use the tiny backbone on 32x32 inputs in this
process (subprocesses only where a signal or a kill is the case).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from cbir_jax import extract, store
from cbir_jax import query as query_lib
from cbir_jax.descriptors import KINDS

import step_delay
from robust_common import job_command, job_config, write_small_images

N = 60  # images of the small collections here: 3 shards of 20


def _quiet(msg: str) -> None:
  pass


def _run(images, out, weights, **kw) -> extract.Summary:
  """The job in this process; weights None means the shipped weights."""
  log = kw.pop("log", _quiet)
  config = dataclasses.replace(job_config(images, out, weights, **kw), weights=weights and
                               str(weights))
  return extract.run(config, log=log)


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
  """Largest difference relative to the largest value (descriptors are not normalised)."""
  b = np.asarray(b, np.float64)
  return float(np.abs(np.asarray(a, np.float64) - b).max(initial=0.0) /
               max(np.abs(b).max(initial=0.0), 1e-30))


def compare(out: pathlib.Path, clean: pathlib.Path) -> tuple[int, int, list[str], float]:
  """(rows lost, duplicated, differences, largest descriptor difference) of out vs clean."""
  problems, worst = [], 0.0
  for k in KINDS:
    a, ma = store.load_descriptors(out, k, verify=True)
    b, mb = store.load_descriptors(clean, k)
    if a.shape != b.shape:
      problems.append(f"{k}: shape {a.shape} vs {b.shape}")
      continue
    worst = max(worst, _rel_diff(a, b))
  rows, want = ma["row"].tolist(), mb["row"].tolist()
  lost, dup = len(set(want) - set(rows)), len(rows) - len(set(rows))
  for c in mb:
    if c not in ma or not np.array_equal(ma[c], mb[c]):
      problems.append(f"metadata column {c} differs")
  if worst > 1e-6:
    problems.append(f"descriptors differ by up to {worst:.3g}")
  return lost, dup, problems, worst


def _equal_to_clean(out, clean, hostile, name, how) -> bool:
  lost, dup, problems, worst = compare(out, clean)
  hostile.rows(lost=lost, duplicated=dup)
  exact = "bitwise equal" if worst == 0 else f"within {worst:.1g} (relative)"
  ok = (lost, dup, problems) == (0, 0, [])
  hostile.check(name, ok, f"{how}; {exact} to a clean run" if ok else str(problems))
  return ok


def _unfinished(out: pathlib.Path, keep: int) -> None:
  """Makes a finished output look like a job killed after `keep` shards."""
  m = json.loads((out / store.MANIFEST).read_text())
  for d in (out / store.SHARDS).iterdir():
    if int(d.name) >= keep:
      shutil.rmtree(d)
  for kind in m["parts"]:
    shutil.rmtree(out / kind)
  for name in ("metadata.parquet", "failures.json"):
    (out / name).unlink(missing_ok=True)  # failures.json: absent when none failed
  m.update(status="running", shards=[], parts={}, metadata=None, failures_file=None, made=[])
  (out / store.MANIFEST).write_text(json.dumps(m))


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_weights):
  """A 60-image folder and its finished extraction (read-only: copy before use)."""
  root = tmp_path_factory.mktemp("small")
  images = root / "imgs"
  write_small_images(images, N, seed=7)
  out = root / "out"
  _run(images, out, tiny_weights)  # tests stage unfinished jobs from it
  return images, out


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  shutil.copytree(src, dst)  # copy2: sizes and modification times kept
  return dst


def test_resumed_on_another_folder_with_the_same_names(small, tiny_weights, tmp_path, hostile):
  """Issue 10, row 1: a killed run resumed with --images at another folder of equal names."""
  name = "killed run resumed on another folder holding the same file names"
  hostile.declare(name)
  images, done = small
  out = _copy(done, tmp_path / "out")
  _unfinished(out, keep=1)
  other = tmp_path / "other"
  write_small_images(other, N, seed=8)  # same names, other pixels
  before = sorted(p.name for p in (out / store.SHARDS).iterdir())
  with pytest.raises(extract.ExtractError) as e:
    _run(other, out, tiny_weights)
  msg = str(e.value)
  refused = (str(other) in msg and str(images) in msg and "--update" in msg
             and sorted(p.name for p in (out / store.SHARDS).iterdir()) == before)
  s = _run(other, out, tiny_weights, update=True)
  clean = tmp_path / "clean"
  _run(other, clean, tiny_weights)
  ok = refused and s.images == N and _equal_to_clean(out, clean, hostile, name,
                                                     f"refused ({msg[:120]}...); --update")
  assert ok, msg


def test_files_overwritten_with_other_photos(small, tiny_weights, tmp_path, hostile):
  """Issue 10, row 2: 3 files overwritten (same names) after a kill; the rerun must not keep
  their old rows."""
  name = "killed run; 3 files overwritten with other photos (same names); rerun"
  hostile.declare(name)
  images = _copy(small[0], tmp_path / "imgs")
  out = _copy(small[1], tmp_path / "out")
  _unfinished(out, keep=2)
  paths = sorted(str(p) for p in images.rglob("*.png"))
  donors = write_small_images(tmp_path / "donors", 3, seed=9)
  victims = [paths[3], paths[30], paths[55]]
  for v, d in zip(victims, donors):
    shutil.copy(d, v)
  with pytest.raises(extract.ExtractError) as e:
    _run(images, out, tiny_weights)
  msg = str(e.value)
  named = all(os.path.relpath(v, images) in msg for v in victims)
  refused = bool(re.search(r"3 changed", msg)) and named
  s = _run(images, out, tiny_weights, update=True)
  clean = tmp_path / "clean"
  _run(images, clean, tiny_weights)
  m = store.read_manifest(out)
  counts = (m["update"]["changed"], m["update"]["added"], m["update"]["removed"]) == (3, 0, 0)
  ok = refused and counts and _equal_to_clean(
      out, clean, hostile, name, f"refused naming the 3 files; --update extracted "
      f"{s.images} (3 changed + the records of the killed run's missing shard)")
  assert ok, (msg, m["update"])


def test_folder_renamed(small, tiny_weights, tmp_path, hostile):
  """Issue 10, row 3: input folder renamed after a kill; rows must not keep the old paths."""
  name = "killed run; input folder renamed; rerun with the new path"
  hostile.declare(name)
  images = _copy(small[0], tmp_path / "imgs")
  out = _copy(small[1], tmp_path / "out")
  _unfinished(out, keep=2)
  moved = tmp_path / "renamed"
  images.rename(moved)
  with pytest.raises(extract.ExtractError) as e:
    _run(moved, out, tiny_weights)
  msg = str(e.value)
  refused = "moved or renamed" in msg and str(moved) in msg and "the same records" in msg
  s = _run(moved, out, tiny_weights, update=True)
  m = store.read_manifest(out)
  _, meta = store.load_descriptors(out, "fc")
  paths_ok = all(pathlib.Path(p).is_file() and str(p).startswith(str(moved))
                 for p in meta["path"])
  clean = tmp_path / "clean"
  _run(moved, clean, tiny_weights)
  # (the output was made from small[0]; imgs/ is its copy, times kept, then renamed)
  ok = (refused and paths_ok and m["update"]["root_moved_from"] == str(small[0])
        and s.images == N - 40 and _equal_to_clean(
            out, clean, hostile, name, "refused ('moved or renamed?'); --update kept the 40 "
            "rows, rewrote their paths, extracted only the 20 of the missing shard"))
  assert ok, (msg, s)
  # The report's image links point at files that exist (search --report read them).
  [r] = query_lib.search_index(str(out), query_ids=[0], k=2)
  assert all(pathlib.Path(h.path).is_file() for h in (r.query, *r.hits))


def test_update_after_adding_removing_and_replacing_photos(shared_data, tiny_weights, tmp_path,
                                                           hostile):
  """Issue 10, "done when": 120 photos, then 10 added, 5 removed, 3 replaced: --update equals
  a clean run over the final folder and reads only the 13 new and changed photos."""
  name = "--update after adding 10, removing 5 and replacing 3 of 120 photos"
  hostile.declare(name)
  photos = sorted((shared_data / "imagenet-sample" / "images").glob("*.JPEG"))[:133]
  images = tmp_path / "photos"
  images.mkdir()
  for p in photos[:120]:
    shutil.copy(p, images / p.name)
  out = tmp_path / "out"
  _run(images, out, tiny_weights)
  for p in photos[120:130]:
    shutil.copy(p, images / p.name)
  for p in photos[:5]:
    (images / p.name).unlink()
  for dst, src in zip(photos[50:53], photos[130:133]):
    shutil.copy(src, images / dst.name)  # same name, another photo
  s = _run(images, out, tiny_weights, update=True)
  clean = tmp_path / "clean"
  _run(images, clean, tiny_weights)
  u = store.read_manifest(out)["update"]
  read = s.images + s.failed
  counts = (read, u["extracted"], u["added"], u["removed"], u["changed"], u["reused"]) == \
      (13, 13, 10, 5, 3, 112)
  ok = counts and _equal_to_clean(out, clean, hostile, name,
                                  f"read {read} photos, reused {u['reused']} rows")
  assert ok, (s, u)


def test_sigterm_at_default_shard_size(many_images, tiny_weights, baseline, tmp_path, hostile):
  """Issue 10, row 10: SIGTERM with the default --shard_size=4096 (one shard here, ~8 s of
  steps): the job stops after the step in flight, keeps the finished part of the shard, and
  the rerun continues from it (not from the start) and equals an uninterrupted run."""
  name = "SIGTERM inside a large shard (default --shard_size)"
  hostile.declare(name)
  folder, _ = many_images
  out = tmp_path / "out"
  cmd = job_command(folder, out, tiny_weights, "--shard_size=4096", "--log_every_s=0")
  log = tmp_path / "job.log"
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                            env=step_delay.env(0.4))
  try:
    t0 = time.monotonic()
    while not re.search(r"\b(6[4-9]|[7-9]\d|1\d\d)/300 images", log.read_text()):
      assert proc.poll() is None and time.monotonic() - t0 < 240, log.read_text()[-2000:]
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    asked = time.monotonic()
    proc.wait(timeout=120)
    reaction = time.monotonic() - asked
  finally:
    proc.kill()
  text = log.read_text()
  parts = [d.name for d in (out / store.SHARDS).iterdir() if ".part-" in d.name]
  covered = int(parts[0].split("-")[-1]) if len(parts) == 1 else 0
  stopped = (proc.returncode == 130 and "Traceback" not in text and 64 <= covered < 300
             and not (out / store.SHARDS / "000000").exists())
  s = _run(folder, out, tiny_weights, shard_size=4096)
  ok = stopped and s.images + s.failed == 300 - covered
  how = (f"exit {proc.returncode} {reaction:.1f} s after the signal (one shard = ~8 s of "
         f"steps here); {covered} records kept as a part; rerun read the other {300 - covered}")
  lost, dup, problems = _compare_values(out, baseline)
  hostile.rows(lost=lost, duplicated=dup)
  ok = ok and (lost, dup, problems) == (0, 0, [])
  hostile.check(name, ok, how if ok else f"{how}; {problems}; {text[-500:]}")
  print(f"\n[figure] SIGTERM reaction at --shard_size=4096: {reaction:.2f} s")
  assert ok, (how, problems, text[-3000:])


def _compare_values(out: pathlib.Path, baseline) -> tuple[int, int, list[str]]:
  """Against the suite's baseline (another shard size: values and metadata, not layout)."""
  _, arrays, meta = baseline
  problems = []
  for k in KINDS:
    a, m = store.load_descriptors(out, k, verify=True)
    if a.shape != arrays[k].shape or _rel_diff(a, arrays[k]) > 1e-6:
      problems.append(f"{k} differs")
  rows = m["row"].tolist()
  for c in ("row", "path", "label", "width", "height"):
    if not np.array_equal(m[c], meta[c]):
      problems.append(f"metadata column {c} differs")
  return len(set(meta["row"].tolist()) - set(rows)), len(rows) - len(set(rows)), problems


def test_stale_failure_files_of_another_process_count(small, tiny_weights, tmp_path, hostile):
  """Issue 10, row 11: a run of 2 workers killed, rerun as 1 worker: the one failure list
  holds each failure once (no per-process files of the earlier count remain to mislead)."""
  name = "failures files left by a run with more processes"
  hostile.declare(name)
  images = _copy(small[0], tmp_path / "imgs")
  (images / "a" / "broken.png").write_bytes(b"not a png")
  out = tmp_path / "out"
  _run(images, out, tiny_weights, worker=1, workers=2)
  _run(images, out, tiny_weights)
  listed = json.loads((out / "failures.json").read_text())
  files = sorted(f.name for f in out.glob("failures*"))
  ok = files == ["failures.json"] and [f[0] for f in listed] == [
      str(images / "a" / "broken.png")] and store.read_failures(out) == [
      (f[0], f[1]) for f in listed]
  hostile.check(name, ok, f"left {files}; failures.json holds {len(listed)} failure(s)")
  assert ok, (files, listed)


def test_labels_csv_case_and_class_folders(tmp_path, tiny_weights, hostile):
  """Issue 10, row 12: CSV keys that differ in case are reported; bare names in a class tree
  that name several files are refused; paths relative to the folder label the right files."""
  images = tmp_path / "imgs"
  for cls in ("a", "b", "c"):
    write_small_images(images / cls, 2, seed=ord(cls), classes=("x",))
  names = sorted(str(p.relative_to(images)) for p in images.rglob("*.png"))
  # Same base names in the three classes (x/img_0000.png): keys by name are ambiguous.
  csv = tmp_path / "labels.csv"
  csv.write_text("file,class_index\n" + "".join(f"{os.path.basename(n)},1\n" for n in names[:2]))
  try:
    _run(images, tmp_path / "o1", tiny_weights, labels_csv=str(csv))
    ambiguous, msg1 = False, "accepted"
  except extract.ExtractError as e:
    msg1 = str(e)
    ambiguous = "names 3 files" in msg1 and "relative" in msg1
  hostile.check("labels CSV keyed by file name in a class-folder tree (names repeat)",
                ambiguous, msg1[:200])
  # Relative paths, one in the wrong case: labelled, and the case difference reported.
  rows = [f"{n},{i}" for i, n in enumerate(names)]
  rows[-1] = f"{names[-1].upper()},9"
  csv.write_text("file,class_index\n" + "\n".join(rows) + "\n")
  lines = []
  _run(images, tmp_path / "o2", tiny_weights, labels_csv=str(csv), log=lines.append)
  _, meta = store.load_descriptors(tmp_path / "o2", "fc")
  m = store.read_manifest(tmp_path / "o2")
  want = list(range(len(names) - 1)) + [-1]
  case = (meta["label"].tolist() == want and m["labels"]["case_mismatches"] == 1
          and m["labels"]["unlabelled"] == 1
          and any("upper/lower case" in ln and names[-1] in ln for ln in lines))
  hostile.check("labels CSV keys that differ from the file names in case", case,
                "; ".join(ln for ln in lines if ln.startswith("labels"))[:300])
  assert ambiguous and case, (msg1, lines, meta["label"])


def test_weights_folder_moved(small, tiny_weights, tmp_path, hostile, monkeypatch):
  """Issue 10, row 13: index made with weights from $CBIR_JAX_WEIGHTS_DIR, that folder moved:
  queries find the same weights (same digest) where they now ship."""
  from cbir_jax import weights as weights_lib
  name = "weights folder of an index moved (same weights still shipped)"
  hostile.declare(name)
  env_root = tmp_path / "env_weights"
  shutil.copytree(tiny_weights, env_root / "vgg_tiny")
  monkeypatch.setenv(weights_lib.ENV_VAR, str(env_root))
  out = tmp_path / "out"
  _run(small[0], out, None)  # --weights unset: the shipped weights of vgg_tiny
  recorded = store.read_manifest(out)["weights"]
  query = sorted(str(p) for p in small[0].rglob("*.png"))[4]
  shutil.move(env_root, tmp_path / "moved_away")
  monkeypatch.delenv(weights_lib.ENV_VAR)
  try:
    query_lib.search_index(str(out), query_paths=[query], k=1)
    gone_refused, msg = False, "accepted without weights"
  except query_lib.IndexMismatch as e:
    gone_refused, msg = recorded["params_sha256"][:12] in str(e), str(e)
  repo = tmp_path / "repo_weights"  # the repository's weights/, holding the same weights
  shutil.copytree(tiny_weights, repo / "vgg_tiny")
  monkeypatch.setattr(weights_lib, "_SHIPPED", repo)
  [r] = query_lib.search_index(str(out), query_paths=[query], k=1)
  ok = (recorded["kind"] == "shipped" and "dir" in recorded and not recorded["dir"]
        and gone_refused and r.hits[0].path == query and r.hits[0].distance < 1e-5)
  # A --weights folder that is gone: the same weights shipped elsewhere are found by digest.
  own = tmp_path / "own_weights"
  shutil.copytree(tiny_weights, own)
  out2 = tmp_path / "out2"
  _run(small[0], out2, own)
  shutil.rmtree(own)
  [r2] = query_lib.search_index(str(out2), query_paths=[query], k=1)
  ok = ok and r2.hits[0].path == query and r2.hits[0].distance < 1e-5
  hostile.check(name, ok, f"recorded as {recorded['kind']} {recorded['name']!r} + digest; "
                f"found again in the repository's weights (also for a --weights folder that "
                f"is gone); without them: {msg[:120]}")
  assert ok, (recorded, msg, r, r2)


def test_file_replaced_keeping_size_and_time(small, tiny_weights, tmp_path, hostile):
  """A file rewritten with other bytes of the same size and its old modification time: only
  --content_digest can see it; with it, the rerun is refused and --update reads that file."""
  name = "file replaced keeping its size and modification time (--content_digest)"
  hostile.declare(name)
  images = _copy(small[0], tmp_path / "imgs")
  out = tmp_path / "out"
  _run(images, out, tiny_weights, content_digest=True)
  victim = sorted(images.rglob("*.png"))[10]
  st = victim.stat()
  data = bytearray(victim.read_bytes())
  data[-20] ^= 0xFF  # inside the PNG's last chunk: same size
  victim.write_bytes(bytes(data))
  os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
  try:
    _run(images, out, tiny_weights, content_digest=True)
    refused, msg = False, "accepted"
  except extract.ExtractError as e:
    msg = str(e)
    refused = "1 changed" in msg and victim.name in msg
  s = _run(images, out, tiny_weights, content_digest=True, update=True)
  ok = refused and s.images + s.failed == 1
  hostile.check(name, ok, f"refused: {msg[:150]}; --update read {s.images + s.failed} file")
  assert ok, (msg, s)


def test_labels_csv_edited_then_update(small, tiny_weights, tmp_path, hostile):
  """The labels CSV changed since the output was made: refused; --update keeps every row and
  relabels them (nothing is read again)."""
  name = "labels CSV edited between runs"
  hostile.declare(name)
  images = small[0]
  names = sorted(str(p.relative_to(images)) for p in images.rglob("*.png"))
  csv = tmp_path / "labels.csv"
  csv.write_text("file,class_index\n" + "".join(f"{n},{i % 4}\n" for i, n in enumerate(names)))
  out = tmp_path / "out"
  _run(images, out, tiny_weights, labels_csv=str(csv))
  csv.write_text("file,class_index\n" + "".join(f"{n},{i % 5}\n" for i, n in enumerate(names)))
  with pytest.raises(extract.ExtractError, match="labels CSV differs"):
    _run(images, out, tiny_weights, labels_csv=str(csv))
  s = _run(images, out, tiny_weights, labels_csv=str(csv), update=True)
  clean = tmp_path / "clean"
  _run(images, clean, tiny_weights, labels_csv=str(csv))
  ok = s.images + s.failed == 0 and _equal_to_clean(out, clean, hostile, name,
                                                    "refused; --update relabelled, read nothing")
  assert ok, s


def test_update_with_nothing_changed_rewrites_nothing(small, tiny_weights, tmp_path, hostile):
  name = "--update on an output that is already up to date"
  hostile.declare(name)
  out = _copy(small[1], tmp_path / "out")
  files = lambda: {p: p.stat().st_mtime_ns for p in out.rglob("*")  # noqa: E731
                   if p.is_file() and not p.name.startswith(".lock")}
  snapshot = files()
  s = _run(small[0], out, tiny_weights, update=True)
  now = files()
  ok = s.complete and s.images == 0 and s.shards_written == 0 and now == snapshot
  hostile.check(name, ok, "nothing to do; no file rewritten")
  assert ok, s


def test_update_interrupted_keeps_the_previous_output(small, tiny_weights, tmp_path, hostile,
                                                      monkeypatch):
  """--update killed while extracting, and failing at its final switch: the previous
  generation stays whole and readable; rerunning --update finishes, equal to a clean run."""
  name = "--update killed mid-way, and failing at the manifest switch"
  hostile.declare(name)
  images = _copy(small[0], tmp_path / "imgs")
  out = _copy(small[1], tmp_path / "out")
  write_small_images(tmp_path / "more", 50, seed=11)
  for p in (tmp_path / "more").rglob("*.png"):
    shutil.copy(p, images / p.parent.name / f"more_{p.name}")
  log = tmp_path / "update.log"
  with open(log, "w") as f:
    proc = subprocess.Popen(job_command(images, out, tiny_weights, "--update"), stdout=f,
                            stderr=subprocess.STDOUT,
                            env=step_delay.env(0.3))
  first = out / "gen-000001" / store.DELTA / "000000"
  t0 = time.monotonic()
  while not (first / "shard.json").exists():
    assert proc.poll() is None and time.monotonic() - t0 < 240, log.read_text()[-2000:]
    time.sleep(0.02)
  proc.kill()
  proc.wait()
  old_ok = compare(out, small[1])[:3] == (0, 0, [])  # still the previous generation
  real = store.write_manifest

  def failing_switch(output_dir, manifest, name=store.MANIFEST):
    if pathlib.Path(output_dir) == out:
      raise OSError(28, "No space left on device")
    return real(output_dir, manifest, name)

  monkeypatch.setattr(store, "write_manifest", failing_switch)
  with pytest.raises(extract.ExtractError, match="No space left"):
    _run(images, out, tiny_weights, update=True)
  monkeypatch.setattr(store, "write_manifest", real)
  still_old = compare(out, small[1])[:3] == (0, 0, [])
  s = _run(images, out, tiny_weights, update=True)
  clean = tmp_path / "clean"
  _run(images, clean, tiny_weights)
  leftovers = sorted(p.name for p in out.iterdir() if p.name not in (
      store.MANIFEST, "gen-000001"))
  ok = (old_ok and still_old and s.images == 0 and not leftovers
        and _equal_to_clean(out, clean, hostile, name,
                            "previous output readable after the kill and the failed switch; "
                            "reruns continued the same update"))
  assert ok, (old_ok, still_old, s, leftovers)


def test_update_refuses_damaged_descriptors(small, tiny_weights, tmp_path, hostile):
  """A part of the index damaged on disk (a flipped byte, same size) before --update: its
  rows are not copied into the next generation (that shard's records are extracted again),
  and the result equals a clean run."""
  name = "--update on an output whose descriptors/ were damaged after the job"
  hostile.declare(name)
  images = _copy(small[0], tmp_path / "imgs")
  out = tmp_path / "out"
  _run(images, out, tiny_weights)
  victim = out / "conv" / "part-000001.npy"
  data = bytearray(victim.read_bytes())
  data[-3] ^= 0x10
  victim.write_bytes(bytes(data))
  write_small_images(tmp_path / "more", 4, seed=12)
  for p in (tmp_path / "more").rglob("*.png"):
    shutil.copy(p, images / p.parent.name / f"more_{p.name}")
  s = _run(images, out, tiny_weights, update=True)
  clean = tmp_path / "clean"
  _run(images, clean, tiny_weights)
  ok = s.images == 4 + 20 and _equal_to_clean(
      out, clean, hostile, name, "the damaged shard's 20 records extracted again, the others "
      "reused after their SHA-256 matched")
  assert ok, s
