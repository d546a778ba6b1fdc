"""Section 4: the extraction job end to end on a folder of JPEGs, into a temporary directory.

Calls the library's job (`cbir_jax.extract.run`) exactly as launch/extract.py
does, and reports its own accounting: images/s, and the share of the wall
time the step loop spent waiting for decoded input.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

from cbir_jax import input_pipeline


def _subset_folder(root: str, limit: int, tmp: str) -> str:
  """A folder of symlinks to the first `limit` images of `root`, keeping class subfolders."""
  out = os.path.join(tmp, "images")
  for r in input_pipeline.folder_records(root)[:limit]:
    rel = os.path.relpath(r.key, root)
    os.makedirs(os.path.join(out, os.path.dirname(rel)), exist_ok=True)
    os.symlink(r.key, os.path.join(out, rel))
  return out


def run(*, data_dir: str, folder: str, backbone: str, batch: int, limit: int = 0,
        dtype: str = "float32", num_threads: int | None = None, draft: bool = False,
        log=print) -> dict[str, Any]:
  """Runs the job once; `limit` > 0 uses only the first `limit` images."""
  from cbir_jax import extract, weights

  root = os.path.join(data_dir, folder)
  shipped = (weights.default_weights_dir(backbone) / "weights.json").is_file()
  with tempfile.TemporaryDirectory(prefix="cbir_bench_") as tmp:
    images = _subset_folder(root, limit, tmp) if limit > 0 else root
    log(f"[end_to_end] extract {folder}{f' (first {limit})' if limit else ''} with {backbone}, "
        f"batch {batch} ...")
    config = extract.ExtractConfig(
        output=os.path.join(tmp, "out"), images=images, model=backbone,
        weights=None if shipped else "random", batch_size=batch, dtype=dtype,
        num_threads=num_threads, draft=draft, progress="none")
    s = extract.run(config, log=lambda msg: None)
  total = s.images + s.failed
  return {"folder": folder, "backbone": backbone, "weights": "shipped" if shipped else "random",
          "batch": batch, "dtype": dtype, "draft": draft, "images": total, "failed": s.failed,
          "seconds": s.seconds, "images_per_s": s.images_per_s,
          "input_wait_s": s.input_wait_s, "input_wait_share": s.input_wait_s / s.seconds,
          "device_s": s.device_s, "write_s": s.write_s, "compiles": s.compiles}
