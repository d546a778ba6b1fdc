"""The accelerator check: the product's step and job on a GPU host, bounded to minutes.

Three parts, in this order: descriptors of the jitted step (`inference.jit_describe`)
against a float32 run of the same photos on the host CPU; images/s of that step for
each backbone and dtype over a batch sweep, with the fraction of the card's peak; and
the extraction job (`extract.run`) on JPEGs made here, every core decoding, with the
input pipeline alone at 1, 2, 4, ... cores as threads and as worker processes. Needs
only jax, flax, orbax, absl, numpy and pillow. Every figure is logged and handed to
`on_update` as it comes, so a run cut short still leaves its figures.
"""
from __future__ import annotations

import dataclasses
import os
import time
import traceback
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks import timing
from cbir_jax.choices import ComputeDtype, Model

# Accepted difference from the CPU float32 reference: the largest over images and
# kinds of the row-wise relative L1 difference sum|x - ref| / sum|ref| (L1 is what
# search ranks by). Keys are "dtype/matmul precision". Measured on the CPU: Lite0
# (shipped weights) turns relative noise e on its weights into a descriptor
# difference of about 150 e (1e-5 -> 1.5e-3, 1e-4 -> 6.8e-3, 1e-3 -> 4.4e-2; VGG16
# with random weights about 10 e), and mask flips at tau add jumps.
TOLERANCES: dict[str, float] = {
    # The correctness check: float32 throughout, only the summation order (and the
    # convolution algorithm) differs; 5e-3 is weight noise of ~3e-5 through Lite0.
    "float32/highest": 5e-3,
    # What the product runs: JAX's default precision lets XLA use TF32 (10-bit
    # mantissa) for float32 convolutions and matmuls on Ampere and later. Rounding
    # Lite0's weights alone to TF32 gives 1.7e-2 (VGG16 8e-4); the bound is ~4x that.
    "float32/default": 0.1,
    # A sanity bound only (NaN, garbage); the observed error is the figure. On the
    # CPU, bfloat16 gave 0.003 for VGG16 (random weights) and 0.10-0.13 for Lite0.
    "bfloat16/default": 0.35,
}
ACCURACY_RUNS: tuple[tuple[str, str], ...] = (("float32", "highest"), ("float32", "default"),
                                              ("bfloat16", "default"))


@dataclasses.dataclass
class GpuCheckConfig:
  """What the check runs. The defaults finish well inside 9 minutes on one H100.

  Attributes:
    sweep: "backbone:batch,batch,..." per backbone, in order.
    dtypes: compute dtypes of the sweep.
    repeats: timed calls per sweep point (median reported).
    image_size: network input (None: the backbone's, 224).
    accuracy_images: photos compared with the CPU reference (the bundled
      samples, repeated when more are asked for).
    e2e_backbone, e2e_batch, e2e_dtype: the extraction job.
    photo_count, photo_width, photo_height: photo-size JPEGs for the job.
    phone_count, phone_width, phone_height: phone-size JPEGs for the job (0: none).
    num_threads: decode threads per process for the job and the pipeline alone (None:
      the product's rule, `input_pipeline.decode_parallelism`).
    num_workers: decode processes for the pipeline alone (None: the product's rule; the
      job uses its own default).
    scaling_photo_images, scaling_phone_images: images of each set the input sweep
      decodes at 1, 2, 4, ... cores, as threads and as processes (0: no sweep).
    scaling_cores: the sweep's largest count (None: every core).
    budget_s: no new sweep point starts later than budget_s - e2e_reserve_s
      after the start (estimated from the points before), so the job still runs.
    e2e_reserve_s: the time kept for the extraction job.
    photo_root: where the made JPEGs are cached (default: the temp dir).
    allow_cpu: run even when JAX's backend is the CPU (tests); otherwise that is
      an error, so a broken CUDA install does not spend the machine's time.
    decoder_images: JPEGs of the decoder comparison (Pillow against nvImageCodec:
      images/s, host CPU-seconds per image, pixel differences; 0: none).
    job_photos: photo-size JPEGs (photo_width x photo_height) the job runs on once per
      decoder of `job_decoders` (0: none), reporting images/s, the step rate, the share
      of wall time the device computed and host CPU-seconds per image.
    job_resize: the job's --resize for those runs.
    wheels: folder of carried nvImageCodec wheels (unpacked and used when present).
    quick: a few minutes' version of everything (small sweep, sets and jobs).
  """
  sweep: tuple[str, ...] = ("vgg16:32,64,128,256,512",
                            "efficientnet_lite0:128,256,512,1024,2048")
  dtypes: tuple[ComputeDtype, ...] = ("float32", "bfloat16")
  repeats: int = 5
  image_size: int | None = None
  accuracy_images: int = 10
  e2e_backbone: Model = "efficientnet_lite0"
  e2e_batch: int = 256
  e2e_dtype: ComputeDtype = "float32"
  photo_count: int = 4000
  photo_width: int = 500
  photo_height: int = 375
  phone_count: int = 300
  phone_width: int = 4032
  phone_height: int = 3024
  num_threads: int | None = None
  num_workers: int | None = None
  scaling_photo_images: int = 2048
  scaling_phone_images: int = 256
  scaling_cores: int | None = None
  budget_s: float = 480.0
  e2e_reserve_s: float = 240.0
  photo_root: str | None = None
  allow_cpu: bool = False
  decoder_images: int = 400
  job_photos: int = 24000
  job_decoders: tuple[str, ...] = ("pillow", "nvimgcodec")
  job_resize: str = "auto"
  wheels: str = ".gpu_wheels"
  quick: bool = False


