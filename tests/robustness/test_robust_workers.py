"""Independent workers (issue 18): the real extraction job as 2-3 local worker processes of
2 fake CPU devices each, with the tiny backbone.

Workers never talk to each other: a worker that is killed, stopped or refused must not stop
the others; a rerun of its index (or the whole job, any worker count) completes the job, and
the result equals a clean one-worker run row for row (bitwise: the same per-device batch).
Each case checks exit codes and that a worker that ends says why in exactly one line. Times
are printed, not asserted; a hang fails the test through its timeout.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from cbir_jax import store
from cbir_jax.descriptors import KINDS

import step_delay
from robust_common import job_command

HERE = pathlib.Path(__file__).resolve().parent
OTHER_VIEW = HERE / "other_view.py"
REPO = HERE.parents[1]
NOISE = ("Traceback", "Check failure", "Terminating process", "Fatal Python", "Aborted",
         "core dumped", "peer ranks")  # "peer ranks": Gloo's line, gone with the coordinator
STEP_DELAY_S = 0.2  # per step (4 rows), so that signals and kills land mid-job
NUM_PHOTOS = 240  # 12 shards of 20: 4 per worker of 3


@dataclasses.dataclass
class Proc:
  popen: subprocess.Popen
  out: pathlib.Path
  err: pathlib.Path
  ended: float | None = None

  def stderr(self) -> str:
    return self.err.read_text(errors="replace")

  @property
  def code(self) -> int | None:
    return self.popen.returncode


def _env(delay: float | None) -> dict[str, str]:
  """2 fake CPU devices per worker, the other XLA flags as the test process has them."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  for k in [k for k in env if k.startswith(("SLURM_", "CBIR_JAX_WORKER"))] + [
      "JOB_COMPLETION_INDEX"]:
    env.pop(k, None)  # a test run inside a SLURM job must not read its variables
  return step_delay.env(delay, env) if delay else env


def _start(tmp: pathlib.Path, images, out, weights, name: str, *flags: str,
           delay: float | None = STEP_DELAY_S, view: list[str] | None = None) -> Proc:
  cmd = job_command(images, out, weights, *flags)
  if view:  # as if this worker's host had another copy of the input (other_view.py)
    cmd = [cmd[0], str(OTHER_VIEW), *view, "--", *cmd[2:]]
  o, e = tmp / f"{name}.out", tmp / f"{name}.err"
  with open(o, "w") as fo, open(e, "w") as fe:
    return Proc(subprocess.Popen(cmd, stdout=fo, stderr=fe, env=_env(delay)), o, e)


def _workers(tmp, images, out, weights, name, n=3, only=None, delay=STEP_DELAY_S, extra=()):
  return [_start(tmp, images, out, weights, f"{name}{i}", f"--worker={i}", f"--workers={n}",
                 *extra, delay=delay) for i in (range(n) if only is None else only)]


def _wait_all(procs: list[Proc], timeout: float = 300) -> None:
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


def _wait_shard(procs: list[Proc], out: pathlib.Path, k: int, timeout: float = 300) -> None:
  """Until shard `k` is complete (the first of a worker's four: the case lands mid-job)."""
  t = time.monotonic()
  while not (out.exists() and k in store.complete_shards(out)):
    assert time.monotonic() - t < timeout, [p.stderr()[-2000:] for p in procs]
    assert all(p.popen.poll() is None for p in procs), [p.stderr()[-2000:] for p in procs]
    time.sleep(0.02)


def _one_line(p: Proc, *must: str) -> tuple[bool, str]:
  """(whether stderr has exactly one error line holding all of `must`, and no crash noise;
  that line)."""
  text = p.stderr()
  lines = [ln for ln in text.splitlines() if ln.startswith("extract: ")]
  hit = [ln for ln in lines if all(m in ln for m in must)]
  clean = not any(n in text for n in NOISE)
  return len(lines) == 1 and len(hit) == 1 and clean, (hit or lines or [text[-300:]])[0]


