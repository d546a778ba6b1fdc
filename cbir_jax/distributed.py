"""Multi-process jobs whose processes agree before writing, stop together and say why.

Built on jax.distributed (JAX 0.10), whose own failure handling aborts a process
(SIGABRT, native stack trace) when a peer dies, when the peer holding the service
dies, or when a process of another job registers. Here the service runs in a
process of its own (`_coordinator.py`), a job identity is checked before
registering, and a watchdog thread ends a process with one line, before JAX would:

  cluster = distributed.initialize(str(output_dir), coordinator_address="host:1234",
                                   num_processes=2, process_id=i, program="extract")
  cluster.agree({"threshold": "0.5", "weights": params_sha256})  # before any write
  finished = True
  for step in range(steps):  # a step without collectives (step_has_collectives)
    if cluster.stop_reason:  # a SIGINT/SIGTERM to any process (cluster.request_stop)
      finished = False
      break
    cluster.check()  # raises PeerLost when a process died, hung or failed
    ...
  reason = cluster.decide_stop(finished)  # None, or why: the same on every process
  cluster.shutdown()  # every process, at the end; or cluster.abort(message) on an error

The coordinator uses two ports: P (JAX's service) and P+1 (the job's identity).
"""
from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import sys
import threading
import time
from typing import Any, Callable, Mapping, NoReturn, Sequence

from cbir_jax import _coordinator

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
# HLO op names of cross-device communication; a step without them cannot hang on a peer.
COLLECTIVE_OPS = ("all-reduce", "all-gather", "all-to-all", "collective-permute",
                  "reduce-scatter", "collective-broadcast", "ragged-all-to-all")


@dataclasses.dataclass(frozen=True)
class Timeouts:
  """How long a job waits for its processes, in seconds.

  Attributes:
    startup_s: for every process to join the coordinator.
    peer_s: a process with no sign of life this long is taken for dead.
    poll_s: the watchdog's period: how soon a stop request or a failure is seen.
    grace_s: after a peer is lost, the time the main thread has to stop on its own
      before the watchdog ends the process.
  """
  startup_s: float = 45.0
  peer_s: float = 10.0
  poll_s: float = 0.5
  grace_s: float = 3.0

  def __post_init__(self):
    for f in dataclasses.fields(self):
      if not getattr(self, f.name) > 0:
        raise ValueError(f"Timeouts.{f.name} must be > 0, got {getattr(self, f.name)}")
    if self.peer_s < 4 * self.poll_s:
      raise ValueError(f"Timeouts.peer_s ({self.peer_s}) must be at least 4 x poll_s "
                       f"({self.poll_s}): a few missed polls are not a dead process")

  @property
  def heartbeat_s(self) -> int:
    """JAX's heartbeat timeout, after which JAX itself aborts the survivors.

    Well above `peer_s + grace_s`, so that the watchdog, which names the lost
    process, acts first.
    """
    return int(3 * self.peer_s + self.grace_s + 15)

  @property
  def register_s(self) -> int:
    """JAX's own registration timeout (it aborts): beyond `startup_s`, where ours acts."""
    return int(self.startup_s + self.heartbeat_s)

  @property
  def linger_s(self) -> float:
    """How long the coordinator outlives a process 0 that ended early, at most."""
    return self.heartbeat_s + 10.0


class DistributedError(RuntimeError):
  """The job cannot start or go on; the message is one line saying why and what to do."""
  exit_code = EXIT_ERROR


class JobMismatch(DistributedError):
  """The coordinator address is taken by another job, or by a duplicate of this one."""


class Disagreement(DistributedError):
  """The processes of one job were started with different settings or inputs.

  Attributes:
    fields: the names of the fields that differ, sorted.
    detail: which processes have which value ("processes disagree on ..."), without advice.
  """

  def __init__(self, message: str, fields: Sequence[str] = (), detail: str = ""):
    super().__init__(message)
    self.fields, self.detail = list(fields), detail or message


class PeerLost(DistributedError):
  """Another process died, hung, failed or never started."""

  def __init__(self, message: str, process: int | None = None, exit_code: int = EXIT_ERROR):
    super().__init__(message)
    self.process = process
    self.exit_code = exit_code