def parse_sweep(entries: Sequence[str]) -> list[tuple[str, tuple[int, ...]]]:
  """["vgg16:32,64"] -> [("vgg16", (32, 64))], with the backbone names checked."""
  from cbir_jax import backbones

  out = []
  for e in entries:
    name, _, batches = e.partition(":")
    try:
      sizes = tuple(int(b) for b in batches.split(",") if b.strip())
    except ValueError:
      sizes = ()
    if not sizes or min(sizes) < 1:
      raise ValueError(f"sweep entry {e!r}: expected 'backbone:batch,batch,...'")
    backbones.get(name)
    out.append((name, sizes))
  return out


def _params_for_reference(params: Any) -> Any:
  """The parameters the CPU reference uses: the same ones (tests perturb them here)."""
  return params


def load_model(name: str, image_size: int | None) -> tuple[Any, Any, Any, int, str]:
  """(backbone, host params, preprocessing, size, "shipped"|"random"): shipped weights if any."""
  import jax

  from cbir_jax import backbones, weights
  from benchmarks import end_to_end, model

  bb = backbones.get(name)
  size = image_size or bb.image_size
  if end_to_end.has_shipped_weights(name):
    params, info = weights.load(name)
    return bb, params, info.preprocessing, size, "shipped"
  params = jax.tree.map(np.asarray, model.random_params(bb, size))
  return bb, params, bb.preprocessing, size, "random"


def sample_batch(count: int, size: int) -> np.ndarray:
  """The bundled sample photos decoded to uint8 [count, size, size, 3] (repeated as needed)."""
  from cbir_jax import input_pipeline, samples

  paths = samples.sample_images()
  imgs = [input_pipeline.decode_image(input_pipeline.read_file(str(p)), size, draft=False)[0]
          for p in paths]
  return np.stack([imgs[i % len(imgs)] for i in range(count)])


