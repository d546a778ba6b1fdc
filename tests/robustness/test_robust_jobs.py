"""The extraction job under hostile conditions: bad files, kills, interrupts, locks, full disks.

Every run uses the tiny test backbone on 32x32 inputs, so the cost is process
start-up, not arithmetic. The reference for "nothing lost" is an
uninterrupted in-process run of the same job (same 8 fake devices as the
subprocesses, which inherit XLA_FLAGS from tests/conftest.py); rows must
match it exactly, descriptor for descriptor.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cbir_jax import extract, input_pipeline, store
from cbir_jax.descriptors import KINDS

import robust_images as ri
from robust_common import (NUM_IMAGES, job_command, job_config, make_tiny_weights,
                           write_small_images)


def _quiet(msg: str) -> None:
  pass


def _sha256(p: pathlib.Path) -> str:
  return hashlib.sha256(p.read_bytes()).hexdigest()


def verify_complete_shards(out: pathlib.Path) -> dict[int, int]:
  """Checks every complete shard by itself (checksums, row counts); returns {index: rows}.

  Independent of the store's loader, which only reads finished jobs.
  """
  rows = {}
  for d in sorted((out / store.SHARDS).iterdir()):
    if not (d.name.isdigit() and (d / "shard.json").is_file()):
      continue
    info = json.loads((d / "shard.json").read_text())
    for name, f in info["files"].items():
      assert _sha256(d / name) == f["sha256"], f"{d}/{name}: checksum differs from shard.json"
    with np.load(d / "meta.npz", allow_pickle=False) as z:
      n = len(z["row"])
      assert list(z["row"]) == sorted(z["row"])
    assert n == info["rows"]
    for k in KINDS:
      assert np.load(d / f"{k}.npy", allow_pickle=False).shape[0] == n
    rows[int(d.name)] = n
  return rows


def compare_with_baseline(out: pathlib.Path, baseline) -> tuple[int, int, list[str]]:
  """(rows lost, rows duplicated, other differences) of a finished output vs the baseline."""
  _, arrays, meta = baseline
  problems = []
  got_meta = None
  for k in KINDS:
    a, m = store.load_descriptors(out, k)
    got_meta = m
    if a.shape[0] == arrays[k].shape[0] and not np.array_equal(np.asarray(a), arrays[k]):
      problems.append(f"{k}: descriptors differ (max {np.abs(np.asarray(a) - arrays[k]).max()})")
  rows = got_meta["row"].tolist()
  want = meta["row"].tolist()
  lost = len(set(want) - set(rows))
  duplicated = len(rows) - len(set(rows))
  if rows != want:
    problems.append("row order or content differs")
  for c in ("path", "label", "width", "height"):
    if c in meta and not np.array_equal(got_meta[c], meta[c]):
      problems.append(f"metadata column {c} differs")
  return lost, duplicated, problems


def _wait_for_shards(proc: subprocess.Popen, out: pathlib.Path, n: int, timeout: float = 180
                     ) -> tuple[bool, float]:
  """Waits until `n` shards are complete.

  Returns:
    (False if the process ended first, the time between the last two shard completions
    seen: how long one shard takes on this machine now; 0 if not seen).
  """
  t0 = time.monotonic()
  count, seen = -1, []
  while time.monotonic() - t0 < timeout:
    now = len(store.complete_shards(out))
    if now != count:
      count = now
      seen.append(time.monotonic())
    if now >= n:
      return True, (seen[-1] - seen[-2] if len(seen) >= 3 else 0.0)
    if proc.poll() is not None:
      return False, 0.0
    time.sleep(0.002)
  raise AssertionError(f"no progress to {n} shards in {timeout} s")


def _start(cmd: list[str], log: pathlib.Path) -> subprocess.Popen:
  """Starts a job with its output in `log` (a file: a pipe nobody reads could fill and
  stall the job)."""
  with open(log, "w") as f:
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)


def _wait_stopped(pid: int, timeout_s: float = 10.0) -> None:
  """Returns once every thread of `pid` is stopped: SIGSTOP takes effect asynchronously, and
  a thread still running for a moment after the signal could write (state T in
  /proc/<pid>/task/<tid>/stat)."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    states = []
    for stat in pathlib.Path(f"/proc/{pid}/task").glob("*/stat"):
      try:
        states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
      except (OSError, IndexError):
        continue
    if states and all(s in ("T", "t") for s in states):
      return
    time.sleep(0.01)
  raise AssertionError(f"process {pid} did not stop within {timeout_s} s")


