"""An extraction job on a Ray cluster (or a local one): one Ray task per worker.

  python launch/extract.py --images=PHOTOS --output=OUT --ray --workers=8 --ray_gpus=1

Each task runs worker i of N (job/workers.py) in a fresh Python process with the GPUs it asked
for, so a crash or a kill of one never leaves JAX state behind in a Ray worker; a task that
fails (the process killed, an error) is retried by Ray (`ray_retries`), and the retry continues
that worker's shards where they stopped. The worker that writes the last shard finishes the job;
if every task succeeded and the job is still unfinished (a retry finished its part first), the
driver runs the finishing step itself. Needs the `ray` extra (pip install 'cbir-jax[ray]').
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any, Callable

from cbir_jax.job.workers import WORKER_ENV, WORKERS_ENV

# Environment a task's process gets from the driver (Ray workers may start with another).
_FORWARD = ("PYTHONPATH", "XLA_FLAGS", "JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL", "TFDS_DATA_DIR")
_FORWARD_PREFIXES = ("CBIR_JAX_",)


@dataclasses.dataclass
class RayOptions:
  """How a job runs on Ray.

  Attributes:
    ray: run the job as Ray tasks, one per worker (`--workers` of them; default 1).
    ray_address: the Ray cluster to join (None: $RAY_ADDRESS, else a local Ray instance).
    ray_gpus: GPUs each worker task asks for (0 on CPU-only clusters).
    ray_cpus: CPUs each worker task asks for.
    ray_retries: times Ray retries a failed worker task (it continues where it stopped).
  """
  ray: bool = False
  ray_address: str | None = None
  ray_gpus: float = 0.0
  ray_cpus: float = 1.0
  ray_retries: int = 3


def _config_json(config: Any) -> str:
  d = dataclasses.asdict(config)
  d.update(worker=None, workers=None, finish=False)  # the task's environment names its index
  return json.dumps(d)


def _config_from_json(text: str) -> Any:
  from cbir_jax import extract

  d = json.loads(text)
  d["kinds"] = tuple(d.get("kinds") or ())
  return extract.ExtractConfig(**d)


def run_worker(config_json: str, index: int, count: int, env: dict[str, str]) -> str:
  """One worker as its own process (the body of a Ray task); raises if it did not exit 0."""
  child_env = dict(os.environ, **env, **{WORKER_ENV: str(index), WORKERS_ENV: str(count)})
  p = subprocess.run([sys.executable, "-m", "cbir_jax.ray_job", config_json], env=child_env,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if p.returncode != 0:
    tail = [ln for ln in p.stderr.splitlines() if ln.strip()][-1:] or [""]
    raise RuntimeError(f"worker {index} of {count} exited {p.returncode}: {tail[0]}")
  return p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""


def run(config: Any, options: RayOptions, *, log: Callable[[str], None]) -> int:
  """Runs every worker as a Ray task and waits for all; returns the exit status (0: done).

  Raises:
    ExtractError, StoreError: a task failed every retry, or the job cannot be finished.
  """
  import ray

  from cbir_jax import extract, store

  count = config.workers or 1
  config = dataclasses.replace(config, worker=None, workers=None)
  config.check()  # bad settings end here, before any task starts
  ray.init(address=options.ray_address, include_dashboard=False, ignore_reinit_error=True,
           log_to_driver=False)
  task = ray.remote(num_gpus=options.ray_gpus, num_cpus=options.ray_cpus,
                    max_retries=options.ray_retries, retry_exceptions=True)(run_worker)
  text = _config_json(config)
  env = {k: v for k, v in os.environ.items() if k in _FORWARD or k.startswith(_FORWARD_PREFIXES)}
  refs = [task.remote(text, i, count, env) for i in range(count)]
  log(f"ray: {count} worker task(s) submitted ({options.ray_gpus:g} GPU, {options.ray_cpus:g} "
      f"CPU each, {options.ray_retries} retries)")
  try:
    lines = ray.get(refs)
  except Exception as e:  # a task that failed every retry: the others' shards are kept
    raise extract.ExtractError(
        f"a worker task failed after {options.ray_retries} retries: "
        f"{getattr(e, 'cause', None) or e}; finished shards are kept, rerun to continue"
        ) from None
  for i, line in enumerate(lines):
    log(f"ray: worker {i}: {line}")
  if not store.load_manifest(config.output).complete:
    summary = extract.run(dataclasses.replace(config, worker=0, workers=1, finish=True), log=log)
    log(f"ray: finished by the driver: {summary.line()}")
  print(f"extract: {count} worker task(s) done; output {config.output}", flush=True)
  return 0


def _task_main(argv: list[str]) -> int:
  """A worker task's process: the launcher's preamble, then the job (its exit status)."""
  from cbir_jax import cli, runtime

  cli.quiet_environment()
  runtime.tune_xla_cpu()  # before JAX starts, as launch/extract.py does
  from cbir_jax import extract

  return extract.main(_config_from_json(argv[1]))


if __name__ == "__main__":
  sys.exit(_task_main(sys.argv))


__all__ = ["RayOptions", "run", "run_worker"]