def descriptor_difference(got: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
  """Row-wise relative L1 and max-abs differences per kind, and the worst over kinds."""
  per_kind, worst_abs = {}, 0.0
  for k, r in ref.items():
    a, b = np.asarray(got[k], np.float64), np.asarray(r, np.float64)
    diff = np.abs(a - b)
    per_kind[k] = float(np.max(diff.sum(1) / np.maximum(np.abs(b).sum(1), 1e-30)))
    worst_abs = max(worst_abs, float(diff.max() / max(np.abs(b).max(), 1e-30)))
  worst = max(per_kind.values()) if per_kind else float("nan")
  if not all(np.isfinite(np.asarray(got[k], np.float64)).all() for k in ref):
    worst = float("inf")
  return {"max_rel_l1": worst, "rel_l1_by_kind": per_kind, "max_abs_rel": worst_abs}


def _describe(bb: Any, params: Any, pre: Any, x: np.ndarray, dtype: str, precision: str,
              device: Any) -> dict[str, np.ndarray]:
  import jax

  from cbir_jax import inference

  step = inference.jit_describe(bb, preprocessing=pre, dtype=inference.compute_dtype(dtype))
  p, xd = jax.device_put(params, device), jax.device_put(x, device)
  prec = None if precision == "default" else precision
  with jax.default_matmul_precision(prec):  # read while tracing: part of the jit key
    return jax.device_get(step(p, xd))


def accuracy(name: str, *, image_size: int | None, count: int, log) -> list[dict[str, Any]]:
  """One row per ACCURACY_RUNS entry: this device's descriptors vs the CPU float32 run."""
  import jax

  bb, params, pre, size, source = load_model(name, image_size)
  x = sample_batch(count, size)
  cpu, device = jax.devices("cpu")[0], jax.devices()[0]
  ref = _describe(bb, _params_for_reference(params), pre, x, "float32", "default", cpu)
  rows = []
  for dtype, precision in ACCURACY_RUNS:
    t = time.perf_counter()
    got = _describe(bb, params, pre, x, dtype, precision, device)
    tol = TOLERANCES[f"{dtype}/{precision}"]
    row = {"backbone": name, "weights": source, "dtype": dtype, "precision": precision,
           "images": count, "image_size": size, "device": device.device_kind,
           "reference": f"{cpu.device_kind} float32", "tolerance_rel_l1": tol,
           **descriptor_difference(got, ref), "seconds": time.perf_counter() - t}
    row["passed"] = bool(row["max_rel_l1"] <= tol)
    log(f"[accuracy] {name} {dtype}/{precision} vs CPU float32: rel L1 {row['max_rel_l1']:.2e}"
        f" (tolerance {tol:g}) {'ok' if row['passed'] else 'FAILED'}")
    rows.append(row)
  return rows


def accuracy_all(cfg: GpuCheckConfig, add: Callable[..., None], log) -> None:
  """`accuracy` for every backbone of the sweep; a broken one is recorded as a failed row."""
  for name, _ in parse_sweep(cfg.sweep):
    try:
      rows = accuracy(name, image_size=cfg.image_size, count=cfg.accuracy_images, log=log)
    except Exception as e:
      rows = [{"backbone": name, "passed": False, "error": f"{type(e).__name__}: {e}"[:2000]}]
      log(f"[accuracy] {name}: FAILED\n{traceback.format_exc()}"[:3000])
    for r in rows:
      add("accuracy", r)


def sweep_point(bb: Any, params: Any, pre: Any, *, batch: int, size: int, dtype: str,
                repeats: int, device: Any) -> dict[str, Any]:
  """Compile seconds, images/s, FLOP/s and the fraction of the device's peak of one step."""
  import jax

  from cbir_jax import inference
  from benchmarks import flops as flops_lib
  from benchmarks import model

  step = inference.jit_describe(bb, preprocessing=pre, dtype=inference.compute_dtype(dtype))
  x = jax.device_put(timing.synthetic_images(batch, size), device)
  t = time.perf_counter()
  compiled = step.lower(params, x).compile()
  compile_s = time.perf_counter() - t
  times = timing.timed(lambda: compiled(params, x), repeats=repeats, warmup=1,
                       sync=jax.block_until_ready)
  ips = timing.rate(batch, times)
  xla = flops_lib.xla_flops(compiled)
  fpi = model.analytic_flops(bb.name, size) or (xla / batch if xla else None)
  peak, peak_src = flops_lib.device_peak(device, dtype)
  bf16_peak, _ = flops_lib.device_peak(device, "bfloat16")
  achieved = fpi * ips if fpi else None
  return {"backbone": bb.name, "dtype": dtype, "batch": batch, "image_size": size,
          "device": device.device_kind, "compile_s": compile_s, "seconds": times,
          "images_per_s": ips, "flops_per_image": fpi, "flops_per_s": achieved,
          "peak_flops_per_s": peak, "peak_source": peak_src,
          "fraction_of_peak": achieved / peak if achieved and peak else None,
          "fraction_of_bf16_peak": achieved / bf16_peak if achieved and bf16_peak else None}


def _sweep_order(sweep: Sequence[tuple[str, tuple[int, ...]]], dtypes: Sequence[str]
                 ) -> list[tuple[str, str, int]]:
  """(backbone, dtype, batch) with every pair's smaller batches first, so a cut keeps breadth."""
  longest = max(len(b) for _, b in sweep)
  return [(name, dtype, batches[i]) for i in range(longest) for name, batches in sweep
          for dtype in dtypes if i < len(batches)]


def model_sweep(cfg: GpuCheckConfig, clock: Callable[[], float], add: Callable[..., None],
                log) -> None:
  """Runs the sweep points the time budget allows; skipped ones are recorded as such."""
  import jax

  device = jax.devices()[0]
  deadline = cfg.budget_s - cfg.e2e_reserve_s
  models: dict[str, Any] = {}
  cost: dict[Any, float] = {}  # seconds the last point of a (backbone, dtype) took
  for name, dtype, batch in _sweep_order(parse_sweep(cfg.sweep), cfg.dtypes):
    estimate = cost.get((name, dtype), cost.get(name, 30.0))
    if clock() + estimate > deadline:
      why = f"time budget: {clock():.0f} s + ~{estimate:.0f} s > {deadline:.0f} s"
      add("skipped", {"backbone": name, "dtype": dtype, "batch": batch, "why": why})
      continue
    t = clock()
    try:
      if name not in models:
        bb, params, pre, size, source = load_model(name, cfg.image_size)
        models[name] = (bb, jax.device_put(params, device), pre, size, source)
      bb, params, pre, size, source = models[name]
      row = sweep_point(bb, params, pre, batch=batch, size=size, dtype=dtype,
                        repeats=cfg.repeats, device=device)
      row["weights"] = source
      add("model", row)
      log(f"[model] {name} {dtype} batch {batch}: {row['images_per_s']:.0f} images/s, "
          f"{(row['flops_per_s'] or 0) / 1e12:.1f} TFLOP/s, "
          f"{_pct(row['fraction_of_peak'])} of {dtype} peak, "
          f"{_pct(row['fraction_of_bf16_peak'])} of bf16 peak (compile {row['compile_s']:.1f} s)")
    except Exception as e:  # e.g. out of memory at the largest batch: keep the others
      add("model", {"backbone": name, "dtype": dtype, "batch": batch,
                    "error": f"{type(e).__name__}: {e}"[:2000]})
      log(f"[model] {name} {dtype} batch {batch}: FAILED {type(e).__name__}: {e}"[:500])
    cost[(name, dtype)] = cost[name] = clock() - t


def _pct(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.1f}%"


def _pipeline_alone(paths: Sequence[str], size: int, cfg: GpuCheckConfig) -> dict[str, Any]:
  """The input pipeline over `paths` as the product runs it by default (draft on)."""
  from benchmarks import pipeline

  pipeline.product(paths[:2], size, batch=2, threads=1, draft=True)  # imports
  t, c = time.perf_counter(), pipeline.cpu_seconds()
  out = pipeline.product(paths, size, batch=cfg.e2e_batch, threads=cfg.num_threads,
                         workers=cfg.num_workers, draft=True)
  wall, cpu = time.perf_counter() - t, pipeline.cpu_seconds() - c
  return {"decode_workers": out["workers"], "decode_threads": out["threads"],
          "decode_draft": True, "decode_images_per_s": len(paths) / wall,
          "decode_steady_images_per_s": out["steady_images_per_s"],
          "decode_images_per_cpu_s": len(paths) / max(cpu, 1e-9)}


def input_scaling(name: str, paths: Sequence[str], cfg: GpuCheckConfig,
                  add: Callable[..., None], log) -> None:
  """The pipeline alone at 1, 2, 4, ... cores as threads and as processes (draft on)."""
  from benchmarks import pipeline

  count = cfg.scaling_photo_images if name == "photo-size" else cfg.scaling_phone_images
  paths = paths[:count]
  if not paths:
    return
  # Enough batches that the second half (the steady rate) spans several per worker.
  batch = max(1, min(64, len(paths) // 16))
  counts = pipeline.core_counts(cfg.scaling_cores or pipeline.cores())
  log(f"[input] {name}: {len(paths)} images, batch {batch}, threads and processes at "
      f"{', '.join(map(str, counts))} ...")
  for row in pipeline.scaling(paths, cfg.image_size or 224, batch=batch, counts=counts,
                              draft=True, name=name, log=log):
    add("input_scaling", {"set": name, **row})


def end_to_end(cfg: GpuCheckConfig, add: Callable[..., None], log) -> None:
  """Per made set: the pipeline alone, the extraction job, then the input scaling sweep."""
  from cbir_jax import samples
  from benchmarks import end_to_end as e2e
  from benchmarks import photos

  sources = tuple(str(p) for p in samples.sample_images())
  sets = [("photo-size", cfg.photo_count, cfg.photo_width, cfg.photo_height),
          ("phone-size", cfg.phone_count, cfg.phone_width, cfg.phone_height)]
  for name, count, width, height in sets:
    if count < 1:
      continue
    try:
      t = time.perf_counter()
      paths = photos.make(photos.PhotoSet(sources, count, width, height), cfg.photo_root)
      row: dict[str, Any] = {"set": name, **photos.describe(paths),
                             "make_s": time.perf_counter() - t}
      log(f"[end_to_end] {name}: {count} JPEGs of {width}x{height} ready "
          f"({row['mean_file_mb']:.2f} MB each, {row['make_s']:.0f} s)")
      row.update(_pipeline_alone(paths, cfg.image_size or 224, cfg))
      log(f"[end_to_end] {name}: input pipeline alone, {row['decode_workers']} processes x "
          f"{row['decode_threads']} threads: {row['decode_images_per_s']:.0f} images/s, "
          f"{row['decode_images_per_cpu_s']:.0f} images per CPU-second")
      job = e2e.extract_folder(os.path.dirname(paths[0]), backbone=cfg.e2e_backbone,
                               batch=cfg.e2e_batch, dtype=cfg.e2e_dtype,
                               num_threads=cfg.num_threads, log=log)
      row.update({f"job_{k}": v for k, v in job.items()})
      add("end_to_end", row)
    except Exception as e:
      add("end_to_end", {"set": name, "error": f"{type(e).__name__}: {e}"[:2000]})
      log(f"[end_to_end] {name}: FAILED\n{traceback.format_exc()}"[:3000])
      continue
    try:
      input_scaling(name, paths, cfg, add, log)
    except Exception as e:
      add("input_scaling", {"set": name, "error": f"{type(e).__name__}: {e}"[:2000]})
      log(f"[input] {name}: FAILED\n{traceback.format_exc()}"[:3000])


def run(cfg: GpuCheckConfig, *, log: Callable[[str], None] = print,
        on_update: Callable[[dict[str, Any]], None] = lambda result: None) -> dict[str, Any]:
  """Runs the check; `on_update(result)` after every new figure (the launcher saves JSON).

  Returns:
    {"environment", "config", "accuracy", "model", "end_to_end", "input_scaling",
    "skipped", "errors", "passed", "seconds"}; passed is False when a descriptor check failed
    or a part broke (a skipped sweep point is not a failure).
  """
  import jax

  from cbir_jax import runtime

  from benchmarks import gpu_check_decoders as decoder_part

  cfg = decoder_part.quick(cfg) if cfg.quick else cfg
  if cfg.wheels and os.path.isdir(cfg.wheels):
    from benchmarks import decoder_compare
    log(f"nvImageCodec wheels unpacked to {decoder_compare.use_wheels(cfg.wheels)}")
  t0 = time.perf_counter()
  clock = lambda: time.perf_counter() - t0  # noqa: E731
  result: dict[str, Any] = {"check": "gpu", "environment": timing.environment(),
                            "config": dataclasses.asdict(cfg), "accuracy": [], "model": [],
                            "end_to_end": [], "input_scaling": [], "skipped": [],
                            "decoders": [], "decoder_jobs": [],
                            "errors": {}, "passed": None}

  def add(part: str, row: dict[str, Any]) -> None:
    result[part].append(row)
    result["seconds"] = clock()
    on_update(result)

  log(runtime.PlatformInfo.from_dict(result["environment"]["platform_info"]).line())
  runtime.warn_if_gpu_unused(log, backend=jax.default_backend())
  if jax.default_backend() == "cpu" and not cfg.allow_cpu:
    result["errors"]["platform"] = ("JAX runs on the CPU; install JAX's CUDA build (see README, "
                                    "'On a GPU or TPU host') or pass --allow_cpu")
  else:
    parts = [("accuracy", lambda: accuracy_all(cfg, add, log)),
             ("model", lambda: model_sweep(cfg, clock, add, log)),
             ("decoders", lambda: decoder_part.decoders(cfg, add, log)),
             ("decoder_jobs", lambda: decoder_part.decoder_jobs(cfg, add, log)),
             ("end_to_end", lambda: end_to_end(cfg, add, log))]
    for part, fn in parts:
      try:
        fn()
      except Exception as e:  # record and go on: one broken part must not hide the others
        result["errors"][part] = f"{type(e).__name__}: {e}"[:2000]
        log(traceback.format_exc())
  broken = [r for part in ("model", "end_to_end", "input_scaling", "decoders", "decoder_jobs")
            for r in result[part]
            if "error" in r]
  result["passed"] = (not result["errors"] and not broken and bool(result["accuracy"])
                      and all(r["passed"] for r in result["accuracy"]))
  result["seconds"] = clock()
  on_update(result)
  return result
