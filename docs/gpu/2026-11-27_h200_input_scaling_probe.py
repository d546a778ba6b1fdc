"""GPU-host input scaling probe: thread pool (the product) vs a process pool, 1..N workers."""
import concurrent.futures as cf, glob, os, sys, time
import numpy as np
from cbir_jax import decode, input_pipeline
from benchmarks import photos

SRC = tuple(sorted(glob.glob("cbir_jax/sample_images/*.jpg")))
def made(count, w, h):
  return photos.make(photos.PhotoSet(SRC, count, w, h), "/tmp/probe_photos")

def _chunk(paths):
  out = []
  for p in paths:
    img, _ = decode.decode_image(open(p, "rb").read(), 224, draft=True)
    out.append(img)
  return np.stack(out)

def threads(paths, n):
  t, c = time.perf_counter(), time.process_time()
  k = 0
  with input_pipeline.image_batches(paths, image_size=224, batch_size=128, num_threads=n, draft=True) as s:
    for b in s: k += int(b.ok.sum())
  return k, time.perf_counter() - t, time.process_time() - c

def procs(paths, n, pool):
  t = time.perf_counter()
  chunks = [paths[i:i + 32] for i in range(0, len(paths), 32)]
  k = sum(len(a) for a in pool.map(_chunk, chunks))
  return k, time.perf_counter() - t, float("nan")

def bare(paths, draft):
  t, c = time.perf_counter(), time.process_time()
  for p in paths: decode.decode_image(open(p, "rb").read(), 224, draft=draft)
  return len(paths), time.perf_counter() - t, time.process_time() - c

cores = len(os.sched_getaffinity(0)); print("cores", cores, flush=True)
for name, paths in (("photo 500x375", made(3000, 500, 375)), ("phone 4032x3024", made(240, 4032, 3024))):
  sub = paths[: max(40, len(paths) // 8)]
  for d in (False, True):
    k, w, c = bare(sub, d); print(f"{name} bare draft={d}: {k/w:.0f}/s wall {k/c:.0f}/CPU-s", flush=True)
  for n in (1, 2, 4, 8, 16):
    if n > cores: break
    k, w, c = threads(paths, n); print(f"{name} threads={n}: {k/w:.0f}/s wall {k/c:.0f}/CPU-s", flush=True)
    with cf.ProcessPoolExecutor(n) as pool:
      list(pool.map(_chunk, [paths[:2]] * n))
      k, w, _ = procs(paths, n, pool); print(f"{name} procs={n}: {k/w:.0f}/s wall", flush=True)
