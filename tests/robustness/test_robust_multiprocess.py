"""Multi-process hostile cases (issue 10's table): the real extraction job, 2 local processes
on 2 fake CPU devices each with the tiny backbone; a toy job (toy_job.py) on the same
cbir_jax.distributed for the cases the job cannot reach cheaply.

Each case checks exit codes and that a process that ends says why in exactly one line (no
Python traceback, no native abort); a stopped or killed job is rerun and compared with an
uninterrupted run, row for row. Times are measured and reported in the ledger (and printed),
not asserted; a hang fails the test through its timeout.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cbir_jax import extract, store
from cbir_jax.descriptors import KINDS

from robust_common import NUM_IMAGES, job_command, job_config, write_small_images
from free_ports import free_port_pair

HERE = pathlib.Path(__file__).resolve().parent
TOY, OTHER_VIEW = HERE / "toy_job.py", HERE / "other_view.py"
REPO = HERE.parents[1]
NOISE = ("Traceback", "Check failure", "Terminating process", "Fatal Python", "Aborted",
         "core dumped")
STEP_DELAY_S = 0.1  # per step, so that signals and kills land mid-job (about 40 steps a run)


@dataclasses.dataclass
class Proc:
  popen: subprocess.Popen
  out: pathlib.Path
  err: pathlib.Path
  ended: float | None = None

  def stderr(self) -> str:
    return self.err.read_text(errors="replace")

  def steps(self) -> int:
    return self.out.read_text().count("step ")

  @property
  def code(self) -> int | None:
    return self.popen.returncode


def _env(**extra: str) -> dict[str, str]:
  """2 fake CPU devices per process, the other XLA flags as the test process has them."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  env.update(extra)
  return env


def _popen(cmd: list[str], tmp: pathlib.Path, name: str, env: dict[str, str]) -> Proc:
  out, err = tmp / f"{name}.out", tmp / f"{name}.err"
  with open(out, "w") as o, open(err, "w") as e:
    return Proc(subprocess.Popen(cmd, stdout=o, stderr=e, env=env), out, err)


def _wait_all(procs: list[Proc], timeout: float = 150) -> None:
  t = time.monotonic()
  while any(p.ended is None for p in procs):
    for p in procs:
      if p.ended is None and p.popen.poll() is not None:
        p.ended = time.monotonic()
    if time.monotonic() - t > timeout:
      for p in procs:
        if p.popen.poll() is None:
          p.popen.kill()
      pytest.fail(f"hung: {[p.stderr()[-2000:] for p in procs]}")
    time.sleep(0.02)


def _one_line(p: Proc, *must: str) -> tuple[bool, str]:
  """(whether stderr has exactly one error line, holding all of `must`, and no crash noise;
  that line)."""
  text = p.stderr()
  lines = [ln for ln in text.splitlines() if " error: " in ln or ln.startswith("toy: process ")
           and " ended" in ln]
  hit = [ln for ln in lines if all(m in ln for m in must)]
  clean = not any(n in text for n in NOISE)
  return len(lines) == 1 and len(hit) == 1 and clean, (hit or lines or [text[-300:]])[0]


def _clean(procs: list[Proc]) -> bool:
  return not any(n in p.stderr() for p in procs for n in NOISE)


# --- the extraction job ----------------------------------------------------------------------


def _job(tmp: pathlib.Path, images, out, weights, port: int, *, name: str, n: int = 2,
         delay: float | None = STEP_DELAY_S, extra=(), per_process=None, views=None,
         only: int | None = None) -> list[Proc]:
  """launch/extract.py as process 0..n-1 of one job (`views`: other_view.py flags per process,
  as if that process' host had another copy of the input; `only`: start that one alone)."""
  env = _env(**({"CBIR_JAX_TEST_STEP_DELAY_S": str(delay)} if delay else {}))
  procs = []
  for pid in range(n) if only is None else [only]:
    cmd = job_command(images, out, weights, f"--coordinator_address=127.0.0.1:{port}",
                      f"--num_processes={n}", f"--process_id={pid}", *extra,
                      *(per_process or {}).get(pid, ()))
    if views and pid in views:
      cmd = [cmd[0], str(OTHER_VIEW), *views[pid], "--", *cmd[2:]]
    procs.append(_popen(cmd, tmp, f"{name}{pid}", env))
  return procs


