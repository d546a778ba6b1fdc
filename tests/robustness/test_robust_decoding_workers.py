"""Hostile input trees and decode worker processes (issue 18, item 4).

Listing: a class folder that is a directory link, links that loop, a tree deeper than
Python's recursion limit, a FIFO named like an image. Decode workers
(`cbir_jax.decode_workers`): a worker stopped (SIGSTOP), alive but stuck in a read (a FIFO
that never gives data: what a dead network mount does), or dead before its first answer,
killed mid-stream, or the whole process group killed. Each ends with one line naming the worker and what to do, and leaves no worker
process and no shared memory behind. Times are measured and reported, not asserted tight;
a hang fails through a generous timeout.
"""
from __future__ import annotations

import errno
import os
import pathlib
import re
import signal
import subprocess
import tempfile
import threading
import time

import pytest

from cbir_jax import decode_workers, extract, store
from cbir_jax import input_pipeline as ip

from robust_common import NUM_IMAGES, job_command, job_config, write_small_images
from fs_helpers import rmtree_deep  # noqa: E402
import step_delay  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
NOISE = ("Traceback", "Broken pipe", "BrokenPipe", "Fatal Python", "core dumped")


def _quiet(msg: str) -> None:
  pass


# --- listing ---------------------------------------------------------------------------------


def test_a_class_folder_that_is_a_directory_link(tmp_path, tiny_weights, hostile):
  """30 of 34 images in a class folder that is a link elsewhere: all extracted, none lost."""
  name = "class folder that is a symlink to a directory (30 of 34 images)"
  hostile.declare(name)
  images = tmp_path / "imgs"
  write_small_images(images, 4, seed=3, classes=("a",))
  elsewhere = tmp_path / "disk2"
  linked = write_small_images(elsewhere, 30, seed=4, classes=("b",))
  os.symlink(elsewhere / "b", images / "b")
  out = tmp_path / "out"
  s = extract.run(job_config(images, out, tiny_weights), log=_quiet)
  _, meta = store.load_descriptors(out, "fc")
  paths = [str(p) for p in meta["path"].tolist()]
  via_link = [str(images / "b" / pathlib.Path(p).name) for p in linked]
  lost = len(set(via_link) - set(paths))
  hostile.rows(lost=lost, duplicated=len(paths) - len(set(paths)))
  ok = (s.images == 34 and lost == 0 and not s.skipped_line
        and sorted(set(meta["label_name"].tolist())) == ["a", "b"])
  hostile.check(name, ok, f"followed: {s.images} images extracted, labels a and b" if ok
                else f"{s.images} images, {lost} of the linked ones missing, {s.skipped_line!r}")
  assert ok, (s.images, lost, s.skipped_line)


def test_directory_links_that_loop_are_counted_and_said(tmp_path, tiny_weights, hostile, caplog):
  """Links to an ancestor and to themselves: not followed, counted, named; the job says so."""
  name = "directory symlinks looping to an ancestor (counted, warned, job says so)"
  hostile.declare(name)
  images = tmp_path / "imgs"
  write_small_images(images, 6, seed=5)
  os.symlink("..", images / "a" / "up")
  os.symlink(".", images / "b" / "self.jpg")  # a directory link with an image extension
  out = tmp_path / "out"
  with caplog.at_level("WARNING"):
    s = extract.run(job_config(images, out, tiny_weights), log=_quiet)
  ok = (s.images == 6 and s.skipped_line == "2 directory links not followed (a loop)"
        and "a/up" in caplog.text and "not followed" in caplog.text)
  hostile.check(name, ok, f"summary: {s.skipped_line!r}; a warning names {images}/a/up"
                if ok else f"{s.images} images, {s.skipped_line!r}")
  assert ok, (s.images, s.skipped_line, caplog.text[-500:])


