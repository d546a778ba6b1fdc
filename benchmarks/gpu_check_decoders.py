"""gpu_check's decoder parts: the decoder comparison, and the job once per decoder.

`decoders`: `decoder_compare.compare` on photo-size JPEGs (Pillow on the host against
nvImageCodec: images/s, host CPU-seconds per image, pixel differences). `decoder_jobs`: the
extraction job on `job_photos` made JPEGs with each decoder of `job_decoders`, reporting
images/s, the step rate (images/s while stepping), the share of the wall time the device
computed (the job's own device timeline, job/feed.py) and the host CPU-seconds per image.
A decoder that cannot run here (no GPU, no extra) is reported as such, not as a failure.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any, Callable

from cbir_jax import decode


def quick(cfg: Any) -> Any:
  """The check at a few minutes' size (--quick)."""
  return dataclasses.replace(
      cfg, sweep=("vgg16:64", "efficientnet_lite0:256"), dtypes=("float32",), repeats=3,
      accuracy_images=4, photo_count=min(cfg.photo_count, 512),
      phone_count=min(cfg.phone_count, 32), scaling_photo_images=0, scaling_phone_images=0,
      decoder_images=min(cfg.decoder_images, 100), job_photos=min(cfg.job_photos, 2048),
      e2e_batch=min(cfg.e2e_batch, 128), budget_s=min(cfg.budget_s, 240.0),
      e2e_reserve_s=min(cfg.e2e_reserve_s, 120.0))


def _photos(cfg: Any, count: int) -> list[str]:
  from cbir_jax import samples
  from benchmarks import photos

  sources = tuple(str(p) for p in samples.sample_images())
  return photos.make(photos.PhotoSet(sources, count, cfg.photo_width, cfg.photo_height),
                     cfg.photo_root)


def decoders(cfg: Any, add: Callable[..., None], log: Callable[[str], None]) -> None:
  """The decoder comparison on `decoder_images` photo-size JPEGs."""
  from benchmarks import decoder_compare

  if cfg.decoder_images < 1:
    return
  try:
    datas = [decode.read_file(p) for p in _photos(cfg, cfg.decoder_images)]
    result = decoder_compare.compare(datas, kind="auto", image_size=cfg.image_size or 224)
  except ImportError as e:  # nvImageCodec not installed: say so, it is not a broken check
    add("decoders", {"skipped": f"{type(e).__name__}: {e}"})
    log(f"[decoders] skipped: {e}")
    return
  decoder_compare.report(result, log=lambda m: log(f"[decoders] {m}"))
  add("decoders", result)


def job_row(images: str, cfg: Any, decoder: str, log: Callable[[str], None]) -> dict[str, Any]:
  """The job once over `images` with `decoder`; the summary's figures and the CPU it took."""
  from cbir_jax import extract
  from benchmarks import end_to_end, pipeline

  shipped = end_to_end.has_shipped_weights(cfg.e2e_backbone)
  with tempfile.TemporaryDirectory(prefix="cbir_gpu_check_") as tmp:
    config = extract.ExtractConfig(
        output=os.path.join(tmp, "out"), images=images, model=cfg.e2e_backbone,
        weights=None if shipped else "random", batch_size=cfg.e2e_batch, dtype=cfg.e2e_dtype,
        num_threads=cfg.num_threads, progress="none", resize=cfg.job_resize, decoder=decoder)
    cpu = pipeline.cpu_seconds()
    s = extract.run(config, log=lambda msg: None)
    cpu = pipeline.cpu_seconds() - cpu
  total = s.images + s.failed
  row = {"decoder": decoder, "decoder_ran": s.decoder, "resize": s.resize,
         "buckets": {str(k): v for k, v in s.buckets.items()}, "backbone": cfg.e2e_backbone,
         "batch": cfg.e2e_batch, "dtype": cfg.e2e_dtype, "images": total, "failed": s.failed,
         "seconds": s.seconds, "images_per_s": s.images_per_s,
         "step_rate_images_per_s": s.steady_images_per_s,
         "device_busy_share": s.device_busy_s / s.seconds if s.seconds else None,
         "device_busy": s.device_busy, "phases": s.phases,
         "host_cpu_s_per_image": cpu / total if total else None}
  log(f"[decoder_jobs] {decoder} ({s.decoder.get('description', '?')}), resize {s.resize}: "
      f"{total} images in {s.seconds:.1f} s, {s.images_per_s:.0f} images/s, "
      f"{s.steady_images_per_s:.0f} while stepping, device computed "
      f"{100 * (row['device_busy_share'] or 0):.0f}% of the wall time, "
      f"{1e3 * (row['host_cpu_s_per_image'] or 0):.2f} ms host CPU per image")
  return row


def decoder_jobs(cfg: Any, add: Callable[..., None], log: Callable[[str], None]) -> None:
  """The job on `job_photos` made JPEGs, once per decoder."""
  from cbir_jax.job.errors import ExtractError

  if cfg.job_photos < 1 or not cfg.job_decoders:
    return
  t = time.perf_counter()
  paths = _photos(cfg, cfg.job_photos)
  log(f"[decoder_jobs] {len(paths)} JPEGs of {cfg.photo_width}x{cfg.photo_height} ready "
      f"({time.perf_counter() - t:.0f} s)")
  for decoder in cfg.job_decoders:
    try:
      add("decoder_jobs", job_row(os.path.dirname(paths[0]), cfg, decoder, log))
    except ExtractError as e:  # e.g. nvimgcodec without a GPU or the extra: not run here
      add("decoder_jobs", {"decoder": decoder, "skipped": str(e)})
      log(f"[decoder_jobs] {decoder}: skipped: {e}")


__all__ = ["decoder_jobs", "decoders", "job_row", "quick"]