def _wait_shards(procs: list[Proc], out: pathlib.Path, n: int, timeout: float = 150) -> None:
  """Until `n` shards are complete (the job runs when the case happens)."""
  t = time.monotonic()
  while not (out.exists() and len(store.complete_shards(out)) >= n):
    assert time.monotonic() - t < timeout, [p.stderr()[-2000:] for p in procs]
    assert all(p.popen.poll() is None for p in procs), [p.stderr()[-2000:] for p in procs]
    time.sleep(0.02)


def _finished(out: pathlib.Path) -> bool:
  try:
    return store.load_manifest(out).complete
  except (OSError, ValueError, store.StoreError):
    return False


def _compare(out: pathlib.Path, reference: pathlib.Path) -> tuple[int, int, list[str]]:
  """(rows lost, rows duplicated, other differences) of a finished output vs a clean run's:
  same rows in the same order, bitwise equal descriptors (same per-device batch)."""
  problems, got_meta, want_meta = [], None, None
  for k in KINDS:
    a, got_meta = store.load_descriptors(out, k)
    b, want_meta = store.load_descriptors(reference, k)
    if a.shape != b.shape or not np.array_equal(np.asarray(a), np.asarray(b)):
      problems.append(f"{k}: descriptors differ")
  rows, want = got_meta["row"].tolist(), want_meta["row"].tolist()
  if rows != want:
    problems.append("row order or content differs")
  for c in ("path", "label", "width", "height"):
    if not np.array_equal(got_meta[c], want_meta[c]):
      problems.append(f"metadata column {c} differs")
  return len(set(want) - set(rows)), len(rows) - len(set(rows)), problems


def _rerun_to_the_end(tmp, images, out, weights, port, name) -> list[str]:
  """The same command without delay, to the end; returns the problems (empty: exit 0 on both)."""
  procs = _job(tmp, images, out, weights, port, name=name, delay=None)
  _wait_all(procs)
  if [p.code for p in procs] != [0, 0]:
    return [f"rerun exits {[p.code for p in procs]}: {[p.stderr()[-1500:] for p in procs]}"]
  return []


def test_processes_with_different_threshold_refuse_before_writing(many_images, tiny_weights,
                                                                  tmp_path, hostile):
  case = "2-process job: process 1 started with --threshold=0.3, process 0 with 0.5"
  hostile.declare(case)
  out = tmp_path / "out"
  procs = _job(tmp_path, many_images[0], out, tiny_weights, free_port_pair(), name="p",
               delay=None, per_process={1: ["--threshold=0.3"]})
  _wait_all(procs)
  checks = [_one_line(p, "extract: error: processes disagree on threshold (process 0: 0.5; "
                         "process 1: 0.3)", "nothing was written") for p in procs]
  codes = [p.code for p in procs]
  ok = codes == [1, 1] and all(c for c, _ in checks) and not out.exists()
  hostile.check(case, ok, f"exits {codes}, output {'made' if out.exists() else 'untouched'}: "
                f"{checks[0][1]}")
  assert ok, [p.stderr()[-2000:] for p in procs]


