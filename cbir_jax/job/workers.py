"""Which worker of how many this process is: from flags, or from the scheduler that started it.

A job over N workers is N independent processes; worker i takes its own fixed range of
shards (`shard_range`) and agrees with the others through the output directory alone. The
index and count come from `--worker`/`--workers`, else from the environment of:

  our Ray launcher / any wrapper   CBIR_JAX_WORKER, CBIR_JAX_WORKERS
  SLURM array jobs                 SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_COUNT
  SLURM srun tasks                 SLURM_PROCID, SLURM_NTASKS
  Kubernetes Indexed Jobs          JOB_COMPLETION_INDEX, count from --workers or CBIR_JAX_WORKERS
                                   (the Job's .spec.completions; Kubernetes does not export it)
Nothing set: one worker (index 0 of 1).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

WORKER_ENV, WORKERS_ENV = "CBIR_JAX_WORKER", "CBIR_JAX_WORKERS"


class WorkerSpecError(ValueError):
  """Worker index/count that cannot be used; the message names where they came from."""


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
  """This process' place in the job: worker `index` of `count`, and where that was read."""
  index: int = 0
  count: int = 1
  source: str = "single"

  def __post_init__(self) -> None:
    if self.count < 1:
      raise WorkerSpecError(f"worker count must be >= 1, got {self.count} ({self.source})")
    if not 0 <= self.index < self.count:
      raise WorkerSpecError(f"worker index must be in [0, {self.count}), got {self.index} "
                            f"({self.source})")

  def line(self) -> str:
    return f"worker {self.index} of {self.count} ({self.source})"


def _int(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise WorkerSpecError(f"${name}={value!r} is not an integer") from None


def resolve(worker: int | None, workers: int | None, env: Mapping[str, str]) -> WorkerSpec:
  """The worker index and count: flags first, then the environment (module docstring).

  Raises:
    WorkerSpecError: a half-given pair, a non-integer variable, an index out of range.
  """
  if worker is not None or (workers is not None and "JOB_COMPLETION_INDEX" not in env):
    if worker is None or workers is None:
      raise WorkerSpecError("give --worker and --workers together (or neither, to read them "
                            "from the scheduler's environment)")
    return WorkerSpec(worker, workers, "--worker/--workers")
  if env.get(WORKER_ENV, "").strip():
    count = _int(env, WORKERS_ENV)
    if count is None:
      raise WorkerSpecError(f"${WORKER_ENV} is set but ${WORKERS_ENV} is not")
    return WorkerSpec(_int(env, WORKER_ENV) or 0, count, f"${WORKER_ENV}/${WORKERS_ENV}")
  task, count = _int(env, "SLURM_ARRAY_TASK_ID"), _int(env, "SLURM_ARRAY_TASK_COUNT")
  if task is not None and count is not None:
    low = _int(env, "SLURM_ARRAY_TASK_MIN") or 0  # --array=1-8 numbers tasks from 1
    return WorkerSpec(task - low, count, "SLURM array job")
  rank, ntasks = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
  if rank is not None and ntasks is not None:
    return WorkerSpec(rank, ntasks, "SLURM tasks")
  index = _int(env, "JOB_COMPLETION_INDEX")
  if index is not None:
    count = workers if workers is not None else _int(env, WORKERS_ENV)
    if count is None:
      raise WorkerSpecError("$JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but not "
                            f"the worker count: pass --workers=COMPLETIONS or set ${WORKERS_ENV}")
    return WorkerSpec(index, count, "Kubernetes Indexed Job")
  return WorkerSpec()


def shard_range(num_shards: int, spec: WorkerSpec) -> range:
  """Worker i's shards: the i-th of `count` contiguous ranges (the last ones may be empty)."""
  per = math.ceil(num_shards / spec.count) if num_shards else 0
  return range(min(spec.index * per, num_shards), min((spec.index + 1) * per, num_shards))


__all__ = ["WORKER_ENV", "WORKERS_ENV", "WorkerSpec", "WorkerSpecError", "resolve",
           "shard_range"]
