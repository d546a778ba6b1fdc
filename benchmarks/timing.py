"""Timing and environment helpers shared by every benchmark section.

Figures are medians of repeats with warm-up excluded; device work is
synchronised (`jax.block_until_ready`) before the clock is read.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import statistics
import time
from typing import Any, Callable, Sequence

import numpy as np


def timed(fn: Callable[[], Any], *, repeats: int, warmup: int = 1,
          sync: Callable[[Any], Any] = lambda x: x) -> list[float]:
  """Seconds of each of `repeats` calls of `fn` after `warmup` untimed calls.

  Args:
    fn: the work; called with no arguments.
    repeats: timed calls (>= 1).
    warmup: untimed calls first (compilation, caches, allocator).
    sync: applied to fn's result inside the timed region, e.g.
      `jax.block_until_ready`, so asynchronous work is counted.

  Returns:
    the per-call seconds, in call order.
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  for _ in range(warmup):
    sync(fn())
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    sync(fn())
    out.append(time.perf_counter() - t)
  return out


def interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
                syncs: dict[str, Callable[[Any], Any]] | None = None) -> dict[str, list[float]]:
  """Like `timed` for several contenders, alternating them call by call.

  On a shared machine the load drifts over seconds; alternating puts every
  contender under the same drift, so their ratio holds better than timing
  one block after another.
  """
  syncs = syncs or {}
  for name, fn in fns.items():
    for _ in range(warmup):
      syncs.get(name, lambda x: x)(fn())
  out: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      sync = syncs.get(name, lambda x: x)
      t = time.perf_counter()
      sync(fn())
      out[name].append(time.perf_counter() - t)
  return out


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def rate(items: int, seconds: Sequence[float]) -> float:
  """Items per second from the median time of a call that handles `items`."""
  return items / median(seconds)


def cpu_info() -> dict[str, Any]:
  """CPU model, cores, clock and SIMD flags from /proc/cpuinfo (Linux), best effort."""
  info: dict[str, Any] = {"model": platform.processor() or platform.machine(),
                          "cores": os.cpu_count() or 1, "mhz": None, "flags": []}
  try:
    text = open("/proc/cpuinfo").read()
  except OSError:
    return info
  m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
  if m:
    info["model"] = m.group(1).strip()
  m = re.search(r"^cpu MHz\s*:\s*([\d.]+)$", text, re.M)
  if m:
    info["mhz"] = float(m.group(1))
  ghz = re.search(r"@\s*([\d.]+)\s*GHz", info["model"])
  if ghz:  # the nominal clock in the model name beats the current (scaled) clock
    info["mhz"] = float(ghz.group(1)) * 1000
  m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
  if m:
    wanted = {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16"}
    info["flags"] = sorted(wanted & set(m.group(1).split()))
  if hasattr(os, "sched_getaffinity"):
    info["cores"] = len(os.sched_getaffinity(0))
  return info


def cpu_peak_flops(info: dict[str, Any], dtype: str = "float32") -> tuple[float | None, str]:
  """An estimate of the CPU's float32 peak: cores x clock x FLOP per cycle.

  FLOP per cycle assumes two FMA units per core at the widest vector width
  the flags show (AVX-512: 2 x 16 lanes x 2 = 64; AVX2: 32); many parts have
  one 512-bit FMA unit, or run AVX-512 at a lower clock, so this is an upper
  estimate, not a datasheet figure. bfloat16 on CPU is not given a peak
  (AMX/VNNI peaks depend on kernels XLA may not use).
  """
  if dtype != "float32" or not info.get("mhz"):
    return None, "no estimate"
  flags = set(info.get("flags", []))
  if "avx512f" in flags and "fma" in flags:
    per_cycle, how = 64, "AVX-512, 2 FMA units"
  elif "avx2" in flags and "fma" in flags:
    per_cycle, how = 32, "AVX2, 2 FMA units"
  else:
    per_cycle, how = 8, "SSE"
  peak = info["cores"] * info["mhz"] * 1e6 * per_cycle
  return peak, (f"estimate: {info['cores']} cores x {info['mhz'] / 1000:.2f} GHz x "
                f"{per_cycle} FLOP/cycle ({how})")


# Distribution names to look up; several may provide one library (first found wins).
_VERSIONED = {"jax": ("jax",), "jaxlib": ("jaxlib",), "jax_cuda_plugin": (
    "jax-cuda13-plugin", "jax-cuda12-plugin"), "flax": ("flax",), "numpy": ("numpy",),
    "PIL": ("pillow",), "grain": ("grain",), "torch": ("torch",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss"), "tensorflow": ("tensorflow-cpu", "tensorflow")}


def versions() -> dict[str, str]:
  """Versions of the libraries the figures depend on (absent ones are omitted).

  Read from package metadata, never by importing: the peers (TensorFlow, torch,
  faiss) take seconds to import and may be absent, e.g. on a GPU host.
  """
  out = {"python": platform.python_version()}
  for name, dists in _VERSIONED.items():
    for dist in dists:
      try:
        out[name] = importlib.metadata.version(dist)
        break
      except importlib.metadata.PackageNotFoundError:
        continue
  return out


def environment() -> dict[str, Any]:
  """Machine, libraries, devices and date, recorded with every run."""
  import jax

  from cbir_jax import runtime

  devs = jax.devices()
  return {
      "platform_info": runtime.platform_info(),
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "hostname": platform.node(),
      "platform": platform.platform(),
      "cpu": cpu_info(),
      "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
      "versions": versions(),
      "backend": jax.default_backend(),
      "devices": [d.device_kind for d in devs],
      "num_devices": len(devs),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def synthetic_images(batch: int, size: int, seed: int = 0) -> np.ndarray:
  """Random uint8 RGB images, never all zeros (zeros let kernels skip work)."""
  rng = np.random.default_rng(seed)
  return rng.integers(1, 256, size=(batch, size, size, 3), dtype=np.uint8)
