"""cbir_jax.distributed in one process: identities, agreement, the coordinator's admission,
and the watchdog against an in-memory key-value store (2-process runs: tests/robustness)."""
from __future__ import annotations

import hashlib
import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbir_jax import _coordinator, distributed, sharding
from free_ports import free_port_pair

FAST = distributed.Timeouts(startup_s=5.0, peer_s=0.8, poll_s=0.1, grace_s=0.4)

# --- identities and addresses --------------------------------------------------------------


def test_job_id_is_a_digest_of_the_job_and_process_count():
  ref = hashlib.sha256("/data/out\x002".encode()).hexdigest()[:16]
  assert distributed.job_id("/data/out", 2) == ref
  assert distributed.job_id("/data/out", 3) != ref
  assert distributed.job_id("/data/out2", 2) != ref


@pytest.mark.parametrize("address,expected", [
    ("127.0.0.1:1234", ("127.0.0.1", 1234)), ("host.example:80", ("host.example", 80)),
    ("[::1]:5000", ("::1", 5000))])
def test_split_address(address, expected):
  assert _coordinator.split_address(address) == expected


@pytest.mark.parametrize("address", ["127.0.0.1", ":1234", "host:", "host:x", "host:65535",
                                     "host:0"])
def test_split_address_refuses(address):
  with pytest.raises(ValueError, match="HOST:PORT"):
    _coordinator.split_address(address)
  with pytest.raises(distributed.DistributedError, match="HOST:PORT"):
    distributed.initialize("/out", coordinator_address=address, num_processes=2, process_id=1)


def test_timeouts_keep_jax_own_limits_beyond_the_watchdog():
  for t in (distributed.Timeouts(), FAST, distributed.Timeouts(peer_s=30, grace_s=10)):
    assert t.heartbeat_s > t.peer_s + t.grace_s + t.poll_s  # the watchdog acts first
    assert t.register_s > t.startup_s
    assert t.linger_s > t.heartbeat_s
  with pytest.raises(ValueError, match="poll_s"):
    distributed.Timeouts(peer_s=1.0, poll_s=0.5)
  with pytest.raises(ValueError, match="startup_s"):
    distributed.Timeouts(startup_s=0)


# --- agreement -----------------------------------------------------------------------------


def test_summarize_digests_text_and_bytes():
  d, shown = distributed.summarize("0.5")
  assert d == hashlib.sha256(b"0.5").hexdigest() and shown == "0.5"
  d, shown = distributed.summarize(b"\x00\x01")
  assert d == hashlib.sha256(b"\x00\x01").hexdigest() and shown == f"sha256 {d[:12]}"
  long = "x" * 65
  digest = hashlib.sha256(long.encode()).hexdigest()
  assert distributed.summarize(long)[1] == f"sha256 {digest[:12]}"
  assert distributed.summarize(long, "65 x")[1] == "65 x"
  with pytest.raises(TypeError):
    distributed.summarize(0.5)


def _s(**fields):
  return {k: distributed.summarize(v) for k, v in fields.items()}


def test_disagreements_none_when_equal():
  assert distributed.disagreements([_s(a="1", b=b"x")] * 3) == ""
  assert distributed.disagreements([]) == ""


def test_disagreements_names_fields_values_and_processes():
  per = [_s(threshold="0.5", model="vgg"), _s(threshold="0.5", model="vgg"),
         _s(threshold="0.3", model="vgg"), _s(threshold="0.5", model="vgg"),
         _s(threshold="0.3", model="vgg"), _s(threshold="0.3", model="vgg")]
  assert distributed.disagreements(per) == (
      "processes disagree on threshold (processes 0-1, 3: 0.5; processes 2, 4-5: 0.3)")


def test_disagreements_missing_field_and_several_fields():
  per = [_s(a="1", b="2"), _s(a="9")]
  assert distributed.disagreements(per) == (
      "processes disagree on a (process 0: 1; process 1: 9), "
      "b (process 0: 2; process 1: (missing))")


# --- collectives in a step -----------------------------------------------------------------