def test_a_tree_deeper_than_the_recursion_limit(hostile):
  name = "1200 nested folders (deeper than Python's recursion limit)"
  hostile.declare(name)
  # Outside pytest's tmp_path: its cleanup (shutil.rmtree) recurses and fails on this tree.
  root = pathlib.Path(tempfile.mkdtemp(prefix="cbir-deep-"))
  parts = ["n"] * 1200
  try:
    for i in range(1, len(parts) + 1):  # one at a time: os.makedirs recurses
      os.mkdir(root.joinpath(*parts[:i]))
    write_small_images(root.joinpath(*parts), 2, seed=6, classes=("leaf",))
    labels, err = [r.label_name for r in ip.list_folder(root).records], ""
  except RecursionError as e:
    labels, err = [], repr(e)[:80]
  finally:
    rmtree_deep(root)
  got = len(labels)
  ok = labels == ["n", "n"]
  hostile.check(name, ok, "listed iteratively: both images, class of the top folder" if ok
                else err or f"{got} listed")
  assert ok, err


# --- decode workers in this process ----------------------------------------------------------


def _alive(pids) -> list[int]:
  import multiprocessing
  multiprocessing.active_children()  # reaps the finished ones
  out = []
  for pid in pids:
    try:
      os.kill(pid, 0)
      out.append(pid)
    except ProcessLookupError:
      pass
  return out


def _resume(pid: int) -> None:
  """Never leaves a stopped process behind, whatever happened (gone already: fine)."""
  try:
    os.kill(pid, signal.SIGCONT)
  except ProcessLookupError:
    pass


def _one_line(msg: str, *must: str) -> bool:
  return "\n" not in msg and all(m in msg for m in must)


def _worker_pids(stream) -> list[int]:
  """The pids of a stream's decode worker processes."""
  return [p.pid for p in stream._engine._workers._procs]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
  return write_small_images(tmp_path_factory.mktemp("photos") / "imgs", 40, seed=11)


def test_a_stopped_worker_is_named_within_the_timeout(photos, hostile):
  """SIGSTOP of one decode worker mid-stream: WorkerError naming it, not a hang."""
  name = "decode worker stopped (SIGSTOP) mid-stream: named within the timeout"
  hostile.declare(name)
  s = ip.image_batches(photos, image_size=16, batch_size=4, num_workers=2, num_threads=1)
  pids = _worker_pids(s)
  next(s)
  os.kill(pids[1], signal.SIGSTOP)
  t0 = time.monotonic()
  try:
    with pytest.raises(decode_workers.WorkerError) as e:
      for _ in s:  # a hang fails through the suite's timeout
        pass
    took = time.monotonic() - t0
  finally:
    _resume(pids[1])
  msg = str(e.value)
  ok = (_one_line(msg, f"decode worker 1 (pid {pids[1]})", "no heartbeat", "stopped", "rerun")
        and not _alive(pids))
  hostile.check(name, ok, f"after {took:.1f} s (timeout {decode_workers.SILENT_S:.0f} s): "
                f"{msg[:90]}...; workers ended" if ok else msg)
  assert ok, (msg, _alive(pids))
  assert took < 120, took


def _reader_arrives(fifo: pathlib.Path, timeout: float = 240,
                    alive: "subprocess.Popen | None" = None) -> tuple[int, float]:
  """Waits until a process opens `fifo` to read, then holds its write end open without
  writing: that read now hangs, as on a dead network mount. (write end, when it began)."""
  t0 = time.monotonic()
  while True:
    try:
      return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK), time.monotonic()
    except OSError as e:  # ENXIO: no reader yet
      assert e.errno == errno.ENXIO, e
    assert time.monotonic() - t0 < timeout and (alive is None or alive.poll() is None), \
        "nobody read the FIFO"
    time.sleep(0.02)


