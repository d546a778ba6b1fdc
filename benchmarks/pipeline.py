"""Section input: decoding JPEGs to network-size uint8, per wall second and per CPU-second.

The product's pipeline (`input_pipeline.positions_batches`) at 1 thread and at every
core in this process, and with worker processes, next to a bare Pillow loop with full
decoding and with JPEG draft (DCT-scaled) decoding, on ImageNet-size photos and on
phone-size JPEGs made from them (`photos.py`). Variants alternate within rounds.
`scaling` is the GPU check's sweep: threads and processes at 1, 2, 4, ... cores.
Canvas rows: the same pipeline decoding into canvases for the device resize (no host resize:
JPEGs by simplejpeg straight into reused canvas buffers, the rest by Pillow), side by side with
today's decode + host resize at every core, alternating: issue 17's CPU-seconds per image.
"""
from __future__ import annotations

import dataclasses
import os
import resource
import time
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from cbir_jax import canvas, input_pipeline
from benchmarks import photos, timing


cores = input_pipeline.default_threads  # the cores this process may use


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


def product(keys: Sequence[str], size: int, *, batch: int, threads: int | None, draft: bool,
            workers: int | None = 0, buckets: Sequence[int] | None = None) -> dict[str, Any]:
  """The product's pipeline over `keys`; every image must come back decoded.

  `buckets`: decode into canvases for the device resize (no host resize), else resize on
  the host as the product does by default.

  Returns:
    {"workers", "threads"} as the stream ran (None asks for the automatic choice),
    "first_batch_s" (start-up: worker processes start, the first batch decodes),
    "steady_images_per_s" and "steady_cpu_ms_per_image" (over the second half of the
    batches, start-up excluded: thread pools, first-touch page faults of fresh buffers, which
    a job of a million photos pays once; the `ahead` batches decoded early shift the span by
    a few batches, the same for every in-process variant).
  """
  decoded = rows = 0
  t0 = time.perf_counter()
  stamps: list[tuple[float, int, float]] = []
  with input_pipeline.positions_batches(keys, np.arange(len(keys)), image_size=size,
                                        batch_size=batch, num_threads=threads,
                                        num_workers=workers, draft=draft,
                                        buckets=buckets) as stream:
    for b in stream:
      rows += int(np.sum(b.valid))
      decoded += int(np.sum(b.ok))
      stamps.append((time.perf_counter(), rows, cpu_seconds()))
      b.recycle()  # canvas mode: done with it, as the job is once its step has run
  if rows != len(keys) or decoded != len(keys):
    raise RuntimeError(f"pipeline returned {rows} rows, {decoded} decoded, for {len(keys)} files")
  half = stamps[(len(stamps) - 1) // 2]  # the steady part: from here to the end
  span = stamps[-1][0] - half[0]
  return {"workers": stream.num_workers, "threads": stream.num_threads,
          "first_batch_s": stamps[0][0] - t0,
          "steady_images_per_s": (rows - half[1]) / span if span > 0 else None,
          "steady_cpu_ms_per_image": (1e3 * (stamps[-1][2] - half[2]) / (rows - half[1])
                                      if rows > half[1] else None)}


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str  # "pillow" (bare loop) or "product"
  threads: int
  draft: bool
  workers: int = 0  # product: decode processes (0: threads in this process)
  canvas: bool = False  # product: decode into canvases (device resize), no host resize

  def fn(self, keys: Sequence[str], size: int, batch: int) -> Callable[[], Any]:
    if self.name == "pillow":
      return lambda: bare_pillow(keys, size, draft=self.draft)
    return lambda: product(keys, size, batch=batch, threads=self.threads, draft=self.draft,
                           workers=self.workers,
                           buckets=canvas.BUCKETS if self.canvas else None)


def default_processes(cores: int) -> tuple[tuple[int, int], ...]:
  """(processes, threads each) to compare with threads here: the product's rule where it
  picks processes (else one process of every core's threads), and one process per core."""
  workers, threads = input_pipeline.decode_parallelism(cores=cores)
  return tuple(sorted({(workers, threads) if workers else (1, cores), (cores, 1)}))


def variants(threads: Sequence[int], processes: Sequence[tuple[int, int]] = ()) -> list[Variant]:
  """Bare Pillow full and draft, then the product (draft, its default) at each thread count
  in this process and with each (processes, threads) pair, and decoding into canvases
  (device resize) at the most threads."""
  return [Variant("pillow", 1, False), Variant("pillow", 1, True),
          *(Variant("product", t, True) for t in threads),
          *(Variant("product", t, True, w) for w, t in processes),
          Variant("product", threads[-1], True, canvas=True)]


def compare(keys: Sequence[str], vs: Sequence[Variant], *, size: int, batch: int, rounds: int
            ) -> list[dict[str, Any]]:
  """Wall and CPU seconds of every variant, alternating variant by variant in each round.

  The start rotates from round to round, so no variant always runs first (after a
  pause) or last. Figures are medians over rounds.
  """
  fns = [v.fn(keys, size, batch) for v in vs]
  wall: list[list[float]] = [[] for _ in vs]
  cpu: list[list[float]] = [[] for _ in vs]
  steady: list[list[float]] = [[] for _ in vs]
  first: list[list[float]] = [[] for _ in vs]
  steady_cpu: list[list[float]] = [[] for _ in vs]
  for r in range(rounds):
    for j in range(len(vs)):
      i = (j + r) % len(vs)
      t, c = time.perf_counter(), cpu_seconds()
      out = fns[i]()
      wall[i].append(time.perf_counter() - t)
      cpu[i].append(cpu_seconds() - c)
      if out and out["steady_images_per_s"]:
        steady[i].append(out["steady_images_per_s"])
        first[i].append(out["first_batch_s"])
      if out and out["steady_cpu_ms_per_image"]:
        steady_cpu[i].append(out["steady_cpu_ms_per_image"])
  n = len(keys)
  rows = []
  for v, w, c, st, f, sc in zip(vs, wall, cpu, steady, first, steady_cpu):
    rows.append({"variant": v.name + ("-canvas" if v.canvas else ""), "workers": v.workers,
                 "threads": v.threads,
                 "draft": v.draft, "images_per_s": timing.rate(n, w),
                 # The rate past start-up (worker processes, the first batch); a bare loop
                 # has none, so its whole-run rate.
                 "steady_images_per_s": timing.median(st) if st else timing.rate(n, w),
                 "first_batch_s": timing.median(f) if f else None,
                 "images_per_cpu_s": n / max(timing.median(c), 1e-9),
                 "cpu_ms_per_image": 1e3 * timing.median(c) / n,
                 "steady_cpu_ms_per_image": timing.median(sc) if sc else None,
                 "cores_busy": timing.median(c) / timing.median(w),
                 "wall_s": w, "cpu_s": c})
  return rows


def _ratios(rows: Sequence[dict[str, Any]], threads: Sequence[int],
            processes: Sequence[tuple[int, int]]) -> dict[str, float]:
  get = {(r["variant"], r["workers"], r["threads"], r["draft"]): r for r in rows}
  full, draft = get[("pillow", 0, 1, False)], get[("pillow", 0, 1, True)]
  one, most = get[("product", 0, threads[0], True)], get[("product", 0, threads[-1], True)]
  per_cpu = lambda a, b: a["images_per_cpu_s"] / b["images_per_cpu_s"]  # noqa: E731
  canvas_row = get[("product-canvas", 0, threads[-1], True)]
  out = {"product_over_pillow_full_per_cpu_s": per_cpu(one, full),
         "product_over_pillow_draft_per_cpu_s": per_cpu(one, draft),
         "pillow_draft_over_full_per_cpu_s": per_cpu(draft, full),
         "product_threads_speedup_wall": most["images_per_s"] / one["images_per_s"],
         # Issue 17's target: CPU-seconds per image decoding into canvases over decoding +
         # host resize, both at every core here (<= 0.55 ImageNet-size, <= 0.9 phone-size).
         "host_cpu_ms_per_image": most["cpu_ms_per_image"],
         "canvas_cpu_ms_per_image": canvas_row["cpu_ms_per_image"],
         "canvas_over_host_cpu_s_per_image": per_cpu(most, canvas_row),
         # The same past start-up (second half of the batches), as a long job runs.
         "host_steady_cpu_ms_per_image": most["steady_cpu_ms_per_image"],
         "canvas_steady_cpu_ms_per_image": canvas_row["steady_cpu_ms_per_image"],
         "canvas_over_host_steady": (
             canvas_row["steady_cpu_ms_per_image"] / most["steady_cpu_ms_per_image"]
             if canvas_row["steady_cpu_ms_per_image"] and most["steady_cpu_ms_per_image"]
             else None)}  # None: too few batches for a second half
  if processes:  # the best worker-process variant against every core's threads here
    best = max((get[("product", w, t, True)] for w, t in processes),
               key=lambda r: r["steady_images_per_s"])
    out.update(best_processes=f"{best['workers']}x{best['threads']}",
               processes_over_threads_steady=(best["steady_images_per_s"]
                                              / most["steady_images_per_s"]),
               processes_over_threads_wall=best["images_per_s"] / most["images_per_s"])
  return out


def core_counts(cores: int) -> list[int]:
  """1, 2, 4, ... below `cores`, then `cores`."""
  out = [1]
  while out[-1] * 2 < cores:
    out.append(out[-1] * 2)
  return sorted({*out, cores})


def scaling(paths: Sequence[str], size: int, *, batch: int, counts: Sequence[int], draft: bool,
            name: str = "", log=print) -> list[dict[str, Any]]:
  """The pipeline alone at each count of threads in this process, of processes of one
  thread, and as the product chooses: images/s (whole run and past start-up), images per
  CPU-second (children's included) and start-up seconds. One run each."""
  settings = [(0, n) for n in counts] + [(n, 1) for n in counts] + [(None, None)]
  rows = []
  for workers, threads in settings:
    t, c = time.perf_counter(), cpu_seconds()
    out = product(paths, size, batch=batch, threads=threads, draft=draft, workers=workers)
    wall, cpu = time.perf_counter() - t, cpu_seconds() - c
    engine = "auto" if workers is None else "processes" if workers else "threads"
    row = {"engine": engine, "workers": out["workers"], "threads": out["threads"],
           "images": len(paths), "batch": batch, "draft": draft,
           "images_per_s": len(paths) / wall, "steady_images_per_s": out["steady_images_per_s"],
           "images_per_cpu_s": len(paths) / max(cpu, 1e-9),
           "first_batch_s": out["first_batch_s"]}
    log(f"[input] {name}{': ' if name else ''}{engine}, {row['workers']} processes x "
        f"{row['threads']} threads: "
        f"{row['images_per_s']:.0f} images/s ({row['steady_images_per_s'] or 0:.0f} past "
        f"start-up, first batch {row['first_batch_s']:.2f} s), "
        f"{row['images_per_cpu_s']:.0f} images per CPU-second")
    rows.append(row)
  return rows


def run(*, data_dir: str, folder: str, num_images: int, phone_images: int, image_size: int,
        batch: int, threads: Sequence[int] | None, rounds: int, photo_root: str | None = None,
        processes: Sequence[tuple[int, int]] | None = None, log=print) -> dict[str, Any]:
  """Rows for each photo set: images/s and images per CPU-second of every variant, with ratios.

  Args:
    data_dir, folder: the ImageNet-size photos (their first `num_images`, sorted).
    phone_images: phone-size JPEGs to make from the first photos (0: skip that set).
    threads: the product's thread counts in this process (default: 1 and every core).
    processes: the product's (processes, threads each) with worker processes (default:
      `default_processes`).
    photo_root: cache folder of the made JPEGs (default: the temp dir).
  """
  threads = tuple(threads or sorted({1, cores()}))
  processes = tuple(default_processes(cores()) if processes is None else processes)
  keys = [r.key for r in input_pipeline.folder_records(os.path.join(data_dir, folder))]
  if not keys:
    raise FileNotFoundError(f"no images under {os.path.join(data_dir, folder)}")
  sets = {folder: keys[:num_images]}
  if phone_images > 0:
    log(f"[input] making {phone_images} phone-size JPEGs (cached) ...")
    sets["phone-size"] = photos.make(photos.PhotoSet(tuple(keys[:phone_images]), phone_images),
                                     photo_root)
  vs = variants(threads, processes)
  auto = input_pipeline.decode_parallelism()
  out: dict[str, Any] = {"image_size": image_size, "batch": batch, "rounds": rounds,
                         "threads": list(threads), "processes": [list(p) for p in processes],
                         "default": {"workers": auto[0], "threads": auto[1]},
                         "sets": [], "rows": []}
  for name, paths in sets.items():
    for p in paths:  # warm the page cache: decoding is measured, not the disk
      input_pipeline.read_file(p)
    product(paths[:2], image_size, batch=batch, threads=1, draft=True)  # engine start-up, imports
    log(f"[input] {name}: {len(paths)} images, {rounds} rounds of {len(vs)} variants ...")
    rows = compare(paths, vs, size=image_size, batch=batch, rounds=rounds)
    for r in rows:
      r["set"] = name
    out["rows"].extend(rows)
    out["sets"].append({"set": name, **photos.describe(paths),
                        **_ratios(rows, threads, processes)})
  return out