def test_step_has_collectives_tells_per_row_steps_from_reductions():
  mesh = sharding.data_mesh()
  x = jax.device_put(np.ones((len(mesh.devices.flat) * 2, 16), np.float32),
                     sharding.batch_sharding(mesh))
  per_row = jax.jit(lambda v: jnp.tanh(v) * 2, out_shardings=sharding.batch_sharding(mesh))
  total = jax.jit(lambda v: jnp.sum(v), out_shardings=sharding.replicated(mesh))
  assert not distributed.step_has_collectives(per_row.lower(x).compile().as_text())
  if len(mesh.devices.flat) > 1:
    assert distributed.step_has_collectives(total.lower(x).compile().as_text())


# --- the coordinator's admission -----------------------------------------------------------


@pytest.fixture
def admission():
  """An admission server of job 'J1' with 2 processes on P+1 (no JAX service): P."""
  port = free_port_pair()
  sock = _coordinator.listen(port + 1)
  server = _coordinator.Admission("J1", 2)
  threading.Thread(target=server.serve_forever, args=(sock,), daemon=True).start()
  yield port, server
  sock.close()


def test_admission_admits_each_process_of_its_job_once(admission):
  port, server = admission
  ask = lambda r: _coordinator.ask(f"127.0.0.1:{port}", r)
  p = _coordinator.PROTOCOL
  assert ask("join J1 2 0") == f"{p} ok"
  assert ask("join J1 2 0") == f"{p} refused taken"
  assert ask("join J2 2 1") == f"{p} refused job J1 2"
  assert ask("join J1 3 1") == f"{p} refused job J1 2"
  assert ask("join J1 2 2") == f"{p} refused range"
  assert ask("status") == f"{p} status J1 2 0 -"
  assert ask("bye 0") == f"{p} ok"
  assert ask("status") == f"{p} status J1 2 0 0"
  assert server.joined == {0} and server.left == {0}


def test_join_refusals_are_one_line_and_say_what_to_do(admission):
  port, _ = admission
  address = f"127.0.0.1:{port}"
  with pytest.raises(_coordinator.Refused, match=r"serves another job \(id J1, 2 "):
    _coordinator.join(address, "J2", 2, 1, 2.0)
  _coordinator.join(address, "J1", 2, 1, 2.0)
  with pytest.raises(_coordinator.Refused, match="already joined.*running twice"):
    _coordinator.join(address, "J1", 2, 1, 2.0)


def test_join_without_coordinator_gives_up_at_the_deadline():
  port = free_port_pair()
  t = time.monotonic()
  with pytest.raises(_coordinator.NoAnswer,
                     match=f"no coordinator answered at port {port + 1} of 127.0.0.1:{port} "
                           "within 1 s"):
    _coordinator.join(f"127.0.0.1:{port}", "J", 2, 1, 0.6)
  assert time.monotonic() - t < 5


def _link(address, n, job):
  return _coordinator.Link.start(address, n, job, heartbeat_s=FAST.heartbeat_s,
                                 register_s=FAST.register_s, linger_s=FAST.linger_s)


def test_coordinator_refuses_a_taken_port_and_names_the_holder():
  port = free_port_pair()
  address = f"127.0.0.1:{port}"
  with socket.socket() as s:  # another program on P
    s.bind(("127.0.0.1", port))
    s.listen()
    with pytest.raises(_coordinator.Refused, match="in use by another program"):
      _link(address, 2, "J1")
  first = _link(address, 2, "J1")
  try:
    with pytest.raises(_coordinator.Refused, match=r"in use by another job \(id J1, 2"):
      _link(address, 3, "J2")
    with pytest.raises(_coordinator.Refused, match="this very job"):
      _link(address, 2, "J1")
  finally:
    first.tell("done")
    first.close()
    assert first.proc.wait(timeout=20) == 0


def test_coordinator_outlives_process_0_until_the_others_left():
  port = free_port_pair()
  address = f"127.0.0.1:{port}"
  link = _link(address, 2, "J1")
  assert _coordinator.ask(address, "join J1 2 0").endswith("ok")
  assert _coordinator.ask(address, "join J1 2 1").endswith("ok")
  link.close()  # process 0 ended without "done"
  time.sleep(0.5)
  assert link.proc.poll() is None  # process 1 may still need the service
  assert _coordinator.status(address) == ("J1", 2, {0, 1}, set())
  _coordinator.ask(address, "bye 1")
  assert link.proc.wait(timeout=20) == 0