def test_a_worker_stuck_in_a_read_is_named_with_the_file(photos, tmp_path, hostile):
  """A decode worker alive, beating, but in a read that never returns (a blocking read of a
  FIFO with a writer that never writes: the kernel's wait of a dead network mount): named,
  with the file, within the peer timeout (SILENT_S) of the read's start, not waited for."""
  import worker_probe

  name = "decode worker stuck in a read (dead mount): named with the file within the timeout"
  hostile.declare(name)
  fifo = tmp_path / "stuck.png"
  os.mkfifo(fifo)
  keys = photos[:9] + [str(fifo)] + photos[9:20]
  s = ip.image_batches(keys, image_size=16, batch_size=4, num_workers=2, num_threads=1,
                       read=worker_probe.blocking_read)
  pids = _worker_pids(s)
  ended: list[tuple[BaseException | None, float]] = []

  def consume() -> None:  # reads start with the iteration: it runs while this one watches
    try:
      for _ in s:
        pass
      ended.append((None, time.monotonic()))
    except BaseException as e:  # noqa: BLE001 (checked below)
      ended.append((e, time.monotonic()))

  consumer = threading.Thread(target=consume, daemon=True)
  consumer.start()
  fd, began = _reader_arrives(fifo, timeout=60)
  try:
    consumer.join(120)  # a hang fails here
  finally:
    os.close(fd)
    s.close()
  assert ended and isinstance(ended[0][0], decode_workers.WorkerError), ended
  msg, took = str(ended[0][0]), ended[0][1] - began
  limit = decode_workers.SILENT_S + decode_workers.POLL_S + 2 * decode_workers.HEARTBEAT_S
  ok = (_one_line(msg, "has been reading", repr(str(fifo)), "dead network mount", "rerun")
        and re.match(r"decode worker [01] \(pid \d+\)", msg) is not None
        and took <= limit + 1.0 and not _alive(pids))
  hostile.check(name, ok, f"{took:.1f} s after the read began (timeout "
                f"{decode_workers.SILENT_S:.0f} s): {msg[:100]}...; workers ended" if ok
                else f"{took:.1f} s: {msg}")
  assert ok, (took, msg, _alive(pids))


def test_a_worker_dead_before_its_first_answer(photos, hostile):
  """SIGBUS (a full /dev/shm) before any answer: one line with the signal and its cause."""
  import worker_probe

  name = "decode worker killed by SIGBUS before its first answer"
  hostile.declare(name)
  s = ip.image_batches(photos, image_size=16, batch_size=4, num_workers=2, num_threads=1,
                       read=worker_probe.dies_at_once)
  pids = _worker_pids(s)
  with pytest.raises(decode_workers.WorkerError) as e:
    for _ in s:
      pass
  msg = str(e.value)
  ok = (_one_line(msg, "is gone, killed by SIGBUS before its first answer", "shared memory",
                  "--shm-size") and "__main__" not in msg and not _alive(pids))
  hostile.check(name, ok, msg[:110] + "..." if ok else msg)
  assert ok, msg


# --- decode workers of a job ----------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  env.update(extra)
  return env


def _decode_workers_of(pid: int) -> list[int]:
  """The spawned decode worker processes of `pid`, in start order (by pid)."""
  out = []
  for d in pathlib.Path("/proc").iterdir():
    if not d.name.isdigit():
      continue
    try:
      ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
      cmd = (d / "cmdline").read_bytes()
    except (OSError, IndexError, ValueError):
      continue
    if ppid == pid and b"spawn_main" in cmd:
      out.append(int(d.name))
  return sorted(out)