@pytest.mark.parametrize("view", ["a file missing", "a file changed"])
def test_processes_that_see_different_files_at_the_same_path_refuse(
    many_images, tiny_weights, tmp_path, hostile, view):
  case = "2 processes that see different file lists at the same path"
  hostile.declare(case)
  folder, paths = many_images
  rel = [pathlib.Path(p).relative_to(folder).as_posix() for p in paths]
  out = tmp_path / "out"
  if view == "a file missing":  # process 1's copy lacks the 57th file
    flags, must = [f"--hide={rel[56]}"], [
        f"processes disagree on input (process 0: {len(rel)} files; process 1: "
        f"{len(rel) - 1} files)", f"file 57 (in sorted order) is {rel[56]} on process 0; "
        f"{rel[57]} on process 1"]
  else:  # process 1's copy of the 8th file has another size and time
    flags, must = [f"--restamp={rel[7]}"], [
        f"processes disagree on input (process 0: {len(rel)} files; process 1: {len(rel)} "
        "files)", f"{rel[7]} differs: ", " bytes, modified ", "on process 0; ", "on process 1"]
  procs = _job(tmp_path, folder, out, tiny_weights, free_port_pair(), name="v", delay=None,
               views={1: flags})
  _wait_all(procs)
  checks = [_one_line(p, "extract: error: ", *must) for p in procs]
  codes = [p.code for p in procs]
  ok = codes == [1, 1] and all(c for c, _ in checks) and not out.exists()
  hostile.check(case, ok, f"{view}: exits {codes}: {checks[0][1]}")
  assert ok, [p.stderr()[-2000:] for p in procs]


@pytest.mark.parametrize("how", ["SIGTERM", "kill -9"])
def test_one_process_stopped_or_killed_then_rerun_equals_a_clean_run(
    many_images, tiny_weights, baseline, tmp_path, hostile, how):
  """Process 1, then (after a rerun got further) process 0 is sent SIGTERM / killed; a last
  rerun finishes. SIGTERM: both exit 130 having kept their finished rows; kill -9: the other
  exits 1 with one line naming the dead process and telling to rerun."""
  case = (f"{how} to one process of a 2-process job" if how == "SIGTERM" else
          f"{how} of one process of a 2-process job")
  hostile.declare(case)
  folder, _ = many_images
  out, port = tmp_path / "out", free_port_pair()
  hows, problems = [], []
  for victim in (1, 0):
    done = len(store.complete_shards(out)) if out.exists() else 0
    procs = _job(tmp_path, folder, out, tiny_weights, port, name=f"{how[:4]}{victim}")
    _wait_shards(procs, out, done + 2)
    t = time.monotonic()
    if how == "SIGTERM":
      procs[victim].popen.send_signal(signal.SIGTERM)
    else:
      procs[victim].popen.kill()
    _wait_all(procs)
    codes = [p.code for p in procs]
    left = NUM_IMAGES // 20 - len(store.complete_shards(out))
    if how == "SIGTERM":
      secs = max(p.ended for p in procs) - t
      said = all(f"extract: interrupted (SIGTERM to process {victim})" in p.stderr()
                 for p in procs)
      ok = codes == [130, 130] and said and _clean(procs) and left > 0
      hows.append(f"SIGTERM to process {victim}: both exit {codes} {secs:.1f} s after it")
    else:
      other = procs[1 - victim]
      secs = other.ended - t
      ok, line = _one_line(other, f"extract: error: process {victim} of 2 stopped responding",
                           "rerun the same command on every process")
      ok = ok and other.code == 1 and not _finished(out)  # the survivor may finish its
      # shards before it notices the loss, but the output is only finished by a rerun
      hows.append(f"kill -9 of process {victim}: the other exits {other.code} {secs:.1f} s "
                  f"after it: {line}")
    print(hows[-1])
    if not ok:
      problems.append(f"{hows[-1]} ({left} shards left): "
                      f"{[p.stderr()[-1500:] for p in procs]}")
  problems += _rerun_to_the_end(tmp_path, folder, out, tiny_weights, port, f"{how[:4]}end")
  lost, duplicated, differ = _compare(out, baseline[0]) if not problems else (0, 0, [])
  hostile.rows(lost=lost, duplicated=duplicated)
  ok = not problems and (lost, duplicated, differ) == (0, 0, [])
  hostile.check(case, ok, "; ".join(hows) + "; rerun equals a clean run row for row"
                if ok else f"{problems} {differ}")
  assert ok, (problems, lost, duplicated, differ)