# --- the watchdog, against an in-memory key-value store -----------------------------------


class FakeKV:
  """The key-value calls of JAX's DistributedRuntimeClient, in memory."""

  def __init__(self):
    self.data: dict[str, str] = {}
    self.cond = threading.Condition()

  def key_value_set(self, key, value, allow_overwrite=False):
    with self.cond:
      if key in self.data and not allow_overwrite:
        raise RuntimeError(f"ALREADY_EXISTS: key {key} already exists.")
      self.data[key] = value
      self.cond.notify_all()

  def key_value_dir_get(self, prefix):
    with self.cond:
      return [(k, v) for k, v in sorted(self.data.items()) if k.startswith(prefix)]

  def blocking_key_value_get(self, key, timeout_in_ms):
    with self.cond:
      if not self.cond.wait_for(lambda: key in self.data, timeout_in_ms / 1000):
        raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
      return self.data[key]


def _clusters(kv, n=2, present=None):
  codes = {}

  def exit_fn(k):  # records instead of ending the test process; _end then returns
    return lambda code: codes.setdefault(k, code)

  made = [distributed.Cluster(kv, process_index=k, process_count=n, job="J",
                              address="127.0.0.1:1", timeouts=FAST, program="t", hint="rerun",
                              exit_fn=exit_fn(k))
          for k in (present if present is not None else range(n))]
  return made, codes


def _in_threads(fns):
  out, errors = [None] * len(fns), [None] * len(fns)

  def run(i):
    try:
      out[i] = fns[i]()
    except BaseException as e:  # noqa: BLE001 - handed to the test
      errors[i] = e

  ts = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
  for t in ts:
    t.start()
  for t in ts:
    t.join(20)
  return out, errors


def _close(clusters):
  for c in clusters:
    c._closed = True  # pylint: disable=protected-access


def test_gather_and_agree_across_processes():
  kv = FakeKV()
  cs, codes = _clusters(kv, 3)
  try:
    out, err = _in_threads([lambda c=c: c.gather("x", f"v{c.process_index}") for c in cs])
    assert err == [None] * 3 and out == [["v0", "v1", "v2"]] * 3
    out, err = _in_threads([lambda c=c: c.agree({"model": "vgg", "w": b"\x01"}) for c in cs])
    assert err == [None] * 3
    fields = [{"model": "vgg", "threshold": "0.5"}, {"model": "vgg", "threshold": "0.3"},
              {"model": "vgg", "threshold": "0.5"}]
    _, err = _in_threads([lambda c=c: c.agree(fields[c.process_index]) for c in cs])
    for e in err:  # every process refuses, with the same line
      assert isinstance(e, distributed.Disagreement)
      assert str(e).startswith("processes disagree on threshold (processes 0, 2: 0.5; "
                               "process 1: 0.3)")
      assert e.fields == ["threshold"] and str(e).startswith(e.detail + "; ")
    shown = [{"input": "3 files"}, {"input": "4 files"}, {"input": "3 files"}]
    _, err = _in_threads([lambda c=c: c.agree({"input": f"digest{c.process_index % 2}"},
                                              shown=shown[c.process_index]) for c in cs])
    assert all(e.detail == "processes disagree on input (processes 0, 2: 3 files; process 1: "
               "4 files)" for e in err)
    assert codes == {}
  finally:
    _close(cs)


def test_decide_stop_gives_every_process_the_same_reason():
  kv = FakeKV()
  cs, _ = _clusters(kv, 3)
  try:
    out, err = _in_threads([lambda c=c: c.decide_stop(True) for c in cs])
    assert err == [None] * 3 and out == [None] * 3
    cs[2]._stop_reason = "SIGTERM to process 2"  # as its signal handler would set it
    out, err = _in_threads([lambda c=c: c.decide_stop(c.process_index == 0) for c in cs])
    assert err == [None] * 3 and out == ["process 1 stopped"] * 3
  finally:
    _close(cs)