def test_kill_and_resume(many_images, tiny_weights, baseline, tmp_path, hostile):
  """SIGKILL at seeded random points, a second job meanwhile, SIGINT, then a rerun to the end.

  The final output must equal the uninterrupted run row for row, and after every
  kill each complete shard must be intact by its own checksums.
  """
  folder, _ = many_images
  out = tmp_path / "out"
  cmd = job_command(folder, out, tiny_weights)
  rng = np.random.default_rng(20261127)
  # Kill once 1-3 shards are complete, again 2-4 and 2-3 shards later (of 15), each after
  # a random fraction of the time one shard takes (measured as the job runs, so the kill
  # lands inside the next shard's work or write whatever the machine's speed); then
  # SIGINT 2-4 shards later.
  kill_at = [int(rng.integers(1, 4))]
  kill_at.append(kill_at[-1] + int(rng.integers(2, 5)))
  kill_at.append(kill_at[-1] + int(rng.integers(2, 4)))
  delays = rng.uniform(0.0, 0.9, size=len(kill_at))
  names = [f"SIGKILL #{i + 1} of an extraction (after {n} shards + {d:.2f} of a shard), rerun"
           for i, (n, d) in enumerate(zip(kill_at, delays))]
  lock_case = "second job into an output directory in use"
  sigint_case = "SIGINT: stops cleanly, complete shards kept"
  hostile.declare(*names, lock_case, sigint_case)

  for i, (n, delay) in enumerate(zip(kill_at, delays)):
    log = tmp_path / f"kill{i}.log"
    proc = _start(cmd, log)
    try:
      reached, shard_s = _wait_for_shards(proc, out, n)
      assert reached, f"job ended before {n} shards: {log.read_text(errors='replace')[-3000:]}"
      if i == 0:
        # Freeze the job (it keeps its lock) and start a second one on the same directory.
        proc.send_signal(signal.SIGSTOP)
        _wait_stopped(proc.pid)  # every thread (the shard writer too) has stopped
        before = sorted(p.name for p in (out / store.SHARDS).iterdir())
        try:
          with pytest.raises(extract.ExtractError) as e:
            extract.run(job_config(folder, out, tiny_weights), log=_quiet)
          after = sorted(p.name for p in (out / store.SHARDS).iterdir())
          ok = bool(re.search(r"another job", str(e.value))) and before == after
          hostile.check(lock_case, ok, f"refused: {e.value}")
          assert ok, (str(e.value), before, after)
        finally:
          proc.send_signal(signal.SIGCONT)
      time.sleep(delay * shard_s)
    finally:
      proc.kill()
      proc.wait()
    shards = verify_complete_shards(out)
    hostile.check(names[i], len(shards) >= n,
                  f"{len(shards)} complete shards intact after the kill; rerun continued")
    assert len(shards) >= n

  # SIGINT: the job finishes the shard in progress, exits 130 with a one-line message.
  log = tmp_path / "sigint.log"
  proc = _start(cmd, log)
  # 2-4 shards further, but with shards left after the one in flight, so the job must stop
  # early rather than finish.
  last = NUM_IMAGES // 20 - 3
  now = len(store.complete_shards(out))
  assert now < last, f"the kills left too little work for SIGINT ({now} shards done)"
  target = min(now + int(rng.integers(2, 5)), last)
  reached, _ = _wait_for_shards(proc, out, target)
  proc.send_signal(signal.SIGINT)
  proc.wait(timeout=120)
  stderr = log.read_text(errors="replace")
  shards = verify_complete_shards(out)
  leftovers = [p.name for p in (out / store.SHARDS).iterdir() if p.name.startswith(".tmp")]
  msg = [ln for ln in stderr.splitlines() if ln.startswith("extract:")]
  ok = (reached and proc.returncode == 130 and "Traceback" not in stderr and not leftovers
        and bool(msg) and "interrupted" in msg[-1] and len(shards) < 15)
  hostile.check(sigint_case, ok, f"exit {proc.returncode}, {len(shards)} shards kept, "
                f"message: {msg[-1] if msg else stderr[-300:]}")
  assert ok, (proc.returncode, leftovers, stderr[-3000:])

  # The rerun that finishes (in this process: same devices, no second start-up cost).
  summary = extract.run(job_config(folder, out, tiny_weights), log=_quiet)
  assert summary.complete and summary.shards_skipped >= len(shards), summary
  lost, duplicated, problems = compare_with_baseline(out, baseline)
  hostile.rows(lost=lost, duplicated=duplicated)
  assert (lost, duplicated, problems) == (0, 0, [])
  # Finished: the shards are the index (parts per kind link to them); no lock file is left.
  assert (out / store.SHARDS).is_dir() and not list(out.glob(".lock-*"))
  assert len(store.read_manifest(out)["shards"]) == NUM_IMAGES // 20


