"""Section 3: the input pipeline alone: JPEG files -> decoded, resized uint8 batches.

tf.data (`cbir_jax.input_pipeline.image_batches`, Pillow decoding inside a
parallel map) at 1..N threads, against plain single-threaded Pillow, each
with and without JPEG draft decoding (DCT-domain downscaling by 1/2..1/8
while decoding, for images much larger than the network input).
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

from cbir_jax import input_pipeline
from cbir_jax.benchmark import timing


def image_files(data_dir: str, folder: str, limit: int) -> list[str]:
  """The first `limit` images (sorted) of data_dir/folder, read once so the page cache is warm."""
  root = os.path.join(data_dir, folder)
  keys = [r.key for r in input_pipeline.folder_records(root)][:limit]
  if not keys:
    raise FileNotFoundError(f"no images under {root}")
  for k in keys:  # warm the OS cache: we measure decoding, not the disk
    input_pipeline.read_file(k)
  return keys


def _tfdata(keys: Sequence[str], size: int, batch: int, threads: int, draft: bool) -> float:
  t = time.perf_counter()
  n = 0
  for b in input_pipeline.image_batches(keys, image_size=size, batch_size=batch,
                                        num_threads=threads, draft=draft):
    n += int(b.valid.sum())
  assert n == len(keys)
  return time.perf_counter() - t


def _pillow(keys: Sequence[str], size: int, draft: bool) -> float:
  t = time.perf_counter()
  for k in keys:
    input_pipeline.decode_image(input_pipeline.read_file(k), size, draft=draft)
  return time.perf_counter() - t


def run(*, data_dir: str, folder: str, num_images: int, image_size: int, batch: int,
        threads: Sequence[int], repeats: int = 1, log=print) -> dict[str, Any]:
  """Images/s of every (reader, threads, draft) configuration, plus the image count and sizes."""
  keys = image_files(data_dir, folder, num_images)
  log(f"[pipeline] {len(keys)} images of {folder}, {image_size}x{image_size} ...")
  _tfdata(keys[:2], image_size, batch, 1, False)  # imports TensorFlow: not part of any figure
  rows = []
  for draft in (False, True):
    t = timing.timed(lambda: _pillow(keys, image_size, draft), repeats=repeats, warmup=0)
    rows.append({"reader": "pillow", "threads": 1, "draft": draft,
                 "images_per_s": timing.rate(len(keys), t), "seconds": t})
    for n in threads:
      # warmup=1 would decode everything twice; tf.data start-up (~0.1 s) is
      # part of what a job pays, so it stays in the timed run.
      t = timing.timed(lambda: _tfdata(keys, image_size, batch, n, draft), repeats=repeats,
                       warmup=0)
      rows.append({"reader": "tf.data", "threads": n, "draft": draft,
                   "images_per_s": timing.rate(len(keys), t), "seconds": t})
  res: dict[str, Any] = {"folder": folder, "num_images": len(keys), "image_size": image_size,
                         "batch": batch, "rows": rows}
  for draft in (False, True):
    pil = next(r for r in rows if r["reader"] == "pillow" and r["draft"] == draft)
    best = max((r for r in rows if r["reader"] == "tf.data" and r["draft"] == draft),
               key=lambda r: r["images_per_s"])
    key = "draft" if draft else "full"
    res[f"best_tfdata_over_pillow_{key}"] = best["images_per_s"] / pil["images_per_s"]
    res[f"best_tfdata_threads_{key}"] = best["threads"]
  for reader in ("pillow", "tf.data"):
    on = max(r["images_per_s"] for r in rows if r["reader"] == reader and r["draft"])
    off = max(r["images_per_s"] for r in rows if r["reader"] == reader and not r["draft"])
    res[f"draft_speedup_{reader}"] = on / off
  return res
