"""Shards written in the step loop (before) vs on the background writer thread (after).

The same extraction job (`extract.run` through `benchmark.end_to_end.extract_folder`: Lite0,
float32, batch 256, default decoding) over JPEGs made like the GPU check's photo-size set,
alternating the two variants. "before" replaces the step loop's shard writer (`StepRunner.writer`)
with the write itself, which is what the step loop did until the writer thread landed.

  PYTHONPATH=. python3 docs/gpu/2026-11-28_h100_writer_probe.py --count=16000 --rounds=2
"""
from __future__ import annotations

import argparse
import json
import os
import time

from cbir_jax import samples
from benchmarks import end_to_end as e2e
from benchmarks import photos
from cbir_jax.job import steps


class _Inline:
  """The write in the step loop itself, as before the writer thread."""

  def submit(self, fn, *args) -> None:
    fn(*args)

  def drain(self) -> None:
    pass

  def close(self) -> None:
    pass


def _inline_init(self, *args, **kwargs) -> None:
  _AFTER(self, *args, **kwargs)
  self.writer = _Inline()


_AFTER = steps.StepRunner.__init__


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--count", type=int, default=16000)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--backbone", default="efficientnet_lite0")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--json", default=None)
  a = p.parse_args()
  t = time.perf_counter()
  sources = tuple(str(s) for s in samples.sample_images())
  paths = photos.make(photos.PhotoSet(sources, a.count, 500, 375), None)
  print(f"{len(paths)} JPEGs ready in {time.perf_counter() - t:.0f} s", flush=True)
  rows = []
  for r in range(a.rounds):
    for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
      steps.StepRunner.__init__ = _inline_init if name == "before" else _AFTER
      job = e2e.extract_folder(os.path.dirname(paths[0]), backbone=a.backbone, batch=256,
                               dtype=a.dtype, log=lambda m: None)
      rows.append({"variant": name, "round": r, **job})
      print(f"round {r} {name:6s}: {job['images_per_s']:7.1f} images/s, "
            f"{job['steady_images_per_s']:7.1f} while stepping; input wait "
            f"{job['input_wait_s']:.1f} s, device {job['device_s']:.1f} s, write "
            f"{job['write_s']:.1f} s, total {job['seconds']:.1f} s", flush=True)
  steps.StepRunner.__init__ = _AFTER
  if a.json:
    with open(a.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
