"""Section end_to_end: the extraction job on a folder of JPEGs, into a temporary directory.

Calls the library's job (`cbir_jax.extract.run`) with the public config, as
launch/extract.py does, and reports its own accounting: images/s, the share of
the wall time the step loop spent waiting for decoded input, and the process'
CPU time per image.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

from cbir_jax import input_pipeline
from benchmarks import pipeline


def _subset_folder(root: str, limit: int, tmp: str) -> str:
  """A folder of symlinks to the first `limit` images of `root`, keeping class subfolders."""
  out = os.path.join(tmp, "images")
  for r in input_pipeline.folder_records(root)[:limit]:
    rel = os.path.relpath(r.key, root)
    os.makedirs(os.path.join(out, os.path.dirname(rel)), exist_ok=True)
    os.symlink(r.key, os.path.join(out, rel))
  return out


def has_shipped_weights(backbone: str) -> bool:
  from cbir_jax import weights

  return (weights.default_weights_dir(backbone) / "weights.json").is_file()


def extract_folder(images: str, *, backbone: str, batch: int, dtype: str = "float32",
                   num_threads: int | None = None, log=print) -> dict[str, Any]:
  """Runs the job once over `images` (shipped weights where they exist, else random)."""
  from cbir_jax import extract

  shipped = has_shipped_weights(backbone)
  with tempfile.TemporaryDirectory(prefix="cbir_bench_") as tmp:
    config = extract.ExtractConfig(
        output=os.path.join(tmp, "out"), images=images, model=backbone,
        weights=None if shipped else "random", batch_size=batch, dtype=dtype,
        num_threads=num_threads, progress="none")
    cpu = pipeline.cpu_seconds()
    s = extract.run(config, log=lambda msg: None)
    cpu = pipeline.cpu_seconds() - cpu
  total = s.images + s.failed
  log(f"[end_to_end] {backbone} {dtype} batch {batch}: {total} images in {s.seconds:.1f} s, "
      f"{s.images_per_s:.1f} images/s, waiting for input {s.input_wait_s / s.seconds:.0%}")
  return {"backbone": backbone, "weights": "shipped" if shipped else "random",
          "batch": batch, "dtype": dtype, "draft": getattr(config, "draft", None),
          "num_threads": num_threads, "images": total, "failed": s.failed,
          "seconds": s.seconds, "images_per_s": s.images_per_s,
          # after start-up and compilation (what a long job runs at), where the job reports it
          "steady_images_per_s": getattr(s, "steady_images_per_s", None),
          "input_wait_s": s.input_wait_s, "input_wait_share": s.input_wait_s / s.seconds,
          "device_s": s.device_s, "write_s": s.write_s, "compiles": s.compiles,
          "cpu_s": cpu, "images_per_cpu_s": total / cpu if cpu > 0 else None}


def run(*, data_dir: str, folder: str, backbone: str, batch: int, limit: int = 0,
        dtype: str = "float32", num_threads: int | None = None, log=print) -> dict[str, Any]:
  """The job on data_dir/folder; `limit` > 0 uses only its first `limit` images."""
  root = os.path.join(data_dir, folder)
  log(f"[end_to_end] extract {folder}{f' (first {limit})' if limit else ''} with {backbone}, "
      f"batch {batch} ...")
  with tempfile.TemporaryDirectory(prefix="cbir_bench_") as tmp:
    images = _subset_folder(root, limit, tmp) if limit > 0 else root
    row = extract_folder(images, backbone=backbone, batch=batch, dtype=dtype,
                         num_threads=num_threads, log=log)
  return {"folder": folder, **row}
