r"""The share of a job's wall time spent finishing it (issue 18: under 5% at 200,000 rows).

  CBIR_JAX_TEST_BACKBONES=1 python benchmarks/finish_share.py --rows=200000 --workdir=/tmp/fs

Writes `rows` small synthetic PNGs (once; reused by later runs), extracts them with the
test-only tiny backbone and random weights, and prints one line: the finishing time (listing
the shards as the index: metadata table, failure list, part links, manifest), the job's wall
time, their ratio, and whether any descriptor array was copied (every part must be the
shard's own file: a hard link, two names for one inode).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import time


def _images(folder: pathlib.Path, rows: int) -> None:
  import numpy as np
  from PIL import Image

  done = folder.parent / f".images-{rows}.done"  # beside the folder: not an input file
  if done.exists():
    return
  shutil.rmtree(folder, ignore_errors=True)
  rng = np.random.default_rng(0)
  for i in range(rows):
    d = folder / f"c{i // 1000:04d}"
    if i % 1000 == 0:
      d.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(d / f"{i:07d}.png")
  done.touch()


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, default=200_000)
  p.add_argument("--workdir", default="/tmp/cbir_finish_share")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--shard_size", type=int, default=4096)
  args = p.parse_args()
  os.environ.setdefault("CBIR_JAX_TEST_BACKBONES", "1")
  work = pathlib.Path(args.workdir)
  t = time.perf_counter()
  _images(work / "images", args.rows)
  print(f"images ready ({time.perf_counter() - t:.0f} s)", flush=True)
  from cbir_jax import extract, store

  out = work / "out"
  shutil.rmtree(out, ignore_errors=True)
  summary = extract.run(extract.ExtractConfig(
      output=str(out), images=str(work / "images"), model="vgg_tiny", weights="random",
      image_size=32, batch_size=args.batch_size, shard_size=args.shard_size, progress="log",
      log_every_s=30))
  m = store.load_manifest(out)
  copied = [e.file for parts in m.parts.values() for e in parts
            if not os.path.samefile(out / e.file,
                                    out / m.shards[int(e.file[-10:-4])].dir /
                                    f"{e.file.split('/')[0]}.npy")]
  print(summary.line())
  print(f"finish_share: {m.rows} rows in {len(m.shards)} shards: finishing "
        f"{summary.finish_s:.2f} s of {summary.seconds:.1f} s wall = "
        f"{100 * summary.finish_s / summary.seconds:.2f}%; descriptor arrays copied: "
        f"{len(copied)}")


if __name__ == "__main__":
  main()