def job_id(job: str, num_processes: int) -> str:
  """The identity a coordinator admits: a digest of `job` (e.g. the absolute output
  directory) and the number of processes."""
  data = f"{job}\0{num_processes}".encode("utf-8", "surrogateescape")
  return hashlib.sha256(data).hexdigest()[:16]


def step_has_collectives(hlo_text: str) -> bool:
  """Whether compiled HLO text (`jit(f).lower(...).compile().as_text()`) communicates
  across devices. Without collectives, processes may stop at different steps."""
  return any(f" {op}(" in hlo_text or f" {op}-start(" in hlo_text for op in COLLECTIVE_OPS)


# --- agreement -----------------------------------------------------------------------------


def summarize(value: str | bytes, shown: str | None = None) -> tuple[str, str]:
  """(digest, what a message may show) of one agreed field.

  `shown` replaces the default (the value itself when short and printable, else a
  digest prefix), e.g. "120 files" for a list of files.
  """
  if isinstance(value, str):
    digest = hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()
    default = value if len(value) <= 64 and value.isprintable() else f"sha256 {digest[:12]}"
  elif isinstance(value, (bytes, bytearray, memoryview)):
    digest = hashlib.sha256(bytes(value)).hexdigest()
    default = f"sha256 {digest[:12]}"
  else:
    raise TypeError(f"agreed fields are str or bytes, got {type(value).__name__}")
  return digest, default if shown is None else shown[:200]


def name_processes(indices: Sequence[int]) -> str:
  """[0, 1, 2, 5] -> 'processes 0-2, 5'; [3] -> 'process 3'."""
  parts, start = [], None
  for i, k in enumerate(indices):
    if start is None:
      start = k
    if i + 1 == len(indices) or indices[i + 1] != k + 1:
      parts.append(str(start) if start == k else f"{start}-{k}")
      start = None
  word = "process" if len(indices) == 1 else "processes"
  return f"{word} {', '.join(parts)}"


def differing(summaries: Sequence[Mapping[str, Sequence[str]]]
              ) -> dict[str, list[tuple[list[int], str]]]:
  """{field: [(processes, shown value), ...]} of the fields whose digests differ, sorted.

  Args:
    summaries: per process, {field: (digest, shown)} from `summarize`.
  """
  fields = sorted(set().union(*summaries)) if summaries else []
  out = {}
  for f in fields:
    groups: dict[str, list[int]] = {}
    shown: dict[str, str] = {}
    for k, s in enumerate(summaries):
      digest, text = s[f] if f in s else ("", "(missing)")
      groups.setdefault(digest, []).append(k)
      shown[digest] = text
    if len(groups) > 1:
      out[f] = [(ks, shown[d]) for d, ks in groups.items()]
  return out


def disagreements(summaries: Sequence[Mapping[str, Sequence[str]]]) -> str:
  """'' when every process has the same digest for every field, else one line naming
  each differing field and which processes have which value (see `differing`)."""
  parts = [f"{f} (" + "; ".join(f"{name_processes(ks)}: {text}" for ks, text in groups) + ")"
           for f, groups in differing(summaries).items()]
  return f"processes disagree on {', '.join(parts)}" if parts else ""


# --- clusters ------------------------------------------------------------------------------