def test_rerun_with_other_settings_is_refused(many_images, tiny_weights, baseline, tmp_path,
                                             hostile):
  """A finished directory refuses a job with another threshold or other weights, untouched."""
  out = tmp_path / "finished"
  shutil.copytree(baseline[0], out)
  snapshot = {p: _sha256(p) for p in out.rglob("*") if p.is_file() and ".lock" not in p.name}
  other_weights = make_tiny_weights(tmp_path / "other_weights", seed=1)
  for case, overrides, pattern in (
      ("rerun into a finished directory with another threshold", {"threshold": 0.3},
       r"other settings.*threshold"),
      ("rerun into a finished directory with other weights", {"weights": str(other_weights)},
       r"other settings.*params_sha256"),
      ("rerun into a finished directory with another image size", {"image_size": 48},
       r"other settings.*image_size")):
    with pytest.raises(extract.ExtractError) as e:
      config = dataclasses.replace(job_config(many_images[0], out, tiny_weights), **overrides)
      extract.run(config, log=_quiet)
    now = {p: _sha256(p) for p in out.rglob("*") if p.is_file() and ".lock" not in p.name}
    ok = bool(re.search(pattern, str(e.value), re.S)) and now == snapshot
    hostile.check(case, ok, f"refused: {str(e.value)[:200]}")
    assert ok, str(e.value)


@contextlib.contextmanager
def _small_tmpfs(path: pathlib.Path, size: str):
  """Mounts a tmpfs of `size` at `path`; yields False when the machine forbids mounting."""
  path.mkdir(parents=True, exist_ok=True)
  if os.environ.get("ROBUSTNESS_NO_MOUNT"):  # exercise the simulated path on a machine
    yield False                              # that could mount
    return
  try:
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    mounted = r.returncode == 0
  except OSError:  # no mount(8)
    mounted = False
  if not mounted:
    yield False
    return
  try:
    yield True
  finally:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk(many_images, tiny_weights, baseline, tmp_path, hostile, monkeypatch):
  """Output on a tiny filesystem: a clear error, every complete shard valid, and after
  space is freed the rerun completes and equals the uninterrupted run.

  A real size-limited tmpfs where the machine lets the test mount one; else the
  store's writes are made to fail with ENOSPC after a few shards (simulation).
  """
  case = "full disk during extraction"
  hostile.declare(case)
  mnt = tmp_path / "small"
  with _small_tmpfs(mnt, "160k") as mounted:
    out = mnt / "out"
    if not mounted:  # simulate: ENOSPC from the 4th shard on
      how = "simulated ENOSPC (mount not permitted)"
      real_save, calls = np.save, [0]

      def failing_save(file, arr, *a, **kw):
        calls[0] += 1
        if calls[0] > 3 * len(KINDS):
          raise OSError(28, os.strerror(28), str(file))
        return real_save(file, arr, *a, **kw)
      monkeypatch.setattr(store.np, "save", failing_save)
    else:
      how = "real 160 KiB tmpfs"
    with pytest.raises(extract.ExtractError) as e:
      extract.run(job_config(many_images[0], out, tiny_weights), log=_quiet)
    msg = str(e.value)
    shards = verify_complete_shards(out)
    leftovers = [p.name for p in (out / store.SHARDS).iterdir() if p.name.startswith(".tmp")]
    ok = (bool(re.search(r"No space left", msg)) and "rerun" in msg and 1 <= len(shards) < 15
          and not leftovers)
    hostile.check(case, ok, f"{how}: error after {len(shards)} complete shards: {msg[:160]}")
    assert ok, (msg, shards, leftovers)
    # Free space (move the partial output to a real disk) and resume.
    monkeypatch.undo()
    moved = tmp_path / "moved"
    shutil.copytree(out, moved, symlinks=True)
  extract.run(job_config(many_images[0], moved, tiny_weights), log=_quiet)
  lost, duplicated, problems = compare_with_baseline(moved, baseline)
  hostile.rows(lost=lost, duplicated=duplicated)
  assert (lost, duplicated, problems) == (0, 0, [])


