"""Section 6: the model + descriptor step on 1, 2, 4, 8 devices, same global batch.

On a CPU host the devices are fake (XLA_FLAGS=--xla_force_host_platform_device_count),
sharing the same cores, so this measures the overhead of sharding (partitioned
compile, per-device dispatch, gathers) and not a speed-up. The device count must
be set before JAX starts, so each count runs in its own subprocess
(`python -m benchmarks.scaling`). On a GPU host the real devices are
used in-process, as meshes over the first 1, 2, 4, ... of them.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any, Sequence

from benchmarks import timing


def measure(num_devices: int, *, backbone: str, batch: int, image_size: int, dtype: str,
            repeats: int) -> dict[str, Any]:
  """Images/s of the sharded step on the first `num_devices` devices (in this process)."""
  import jax

  from cbir_jax import backbones, inference, sharding

  devices = jax.devices()[:num_devices]
  if len(devices) < num_devices:
    raise ValueError(f"asked for {num_devices} devices, JAX sees {len(jax.devices())}")
  if batch % num_devices:
    raise ValueError(f"global batch {batch} is not divisible by {num_devices} devices")
  mesh = sharding.data_mesh(devices)
  bb = backbones.get(backbone)
  from benchmarks.model import random_params

  params = sharding.replicate(random_params(bb, image_size), mesh)
  x = jax.device_put(timing.synthetic_images(batch, image_size), sharding.batch_sharding(mesh))
  step = inference.jit_describe(bb, mesh=mesh, preprocessing=bb.preprocessing,
                                kinds=("fc_conv",), dtype=inference.compute_dtype(dtype))
  t = timing.timed(lambda: step(params, x), repeats=repeats, warmup=1,
                   sync=jax.block_until_ready)
  return {"devices": num_devices, "device_kind": devices[0].device_kind, "backbone": backbone,
          "batch": batch, "image_size": image_size, "dtype": dtype,
          "images_per_s": timing.rate(batch, t), "seconds": t}


def _subprocess(num_devices: int, **kw: Any) -> dict[str, Any]:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  args = [sys.executable, "-m", "benchmarks.scaling", json.dumps(
      {"num_devices": num_devices, **kw})]
  proc = subprocess.run(args, env=env, capture_output=True, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    raise RuntimeError(f"scaling run on {num_devices} devices failed "
                       f"(exit {proc.returncode}): {proc.stderr[-2000:]}")
  return json.loads(lines[-1])


def run(*, device_counts: Sequence[int], backbone: str, batch: int, image_size: int,
        dtype: str, repeats: int, log=print) -> list[dict[str, Any]]:
  """One row per device count, with the slowdown (or speed-up) relative to one device."""
  import jax

  rows = []
  real = jax.default_backend() != "cpu"
  if real:  # every real device, in this process
    n = len(jax.devices())
    counts = sorted({c for c in device_counts if c <= n} | {n})
  else:
    counts = list(device_counts)
  for c in counts:
    log(f"[scaling] {backbone} batch {batch} on {c} {'' if real else 'fake CPU '}device(s) ...")
    kw = dict(backbone=backbone, batch=batch, image_size=image_size, dtype=dtype,
              repeats=repeats)
    rows.append(measure(c, **kw) if real else _subprocess(c, **kw))
  base = rows[0]["images_per_s"]
  for r in rows:
    r["relative_to_first"] = r["images_per_s"] / base
    r["fake_devices"] = not real
  return rows


if __name__ == "__main__":
  kw = json.loads(sys.argv[1])
  print(json.dumps(measure(kw.pop("num_devices"), **kw)))
