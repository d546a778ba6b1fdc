"""A toy multi-process job on cbir_jax.distributed, for the multi-process robustness tests.

Each process runs the same loop of jitted global steps the extraction job runs
(batch split on a "data" mesh over every process' devices), with the exit codes of
launch/extract.py: 0 done, 130 stopped together, 1 error with one "toy: error:" line.

  python toy_job.py --coordinator=127.0.0.1:PORT --num_processes=2 --process_id=0 \
      --job=/some/output --steps=100 --step_delay_s=0.05 --field threshold=0.5
  python toy_job.py ... --bench   # per-step cost of ways to agree on stopping
"""
from __future__ import annotations

import argparse
import signal
import sys
import time


def _args(argv):
  p = argparse.ArgumentParser()
  p.add_argument("--coordinator", required=True)
  p.add_argument("--num_processes", type=int, default=2)
  p.add_argument("--process_id", type=int, required=True)
  p.add_argument("--job", default="toy-job")
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--step_delay_s", type=float, default=0.0)
  p.add_argument("--field", action="append", default=[], help="NAME=VALUE to agree on")
  p.add_argument("--startup_s", type=float, default=45.0)
  p.add_argument("--peer_s", type=float, default=10.0)
  p.add_argument("--bench", action="store_true")
  return p.parse_args(argv)


def _step_fn():
  import jax
  import jax.numpy as jnp
  import numpy as np

  from cbir_jax import sharding

  mesh = sharding.data_mesh()
  w = jnp.asarray(np.random.default_rng(0).standard_normal((64, 64)), jnp.float32)

  @jax.jit
  def step(x):  # per-row work only, like the extraction step: no collectives
    return jnp.tanh(x @ w) @ w

  local = sharding.local_batch_size(4, mesh)

  def run(i: int) -> np.ndarray:
    x = np.full((local, 64), i % 7, np.float32)
    return sharding.host_local(step(sharding.shard_batch(x, mesh)))

  return run, mesh, local


def _install_signals(cluster, pid: int) -> None:
  received = []

  def handle(signum, frame):
    if received:  # a second signal to this process: stop at once
      raise KeyboardInterrupt
    received.append(signum)
    cluster.request_stop(f"{signal.Signals(signum).name} to process {pid}")
    print(f"toy: process {pid}: {signal.Signals(signum).name} received, stopping",
          file=sys.stderr, flush=True)

  for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, handle)


def _job(cluster, args) -> int:
  pid = cluster.process_index
  cluster.agree(dict(f.split("=", 1) for f in args.field))
  run, _, _ = _step_fn()
  print(f"toy: process {pid}: agreed, stepping", file=sys.stderr, flush=True)
  step = 0
  for step in range(args.steps):
    if cluster.stop_reason:
      break
    cluster.check()
    run(step)
    if args.step_delay_s:
      time.sleep(args.step_delay_s)
    print(f"step {step}", flush=True)
  else:
    step = args.steps
  # The decision point every process reaches, whether it stopped or finished its steps.
  reason = cluster.decide_stop(step == args.steps)
  cluster.shutdown()
  if reason:
    print(f"toy: stopped at step {step} ({reason}); rerun to continue", file=sys.stderr,
          flush=True)
    return 130
  print("toy: done", file=sys.stderr, flush=True)
  return 0


def main(argv) -> int:
  args = _args(argv)
  from cbir_jax import distributed

  try:
    cluster = distributed.initialize(
        args.job, coordinator_address=args.coordinator, num_processes=args.num_processes,
        process_id=args.process_id, program="toy", hint="rerun the toy job",
        timeouts=distributed.Timeouts(startup_s=args.startup_s, peer_s=args.peer_s))
  except distributed.DistributedError as e:
    print(f"toy: error: {e}", file=sys.stderr, flush=True)
    return 1
  if args.bench:
    return _bench(cluster)
  _install_signals(cluster, cluster.process_index)
  try:
    return _job(cluster, args)
  except distributed.DistributedError as e:
    cluster.abort(str(e), e.exit_code)
  except KeyboardInterrupt:
    cluster.abort("stopped at once (second signal)", distributed.EXIT_INTERRUPTED)


# --- per-step cost of stop mechanisms ----------------------------------------------------


def _bench(cluster, rounds: int = 5, steps: int = 200) -> int:
  """Milliseconds per step of: no stop check; the watchdog's flag (what the job uses); a
  key-value read per step; a process_allgather per step; the flag folded into the step."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import multihost_utils

  from cbir_jax import sharding

  run, mesh, local = _step_fn()
  client = cluster._client  # pylint: disable=protected-access
  n_local = len(mesh.local_devices)
  w = jnp.ones((64, 64), jnp.float32)

  @jax.jit
  def folded(x, flags):  # the step plus a global max of per-device stop flags
    return jnp.tanh(x @ w) @ w, jnp.max(flags)

  def run_folded(i):
    x = sharding.shard_batch(np.full((local, 64), i % 7, np.float32), mesh)
    flags = sharding.shard_batch(np.zeros(n_local, np.int32), mesh)
    y, stop = folded(x, flags)
    sharding.host_local(y)
    return int(stop)

  variants = {
      "none": lambda i: run(i),
      "watchdog flag": lambda i: (cluster.stop_reason, cluster.check(), run(i)),
      "kv read per step": lambda i: (client.key_value_dir_get("cbir_jax/bench/stop/"), run(i)),
      "process_allgather per step": lambda i: (
          multihost_utils.process_allgather(np.int32(0)), run(i)),
      "folded into the step": run_folded,
  }
  for f in variants.values():  # compile everything first
    f(0)
  times = {k: [] for k in variants}
  for _ in range(rounds):  # alternated, so that machine load hits every variant alike
    for name, f in variants.items():
      cluster.barrier(f"bench-{name}")
      t = time.perf_counter()
      for i in range(steps):
        f(i)
      times[name].append((time.perf_counter() - t) / steps * 1e3)
  base = float(np.median(times["none"]))
  if cluster.process_index == 0:
    for name, ts in times.items():
      m = float(np.median(ts))
      print(f"{name:28s} {m:7.3f} ms/step  (+{m - base:6.3f} ms; rounds: "
            f"{', '.join(f'{t:.3f}' for t in ts)})", flush=True)
  cluster.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