def _clean(procs: list[Proc]) -> bool:
  return not any(n in p.stderr() for p in procs for n in NOISE)


def _finished(out: pathlib.Path) -> bool:
  try:
    return store.load_manifest(out).complete
  except (OSError, ValueError, store.StoreError):
    return False


def _compare(out: pathlib.Path, reference: pathlib.Path) -> tuple[int, int, list[str]]:
  """(rows lost, rows duplicated, other differences) of a finished output vs a clean run's."""
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
  if sorted(store.read_failures(out)) != sorted(store.read_failures(reference)):
    problems.append("failures differ")
  return len(set(want) - set(rows)), len(rows) - len(set(rows)), problems


@pytest.fixture(scope="module")
def photos(imagenet_sample, tmp_path_factory):
  """The first NUM_PHOTOS real photos of imagenet-sample, copied (the data stays read-only)."""
  import shutil

  folder = tmp_path_factory.mktemp("photos") / "images"
  folder.mkdir()
  for p in sorted(imagenet_sample.glob("*.JPEG"))[:NUM_PHOTOS]:
    shutil.copy2(p, folder / p.name)
  return folder


@pytest.fixture(scope="module")
def clean_run(photos, tiny_weights, tmp_path_factory):
  """One worker, no delay, in a subprocess of the same devices: the reference."""
  tmp = tmp_path_factory.mktemp("clean")
  p = _start(tmp, photos, tmp / "out", tiny_weights, "clean", delay=None)
  _wait_all([p])
  assert p.code == 0, p.stderr()[-3000:]
  return tmp / "out"


def _record(hostile, case, ok, how, out=None, reference=None):
  lost, duplicated, differ = _compare(out, reference) if ok and out else (0, 0, [])
  hostile.rows(lost=lost, duplicated=duplicated)
  ok = ok and (lost, duplicated, differ) == (0, 0, [])
  hostile.check(case, ok, how if ok else f"{how}; {differ}")
  return ok, differ


STOP_S = 60.0  # the figure


@pytest.fixture(scope="module")
def sigstopped(photos, tiny_weights, tmp_path_factory):
  """3 workers; worker 0 stopped (SIGSTOP) once its first shard is written and continued
  (SIGCONT) by a timer STOP_S later, so the stop runs while the module's other cases do;
  the case's test is the module's last. Yields (procs, out, the timer, what was seen when
  it continued worker 0)."""
  tmp = tmp_path_factory.mktemp("sigstop")
  out = tmp / "out"
  procs = _workers(tmp, photos, out, tiny_weights, "s")
  seen: dict = {}

  def cont() -> None:
    seen.update(others=[p.popen.poll() for p in procs[1:]], finished=_finished(out),
                alive=procs[0].popen.poll() is None, stopped_for=time.monotonic() - t0,
                others_last=max(p.err.stat().st_mtime for p in procs[1:]) - wall0)
    procs[0].popen.send_signal(signal.SIGCONT)

  timer = None
  try:
    _wait_shard(procs, out, 0)
    procs[0].popen.send_signal(signal.SIGSTOP)
    t0, wall0 = time.monotonic(), time.time()
    timer = threading.Timer(STOP_S, cont)
    timer.start()
    yield procs, out, timer, seen
  finally:  # never leave a stopped or running worker behind
    if timer is not None:
      timer.cancel()
    for p in procs:
      if p.popen.poll() is None:
        p.popen.send_signal(signal.SIGCONT)
        p.popen.kill()
        p.popen.wait()