def test_file_deleted_between_listing_and_reading(tiny_weights, tmp_path, hostile, monkeypatch):
  """The job lists the folder, then a file vanishes before it is read: a failure row."""
  folder = tmp_path / "imgs"
  paths = write_small_images(folder, 12)
  victim = paths[5]
  real = input_pipeline.list_folder

  def list_then_delete(root):
    listing = real(root)
    os.remove(victim)
    return listing
  monkeypatch.setattr(input_pipeline, "list_folder", list_then_delete)
  out = tmp_path / "out"
  summary = extract.run(job_config(folder, out, tiny_weights), log=_quiet)
  _, meta = store.load_descriptors(out, "fc")
  failures = store.read_failures(out)
  ok = (summary.images == 11 and summary.failed == 1 and len(meta["path"]) == 11
        and victim not in meta["path"].tolist() and len(failures) == 1
        and failures[0][0] == victim and "No such file" in failures[0][1])
  hostile.check("file deleted between listing and reading (job)", ok,
                f"failure row: {failures[0][1] if failures else None}")
  assert ok, (summary, failures)


# --- the hostile folder, through the launcher ------------------------------------------------


def _hostile_folder(root: pathlib.Path) -> tuple[list[ri.ImageCase], list[ri.SpecialCase]]:
  cases = ri.image_cases()
  for c in cases:
    c.make(root / c.filename)
  good = ri.encode(ri.Image.fromarray(ri.rgb_pattern(20, 20)), "PNG")
  specials = ri.special_cases(good)
  for s in specials:
    s.make(root)
  ri.dir_loop(root)
  return cases, specials


# Runs argv[1:] as this process' user minus CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so a
# root child is bound by file permissions like any user. Dropped from the bounding set
# (PR_CAPBSET_DROP = 24): execve then grants root only what that set holds. A separate
# tiny process rather than a preexec_fn, which would run Python after fork() in this
# multithreaded (JAX, TensorFlow) process.
_WITHOUT_DAC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2):
  if libc.prctl(24, cap, 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_CAPBSET_DROP, {cap}) failed: errno {ctypes.get_errno()}")