def test_second_process_never_started(many_images, tiny_weights, tmp_path, hostile):
  case = "2-process job: second process never started"
  hostile.declare(case)
  out = tmp_path / "out"
  t = time.monotonic()
  p0 = _job(tmp_path, many_images[0], out, tiny_weights, free_port_pair(), name="alone",
            n=2, delay=None, extra=["--startup_timeout_s=5"], only=0)[0]
  _wait_all([p0])
  ok, line = _one_line(p0, "extract: error: process 1 of 2 did not join the coordinator",
                       "within 5 s")
  secs = p0.ended - t
  print(f"second process never started: process 0 exits {p0.code} {secs:.1f} s after its "
        f"start (--startup_timeout_s=5): {line}")
  ok = ok and p0.code == 1 and not out.exists()
  hostile.check(case, ok, f"exit {p0.code} after {secs:.1f} s (--startup_timeout_s=5, "
                f"default 45): {line}")
  assert ok, p0.stderr()[-3000:]


def test_another_job_on_the_coordinator_port_is_refused_and_harms_nothing(
    many_images, tiny_weights, baseline, tmp_path, hostile):
  case = "a second job reusing a running job's coordinator port"
  hostile.declare(case)
  folder, _ = many_images
  port = free_port_pair()
  a_out, b_out = tmp_path / "a", tmp_path / "b"
  a = _job(tmp_path, folder, a_out, tiny_weights, port, name="a")
  _wait_shards(a, a_out, 1)
  b = _job(tmp_path, folder, b_out, tiny_weights, port, name="b", delay=None)
  _wait_all(b)
  a_running = all(p.popen.poll() is None for p in a)
  _wait_all(a)
  b_ok = [_one_line(p, "extract: error:", e)
          for p, e in zip(b, ["in use by another job", "serves another job"])]
  codes_a, codes_b = [p.code for p in a], [p.code for p in b]
  lost, duplicated, differ = _compare(a_out, baseline[0]) if codes_a == [0, 0] else (0, 0, ["-"])
  hostile.rows(lost=lost, duplicated=duplicated)
  ok = (codes_b == [1, 1] and all(c for c, _ in b_ok) and not b_out.exists() and a_running
        and codes_a == [0, 0] and (lost, duplicated, differ) == (0, 0, []))
  hostile.check(case, ok, f"the intruders exit {codes_b}: {b_ok[0][1]} / {b_ok[1][1]}; the "
                f"running job went on and finished ({codes_a}), equal to a clean run")
  assert ok, ([p.stderr()[-1500:] for p in a + b], differ)