def test_a_stop_request_reaches_every_process():
  kv = FakeKV()
  cs, codes = _clusters(kv, 2)
  try:
    cs[1].request_stop("SIGTERM to process 1")
    cs[1].request_stop("later reason")  # the first reason stays
    t = time.monotonic()
    while cs[0].stop_reason is None and time.monotonic() - t < 5:
      time.sleep(0.01)
    assert cs[0].stop_reason == cs[1].stop_reason == "SIGTERM to process 1"
    cs[0].check()  # a stop is not a failure
    assert codes == {}
  finally:
    _close(cs)


def test_a_silent_process_is_named_then_this_one_ends(capsys):
  kv = FakeKV()
  cs, codes = _clusters(kv, 2, present=[0])  # process 1 never shows a sign of life
  t = time.monotonic()
  while 0 not in codes and time.monotonic() - t < 10:
    time.sleep(0.02)
  assert codes == {0: distributed.EXIT_ERROR}
  with pytest.raises(distributed.PeerLost, match="process 1 of 2 stopped responding") as e:
    cs[0].check()
  assert e.value.process == 1 and str(e.value).endswith("; rerun")
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("t: error: process 1 of 2 stopped responding")
  assert kv.data["cbir_jax/J/live/failed/0"].startswith("1 process 1 of 2 stopped responding")


def test_abort_tells_the_others_why_and_with_which_code(capsys):
  kv = FakeKV()
  cs, codes = _clusters(kv, 2)
  cs[1].abort("stopped at once (second signal)", distributed.EXIT_INTERRUPTED)
  t = time.monotonic()
  while 0 not in codes and time.monotonic() - t < 10:
    time.sleep(0.02)
  assert codes == {1: 130, 0: 130}
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines == ["t: stopped at once (second signal)",
                   "t: process 1 ended: stopped at once (second signal); rerun"]


# --- one process ---------------------------------------------------------------------------


def test_local_cluster_has_the_same_calls(capsys):
  c = distributed.initialize("/out")
  assert isinstance(c, distributed.LocalCluster)
  assert c.gather("x", "v") == ["v"]
  c.agree({"a": "1", "b": b"2"})
  with pytest.raises(TypeError):
    c.agree({"a": 1})
  assert c.stop_reason is None
  c.request_stop("SIGINT to process 0")
  c.request_stop("second")
  assert c.stop_reason == "SIGINT to process 0"
  c.check()
  assert c.decide_stop(False) == "SIGINT to process 0" and c.decide_stop(True) is None
  c.shutdown()
  with pytest.raises(SystemExit) as e:
    distributed.LocalCluster("t").abort("disk full")
  assert e.value.code == 1 and capsys.readouterr().err == "t: error: disk full\n"
  one = distributed.initialize("/out", coordinator_address="127.0.0.1:1", num_processes=1,
                               process_id=0)
  assert isinstance(one, distributed.LocalCluster)
  with pytest.raises(distributed.DistributedError, match="process_id"):
    distributed.initialize("/out", coordinator_address="127.0.0.1:1", num_processes=2,
                           process_id=2)


def test_the_private_jax_apis_relied_on_still_exist():
  """distributed.py builds JAX's client itself (jax.distributed.initialize always hosts the
  service in process 0); a JAX upgrade that moves these must fail here, not in a job."""
  from jax._src import clusters, xla_bridge
  from jax._src import distributed as jax_distributed
  from jax._src.lib import _jax

  for arg in ("init_timeout", "heartbeat_timeout", "shutdown_timeout", "use_compression"):
    assert arg in _jax.get_distributed_runtime_client.__doc__
  for arg in ("heartbeat_timeout", "cluster_register_timeout", "shutdown_timeout"):
    assert arg in _jax.get_distributed_runtime_service.__doc__
  for name in ("connect", "shutdown", "key_value_set", "key_value_dir_get",
               "blocking_key_value_get"):
    assert hasattr(_jax.DistributedRuntimeClient, name)
  state = jax_distributed.global_state
  for name in ("client", "process_id", "num_processes", "coordinator_address"):
    assert hasattr(state, name)
  assert callable(state.initialize_preemption_sync_manager)
  assert callable(clusters.ClusterEnv.auto_detect_unset_distributed_params)
  assert callable(xla_bridge.backends_are_initialized)


# --- the extraction job's use of it (cbir_jax/job/control.py, agreement.py) -----------------


def _coordinators(kv, n=2):
  from cbir_jax.job import control

  cs, codes = _clusters(kv, n)
  return [control.Coordinator(c, log=lambda m: None) for c in cs], cs, codes


