r"""Device resize figures (issue 17 item 1): pixels against Pillow, the host's box reduction
against Pillow direct, the step's CPU cost with each resize, and food7 retrieval with each.

  PYTHONPATH=. python -m benchmarks.resize_bench --data=../shared/data \
      --parts=pixels,reduce,step,food7,host   # also: order (Pillow's pass order)
Prints one line per figure and the whole result as JSON on the last line.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
import PIL
from PIL import Image

from cbir_jax import (backbones, canvas, decode, evaluation, inference, input_pipeline, resize,
                      turbo_decode)
from cbir_jax import weights as weights_lib
from benchmarks import photos
from benchmarks.pipeline import cpu_seconds

SIZE = 224
_resize = jax.jit(resize.resize_canvases, static_argnums=2)


def _summary(hist: np.ndarray) -> dict[str, float]:
  """Mean, 99.9th percentile and max of absolute differences given as counts per level."""
  n = hist.sum()
  cum = np.cumsum(hist)
  return {"values": int(n), "mean_abs": float((hist * np.arange(len(hist))).sum() / n),
          "p99_9": int(np.searchsorted(cum, 0.999 * n)), "max": int(np.flatnonzero(hist)[-1]),
          "share_off": float(1 - hist[0] / n)}


def pixels(paths: Sequence[str], *, batch: int = 16) -> dict[str, Any]:
  """The product's two paths on the same files: host (decode, draft, Pillow BILINEAR) against
  canvases resized on the device; differences per channel value of decoded rows."""
  hist = np.zeros(256, np.int64)
  buckets: dict[int, int] = {}
  kw = dict(image_size=SIZE, batch_size=batch, num_workers=0)
  with input_pipeline.image_batches(paths, **kw) as host, \
      input_pipeline.image_batches(paths, buckets=canvas.BUCKETS, **kw) as dev:
    for h, d in zip(host, dev):
      got = np.asarray(_resize(d.images, d.sizes, (SIZE, SIZE)))
      diff = np.abs(got.astype(np.int16) - h.images)[h.ok]
      hist += np.bincount(diff.ravel(), minlength=256)
      buckets[d.bucket] = buckets.get(d.bucket, 0) + 1
  return {**_summary(hist), "images": len(paths), "batches_per_bucket": buckets}


def reduce_vs_direct(sources: Sequence[str], *, side: int = 4000) -> dict[str, Any]:
  """Images larger than the largest canvas after decoding (a big PNG): Pillow's reduce by the
  integer box factor then the device resize, against Pillow's BILINEAR straight from full size."""
  hist = np.zeros(256, np.int64)
  factors = []
  for s in sources:
    with Image.open(s) as img:
      big = img.convert("RGB").resize((side, side * 3 // 4), Image.BICUBIC)
    placed = canvas._placed(big, max(canvas.BUCKETS))
    factors.append(placed.reduced)
    canvases, sizes = canvas.assemble([placed.pixels])
    got = np.asarray(_resize(canvases, sizes, (SIZE, SIZE)))[0]
    ref = np.asarray(big.resize((SIZE, SIZE), Image.BILINEAR))
    hist += np.bincount(np.abs(got.astype(np.int16) - ref).ravel(), minlength=256)
  return {**_summary(hist), "images": len(sources), "size": f"{side}x{side * 3 // 4}",
          "box_factors": sorted(set(factors))}


def host_costs(paths: Sequence[str], *, rounds: int = 3) -> dict[str, Any]:
  """Single-thread CPU ms per image of the host's share, alternated, medians over rounds: the
  Pillow JPEG decode alone (draft, `load`), the product's host path (decode + resize), the
  Pillow canvas path (decode + placement, `decode_placed`) and the product's canvas path
  for JPEGs (header plan + simplejpeg straight into a reused slot, `turbo_decode`)."""
  datas = [input_pipeline.read_file(p) for p in paths]
  slot = np.empty(canvas.slot_bytes(max(canvas.BUCKETS)), np.uint8)

  def turbo(d: bytes) -> None:
    p = turbo_decode.plan(d, (SIZE, SIZE), largest=max(canvas.BUCKETS))
    if isinstance(p, str):
      canvas.decode_placed(d, SIZE)
    else:
      turbo_decode.decode_into(p, slot)

  def load(d: bytes) -> None:
    with Image.open(io.BytesIO(d)) as img:
      img.draft("RGB", (SIZE, SIZE))
      img.load()

  fns = {"decode_only": load, "host_resize": lambda d: decode.decode_image(d, SIZE),
         "canvas_pillow": lambda d: canvas.decode_placed(d, SIZE), "canvas": turbo}
  ms: dict[str, list[float]] = {k: [] for k in fns}
  names = list(fns)
  for r in range(rounds):
    for j in range(len(names)):
      name = names[(j + r) % len(names)]
      c = time.process_time()
      for d in datas:
        fns[name](d)
      ms[name].append(1e3 * (time.process_time() - c) / len(datas))
  out: dict[str, Any] = {f"{k}_cpu_ms": float(np.median(v)) for k, v in ms.items()}
  out["canvas_over_host"] = out["canvas_cpu_ms"] / out["host_resize_cpu_ms"]
  out["canvas_pillow_over_host"] = out["canvas_pillow_cpu_ms"] / out["host_resize_cpu_ms"]
  out["decode_only_over_host"] = out["decode_only_cpu_ms"] / out["host_resize_cpu_ms"]
  return {"images": len(paths), **out}


def pass_order(*, step: int = 37, outs: Sequence[tuple[int, int]] = ((224, 224), (160, 300))
               ) -> dict[str, Any]:
  """Which pass Pillow runs first, probed on a grid of input shapes, against
  `resize.vertical_first`: an image resized in one call equals exactly one of the two
  orders done as two single-axis resizes (each rounds to uint8 in between)."""
  rng = np.random.default_rng(0)
  shapes = agree = 0
  for oh, ow in outs:
    for h in range(40, 1000, step):
      for w in range(40, 1000, step + 4):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = np.asarray(img.resize((ow, oh), Image.BILINEAR))
        h_first = np.asarray(img.resize((ow, h), Image.BILINEAR).resize((ow, oh), Image.BILINEAR))
        v_first = bool(np.any(h_first != ref))
        rule = bool(resize.vertical_first(np.array([[h, w]]), (oh, ow))[0])
        shapes += 1
        agree += v_first == rule
  return {"shapes": shapes, "rule_agrees": agree, "pillow": PIL.__version__}


def _cpu_per_call(fn: Callable[[], Any]) -> tuple[float, float]:
  t, c = time.perf_counter(), cpu_seconds()
  jax.block_until_ready(fn())
  return time.perf_counter() - t, cpu_seconds() - c


def step_cost(*, batch: int = 32, rounds: int = 5, model: str = "efficientnet_lite0"
              ) -> dict[str, Any]:
  """CPU-seconds per image of the jitted step on this backend: host resize (224 inputs) against
  device resize (640 canvases holding 500x375 images), alternated, medians over rounds."""
  bb = backbones.get(model)
  params, info = weights_lib.load(model)
  kw = dict(preprocessing=info.preprocessing, kinds=("fc_conv",))
  host = jax.jit(inference.describe_fn(bb, **kw))
  dev = jax.jit(inference.describe_canvas_fn(bb, image_size=SIZE, **kw))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)
  side = 640  # the bucket most ImageNet-size batches run at
  canvases = rng.integers(0, 256, (batch, canvas.slot_bytes(side)), dtype=np.uint8)
  sizes = np.tile(np.array([[375, 500]], np.int32), (batch, 1))
  calls = {"host": lambda: host(params, images), "device": lambda: dev(params, canvases, sizes),
           "resize_only": lambda: _resize(canvases, sizes, (SIZE, SIZE))}
  for f in calls.values():  # compile
    jax.block_until_ready(f())
  cpu: dict[str, list[float]] = {k: [] for k in calls}
  wall: dict[str, list[float]] = {k: [] for k in calls}
  names = list(calls)
  for r in range(rounds):
    for j in range(len(names)):
      name = names[(j + r) % len(names)]
      w, c = _cpu_per_call(calls[name])
      wall[name].append(w)
      cpu[name].append(c)
  out: dict[str, Any] = {"batch": batch, "canvas": side, "backend": jax.default_backend()}
  for k in names:
    out[f"{k}_cpu_ms_per_image"] = 1e3 * float(np.median(cpu[k])) / batch
    out[f"{k}_wall_ms_per_image"] = 1e3 * float(np.median(wall[k])) / batch
  out["device_over_host_cpu"] = out["device_cpu_ms_per_image"] / out["host_cpu_ms_per_image"]
  return out


def food7(folder: str, *, batch: int = 32, model: str = "efficientnet_lite0") -> dict[str, Any]:
  """P@5 and mAP of Lite0 `fc_conv` over food7 (every image a query), with descriptors from
  the jitted step directly: host resize against device resize (the job is not wired yet)."""
  records = input_pipeline.folder_records(folder)
  keys = [r.key for r in records]
  labels = np.array([r.label for r in records])
  bb = backbones.get(model)
  params, info = weights_lib.load(model)
  kw = dict(preprocessing=info.preprocessing, kinds=("fc_conv",))
  host = jax.jit(inference.describe_fn(bb, **kw))
  dev = jax.jit(inference.describe_canvas_fn(bb, image_size=SIZE, **kw))
  cache: dict[str, np.ndarray] = {}
  out: dict[str, Any] = {"images": len(keys)}
  for name, buckets in (("host", None), ("device", canvas.BUCKETS)):
    parts: list[np.ndarray] = []
    with input_pipeline.image_batches(keys, image_size=SIZE, batch_size=batch,
                                      buckets=buckets) as stream:
      for b in stream:
        if not b.ok[b.valid].all():
          raise RuntimeError(f"food7: undecodable rows {b.error}")
        d = host(params, b.images) if buckets is None else dev(params, b.images, b.sizes)
        parts.append(np.asarray(d["fc_conv"])[b.valid])
    rows = np.concatenate(parts)
    ev = evaluation.evaluate_arrays({"fc_conv": rows}, labels, keys,
                                    queries=np.arange(len(keys)), k=5, random_baseline=False,
                                    histogram_cache=cache)
    r = ev.results[0]
    out[name] = {"p_at_5": r.precision[5], "map": r.mean_ap}
  out["p_at_5_diff"] = out["device"]["p_at_5"] - out["host"]["p_at_5"]
  out["map_diff"] = out["device"]["map"] - out["host"]["map"]
  return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data", default="../shared/data")
  ap.add_argument("--parts", default="pixels,reduce,step,food7,host")
  ap.add_argument("--phone_images", type=int, default=100)
  ap.add_argument("--photo_root", default=None)
  args = ap.parse_args(argv)
  parts = args.parts.split(",")
  imagenet = [r.key for r in input_pipeline.folder_records(
      os.path.join(args.data, "imagenet-sample", "images"))]
  out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                         "backend": jax.default_backend(), "cores": os.cpu_count(),
                         "buckets": list(canvas.BUCKETS)}
  if "pixels" in parts:
    out["pixels_imagenet"] = pixels(imagenet)
    print("pixels imagenet-sample:", out["pixels_imagenet"], flush=True)
    if args.phone_images:
      phone = photos.make(photos.PhotoSet(tuple(imagenet[:args.phone_images]),
                                          args.phone_images), args.photo_root)
      out["pixels_phone"] = pixels(phone)
      print("pixels phone-size:", out["pixels_phone"], flush=True)
  if "order" in parts:
    out["order"] = pass_order()
    print("Pillow pass order vs resize.vertical_first:", out["order"], flush=True)
  if "host" in parts:
    out["host_imagenet"] = host_costs(imagenet[:256])
    print("host CPU per image, imagenet-sample:", out["host_imagenet"], flush=True)
    if args.phone_images:
      phone = photos.make(photos.PhotoSet(tuple(imagenet[:args.phone_images]),
                                          args.phone_images), args.photo_root)
      out["host_phone"] = host_costs(phone)
      print("host CPU per image, phone-size:", out["host_phone"], flush=True)
  if "reduce" in parts:
    out["reduce"] = reduce_vs_direct(imagenet[:8])
    print("host box reduction vs Pillow direct:", out["reduce"], flush=True)
  if "step" in parts:
    out["step"] = step_cost()
    print("step CPU cost:", out["step"], flush=True)
  if "food7" in parts:
    out["food7"] = food7(os.path.join(args.data, "food7"))
    print("food7 fc_conv:", out["food7"], flush=True)
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