def test_kill_9_of_one_worker_the_others_finish_rerun_completes(
    sigstopped, photos, tiny_weights, clean_run, tmp_path, hostile):
  # `sigstopped` first: that case's 60 s stop starts now and runs during the other cases.
  case = "kill -9 of one of 3 workers mid-job"
  hostile.declare(case)
  out = tmp_path / "out"
  procs = _workers(tmp_path, photos, out, tiny_weights, "k")
  _wait_shard(procs, out, 4)
  procs[1].popen.kill()
  _wait_all(procs)
  codes = [p.code for p in procs]
  ok = codes == [0, -signal.SIGKILL, 0] and _clean(procs) and not _finished(out)
  how = f"the others exit {codes[0]}, {codes[2]} (the killed one {codes[1]})"
  rerun = _workers(tmp_path, photos, out, tiny_weights, "r", only=[1], delay=None)
  _wait_all(rerun)
  ok = ok and rerun[0].code == 0 and _finished(out) and _clean(rerun)
  how += f"; rerunning worker 1 exits {rerun[0].code} and finishes the job"
  print(how)
  ok, differ = _record(hostile, case, ok, how + ", equal to a clean run row for row", out,
                       clean_run)
  assert ok, ([p.stderr()[-1500:] for p in procs + rerun], differ)


def test_sigterm_to_one_worker_then_the_whole_job_rerun_with_one_worker(
    photos, tiny_weights, clean_run, tmp_path, hostile):
  """SIGTERM: that worker stops after its step with 130 keeping its rows, the others go on;
  rerunning the job as ONE worker continues every worker's shards (any count continues)."""
  case = "SIGTERM to one of 3 workers, the job rerun with 1 worker"
  hostile.declare(case)
  out = tmp_path / "out"
  procs = _workers(tmp_path, photos, out, tiny_weights, "t")
  _wait_shard(procs, out, 8)
  procs[2].popen.send_signal(signal.SIGTERM)
  _wait_all(procs)
  codes = [p.code for p in procs]
  said, line = _one_line(procs[2], "extract: interrupted (SIGTERM to worker 2)",
                         "Rerun the same command")
  ok = codes == [0, 0, 130] and said and _clean(procs) and not _finished(out)
  one = _start(tmp_path, photos, out, tiny_weights, "one", delay=None)
  _wait_all([one])
  ok = ok and one.code == 0 and _finished(out)
  how = f"exits {codes}: {line}; one worker then exits {one.code} and finishes"
  print(how)
  ok, differ = _record(hostile, case, ok, how + ", equal to a clean run", out, clean_run)
  assert ok, ([p.stderr()[-1500:] for p in procs + [one]], differ)


def test_a_worker_with_other_settings_is_refused_and_mixes_nothing(
    photos, tiny_weights, clean_run, tmp_path, hostile):
  case = "workers of one job started with different settings"
  hostile.declare(case)
  out = tmp_path / "out"
  first = _workers(tmp_path, photos, out, tiny_weights, "a", n=2, only=[0])
  _wait_shard(first, out, 0)
  other = _workers(tmp_path, photos, out, tiny_weights, "b", n=2, only=[1],
                   extra=["--threshold=0.3"], delay=None)
  _wait_all(other)
  refused, line = _one_line(other[0], "extract: error: ", "other settings",
                            "threshold: 0.5 in the directory, 0.3 now")
  _wait_all(first)
  ok = other[0].code == 1 and refused and first[0].code == 0
  rest = _workers(tmp_path, photos, out, tiny_weights, "c", n=2, only=[1], delay=None)
  _wait_all(rest)
  ok = ok and rest[0].code == 0 and _finished(out)
  how = f"the later worker exits {other[0].code}: {line}; the job then finishes as before"
  print(how)
  ok, differ = _record(hostile, case, ok, how + ", equal to a clean run", out, clean_run)
  assert ok, ([p.stderr()[-1500:] for p in first + other + rest], differ)


