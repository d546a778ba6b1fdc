"""The coordinator of a multi-process job: a small process of its own beside process 0.

It hosts JAX's coordination service on port P, so that a killed process 0 does not
abort the other processes on the spot (their error polling would), and answers on
port P+1 which job it serves, so that a process of another job is turned away
before it registers (a stray registration aborts the running job). Started and
stopped by cbir_jax.distributed, which uses the client half below; imports only the
standard library (and jaxlib in the coordinator process).

Admission protocol on P+1, one request line per connection, one reply line:
  "join JOB N PID"  ->  "PROTOCOL ok" | "PROTOCOL refused job OTHER_JOB OTHER_N"
                                      | "PROTOCOL refused taken" | "PROTOCOL refused range"
  "status"          ->  "PROTOCOL status JOB N JOINED LEFT"  (comma-separated indices, or -)
  "bye PID"         ->  "PROTOCOL ok"   (the process is leaving: it no longer needs the service)
Process 0 talks to it on stdin: "gone PID" (a process process 0 knows is dead), "done"
(every client has shut down: stop now). End of input without "done" means process 0
ended early; the service then stays up until the other processes have left, at most
--linger_s, because a client whose service vanishes aborts.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import select
import signal
import socket
import subprocess
import sys
import threading
import time

PROTOCOL = "cbir_jax-coordinator/1"
EXIT_PORT_IN_USE = 3
LOG_ENV = "CBIR_JAX_COORDINATOR_LOG"  # a file for the coordinator's own (JAX) log lines


class Refused(Exception):
  """The coordinator (or the port) belongs to another job; the message says what to do."""


class NoAnswer(Exception):
  """No coordinator listens at the address (yet)."""


def listen(port: int) -> socket.socket:
  """A listening socket on every interface (IPv6 and IPv4 where possible), no SO_REUSEPORT.

  Raises:
    OSError: the port is taken (EADDRINUSE), also by a gRPC server that set SO_REUSEPORT.
  """
  if socket.has_dualstack_ipv6():
    return socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
  return socket.create_server(("0.0.0.0", port))


def _indices(s: set[int]) -> str:
  return ",".join(str(p) for p in sorted(s)) or "-"


class Admission:
  """The job's identity and roll call: who joined, who left."""

  def __init__(self, job: str, num_processes: int):
    self.job, self.num_processes = job, num_processes
    self.joined: set[int] = set()
    self.left: set[int] = set()
    self.changed = threading.Condition()

  def reply(self, request: str) -> str:
    words = request.split()
    if words == ["status"]:
      with self.changed:
        return (f"{PROTOCOL} status {self.job} {self.num_processes} {_indices(self.joined)} "
                f"{_indices(self.left)}")
    if len(words) == 2 and words[0] == "bye" and words[1].isdigit():
      self.leave(int(words[1]))
      return f"{PROTOCOL} ok"
    if len(words) != 4 or words[0] != "join":
      return f"{PROTOCOL} refused request"
    if words[1] != self.job or words[2] != str(self.num_processes):
      return f"{PROTOCOL} refused job {self.job} {self.num_processes}"
    if not words[3].isdigit() or int(words[3]) >= self.num_processes:
      return f"{PROTOCOL} refused range"
    with self.changed:
      if int(words[3]) in self.joined:
        return f"{PROTOCOL} refused taken"
      self.joined.add(int(words[3]))
    return f"{PROTOCOL} ok"

  def leave(self, pid: int) -> None:
    with self.changed:
      self.left.add(pid)
      self.changed.notify_all()

  def wait_until_others_left(self, timeout: float) -> None:
    """Until every process but 0 that joined has left (or is known dead), or `timeout`."""
    with self.changed:
      self.changed.wait_for(lambda: self.joined - {0} <= self.left, timeout)

  def serve_forever(self, sock: socket.socket) -> None:
    while True:
      try:
        conn, _ = sock.accept()
      except OSError:  # the socket was closed: the coordinator is stopping
        return
      with conn:
        try:
          conn.settimeout(5.0)
          request = conn.makefile("r", encoding="ascii", errors="replace").readline(256)
          conn.sendall((self.reply(request) + "\n").encode("ascii"))
        except OSError:  # a client that went away; the next one is served
          pass


# --- the coordinator process ---------------------------------------------------------------


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--port", type=int, required=True)
  p.add_argument("--num_processes", type=int, required=True)
  p.add_argument("--job", required=True)
  p.add_argument("--heartbeat_s", type=int, required=True)
  p.add_argument("--register_s", type=int, required=True)
  p.add_argument("--linger_s", type=float, required=True)
  args = p.parse_args(argv)
  # Signals meant for the job (Ctrl-C to the terminal's process group, a scheduler's
  # SIGTERM) must not take the service away while the processes stop together.
  for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
  try:
    sock = listen(args.port + 1)
    listen(args.port).close()  # gRPC would share a taken port silently (SO_REUSEPORT)
  except OSError as e:
    print(f"error port {e}", flush=True)
    return EXIT_PORT_IN_USE
  from jaxlib import _jax

  service = _jax.get_distributed_runtime_service(
      f"[::]:{args.port}", args.num_processes, heartbeat_timeout=args.heartbeat_s,
      cluster_register_timeout=args.register_s, shutdown_timeout=args.register_s)
  admission = Admission(args.job, args.num_processes)
  threading.Thread(target=admission.serve_forever, args=(sock,), daemon=True).start()
  print("ready", flush=True)
  for line in sys.stdin:
    words = line.split()
    if words == ["done"]:
      break
    if len(words) == 2 and words[0] == "gone" and words[1].isdigit():
      admission.leave(int(words[1]))
  else:  # process 0 ended early
    admission.wait_until_others_left(args.linger_s)
  service.shutdown()
  return 0


