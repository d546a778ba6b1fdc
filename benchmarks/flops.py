"""FLOP counts per image and device peaks, to turn images/s into a fraction of peak.

Peaks are the vendors' dense figures (no sparsity); a CPU's peak is an
estimate from its clock and vector units (`timing.cpu_peak_flops`).
"""
from __future__ import annotations

from typing import Any, Sequence

from benchmarks import timing

# Dense TFLOP/s by dtype, from NVIDIA's datasheets. float32 on these cards
# runs convolutions and matmuls as TF32 under JAX's default precision, so
# "float32" maps to the TF32 figure and "float32_simt" keeps the plain one.
GPU_PEAKS_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7, "float32_simt": 66.9},
    "H100 PCIe": {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0, "float32_simt": 51.2},
    "H200": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7, "float32_simt": 66.9},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0, "float32_simt": 19.5},
}


def gpu_model(device_kind: str) -> str | None:
  """The row of GPU_PEAKS_TFLOPS for a `jax.Device.device_kind`, or None."""
  kind = device_kind.upper()
  if "H200" in kind:
    return "H200"
  if "H100" in kind:
    return "H100 PCIe" if "PCIE" in kind else "H100 SXM"
  if "A100" in kind:
    return "A100"
  return None


def device_peak(device: Any, dtype: str) -> tuple[float | None, str]:
  """(peak FLOP/s of one device for `dtype`, where the figure comes from)."""
  if device.platform == "cpu":
    return timing.cpu_peak_flops(timing.cpu_info(), dtype)
  model = gpu_model(device.device_kind)
  if model is None or dtype not in GPU_PEAKS_TFLOPS[model]:
    return None, f"no peak known for {device.device_kind} {dtype}"
  return GPU_PEAKS_TFLOPS[model][dtype] * 1e12, f"{model} datasheet, dense {dtype}"


def vgg_flops(blocks: Sequence[tuple[int, int]], image_size: int, *, fc_dim: int = 4096,
              num_classes: int = 1000) -> int:
  """Multiply-adds x 2 of a VGG forward pass for one square image (convs and FCs only).

  VGG16 at 224: 15.47 GMAC, i.e. about 30.9 GFLOP. Bias, ReLU and pooling
  (under 0.1%) are left out, as is customary.
  """
  total, h, cin = 0, image_size, 3
  for n_convs, channels in blocks:
    for _ in range(n_convs):
      total += 2 * h * h * 9 * cin * channels
      cin = channels
    h //= 2
  fc_in = 7 * 7 * cin  # adaptive pooling to 7x7 before FC6, as in the module
  total += 2 * (fc_in * fc_dim + fc_dim * fc_dim + fc_dim * num_classes)
  return total


def xla_flops(compiled: Any) -> float | None:
  """FLOPs of a compiled computation from XLA's cost analysis (None if unavailable).

  `Compiled.cost_analysis()` returns a dict in JAX 0.10 (a one-element list of
  dicts in older releases); both are accepted.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  flops = float(cost["flops"])
  return flops if flops > 0 else None
