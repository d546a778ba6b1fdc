"""Multi-process hostile cases on a toy job (toy_job.py): 2 local processes on 2 fake CPU
devices each, killed, stopped, hung, started with other settings, or joined by another job.

Each case checks exit codes and that a survivor says why in exactly one line (no
Python traceback, no native abort). Times are measured and reported in the ledger,
not asserted; a hang fails the test through its timeout.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

TOY = pathlib.Path(__file__).with_name("toy_job.py")
REPO = pathlib.Path(__file__).resolve().parents[2]
PEER_S = 3.0  # the watchdog's limit in these tests (default 10 s); startup below
STARTUP_S = 6.0
NOISE = ("Traceback", "Check failure", "Terminating process", "Fatal Python", "Aborted",
         "core dumped")


def _free_port_pair() -> int:
  for _ in range(50):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    try:
      with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", port))
        b.bind(("127.0.0.1", port + 1))
      return port
    except OSError:
      continue
  raise RuntimeError("no free port pair")


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


def _start(tmp: pathlib.Path, port: int, pid: int, *extra: str, name: str = "") -> Proc:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  out, err = tmp / f"{name}out{pid}.log", tmp / f"{name}err{pid}.log"
  cmd = [sys.executable, str(TOY), f"--coordinator=127.0.0.1:{port}", f"--process_id={pid}",
         f"--peer_s={PEER_S}", f"--startup_s={STARTUP_S}", *extra]
  with open(out, "w") as o, open(err, "w") as e:
    return Proc(subprocess.Popen(cmd, stdout=o, stderr=e, env=env), out, err)


def _job(tmp, *extra, n=2, name="", per_process=None) -> list[Proc]:
  port = _free_port_pair()
  return [_start(tmp, port, i, f"--num_processes={n}", *extra,
                 *(per_process or {}).get(i, ()), name=name) for i in range(n)]


def _wait_steps(procs: list[Proc], n: int = 5, timeout: float = 90) -> None:
  """Until every process has made `n` steps (so the job runs when the case happens)."""
  t = time.monotonic()
  while not all(p.steps() >= n for p in procs):
    assert time.monotonic() - t < timeout, [p.stderr()[-2000:] for p in procs]
    assert all(p.popen.poll() is None for p in procs), [p.stderr()[-2000:] for p in procs]
    time.sleep(0.05)


def _wait_all(procs: list[Proc], timeout: float = 120) -> None:
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
  """(whether stderr has exactly one line with all of `must` and no crash noise, the line)."""
  text = p.stderr()
  lines = [l for l in text.splitlines() if " error: " in l or l.startswith("toy: process ")
           and " ended" in l]
  hit = [l for l in lines if all(m in l for m in must)]
  clean = not any(n in text for n in NOISE)
  return len(lines) == 1 and len(hit) == 1 and clean, (hit or lines or [text[-300:]])[0]


LONG = ("--steps=100000", "--step_delay_s=0.02")


@pytest.mark.parametrize("victim,when", [(1, "mid-job"), (0, "mid-job"),
                                         (1, "after process 0 finished its steps")])
def test_sigterm_to_one_process_stops_both_with_130(tmp_path, hostile, victim, when):
  case = "2-process job: SIGTERM to one process"
  hostile.declare(case)
  if when == "mid-job":
    procs = _job(tmp_path, *LONG)
    _wait_steps(procs)
  else:  # process 0 waits at the end for process 1, which then gets the signal
    procs = _job(tmp_path, "--step_delay_s=0.02", per_process={
        0: ["--steps=20"], 1: ["--steps=100000"]})
    _wait_steps(procs[1:], n=40)
    assert procs[0].popen.poll() is None and procs[0].steps() == 20
  t = time.monotonic()
  procs[victim].popen.send_signal(signal.SIGTERM)
  _wait_all(procs)
  secs = max(p.ended for p in procs) - t
  codes = [p.popen.returncode for p in procs]
  said = all(f"SIGTERM to process {victim}" in p.stderr() for p in procs)
  clean = not any(n in p.stderr() for p in procs for n in NOISE)
  print(f"SIGTERM to process {victim} ({when}): both ended {codes} in {secs:.1f} s")
  ok = hostile.check(case, codes == [130, 130] and said and clean,
                     f"SIGTERM to process {victim} ({when}): exits {codes} in {secs:.1f} s")
  assert ok, [p.stderr()[-2000:] for p in procs]


def test_second_sigint_stops_every_process_at_once_with_130(tmp_path, hostile):
  case = "2-process job: second SIGINT to one process"
  hostile.declare(case)
  procs = _job(tmp_path, *LONG)
  _wait_steps(procs)
  t = time.monotonic()
  procs[1].popen.send_signal(signal.SIGINT)
  time.sleep(0.05)
  procs[1].popen.send_signal(signal.SIGINT)
  _wait_all(procs)
  secs = max(p.ended for p in procs) - t
  codes = [p.popen.returncode for p in procs]
  clean = not any(n in p.stderr() for p in procs for n in NOISE)
  at_once = "stopped at once" in procs[0].stderr()  # else the first stop was already done
  ok = hostile.check(case, codes == [130, 130] and clean,
                     f"exits {codes} in {secs:.1f} s "
                     f"({'stopped at once' if at_once else 'stopped together'})")
  assert ok, [p.stderr()[-2000:] for p in procs]


@pytest.mark.parametrize("victim", [1, 0])
def test_kill_9_of_one_process_ends_the_other_with_one_line(tmp_path, hostile, victim):
  case = "2-process job: kill -9 of one process"
  hostile.declare(case)
  procs = _job(tmp_path, *LONG)
  _wait_steps(procs)
  t = time.monotonic()
  procs[victim].popen.kill()
  _wait_all(procs)
  other = procs[1 - victim]
  secs = other.ended - t
  ok_line, line = _one_line(other, "toy: error:", f"process {victim} of 2 stopped responding",
                            "rerun")
  print(f"kill -9 of process {victim}: the other ended {other.popen.returncode} after "
        f"{secs:.1f} s (peer_s={PEER_S}): {line}")
  ok = hostile.check(case, other.popen.returncode == 1 and ok_line,
                     f"kill -9 of process {victim}: the other exits "
                     f"{other.popen.returncode} after {secs:.1f} s: {line}")
  assert ok, other.stderr()[-3000:]


def test_a_hung_process_is_named_by_the_other(tmp_path, hostile):
  case = "2-process job: one process hangs (SIGSTOP)"
  hostile.declare(case)
  procs = _job(tmp_path, *LONG)
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
  codes = [p.popen.returncode for p in procs]
  ok = hostile.check(case, codes == [1, 1] and ok0 and ok1,
                     f"process 0 exits {codes[0]} after {secs:.1f} s: {line0}; the resumed "
                     f"one: {line1}")
  assert ok, [p.stderr()[-2000:] for p in procs]


def test_second_process_never_started(tmp_path, hostile):
  case = "2-process job: second process never started"
  hostile.declare(case)
  port = _free_port_pair()
  t = time.monotonic()
  p0 = _start(tmp_path, port, 0, "--num_processes=2", *LONG)
  _wait_all([p0])
  secs = p0.ended - t
  ok_line, line = _one_line(p0, "toy: error: process 1 of 2 did not join", "within 6 s")
  print(f"second process never started: process 0 ended {p0.popen.returncode} after "
        f"{secs:.1f} s (startup_s={STARTUP_S}, plus start-up): {line}")
  ok = hostile.check(case, p0.popen.returncode == 1 and ok_line,
                     f"exit {p0.popen.returncode} after {secs:.1f} s: {line}")
  assert ok, p0.stderr()[-3000:]


def test_process_0_never_started(tmp_path, hostile):
  case = "2-process job: process 0 never started"
  hostile.declare(case)
  port = _free_port_pair()
  p1 = _start(tmp_path, port, 1, "--num_processes=2", *LONG)
  _wait_all([p1])
  ok_line, line = _one_line(p1, "toy: error: no coordinator answered", f"{port + 1}")
  ok = hostile.check(case, p1.popen.returncode == 1 and ok_line,
                     f"exit {p1.popen.returncode}: {line}")
  assert ok, p1.stderr()[-3000:]


def test_processes_with_different_settings_refuse_before_stepping(tmp_path, hostile):
  case = "2-process job: processes started with different settings"
  hostile.declare(case)
  procs = _job(tmp_path, *LONG, "--field=model=vgg", per_process={
      0: ["--field=threshold=0.5"], 1: ["--field=threshold=0.3"]})
  _wait_all(procs)
  codes = [p.popen.returncode for p in procs]
  checks = [_one_line(p, "toy: error: processes disagree on threshold (process 0: 0.5; "
                         "process 1: 0.3)") for p in procs]
  stepped = [p.steps() for p in procs]
  ok = hostile.check(case, codes == [1, 1] and all(c for c, _ in checks) and stepped == [0, 0],
                     f"exits {codes}, steps {stepped}: {checks[0][1]}")
  assert ok, [p.stderr()[-2000:] for p in procs]


@pytest.mark.parametrize("intruder", ["other job", "same job twice"])
def test_another_job_on_the_coordinator_port_is_refused_and_harms_nothing(
    tmp_path, hostile, intruder):
  case = "a second job reusing a running job's coordinator port"
  hostile.declare(case)
  port = _free_port_pair()
  a = [_start(tmp_path, port, i, "--num_processes=2", "--job=/out/a", *LONG, name="a")
       for i in range(2)]
  _wait_steps(a)
  job = "/out/b" if intruder == "other job" else "/out/a"
  b = [_start(tmp_path, port, i, "--num_processes=2", f"--job={job}", "--steps=5", name="b")
       for i in range(2)]
  _wait_all(b)
  # The running job is unharmed: it still steps, and still stops together on request.
  _wait_steps(a, n=min(p.steps() for p in a) + 5)
  a[0].popen.send_signal(signal.SIGTERM)
  _wait_all(a)
  expect = (["in use by another job", "serves another job"] if intruder == "other job" else
            ["this very job", "already joined"])
  b_ok = [_one_line(p, "toy: error:", e) for p, e in zip(b, expect)]
  codes_a, codes_b = [p.popen.returncode for p in a], [p.popen.returncode for p in b]
  ok = hostile.check(case, codes_a == [130, 130] and codes_b == [1, 1]
                     and all(c for c, _ in b_ok),
                     f"{intruder}: intruders exit {codes_b}: {b_ok[0][1]} / {b_ok[1][1]}; the "
                     f"running job went on, then stopped on SIGTERM with {codes_a}")
  assert ok, [p.stderr()[-1500:] for p in a + b]