# --- the client half: used by the job's processes -------------------------------------------


def split_address(address: str) -> tuple[str, int]:
  """'host:port' or '[v6]:port' -> (host, port); raises ValueError. PORT+1 must exist too."""
  host, sep, port = address.rpartition(":")
  host = host.strip("[]")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65535:
    raise ValueError(f"coordinator address {address!r} is not HOST:PORT with a port below "
                     "65535 (the coordinator also uses PORT+1)")
  return host, int(port)


def ask(address: str, request: str, timeout: float = 5.0) -> str | None:
  """One request to the admission port (PORT+1) of `address`: the reply ('' if none came),
  or None when nothing listens there."""
  host, port = split_address(address)
  try:
    with socket.create_connection((host, port + 1), timeout=timeout) as s:
      s.sendall(f"{request}\n".encode("ascii"))
      return s.makefile("r", encoding="ascii", errors="replace").readline(512).strip()
  except (ConnectionRefusedError, socket.gaierror):
    return None
  except OSError:  # connected but no answer, reset, timeout
    return ""


def join(address: str, job: str, n: int, pid: int, wait_s: float) -> None:
  """Asks the coordinator to admit process `pid` of job `job`, retrying for `wait_s`.

  Raises:
    NoAnswer: nothing answered within `wait_s`.
    Refused: another job's coordinator, a duplicate process, or another program.
  """
  deadline = time.monotonic() + wait_s
  while (reply := ask(address, f"join {job} {n} {pid}")) is None:
    if time.monotonic() > deadline:
      _, port = split_address(address)
      raise NoAnswer(f"no coordinator answered at port {port + 1} of {address} within "
                     f"{wait_s:.0f} s: start process 0 with --coordinator_address={address} "
                     f"and --num_processes={n}")
    time.sleep(0.25)
  words = reply.split()
  if words[:2] == [PROTOCOL, "ok"]:
    return
  if words[:3] == [PROTOCOL, "refused", "job"]:
    raise Refused(f"the coordinator at {address} serves another job (id {words[3]}, "
                  f"{words[4]} processes), not this one (id {job}, {n} processes): give each "
                  "job its own coordinator port")
  if words[:3] == [PROTOCOL, "refused", "taken"]:
    raise Refused(f"process {pid} of this job already joined the coordinator at {address}: "
                  "is the same command running twice?")
  raise Refused(f"something other than this job's coordinator answers at port+1 of {address} "
                f"({reply[:60]!r}): choose a coordinator port P with P and P+1 free")


def status(address: str) -> tuple[str, int, set[int], set[int]] | None:
  """(job, number of processes, joined, left) of the coordinator at `address`, or None."""
  words = (ask(address, "status", timeout=2.0) or "").split()
  if words[:2] != [PROTOCOL, "status"] or len(words) != 6:
    return None
  ids = lambda w: {int(k) for k in w.split(",") if k.isdigit()}
  return words[2], int(words[3]), ids(words[4]), ids(words[5])


def _holder(address: str, job: str) -> str:
  """Who holds the port of `address`, and what to do about it."""
  st = status(address)
  if st is None:
    return (f"port {split_address(address)[1]} or the one after it is in use by another "
            "program: choose a coordinator port P with P and P+1 free")
  if st[0] == job:
    return (f"a coordinator of this very job already runs at {address} (processes joined: "
            f"{sorted(st[2])}, left: {sorted(st[3])}): the same command is running twice, or "
            "a previous run of it is still stopping (then rerun in a minute)")
  return (f"the coordinator port {split_address(address)[1]} is in use by another job (id "
          f"{st[0]}, {st[1]} processes): give each job its own coordinator port")


class Link:
  """Process 0's end of the coordinator process it started."""

  def __init__(self, proc: subprocess.Popen):
    self.proc = proc

  @classmethod
  def start(cls, address: str, n: int, job: str, *, heartbeat_s: int, register_s: int,
            linger_s: float) -> "Link":
    """Starts the coordinator of job `job` and waits until it serves.

    Raises:
      Refused: the port is taken (by another job, a duplicate, or another program).
      RuntimeError: the coordinator did not start.
    """
    # run_path, not -m: importing the cbir_jax package would import JAX (about a second).
    cmd = [sys.executable, "-c", "import runpy, sys; runpy.run_path(sys.argv.pop(1), "
           "run_name='__main__')", str(pathlib.Path(__file__)),
           f"--port={split_address(address)[1]}", f"--num_processes={n}", f"--job={job}",
           f"--heartbeat_s={heartbeat_s}", f"--register_s={register_s}",
           f"--linger_s={linger_s}"]
    with open(os.environ.get(LOG_ENV) or os.devnull, "ab") as err:
      proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                              start_new_session=True)  # the terminal's Ctrl-C is for the job
    ready, _, _ = select.select([proc.stdout], [], [], 60.0)
    line = proc.stdout.readline().decode(errors="replace").strip() if ready else ""
    if line == "ready":
      return cls(proc)
    link = cls(proc)
    link.close()
    link.wait(10)
    if line.startswith("error port"):
      raise Refused(_holder(address, job))
    raise RuntimeError(f"the job's coordinator did not start ({line or 'no answer'}); set "
                       f"{LOG_ENV}=FILE to see its log")

  def tell(self, line: str) -> None:
    """"gone PID" or "done" (see the module docstring); never raises."""
    try:
      self.proc.stdin.write(f"{line}\n".encode())
      self.proc.stdin.flush()
    except (OSError, ValueError):
      pass

  def close(self) -> None:
    """End of input: process 0 is leaving early; the coordinator outlives it a while."""
    try:
      self.proc.stdin.close()
    except OSError:
      pass

  def wait(self, timeout: float) -> None:
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      pass  # it stops on its own once the others have left


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