@pytest.mark.parametrize("view", ["a file missing", "a file changed"])
def test_a_worker_that_sees_other_files_is_refused(photos, tiny_weights, tmp_path, hostile,
                                                    view):
  case = "workers that see different file lists at the same path"
  hostile.declare(case)
  rel = sorted(p.name for p in photos.iterdir())
  out = tmp_path / "out"
  first = _workers(tmp_path, photos, out, tiny_weights, "a", n=2, only=[0], delay=None)
  _wait_all(first)
  flag = f"--hide={rel[56]}" if view == "a file missing" else f"--restamp={rel[7]}"
  must = (["1 removed", rel[56]] if view == "a file missing" else ["1 changed", rel[7]])
  p = _start(tmp_path, photos, out, tiny_weights, "b", "--worker=1", "--workers=2",
             delay=None, view=[flag])
  _wait_all([p])
  refused, line = _one_line(p, "extract: error: ", "another input", *must)
  ok = first[0].code == 0 and p.code == 1 and refused and not _finished(out)
  hostile.check(case, ok, f"{view}: the later worker exits {p.code}: {line}")
  assert ok, (first[0].stderr()[-1500:], p.stderr()[-2000:])


def _task_pid(out: pathlib.Path, index: int) -> int | None:
  """The process of worker task `index` of the Ray job writing `out` (its command line holds
  the job's settings, its environment the worker index), if running."""
  for d in pathlib.Path("/proc").iterdir():
    try:
      cmd = (d / "cmdline").read_bytes().split(b"\0")
      if b"cbir_jax.ray_job" not in cmd or not any(str(out).encode() in c for c in cmd):
        continue
      env = (d / "environ").read_bytes().split(b"\0")
    except (OSError, ValueError):
      continue
    if f"CBIR_JAX_WORKER={index}".encode() in env:
      return int(d.name)
  return None


def test_ray_job_with_a_task_killed_once_equals_a_clean_run(photos, tiny_weights, clean_run,
                                                            tmp_path, hostile):
  """launch/extract.py --ray on a local Ray instance: 3 worker tasks; worker 1's process is
  killed once mid-job; Ray retries the task, which continues its shards; the job finishes
  and equals a clean one-worker run row for row."""
  pytest.importorskip("ray")
  case = "Ray job of 3 worker tasks, one task killed once"
  hostile.declare(case)
  out = tmp_path / "out"
  p = _start(tmp_path, photos, out, tiny_weights, "ray", "--ray", "--workers=3",
             "--ray_cpus=0.5", "--ray_retries=2")
  _wait_shard([p], out, 4, timeout=400)
  pid = _task_pid(out, 1)
  assert pid is not None, p.stderr()[-2000:]
  os.kill(pid, signal.SIGKILL)
  _wait_all([p], timeout=400)
  ok = p.code == 0 and _finished(out) and "Traceback" not in p.stderr()
  how = f"worker 1's process killed once; the job exits {p.code} after Ray's retry"
  print(how)
  ok, differ = _record(hostile, case, ok, how + ", equal to a clean run", out, clean_run)
  assert ok, (p.stderr()[-3000:], differ)


def test_sigstop_of_one_worker_for_60s_the_others_finish_without_it(
    sigstopped, clean_run, hostile):
  """Worker 0 stopped for STOP_S (from the module's first case on): the other two finished
  meanwhile; continued, it finishes the job, equal to a clean run."""
  case = "SIGSTOP of one of 3 workers for 60 s"
  hostile.declare(case)
  procs, out, timer, seen = sigstopped
  timer.join(STOP_S + 60)
  _wait_all(procs)
  ok = (seen.get("others") == [0, 0] and seen["alive"] and not seen["finished"]
        and seen["stopped_for"] >= STOP_S and [p.code for p in procs] == [0, 0, 0]
        and _finished(out) and _clean(procs))
  how = (f"the others exit {seen.get('others')} (last line {seen.get('others_last', -1):.1f} s "
         f"into the stop); continued after {seen.get('stopped_for', -1):.1f} s, the stopped "
         f"one exits {procs[0].code} and finishes")
  print(how)
  ok, differ = _record(hostile, case, ok, how + ", equal to a clean run", out, clean_run)
  assert ok, ([p.stderr()[-1500:] for p in procs], differ, seen)