os.execv(sys.argv[1], sys.argv[1:])
"""


def _without_dac(cmd: list[str]) -> list[str]:
  return [sys.executable, "-c", _WITHOUT_DAC, *cmd]


def _permissions_bind_children(tmp: pathlib.Path) -> str:
  """How a child process can be made to respect a chmod 000 here ('' if it cannot)."""
  probe = tmp / "probe"
  probe.write_text("x")
  probe.chmod(0)
  cat = shutil.which("cat") or "/bin/cat"
  try:
    if subprocess.run([cat, str(probe)], capture_output=True).returncode != 0:
      return "plain"  # not root: permissions apply anyway
    r = subprocess.run(_without_dac([cat, str(probe)]), capture_output=True, text=True)
    return "root without DAC capabilities" if "Permission denied" in r.stderr else ""
  finally:
    probe.chmod(0o644)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # expected, see images
def test_hostile_folder_job(tiny_weights, tmp_path, hostile):
  """Every hostile file in one folder, extracted by launch/extract.py.

  The good files are all extracted (their rows equal the descriptors of the
  same images computed here), every bad one is in the failures file with a
  reason, the exit status is 0, and the counts add up. As root, the job runs
  without the capabilities that let root read a chmod-000 file, so that file
  is really unreadable to it.
  """
  from cbir_jax import backbones, checkpoint, inference

  root = tmp_path / "imgs"
  root.mkdir()
  cases, specials = _hostile_folder(root)
  locked = root / "locked.png"
  locked.write_bytes(ri.encode(ri.Image.fromarray(ri.rgb_pattern(20, 20)), "PNG"))
  locked.chmod(0o000)
  perms = _permissions_bind_children(tmp_path)
  out = tmp_path / "out"
  cmd = job_command(root, out, tiny_weights)
  try:
    proc = subprocess.run(_without_dac(cmd) if perms.startswith("root") else cmd,
                          capture_output=True, text=True, errors="replace", timeout=300)
  finally:
    locked.chmod(0o644)
  assert proc.returncode == 0, proc.stderr[-4000:]
  weights = tiny_weights
  manifest = store.read_manifest(out)
  _, meta = store.load_descriptors(out, "fc")
  failures = dict(store.read_failures(out))
  listed_failures = json.loads((out / "failures.json").read_text(errors="surrogateescape"))
  listed = [r.key for r in input_pipeline.folder_records(root)]
  m = re.search(r"extracted (\d+) images, (\d+) failed", proc.stdout)
  counts_ok = (m is not None and int(m.group(1)) == len(meta["path"])
               and int(m.group(2)) == len(failures) == manifest["failures"]
               and len(listed_failures) == len(failures)
               and len(meta["path"]) + len(failures) == len(listed) == manifest["num_records"])
  hostile.check("hostile folder: counts add up (rows + failures = files listed)", counts_ok,
                f"{len(meta['path'])} rows + {len(failures)} failures = {len(listed)} listed")
  paths = meta["path"].tolist()
  assert paths == sorted(paths)

  # Independent descriptors of the good files, computed in this process.
  params, info = checkpoint.load(weights)
  fn = inference.jit_describe(backbones.get("vgg_tiny"), preprocessing=info.preprocessing,
                              kinds=("fc_conv",))
  got = dict(zip(paths, np.asarray(store.load_descriptors(out, "fc_conv")[0])))
  problems = []

  def good_row(key: str) -> str:
    if key not in got:
      return f"missing (failure: {failures.get(key)})"
    img, err = input_pipeline.load_images([key], ri.SIZE)
    if err[0]:
      return f"cannot decode here: {err[0]}"
    want = np.asarray(fn(params, img)["fc_conv"])[0]
    diff = np.abs(got[key] - want).max() / max(np.abs(want).max(), 1e-6)
    return "" if diff < 1e-5 else f"descriptor differs (rel {diff:.2g})"

  def bad_row(key: str, pattern: str) -> str:
    if key in got:
      return "extracted although bad"
    reason = failures.get(key)
    if not reason:
      return "not in the failures file"
    return "" if re.search(pattern, reason, re.I) else f"reason {reason!r} !~ {pattern!r}"

  for c in cases:
    key = str(root / c.filename)
    p = good_row(key) if c.good else bad_row(key, c.reason)
    hostile.check(c.name, not p, p or ("extracted" if c.good else f"failure: {failures[key]}"))
    if p:
      problems.append((c.name, p))
  for s in specials:
    for f in s.filenames:
      p = bad_row(str(root / f), s.reason)
      hostile.check(s.name, not p, p or f"failure: {failures[str(root / f)]}")
      if p:
        problems.append((s.name, p))
  if perms:
    p = bad_row(str(locked), r"permission")
    hostile.check("unreadable file (chmod 000)", not p,
                  p or f"job ({perms}): failure: {failures.get(str(locked))}")
    if p:
      problems.append(("unreadable", p))
  # else: permissions cannot bind a child here; the decoder-level test covers the case.
  loop_ok = len(paths) == len(set(paths)) and not any("/up/" in k for k in listed)
  hostile.check("directory symlink loop in the input tree", loop_ok,
                "not followed; no file listed twice")
  assert counts_ok and loop_ok and not problems, (problems, proc.stdout, proc.stderr[-2000:])


# --- damaged or foreign state in the output directory ---------------------------------------


def _unfinished_copy(baseline, dest: pathlib.Path, keep: int) -> pathlib.Path:
  """The baseline output as a job killed after `keep` shards would leave it."""
  shutil.copytree(baseline[0], dest)
  for d in (dest / store.SHARDS).iterdir():
    if int(d.name) >= keep:
      shutil.rmtree(d)
  m = json.loads((dest / store.MANIFEST).read_text())
  for kind in m["parts"]:
    shutil.rmtree(dest / kind)
  for name in ("metadata.parquet", "failures.json"):
    (dest / name).unlink(missing_ok=True)  # failures.json: absent when none failed
  m.update(status="running", shards=[], parts={}, metadata=None, failures_file=None, made=[])
  (dest / store.MANIFEST).write_text(json.dumps(m))
  return dest


def test_leftovers_of_a_killed_shard_write(many_images, tiny_weights, baseline, tmp_path,
                                          hostile):
  """What a kill inside a shard write leaves (a temporary directory, a shard directory
  without shard.json) is cleaned up by the rerun, which then equals the uninterrupted run."""
  out = _unfinished_copy(baseline, tmp_path / "out", keep=5)
  tmp = out / store.SHARDS / ".tmp-000005-deadbeef"
  tmp.mkdir()
  (tmp / "fc.npy").write_bytes(b"\x93NUMPY half a file")
  half = out / store.SHARDS / "000006"
  half.mkdir()
  shutil.copy(baseline[0] / store.SHARDS / "000006" / "fc.npy", half / "fc.npy")
  summary = extract.run(job_config(many_images[0], out, tiny_weights), log=_quiet)
  lost, duplicated, problems = compare_with_baseline(out, baseline)
  hostile.rows(lost=lost, duplicated=duplicated)
  # Finished: shards/ holds the complete shards only (they are the index), no leftover.
  leftovers = [p.name for p in out.rglob("*") if p.name.startswith(".tmp")
               or (p.parent.name == store.SHARDS and not (p / "shard.json").is_file())]
  ok = (lost, duplicated, problems, leftovers) == (0, 0, [], []) and summary.shards_skipped == 5
  hostile.check("leftovers of a shard write cut short (temp dir, shard without shard.json)", ok,
                f"cleaned up; rerun wrote {summary.shards_written} shards, skipped "
                f"{summary.shards_skipped}; output equals the uninterrupted run")
  assert ok, (lost, duplicated, problems, leftovers, summary)


def _truncate(p: pathlib.Path) -> None:
  p.write_bytes(p.read_bytes()[:100])


def _flip_a_byte(p: pathlib.Path) -> None:
  data = bytearray(p.read_bytes())
  data[-7] ^= 0x40  # inside the last row's values: same size, valid header
  p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte], ids=["truncated", "bit flip"])
def test_damaged_complete_shard_before_rerun(many_images, tiny_weights, baseline, tmp_path,
                                            hostile, damage):
  """A complete shard damaged on disk (bad copy, disk error) before the rerun: the rerun
  must not crash with a traceback nor produce wrong output; it recomputes the shard or
  stops with an error that names it."""
  out = _unfinished_copy(baseline, tmp_path / "out", keep=8)
  damage(out / store.SHARDS / "000003" / "conv.npy")
  try:
    extract.run(job_config(many_images[0], out, tiny_weights), log=_quiet)
  except extract.ExtractError as e:
    ok = "000003" in str(e)
    how = f"stopped with a clear error: {str(e)[:200]}"
  except Exception as e:  # noqa: BLE001 - the finding: an unclear crash
    ok, how = False, f"crashed: {type(e).__name__}: {str(e)[:200]}"
  else:
    lost, duplicated, problems = compare_with_baseline(out, baseline)
    hostile.rows(lost=lost, duplicated=duplicated)
    ok = (lost, duplicated, problems) == (0, 0, [])
    how = "damaged shard recomputed; output equals the uninterrupted run" if ok else str(problems)
  name = "complete shard " + ("truncated" if damage is _truncate else "with a flipped byte")
  hostile.check(f"{name} on disk before a rerun", ok, how)
  assert ok, how


def test_shards_without_manifest_are_not_reused(many_images, tiny_weights, baseline, tmp_path,
                                               hostile):
  """manifest.json deleted, shards left: a rerun with other settings must not silently
  mix the old shards into its output."""
  out = tmp_path / "out"
  shutil.copytree(baseline[0], out)
  (out / store.MANIFEST).unlink()
  config = dataclasses.replace(job_config(many_images[0], out, tiny_weights), threshold=0.3)
  try:
    extract.run(config, log=_quiet)
  except extract.ExtractError as e:
    ok, how = True, f"refused: {str(e)[:200]}"
  else:
    fresh = tmp_path / "fresh"
    extract.run(dataclasses.replace(config, output=str(fresh)), log=_quiet)
    a = np.asarray(store.load_descriptors(out, "conv")[0])
    b = np.asarray(store.load_descriptors(fresh, "conv")[0])
    ok = a.shape == b.shape and np.array_equal(a, b)
    how = ("recomputed with the new settings" if ok else
           "old shards (threshold 0.5) reused under a manifest saying 0.3")
  hostile.check("shards left without their manifest, rerun with other settings", ok, how)
  assert ok, how


def test_bad_paths(many_images, tiny_weights, tmp_path, hostile):
  """Output path that is a file, input folder missing or without images: clear errors."""
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "notes.txt").write_text("no images here")
  for case, images, output, pattern in (
      ("output path is an existing file", many_images[0], a_file, r"a_file"),
      ("input folder does not exist", tmp_path / "missing", tmp_path / "o1", r"does not exist"),
      ("input folder holds no images", tmp_path / "empty", tmp_path / "o2", r"no images")):
    try:
      extract.run(job_config(images, output, tiny_weights), log=_quiet)
      ok, how = False, "accepted"
    except extract.ExtractError as e:
      ok, how = bool(re.search(pattern, str(e))), f"refused: {str(e)[:160]}"
    hostile.check(case, ok, how)
    assert ok, how


def test_folder_where_every_file_is_bad(tiny_weights, tmp_path, hostile):
  """Only bad files: the job completes with zero rows and every file in the failures."""
  folder = tmp_path / "imgs"
  folder.mkdir()
  for i in range(5):
    (folder / f"x{i}.jpg").write_bytes(b"not an image %d" % i)
  out = tmp_path / "out"
  summary = extract.run(job_config(folder, out, tiny_weights), log=_quiet)
  a, meta = store.load_descriptors(out, "fc_conv")
  failures = store.read_failures(out)
  ok = (summary.images, summary.failed, a.shape[0], len(meta["path"]), len(failures)) == \
      (0, 5, 0, 0, 5)
  hostile.check("folder where every file is bad", ok,
                f"completes with 0 rows, {len(failures)} failures listed")
  assert ok, (summary, a.shape, failures)


def test_killed_while_finishing(many_images, tiny_weights, baseline, tmp_path, hostile):
  """All shards written, the job killed while finishing (a half-written metadata table, a
  part link cut short, a stale part that is not the shard's file): the rerun finishes,
  writes no shard and equals the uninterrupted run."""
  out = _unfinished_copy(baseline, tmp_path / "out", keep=NUM_IMAGES // 20)
  (out / "fc").mkdir()
  (out / "fc" / ".part-000000.npy.tmp").write_bytes(b"\x93NUMPY" + b"\0" * 50)  # cut short
  np.save(out / "fc" / "part-000001.npy", np.zeros((3, 64), np.float32))  # not the shard's
  (out / ".metadata.parquet.tmp").write_bytes(b"PAR1")
  summary = extract.run(job_config(many_images[0], out, tiny_weights), log=_quiet)
  lost, duplicated, problems = compare_with_baseline(out, baseline)
  hostile.rows(lost=lost, duplicated=duplicated)
  ok = (lost, duplicated, problems) == (0, 0, []) and summary.shards_written == 0
  hostile.check("killed while finishing (stale and half-written index files)", ok,
                "rerun wrote no shard, relinked the parts; output equals the uninterrupted run")
  assert ok, (lost, duplicated, problems, summary)


def test_killed_half_way_through_linking_the_parts(many_images, tiny_weights, baseline,
                                                   tmp_path, hostile, monkeypatch):
  """Killed after half the parts were linked: nothing loads as finished meanwhile, and
  the rerun finishes the job, rewriting no shard."""
  name = "killed half-way through listing the shards as parts"
  hostile.declare(name)
  from cbir_jax import consolidate
  out = _unfinished_copy(baseline, tmp_path / "out", keep=NUM_IMAGES // 20)
  real_link, calls = consolidate.os.link, []

  def killed_half_way(src, dst):
    calls.append(dst)
    if len(calls) > 20:
      raise KeyboardInterrupt  # stands for SIGKILL: nothing after this line runs
    return real_link(src, dst)

  monkeypatch.setattr(consolidate.os, "link", killed_half_way)
  with pytest.raises(KeyboardInterrupt):
    extract.run(job_config(many_images[0], out, tiny_weights), log=_quiet)
  monkeypatch.undo()
  running = not store.load_manifest(out).complete
  summary = extract.run(job_config(many_images[0], out, tiny_weights), log=_quiet)
  lost, duplicated, problems = compare_with_baseline(out, baseline)
  hostile.rows(lost=lost, duplicated=duplicated)
  ok = (running and summary.complete and summary.images == 0 and summary.shards_written == 0
        and (lost, duplicated, problems) == (0, 0, []))
  hostile.check(name, ok, "the output stayed unfinished; the rerun finished it, rewriting "
                "no shard")
  assert ok, (running, problems, summary)


@pytest.mark.parametrize("name,data,pattern", [
    ("labels CSV that is not UTF-8", "file,class_index,class_name\nimg_0000.png,1,caf\xe9\n"
     .encode("latin-1"), r"labels\.csv.*not UTF-8"),
    ("labels CSV with a class index too large for int64",
     b"file,class_index\nimg_0000.png,99999999999999999999999\n", r"line 2.*out of range"),
    ("labels CSV without the required columns", b"name,label\nimg_0000.png,1\n",
     r"columns file and class_index"),
    ("labels CSV with a non-integer class index", b"file,class_index\nimg_0000.png,cat\n",
     r"line 2.*not an integer"),
], ids=["not utf-8", "huge class index", "no columns", "not an integer"])
def test_hostile_labels_csv(tiny_weights, tmp_path, hostile, name, data, pattern):
  """--labels_csv files that cannot be used: a clear ExtractError before any work."""
  folder = tmp_path / "imgs"
  write_small_images(folder, 2)
  csv_path = tmp_path / "labels.csv"
  csv_path.write_bytes(data)
  try:
    extract.run(job_config(folder, tmp_path / "out", tiny_weights, labels_csv=str(csv_path)),
                log=_quiet)
    ok, how = False, "accepted"
  except extract.ExtractError as e:
    ok, how = bool(re.search(pattern, str(e))), f"refused: {str(e)[:160]}"
  except Exception as e:  # noqa: BLE001 - the finding: a crash instead of a message
    ok, how = False, f"crashed: {type(e).__name__}: {e}"
  hostile.check(name, ok, how)
  assert ok, how