def test_two_process_run_killed_then_one_process_finishes_it(tiny_weights, tmp_path, hostile):
  """kill -9 of process 1 (process 0 then ends, keeping its finished rows), rerun with one
  process: it continues both processes' shards, lists every bad file once, in one failures
  file, and equals a clean run."""
  case = "2-process run killed, rerun with 1 process"
  hostile.declare(case)
  images = tmp_path / "imgs"
  write_small_images(images, 100)
  bad = {"a/zero.png": b"", "b/text.png": b"not a PNG", "b/cut.png": b"\x89PNG\r\n\x1a\n\0"}
  for rel, data in bad.items():
    (images / rel).write_bytes(data)
  reference = tmp_path / "clean"
  extract.run(job_config(images, reference, tiny_weights), log=lambda m: None)
  out, port = tmp_path / "out", free_port_pair()
  procs = _job(tmp_path, images, out, tiny_weights, port, name="k",
               extra=["--peer_timeout_s=3"])  # the survivor ends sooner (default 10 s)
  _wait_shards(procs, out, 1)
  procs[1].popen.kill()
  _wait_all(procs)
  kept = len(store.complete_shards(out))
  env = _env()
  one = _popen(job_command(images, out, tiny_weights), tmp_path, "one", env)
  _wait_all([one])
  files = sorted(f.name for f in out.glob("failures-*.tsv"))
  failed = sorted(pathlib.Path(p).relative_to(images).as_posix()
                  for p, _ in store.read_failures(out))
  lost, duplicated, differ = (_compare(out, reference) if one.code == 0 else (0, 0, ["-"]))
  hostile.rows(lost=lost, duplicated=duplicated)
  ok = (procs[0].code == 1 and one.code == 0 and files == ["failures-0.tsv"]
        and failed == sorted(bad) and (lost, duplicated, differ) == (0, 0, []) and kept < 6)
  hostile.check(case, ok, f"{kept} of 6 shards kept from the 2-process run; the 1-process "
                f"rerun exits {one.code}, failures files {files} listing {len(failed)} of "
                f"{len(bad)} bad files, equal to a clean run: {not differ}")
  assert ok, (procs[0].stderr()[-1500:], one.stderr()[-2000:], files, failed, differ)


# --- the toy job: cases the extraction job cannot reach cheaply -------------------------------

PEER_S = 3.0  # the watchdog's limit in the toy cases (default 10 s); startup below
STARTUP_S = 6.0
LONG = ("--steps=100000", "--step_delay_s=0.02")


def _toy(tmp: pathlib.Path, port: int, pid: int, *extra: str, name: str = "") -> Proc:
  cmd = [sys.executable, str(TOY), f"--coordinator=127.0.0.1:{port}", f"--process_id={pid}",
         f"--peer_s={PEER_S}", f"--startup_s={STARTUP_S}", *extra]
  return _popen(cmd, tmp, f"{name}toy{pid}", _env())


def _toy_job(tmp, *extra, n=2, name="", per_process=None) -> list[Proc]:
  port = free_port_pair()
  return [_toy(tmp, port, i, f"--num_processes={n}", *extra,
               *(per_process or {}).get(i, ()), name=name) for i in range(n)]


def _wait_steps(procs: list[Proc], n: int = 5, timeout: float = 90) -> None:
  """Until every toy process has made `n` steps (so the job runs when the case happens)."""
  t = time.monotonic()
  while not all(p.steps() >= n for p in procs):
    assert time.monotonic() - t < timeout, [p.stderr()[-2000:] for p in procs]
    assert all(p.popen.poll() is None for p in procs), [p.stderr()[-2000:] for p in procs]
    time.sleep(0.05)


def test_sigterm_to_the_process_still_stepping_stops_the_one_that_finished(tmp_path, hostile):
  """Process 0 finished its steps and waits for process 1 at the stop decision; process 1
  gets SIGTERM: both stop together with 130 (the decision is the same everywhere)."""
  case = "2-process job: SIGTERM to one process after the other finished its steps"
  hostile.declare(case)
  procs = _toy_job(tmp_path, "--step_delay_s=0.02", per_process={
      0: ["--steps=20"], 1: ["--steps=100000"]})
  _wait_steps(procs[1:], n=40)
  assert procs[0].popen.poll() is None and procs[0].steps() == 20
  t = time.monotonic()
  procs[1].popen.send_signal(signal.SIGTERM)
  _wait_all(procs)
  secs = max(p.ended for p in procs) - t
  codes = [p.code for p in procs]
  said = all("SIGTERM to process 1" in p.stderr() for p in procs)
  ok = hostile.check(case, codes == [130, 130] and said and _clean(procs),
                     f"exits {codes} in {secs:.1f} s")
  assert ok, [p.stderr()[-2000:] for p in procs]