def _identities(keys, changed=()):
  from cbir_jax.job import identity

  return identity.RecordIdentities(
      keys=keys, stamps=[f"{100 + i}:{1_700_000_000_000_000_000 + i}" if k not in changed
                         else f"{999}:{1_800_000_000_000_000_000}" for i, k in enumerate(keys)])


def _first_differing_index(a, b):
  """A literal loop: the first position where two (key, stamp) lists differ."""
  for i in range(max(len(a), len(b))):
    if (a[i] if i < len(a) else None) != (b[i] if i < len(b) else None):
      return i
  return None


@pytest.mark.parametrize("case", ["missing", "extra", "changed"])
def test_processes_name_the_first_input_file_that_differs(case):
  from cbir_jax.job import agreement
  from cbir_jax.job.errors import ExtractError

  keys = [f"c{i % 3}/img_{i:05d}.jpg" for i in range(2 * agreement.BLOCK + 300)]
  keys.sort()
  mine = _identities(keys)
  other = {"missing": _identities(keys[:1500] + keys[1501:]),
           "extra": _identities(keys[:1700] + ["c1/new.jpg"] + keys[1700:]),
           "changed": _identities(keys, changed={keys[1800]})}[case]
  i = _first_differing_index(list(zip(mine.keys, mine.stamps)),
                             list(zip(other.keys, other.stamps)))
  assert i == {"missing": 1500, "extra": 1700, "changed": 1800}[case]
  kv = FakeKV()
  coords, cs, codes = _coordinators(kv)
  records = [mine, other]
  try:
    _, err = _in_threads([lambda k=k: coords[k].agree(
        {"threshold": "0.5", "input": records[k].digest()},
        {"input": f"{len(records[k])} files"}, records=records[k], noun="files")
        for k in range(2)])
    assert all(isinstance(e, ExtractError) for e in err), err
    assert str(err[0]) == str(err[1])  # the same line on every process
    n0, n1 = len(mine), len(other)
    expected = {
        "missing": f"file {i + 1} (in sorted order) is {mine.keys[i]} on process 0; "
                   f"{other.keys[i]} on process 1",
        "extra": f"file {i + 1} (in sorted order) is {mine.keys[i]} on process 0; "
                 f"c1/new.jpg on process 1",
        "changed": f"{keys[i]} differs: {100 + i} bytes, modified "
                   f"{agreement.describe_stamp(mine.stamps[i]).split('modified ')[1]} on "
                   "process 0; 999 bytes, modified 2027-01-15 08:00:00.000 UTC on process 1"}
    assert str(err[0]).startswith(
        f"processes disagree on input (process 0: {n0} files; process 1: {n1} files); "
        f"{expected[case]}. Start every process with the same flags"), str(err[0])
    assert codes == {}
  finally:
    _close(cs)


def test_describe_stamp_reads_size_and_time():
  from cbir_jax.job import agreement

  # 1_700_000_000 s after the epoch is 2023-11-14 22:13:20 UTC.
  assert agreement.describe_stamp("1234:1700000000123456789") == (
      "1234 bytes, modified 2023-11-14 22:13:20.123 UTC")
  assert agreement.describe_stamp("5:1700000000000000000:" + "ab" * 32) == (
      "5 bytes, modified 2023-11-14 22:13:20.000 UTC, sha256 abababababab")
  assert agreement.describe_stamp("missing") == "missing"


def test_one_process_failing_at_start_up_stops_every_process_naming_it():
  from cbir_jax.job.errors import ExtractError

  kv = FakeKV()
  coords, cs, codes = _coordinators(kv)
  try:
    errors = ["", "no images found under /data/photos"]
    _, err = _in_threads([lambda k=k: coords[k].all_started(errors[k]) for k in range(2)])
    assert str(err[1]) == "no images found under /data/photos"
    assert str(err[0]) == "process 1 could not start: no images found under /data/photos"
    _, err = _in_threads([lambda k=k: coords[k].all_started("") for k in range(2)])
    assert err == [None, None]
    out, err = _in_threads([lambda k=k: coords[k].max(7 + 3 * k) for k in range(2)])
    assert out == [10, 10] and err == [None, None]
    assert codes == {}
  finally:
    _close(cs)