class _Base:
  """What single- and multi-process jobs share: stop requests and agreement."""

  process_index: int = 0
  process_count: int = 1

  def __init__(self, program: str, hint: str):
    self.program, self.hint = program, hint
    self._stop_reason: str | None = None
    self._stop_local = False

  def request_stop(self, reason: str) -> None:
    """Asks every process to stop after its current step. Safe in a signal handler."""
    if self._stop_reason is None:
      self._stop_reason, self._stop_local = reason, True

  @property
  def stop_reason(self) -> str | None:
    """Why the job is stopping (a signal to some process), or None."""
    return self._stop_reason

  def gather(self, name: str, value: str) -> list[str]:
    raise NotImplementedError

  def barrier(self, name: str) -> None:
    """Returns once every process has called `barrier(name)`."""
    self.gather(f"barrier:{name}", "")

  def decide_stop(self, finished: bool) -> str | None:
    """The decision point after the step loop, which every process reaches, whether it
    finished its steps or stopped early: None when every process finished, else why the
    job stops, the same on every process."""
    mine = "" if finished else (self.stop_reason or f"process {self.process_index} stopped")
    reasons = [r for r in self.gather("decide stop", mine) if r]
    return reasons[0] if reasons else None

  def agree(self, fields: Mapping[str, str | bytes], *,
            shown: Mapping[str, str] | None = None) -> None:
    """Raises Disagreement, on every process, unless all processes passed equal fields.

    Every process must call it, with the same field names, before writing anything.
    `shown` gives how some fields appear in the message (default: see `summarize`).
    """
    shown = shown or {}
    mine = {k: summarize(v, shown.get(k)) for k, v in fields.items()}
    everyone = [json.loads(v) for v in self.gather("agree", json.dumps(mine, sort_keys=True))]
    message = disagreements(everyone)
    if message:
      raise Disagreement(f"{message}; start every process with the same settings and input",
                         fields=list(differing(everyone)), detail=message)