def test_second_sigint_stops_every_process_at_once_with_130(tmp_path, hostile):
  case = "2-process job: second SIGINT to one process"
  hostile.declare(case)
  procs = _toy_job(tmp_path, *LONG)
  _wait_steps(procs)
  t = time.monotonic()
  procs[1].popen.send_signal(signal.SIGINT)
  time.sleep(0.05)
  procs[1].popen.send_signal(signal.SIGINT)
  _wait_all(procs)
  secs = max(p.ended for p in procs) - t
  codes = [p.code for p in procs]
  at_once = "stopped at once" in procs[0].stderr()  # else the first stop was already done
  ok = hostile.check(case, codes == [130, 130] and _clean(procs),
                     f"exits {codes} in {secs:.1f} s "
                     f"({'stopped at once' if at_once else 'stopped together'})")
  assert ok, [p.stderr()[-2000:] for p in procs]


def test_a_hung_process_is_named_by_the_other(tmp_path, hostile):
  case = "2-process job: one process hangs (SIGSTOP)"
  hostile.declare(case)
  procs = _toy_job(tmp_path, *LONG)
  _wait_steps(procs)
  t = time.monotonic()
  procs[1].popen.send_signal(signal.SIGSTOP)
  try:
    _wait_all(procs[:1])
  finally:
    procs[1].popen.send_signal(signal.SIGCONT)
  _wait_all(procs)
  secs = procs[0].ended - t
  ok0, line0 = _one_line(procs[0], "process 1 of 2 stopped responding")
  # The resumed process learns why from process 0, or finds the coordinator gone with it.
  ok1, line1 = _one_line(procs[1], "toy: error:")
  ok1 = ok1 and ("process 0 ended: process 1 of 2 stopped responding" in line1
                 or "lost contact with the coordinator" in line1)
  codes = [p.code for p in procs]
  ok = hostile.check(case, codes == [1, 1] and ok0 and ok1,
                     f"process 0 exits {codes[0]} after {secs:.1f} s: {line0}; the resumed "
                     f"one: {line1}")
  assert ok, [p.stderr()[-2000:] for p in procs]


def test_process_0_never_started(tmp_path, hostile):
  case = "2-process job: process 0 never started"
  hostile.declare(case)
  port = free_port_pair()
  p1 = _toy(tmp_path, port, 1, "--num_processes=2", *LONG)
  _wait_all([p1])
  ok_line, line = _one_line(p1, "toy: error: no coordinator answered", f"{port + 1}")
  ok = hostile.check(case, p1.code == 1 and ok_line, f"exit {p1.code}: {line}")
  assert ok, p1.stderr()[-3000:]


def test_the_same_job_started_twice_on_one_port_is_refused(tmp_path, hostile):
  case = "the same 2-process command started twice on one coordinator port"
  hostile.declare(case)
  port = free_port_pair()
  a = [_toy(tmp_path, port, i, "--num_processes=2", "--job=/out/a", *LONG, name="a")
       for i in range(2)]
  _wait_steps(a)
  b = [_toy(tmp_path, port, i, "--num_processes=2", "--job=/out/a", "--steps=5", name="b")
       for i in range(2)]
  _wait_all(b)
  # The running job is unharmed: it still steps, and still stops together on request.
  _wait_steps(a, n=min(p.steps() for p in a) + 5)
  a[0].popen.send_signal(signal.SIGTERM)
  _wait_all(a)
  b_ok = [_one_line(p, "toy: error:", e) for p, e in zip(b, ["this very job", "already joined"])]
  codes_a, codes_b = [p.code for p in a], [p.code for p in b]
  ok = hostile.check(case, codes_a == [130, 130] and codes_b == [1, 1]
                     and all(c for c, _ in b_ok),
                     f"the duplicates exit {codes_b}: {b_ok[0][1]} / {b_ok[1][1]}; the "
                     f"running job went on, then stopped on SIGTERM with {codes_a}")
  assert ok, [p.stderr()[-1500:] for p in a + b]