def test_agreement_fields_are_named_after_the_flags(tmp_path):
  import dataclasses
  import types

  from PIL import Image

  from cbir_jax import backbones, extract, manifest
  from cbir_jax import preprocessing as pp
  from cbir_jax.job import agreement, plan, sources

  for i in range(3):
    Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
  source = sources.folder_source(str(tmp_path), None)
  loaded = types.SimpleNamespace(record=manifest.WeightsRecord(kind="random", name="random",
                                                               params_sha256="ab" * 32, seed=0),
                                 preprocessing=pp.TORCHVISION)
  bb = backbones.get("vgg_tiny")

  def fields(**kw):
    config = dataclasses.replace(extract.ExtractConfig(output="/o", images=str(tmp_path),
                                                       model="vgg_tiny"), **kw)
    kinds = plan.resolve_kinds(config.kinds, bb, loaded.record)
    return agreement.fields(config, plan.new_manifest(config, source, loaded, bb, 32, kinds),
                            source)

  base, shown = fields()
  assert shown["input"] == "3 files" and shown["weights"] == "parameters sha256 abababababab"
  assert base["images"] == str(tmp_path) and base["threshold"] == "0.5"
  for kw, name in (({"threshold": 0.3}, "threshold"), ({"masks": "spatial"}, "masks"),
                   ({"relative": False}, "relative"), ({"batch_size": 3}, "batch_size"),
                   ({"shard_size": 7}, "shard_size"), ({"kinds": ("mac",)}, "kinds"),
                   ({"output_dtype": "float16"}, "output_dtype"), ({"update": True}, "update")):
    other, _ = fields(**kw)
    assert [k for k in base if base[k] != other[k]] == [name], kw


@pytest.mark.parametrize("model,overrides", [
    ("vgg_tiny", {}), ("efficientnet_lite_tiny", {}),
    ("vgg_tiny", {"masks": "spatial", "relative": False, "dtype": "bfloat16"})])
def test_the_job_step_has_no_cross_process_collectives(tmp_path, monkeypatch, model, overrides):
  """Processes stop at different steps and leave a lost peer behind without hanging only
  because the step talks to no other device: checked on the step the job really compiles,
  on 8 devices (a mesh over several processes compiles to the same per-device program)."""
  from PIL import Image

  from cbir_jax import extract
  from cbir_jax.job import steps

  for i in range(3):
    Image.new("RGB", (40, 40), (50 * i, 20, 0)).save(tmp_path / f"{i}.png")
  seen = []
  make = steps.StepRunner.__init__

  def capture(self, *a, **kw):
    make(self, *a, **kw)
    seen.append(self)

  monkeypatch.setattr(steps.StepRunner, "__init__", capture)
  extract.run(extract.ExtractConfig(output=str(tmp_path / "out"), images=str(tmp_path),
                                    model=model, weights="random", image_size=32,
                                    progress="none", **overrides), log=lambda m: None)
  (runner,) = seen
  assert len(runner.mesh.devices.flat) == len(jax.devices()) > 1
  images = sharding.shard_batch(np.zeros((runner.plan.batch_rows, 32, 32, 3), np.uint8),
                                runner.mesh)
  hlo = runner.fn.lower(runner.params, images).compile().as_text()
  assert not distributed.step_has_collectives(hlo)


def test_signals_stop_after_the_step_inside_the_loop_and_at_once_elsewhere():
  import os
  import signal

  from cbir_jax.job import control

  lines = []
  coord = control.Coordinator(distributed.LocalCluster("extract"), log=lines.append)
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  with coord:
    with pytest.raises(KeyboardInterrupt):  # outside the steps: nothing to finish
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(1)
    assert coord.at_once == "SIGTERM" and not coord.stop_requested()
    with coord.stepping():
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.1)
      assert coord.stop_requested() and coord.cluster.stop_reason == "SIGINT to process 0"
      assert lines == ["stopping after the step in flight (SIGINT to process 0); finished "
                       "rows are kept (send SIGINT/SIGTERM again to stop at once)"]
      assert coord.decide_stop(False) == "SIGINT to process 0"
      with pytest.raises(KeyboardInterrupt):  # a second signal: at once
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
