"""Section input: decoding JPEGs to network-size uint8, per wall second and per CPU-second.

The product's pipeline (`input_pipeline.positions_batches`, whichever engine is on
the branch) at 1 thread and at every core, next to a bare Pillow loop with full
decoding and with JPEG draft (DCT-scaled) decoding, on ImageNet-size photos and on
phone-size JPEGs made from them (`photos.py`). Variants alternate within rounds.
"""
from __future__ import annotations

import dataclasses
import os
import resource
import time
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from cbir_jax import input_pipeline
from cbir_jax.benchmark import photos, timing


def cores() -> int:
  """The cores this process may use (the product's default decode parallelism)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_seconds() -> float:
  """User + system CPU time of this process' threads, plus its reaped child processes."""
  c = resource.getrusage(resource.RUSAGE_CHILDREN)
  return time.process_time() + c.ru_utime + c.ru_stime


def bare_pillow(keys: Sequence[str], size: int, *, draft: bool) -> None:
  """What a user writes without the product: open, (draft), RGB, bilinear resize, array."""
  for k in keys:
    with Image.open(k) as img:
      if draft:
        img.draft("RGB", (size, size))
      np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))


def product(keys: Sequence[str], size: int, *, batch: int, threads: int, draft: bool) -> None:
  """The product's pipeline over `keys`; every image must come back decoded."""
  decoded = rows = 0
  for b in input_pipeline.positions_batches(keys, np.arange(len(keys)), image_size=size,
                                            batch_size=batch, num_threads=threads, draft=draft):
    rows += int(np.sum(b.valid))
    decoded += int(np.sum(b.ok))
  if rows != len(keys) or decoded != len(keys):
    raise RuntimeError(f"pipeline returned {rows} rows, {decoded} decoded, for {len(keys)} files")


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str  # "pillow" (bare loop) or "product"
  threads: int
  draft: bool

  def fn(self, keys: Sequence[str], size: int, batch: int) -> Callable[[], None]:
    if self.name == "pillow":
      return lambda: bare_pillow(keys, size, draft=self.draft)
    return lambda: product(keys, size, batch=batch, threads=self.threads, draft=self.draft)


def variants(threads: Sequence[int]) -> list[Variant]:
  """Bare Pillow full and draft, then the product (draft, its default) at each thread count."""
  return [Variant("pillow", 1, False), Variant("pillow", 1, True),
          *(Variant("product", t, True) for t in threads)]


def compare(keys: Sequence[str], vs: Sequence[Variant], *, size: int, batch: int, rounds: int
            ) -> list[dict[str, Any]]:
  """Wall and CPU seconds of every variant, alternating variant by variant in each round.

  The start rotates from round to round, so no variant always runs first (after a
  pause) or last. Figures are medians over rounds.
  """
  fns = [v.fn(keys, size, batch) for v in vs]
  wall: list[list[float]] = [[] for _ in vs]
  cpu: list[list[float]] = [[] for _ in vs]
  for r in range(rounds):
    for j in range(len(vs)):
      i = (j + r) % len(vs)
      t, c = time.perf_counter(), cpu_seconds()
      fns[i]()
      wall[i].append(time.perf_counter() - t)
      cpu[i].append(cpu_seconds() - c)
  n = len(keys)
  rows = []
  for v, w, c in zip(vs, wall, cpu):
    rows.append({"variant": v.name, "threads": v.threads, "draft": v.draft,
                 "images_per_s": timing.rate(n, w),
                 "images_per_cpu_s": n / max(timing.median(c), 1e-9),
                 "cores_busy": timing.median(c) / timing.median(w),
                 "wall_s": w, "cpu_s": c})
  return rows


def _ratios(rows: Sequence[dict[str, Any]], threads: Sequence[int]) -> dict[str, float]:
  get = {(r["variant"], r["threads"], r["draft"]): r for r in rows}
  full, draft = get[("pillow", 1, False)], get[("pillow", 1, True)]
  one, most = get[("product", threads[0], True)], get[("product", threads[-1], True)]
  per_cpu = lambda a, b: a["images_per_cpu_s"] / b["images_per_cpu_s"]  # noqa: E731
  return {"product_over_pillow_full_per_cpu_s": per_cpu(one, full),
          "product_over_pillow_draft_per_cpu_s": per_cpu(one, draft),
          "pillow_draft_over_full_per_cpu_s": per_cpu(draft, full),
          "product_threads_speedup_wall": most["images_per_s"] / one["images_per_s"]}


def run(*, data_dir: str, folder: str, num_images: int, phone_images: int, image_size: int,
        batch: int, threads: Sequence[int] | None, rounds: int, photo_root: str | None = None,
        log=print) -> dict[str, Any]:
  """Rows for each photo set: images/s and images per CPU-second of every variant, with ratios.

  Args:
    data_dir, folder: the ImageNet-size photos (their first `num_images`, sorted).
    phone_images: phone-size JPEGs to make from the first photos (0: skip that set).
    threads: the product's thread counts (default: 1 and every core).
    photo_root: cache folder of the made JPEGs (default: the temp dir).
  """
  threads = tuple(threads or sorted({1, cores()}))
  keys = [r.key for r in input_pipeline.folder_records(os.path.join(data_dir, folder))]
  if not keys:
    raise FileNotFoundError(f"no images under {os.path.join(data_dir, folder)}")
  sets = {folder: keys[:num_images]}
  if phone_images > 0:
    log(f"[input] making {phone_images} phone-size JPEGs (cached) ...")
    sets["phone-size"] = photos.make(photos.PhotoSet(tuple(keys[:phone_images]), phone_images),
                                     photo_root)
  vs = variants(threads)
  out: dict[str, Any] = {"image_size": image_size, "batch": batch, "rounds": rounds,
                         "threads": list(threads), "sets": [], "rows": []}
  for name, paths in sets.items():
    for p in paths:  # warm the page cache: decoding is measured, not the disk
      input_pipeline.read_file(p)
    product(paths[:2], image_size, batch=batch, threads=1, draft=True)  # engine start-up, imports
    log(f"[input] {name}: {len(paths)} images, {rounds} rounds of {len(vs)} variants ...")
    rows = compare(paths, vs, size=image_size, batch=batch, rounds=rounds)
    for r in rows:
      r["set"] = name
    out["rows"].extend(rows)
    out["sets"].append({"set": name, **photos.describe(paths), **_ratios(rows, threads)})
  return out