@pytest.fixture(scope="module")
def job_images(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp("job") / "imgs"
  write_small_images(folder, NUM_IMAGES, seed=12)
  return folder


def _start_job(job_images, tmp_path, tiny_weights, **popen) -> tuple[subprocess.Popen, list[int]]:
  """The job with 2 decode workers, slowed to run a minute; once both workers run.

  Its output goes to files (tmp_path/job.err): the workers inherit them, and a stopped
  worker would hold a pipe open after the job ended.
  """
  cmd = job_command(job_images, tmp_path / "out", tiny_weights, "--num_workers=2")
  with open(tmp_path / "job.out", "w") as o, open(tmp_path / "job.err", "w") as e:
    p = subprocess.Popen(cmd, stdout=o, stderr=e, env=step_delay.env(0.3, _env()),
                         **popen)
  p.err_path = tmp_path / "job.err"
  t0 = time.monotonic()
  while len(workers := _decode_workers_of(p.pid)) < 2:
    if p.poll() is not None or time.monotonic() - t0 > 240:
      p.kill()
      pytest.fail(f"the job did not start its decode workers: {_stderr(p)[-2000:]}")
    time.sleep(0.1)
  while "images/s" not in _stderr(p):  # its first progress line: into the steps
    if p.poll() is not None or time.monotonic() - t0 > 240:
      p.kill()
      pytest.fail(f"the job did not start its steps: {_stderr(p)[-2000:]}")
    time.sleep(0.1)
  return p, workers


def _stderr(p: subprocess.Popen) -> str:
  return p.err_path.read_text(errors="replace")


def _ended(p: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
  try:
    p.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    for w in _decode_workers_of(p.pid):
      os.kill(w, signal.SIGKILL)
    p.kill()
    p.wait()
    pytest.fail(f"hung: {_stderr(p)[-2000:]}")
  return p.returncode, _stderr(p)


def _error_lines(err: str) -> list[str]:
  return [ln for ln in err.splitlines() if ln.startswith("extract:")]


def test_job_stops_within_10s_of_sigterm_with_a_stopped_worker(job_images, tmp_path,
                                                               tiny_weights, hostile):
  """SIGSTOP of a worker, then SIGTERM to the job: it stops after the step in flight (130),
  or, when that step waits for the stopped worker, names it in one line (1)."""
  name = "job with a SIGSTOPped decode worker: first SIGTERM stops it within 10 s"
  hostile.declare(name)
  p, workers = _start_job(job_images, tmp_path, tiny_weights)
  os.kill(workers[1], signal.SIGSTOP)
  try:
    time.sleep(4)  # the batches decoded ahead are used up: the job waits for the worker
    os.kill(p.pid, signal.SIGTERM)
    t0 = time.monotonic()
    code, err = _ended(p)
    took = time.monotonic() - t0
  finally:
    _resume(workers[1])
  lines = _error_lines(err)
  named = f"decode worker 1 (pid {workers[1]}) sent no heartbeat"
  one = (len(lines) == 1 and not any(n in err for n in NOISE)
         and (code == 130 and "interrupted (SIGTERM" in lines[0]
              or code == 1 and named in lines[0]))
  ok = one and took < 10 and not _alive(workers)
  hostile.check(name, ok, f"exit {code} {took:.1f} s after SIGTERM: {lines[0][:100]}..."
                if one else f"exit {code}, {took:.1f} s: {err[-300:]}")
  assert one and not _alive(workers), (code, took, err[-3000:])


def test_job_with_a_killed_worker_says_so(job_images, tmp_path, tiny_weights, hostile):
  name = "job's decode worker SIGKILLed: one line saying it died (not 'Broken pipe')"
  hostile.declare(name)
  p, workers = _start_job(job_images, tmp_path, tiny_weights)
  os.kill(workers[0], signal.SIGKILL)
  code, err = _ended(p)
  lines = _error_lines(err)
  ok = (code == 1 and len(lines) == 1 and not any(n in err for n in NOISE)
        and re.search(rf"decode worker 0 \(pid {workers[0]}\) is gone, killed by SIGKILL",
                      lines[0]) is not None and not _alive(workers))
  hostile.check(name, ok, lines[0][:120] + "..." if ok else f"exit {code}: {err[-300:]}")
  assert ok, (code, err[-3000:])


def _shm_files_mapped(pid: int) -> set[str]:
  with open(f"/proc/{pid}/maps") as f:
    return {ln.split(None, 5)[5].strip() for ln in f
            if len(ln.split(None, 5)) == 6 and ("/dev/shm/" in ln or "memfd:" in ln)}


def test_killing_the_process_group_leaves_no_shared_memory(job_images, tmp_path, tiny_weights,
                                                           hostile):
  name = "whole process group SIGKILLed: no /dev/shm segment left"
  hostile.declare(name)
  p, workers = _start_job(job_images, tmp_path, tiny_weights, start_new_session=True)
  mapped = set().union(*(_shm_files_mapped(w) for w in workers))
  os.killpg(p.pid, signal.SIGKILL)
  _ended(p)
  t0 = time.monotonic()
  while _alive(workers) and time.monotonic() - t0 < 30:
    time.sleep(0.1)
  named = sorted(m for m in mapped if m.startswith("/dev/shm/"))
  left = [m for m in named if os.path.exists(m.replace(" (deleted)", ""))]
  ok = bool(mapped) and not left and not _alive(workers)
  hostile.check(name, ok, f"workers mapped {sorted(mapped)}; nothing named left" if ok
                else f"left {left}, mapped {sorted(mapped)}")
  for m in left:  # do not leave the old code's leak on this machine
    os.unlink(m)
  assert ok, (left, sorted(mapped))



def _serve_once(fifo: pathlib.Path, data: bytes, done: threading.Event) -> threading.Thread:
  """A thread that gives the FIFO's next reader `data`, then EOF (or stops at `done`)."""
  def serve() -> None:
    while not done.is_set():
      try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
      except OSError:  # no reader yet
        time.sleep(0.02)
        continue
      os.set_blocking(fd, True)
      try:
        os.write(fd, data)  # a small PNG: fits the pipe's buffer
      finally:
        os.close(fd)
      return

  t = threading.Thread(target=serve, daemon=True)
  t.start()
  return t


def test_first_sigterm_with_a_worker_stuck_in_a_read_stops_within_10s(tmp_path, tiny_weights,
                                                                        hostile):
  """A file list whose 26th file reads like a dead mount (a FIFO read blocking in a decode
  worker). SIGTERM as that read begins: the job stops within 10 s with one line (130) and
  no worker left; the rerun, the file now answering, finishes equal to a clean run."""
  import numpy as np

  from cbir_jax.descriptors import KINDS

  name = "first SIGTERM with a decode worker stuck in a read: stops within 10 s, rerun equal"
  hostile.declare(name)
  images = write_small_images(tmp_path / "imgs", 40, seed=13, classes=("a",))
  fifo = tmp_path / "imgs" / "a" / "stuck.png"
  os.mkfifo(fifo)
  png = pathlib.Path(images[25]).read_bytes()
  listed = images[:25] + [str(fifo)] + images[25:]
  (tmp_path / "list.txt").write_text("".join(f"{p}\n" for p in listed))

  def command(out: pathlib.Path) -> list[str]:
    cmd = job_command(tmp_path / "imgs", out, tiny_weights, "--num_workers=2")
    return [f"--file_list={tmp_path / 'list.txt'}" if c.startswith("--images=") else c
            for c in cmd]

  def job(out: pathlib.Path, env: dict[str, str], log: str) -> subprocess.Popen:
    with open(tmp_path / log, "w") as f:
      return subprocess.Popen(command(out), stdout=f, stderr=subprocess.STDOUT, env=env)

  blocking = step_delay.fifo_reads_block(_env())
  done = threading.Event()
  try:
    _serve_once(fifo, png, done)
    ref = job(tmp_path / "ref", blocking, "ref.log")
    assert ref.wait(240) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    p = job(tmp_path / "out", step_delay.env(0.3, blocking), "job.log")
    fd, _ = _reader_arrives(fifo, alive=p)
    try:
      workers = _decode_workers_of(p.pid)
      p.send_signal(signal.SIGTERM)
      t0 = time.monotonic()
      code = p.wait(60)
      took = time.monotonic() - t0
    finally:
      os.close(fd)
    err = (tmp_path / "job.log").read_text(errors="replace")
    lines = _error_lines(err)
    stopped = (code == 130 and len(lines) == 1 and "interrupted (SIGTERM" in lines[0]
               and not any(n in err for n in NOISE) and took < 10 and not _alive(workers))
    _serve_once(fifo, png, done)
    rerun = job(tmp_path / "out", blocking, "rerun.log")
    assert rerun.wait(240) == 0, (tmp_path / "rerun.log").read_text()[-2000:]
  finally:
    done.set()
  (_, want), (_, got) = (store.load_descriptors(tmp_path / o, "fc") for o in ("ref", "out"))
  rows, ref_rows = got["row"].tolist(), want["row"].tolist()
  lost, dup = len(set(ref_rows) - set(rows)), len(rows) - len(set(rows))
  hostile.rows(lost=lost, duplicated=dup)
  same = rows == ref_rows and all(
      np.array_equal(np.asarray(store.load_descriptors(tmp_path / "out", k)[0]),
                     np.asarray(store.load_descriptors(tmp_path / "ref", k)[0])) for k in KINDS)
  ok = stopped and same and len(rows) == 41
  hostile.check(name, ok, f"exit {code} {took:.1f} s after SIGTERM: {lines[0][:80]}...; "
                f"rerun finished, {len(rows)} rows equal to a clean run" if ok
                else f"exit {code}, {took:.1f} s, lines {lines}, {len(rows)} rows, same {same}")
  assert ok, (code, took, err[-3000:], len(rows), same)