class LocalCluster(_Base):
  """A job of one process: the same calls, no coordinator."""

  def __init__(self, program: str = "cbir_jax", hint: str = ""):
    super().__init__(program, hint)

  def gather(self, name: str, value: str) -> list[str]:
    return [value]

  def check(self) -> None:
    pass

  def shutdown(self) -> None:
    pass

  def abort(self, message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Ends the process with one line (SystemExit, so that exit hooks run)."""
    kind = "error: " if code != EXIT_INTERRUPTED else ""
    print(f"{self.program}: {kind}{message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


class Cluster(_Base):
  """This process' view of a multi-process job; see the module docstring.

  Attributes:
    process_index, process_count: as jax.process_index() / jax.process_count().
    job: the job identity the coordinator admitted (None when adopting a JAX
      distributed runtime started elsewhere).
  """

  def __init__(self, client: Any, *, process_index: int, process_count: int, job: str | None,
               address: str, timeouts: Timeouts, program: str, hint: str,
               coordinator: _coordinator.Link | None = None,
               exit_fn: Callable[[int], NoReturn] = os._exit):
    super().__init__(program, hint)
    self.process_index, self.process_count, self.job = process_index, process_count, job
    self.address, self.timeouts = address, timeouts
    self._client, self._coordinator, self._exit = client, coordinator, exit_fn
    self._ns = f"cbir_jax/{job or 'adopted'}"
    self._seq = 0
    self._lost: PeerLost | None = None
    self._lost_at = 0.0
    self._closed = False
    self._ending = threading.Lock()
    self._wake = threading.Event()
    self._watchdog = threading.Thread(target=self._watch, name="cbir_jax-watchdog",
                                      daemon=True)
    self._watchdog.start()
    atexit.register(self._at_exit)

  # -- what the job calls

  def request_stop(self, reason: str) -> None:
    super().request_stop(reason)
    self._wake.set()  # the watchdog tells the others now, not at its next poll

  def check(self) -> None:
    """Raises PeerLost once the watchdog found a process dead, hung or failed."""
    if self._lost is not None:
      raise self._lost

  def gather(self, name: str, value: str) -> list[str]:
    """Every process' `value`, in process order. All processes call it, in the same order."""
    self._seq += 1
    base = f"{self._ns}/gather/{self._seq}:{name}"
    self._client.key_value_set(f"{base}/{self.process_index}", value)
    return [value if k == self.process_index else self._wait_key(f"{base}/{k}")
            for k in range(self.process_count)]

  def shutdown(self) -> None:
    """The end of the job on every process (done, or stopped together): waits for all
    processes, then shuts JAX's runtime and the coordinator down."""
    import jax

    self.barrier("end")
    self._closed = True
    self._wake.set()
    try:
      jax.distributed.shutdown()  # every process is here: JAX's own barrier passes at once
    except RuntimeError:
      pass  # a process that died after the barrier; nothing is left to coordinate
    if self._coordinator is not None:
      self._coordinator.tell("done")
      self._coordinator.wait(10)

  def abort(self, message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Ends this process now with one line, and tells the others why (they end too)."""
    self._end(message, code)

  # -- the watchdog

  def _watch(self) -> None:
    try:
      self._watch_loop()
    except Exception as e:  # noqa: BLE001 - without its watchdog a process must not go on
      self._end(f"process {self.process_index}: the job's watchdog failed ({e!r})", EXIT_ERROR)

  def _watch_loop(self) -> None:
    me, t = self.process_index, self.timeouts
    seen = {k: ("", time.monotonic()) for k in range(self.process_count) if k != me}
    beats, posted, unreachable_since, last = 0, False, None, time.monotonic()
    while not self._closed:
      now = time.monotonic()
      if now - last > t.peer_s / 2:  # this process was suspended or starved, not its peers
        seen = {k: (v, now) for k, (v, _) in seen.items()}
        unreachable_since = None
      last = now
      try:
        if self._stop_local and not posted:
          self._client.key_value_set(f"{self._ns}/live/stop/{me}", self._stop_reason or "",
                                     allow_overwrite=True)
          posted = True
        beats += 1
        self._client.key_value_set(f"{self._ns}/live/alive/{me}", str(beats),
                                   allow_overwrite=True)
        entries = self._client.key_value_dir_get(f"{self._ns}/live/")
        unreachable_since = None
      except RuntimeError as e:  # JaxRuntimeError: the service does not answer
        if self._closed:
          return
        unreachable_since = unreachable_since or now
        if now - unreachable_since > t.peer_s:
          status = str(e).split(":", 1)[0]  # e.g. UNAVAILABLE; the rest is gRPC detail
          self._lose(PeerLost(f"lost contact with the coordinator at {self.address} (process "
                              f"0's host) for {t.peer_s:.0f} s ({status})", process=0))
        entries = []
      self._read(entries, seen, now)
      if self._lost is not None and now - self._lost_at > t.grace_s:
        self._end(str(self._lost), self._lost.exit_code)
      self._wake.wait(t.poll_s)
      self._wake.clear()

  def _read(self, entries: list[tuple[str, str]], seen: dict[int, tuple[str, float]],
            now: float) -> None:
    prefix = f"{self._ns}/live/"
    for key, value in entries:
      kind, _, k = key[len(prefix):].partition("/")
      if not k.isdigit() or int(k) == self.process_index:
        continue
      k = int(k)
      if kind == "alive" and k in seen and seen[k][0] != value:
        seen[k] = (value, now)
      elif kind == "stop" and self._stop_reason is None:
        self._stop_reason = value or f"process {k} was asked to stop"
      elif kind == "failed":
        code, _, message = value.partition(" ")
        seen.pop(k, None)
        self._lose(PeerLost(f"process {k} ended: {message}", process=k,
                            exit_code=int(code) if code.isdigit() else EXIT_ERROR))
    for k, (_, last) in sorted(seen.items()):
      if now - last > self.timeouts.peer_s:
        self._lose(PeerLost(
            f"process {k} of {self.process_count} stopped responding (no sign of life for "
            f"{self.timeouts.peer_s:.0f} s: killed, crashed or hung)", process=k))

  def _lose(self, error: PeerLost) -> None:
    if self._lost is None:
      error.args = (f"{error}; {self.hint}" if self.hint else str(error),)
      self._lost, self._lost_at = error, time.monotonic()

  # -- leaving

  def _wait_key(self, key: str) -> str:
    while True:
      self.check()
      try:
        return self._client.blocking_key_value_get(key, int(self.timeouts.poll_s * 1000))
      except RuntimeError as e:
        if "DEADLINE_EXCEEDED" not in str(e):  # coordinator unreachable: the watchdog decides
          time.sleep(self.timeouts.poll_s)

  def _end(self, message: str, code: int) -> NoReturn:
    """Tells the others why, prints one line, then os._exit: JAX's exit hooks would wait
    for a lost peer, and a client whose service is gone aborts when destroyed."""
    if not self._ending.acquire(blocking=False):  # the other thread is ending the process
      threading.Event().wait()
    self._closed = True
    why = message.removesuffix(f"; {self.hint}") if self.hint else message
    try:
      self._client.key_value_set(f"{self._ns}/live/failed/{self.process_index}",
                                 f"{code} {why}", allow_overwrite=True)
    except RuntimeError:
      pass
    if self._coordinator is not None:
      if self._lost is not None and self._lost.process not in (None, 0):
        self._coordinator.tell(f"gone {self._lost.process}")
      self._coordinator.close()
    else:  # the coordinator need not wait for this process any more
      _coordinator.ask(self.address, f"bye {self.process_index}", timeout=2.0)
    kind = "error: " if code != EXIT_INTERRUPTED else ""
    print(f"{self.program}: {kind}{message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    self._exit(code)

  def _at_exit(self) -> None:
    # The interpreter is leaving without shutdown() or abort() (an uncaught exception):
    # tell the others, and skip JAX's exit hooks, which would wait for them.
    if not self._closed:
      self._end(f"process {self.process_index} exited before the job finished (see its "
                "messages)", EXIT_ERROR)


# --- start-up ------------------------------------------------------------------------------


def _missing(address: str, n: int) -> str:
  st = _coordinator.status(address)
  missing = [k for k in range(n) if st is None or k not in st[2]]
  return name_processes(missing) if missing else "some processes"


def _connect(address: str, n: int, pid: int, timeouts: Timeouts, deadline: float,
             program: str, hint: str, exit_fn: Callable[[int], NoReturn]) -> Any:
  """JAX's client, connected (all processes registered), installed as JAX's own."""
  from jax._src import distributed as jax_distributed
  from jax._src.lib import _jax

  client = _jax.get_distributed_runtime_client(
      address, pid, init_timeout=timeouts.register_s, heartbeat_timeout=timeouts.heartbeat_s,
      shutdown_timeout=int(timeouts.startup_s), use_compression=True)
  connected = threading.Event()

  def startup_watchdog():  # connect() blocks until all have registered, and then JAX aborts
    if connected.wait(max(deadline - time.monotonic(), 0.0)):
      return
    message = (f"{_missing(address, n)} of {n} did not join the coordinator at {address} "
               f"within {timeouts.startup_s:.0f} s: start every process with the same "
               "--coordinator_address and --num_processes")
    if pid != 0:  # the coordinator need not wait for this process any more
      _coordinator.ask(address, f"bye {pid}", timeout=2.0)
    print(f"{program}: error: {message}" + (f"; {hint}" if hint else ""), file=sys.stderr,
          flush=True)
    exit_fn(EXIT_ERROR)

  threading.Thread(target=startup_watchdog, name="cbir_jax-startup", daemon=True).start()
  try:
    client.connect()
  except RuntimeError as e:  # JaxRuntimeError
    raise PeerLost(f"could not register with the coordinator at {address}: "
                   f"{str(e).splitlines()[0]}", process=0) from None
  finally:
    connected.set()
  state = jax_distributed.global_state
  state.coordinator_address, state.process_id, state.num_processes = address, pid, n
  state.client = client
  state.initialize_preemption_sync_manager()
  return client


def initialize(job: str, *, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               auto_detect: bool = False, timeouts: Timeouts = Timeouts(),
               program: str = "cbir_jax", hint: str = "rerun the same command on every process",
               exit_fn: Callable[[int], NoReturn] = os._exit) -> Cluster | LocalCluster:
  """Starts (or joins) a multi-process job; call before any JAX computation.

  Args:
    job: what identifies the job, e.g. the absolute output directory; with the
      number of processes it forms the identity the coordinator admits.
    coordinator_address, num_processes, process_id: as for jax.distributed.initialize;
      process 0 starts the coordinator on PORT and PORT+1 of this address.
    auto_detect: fill unset values from the cluster environment (SLURM, Open MPI,
      Cloud TPU), as jax.distributed.initialize does.
    timeouts: see Timeouts.
    program, hint: the lines this module prints itself start with "{program}: error:"
      and end with the hint (what the user should do).
    exit_fn: how the watchdog ends the process (tests replace os._exit).

  Returns:
    A LocalCluster when the job has one process, else a Cluster.

  Raises:
    JobMismatch: the coordinator belongs to another job (or the port is taken).
    PeerLost: process 0's coordinator did not answer within `timeouts.startup_s`.
    DistributedError: bad settings, or JAX already started its backends.
  """
  import jax
  from jax._src import distributed as jax_distributed

  if jax.distributed.is_initialized():  # started by the caller: use it as it is
    state = jax_distributed.global_state
    return Cluster(state.client, process_index=state.process_id,
                   process_count=state.num_processes, job=None,
                   address=state.coordinator_address, timeouts=timeouts, program=program,
                   hint=hint, exit_fn=exit_fn)
  explicit = (coordinator_address, num_processes, process_id)
  if not auto_detect and all(v is None for v in explicit):
    return LocalCluster(program, hint)
  if None in explicit:
    coordinator_address, num_processes, process_id = _detect(*explicit, timeouts)
  n, pid = int(num_processes), int(process_id)
  if not 0 <= pid < n:
    raise DistributedError(f"process_id must be in [0, {n}), got {pid}")
  if n == 1:
    return LocalCluster(program, hint)
  try:
    _coordinator.split_address(coordinator_address)
  except ValueError as e:
    raise DistributedError(str(e)) from None
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    raise DistributedError("distributed.initialize must come before any JAX computation")
  ident = job_id(job, n)
  client, link = _start(coordinator_address, n, pid, ident, timeouts, program, hint, exit_fn)
  return Cluster(client, process_index=pid, process_count=n, job=ident,
                 address=coordinator_address, timeouts=timeouts, program=program, hint=hint,
                 coordinator=link, exit_fn=exit_fn)


def _start(address: str, n: int, pid: int, ident: str, timeouts: Timeouts, program: str,
           hint: str, exit_fn: Callable[[int], NoReturn]) -> tuple[Any, Any]:
  """Process 0 starts the coordinator; every process joins it, then connects JAX's client."""
  deadline = time.monotonic() + timeouts.startup_s
  link = None
  try:
    if pid == 0:
      link = _coordinator.Link.start(address, n, ident, heartbeat_s=timeouts.heartbeat_s,
                                     register_s=timeouts.register_s, linger_s=timeouts.linger_s)
    _coordinator.join(address, ident, n, pid, deadline - time.monotonic())
    client = _connect(address, n, pid, timeouts, deadline, program, hint, exit_fn)
  except BaseException as e:
    if link is not None:
      link.close()
    if isinstance(e, _coordinator.Refused):
      raise JobMismatch(str(e)) from None
    if isinstance(e, _coordinator.NoAnswer):
      raise PeerLost(str(e), process=0) from None
    if isinstance(e, RuntimeError) and not isinstance(e, DistributedError):
      raise DistributedError(str(e)) from None  # the coordinator process did not start
    raise
  return client, link


def _detect(address: str | None, n: int | None, pid: int | None, timeouts: Timeouts
            ) -> tuple[str, int, int]:
  """Unset values from the cluster environment, as jax.distributed.initialize finds them."""
  import jax
  from jax._src import clusters

  address = address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  address, n, pid, local_ids = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      address, n, pid, None, None, int(timeouts.startup_s))
  if None in (address, n, pid):
    raise DistributedError("no cluster environment found: give --coordinator_address, "
                           "--num_processes and --process_id")
  if address.rpartition(":")[2] == "65535":  # e.g. SLURM's choice for some job ids
    raise DistributedError(f"the cluster's coordinator address {address} leaves no port+1 "
                           "for the coordinator: set JAX_COORDINATOR_PORT to a port P with "
                           "P and P+1 free")
  if local_ids is not None:  # as jax.distributed.initialize does for GPUs
    ids = ",".join(str(i) for i in ([local_ids] if isinstance(local_ids, int) else local_ids))
    jax.config.update("jax_cuda_visible_devices", ids)
    jax.config.update("jax_rocm_visible_devices", ids)
  return address, int(n), int(pid)


__all__ = ["Cluster", "Disagreement", "DistributedError", "EXIT_ERROR", "EXIT_INTERRUPTED",
           "JobMismatch", "LocalCluster", "PeerLost", "Timeouts", "differing", "disagreements",
           "initialize", "job_id", "name_processes", "step_has_collectives", "summarize"]
