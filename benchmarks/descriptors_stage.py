"""Section 2: the Conv descriptor maths alone, three ways, on VGG16-shaped pools.

- jax: `cbir_jax.descriptors.conv_descriptor`, jit-compiled, pools on device;
- numpy: the same closed form (count map x sum-pooled blocks) in NumPy;
- loop: per image, per significant last-block neuron, marking its children
  in every earlier block, as the authors' published notebook does it (written
  here from SPEC.md section 2, not copied).
All three must agree; the maximum difference is recorded with the timings.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from cbir_jax import descriptors as desc
from benchmarks import timing

VGG16_POOLS_224 = ((112, 64), (56, 128), (28, 256), (14, 512), (7, 512))


def synthetic_pools(batch: int, shapes: Sequence[tuple[int, int]] = VGG16_POOLS_224,
                    seed: int = 0) -> list[np.ndarray]:
  """Post-ReLU-like pools: relu(N(0, 1)), float32 NHWC, a fresh draw per block."""
  rng = np.random.default_rng(seed)
  return [np.maximum(rng.standard_normal((batch, s, s, c), dtype=np.float32), 0)
          for s, c in shapes]


def numpy_conv_descriptor(pools: Sequence[np.ndarray], threshold: float = 0.5) -> np.ndarray:
  """Vectorised NumPy form of SPEC.md 2 (relative tau, per-channel masks, floor-sized pools)."""
  last = pools[-1].astype(np.float32)
  n, h, w, _ = last.shape
  tau = threshold * last.max(axis=(1, 2, 3), keepdims=True)
  m = (last > tau).astype(np.float32)
  den = m.sum(axis=(1, 2))
  v_last = np.where(den > 0, (m * last).sum(axis=(1, 2)) / np.maximum(den, 1e-30), 0)
  count = m.sum(axis=-1)
  values = []
  nb = len(pools)
  for b, block in enumerate(pools[:-1]):
    s = 2 ** (nb - 1 - b)
    p = block[:, :s * h, :s * w, :].reshape(n, h, s, w, s, -1).sum(axis=(2, 4))
    num = np.einsum("nhwc,nhw->nc", p, count)
    d = s * s * count.sum(axis=(1, 2))[:, None]
    values.append(np.where(d > 0, num / np.maximum(d, 1e-30), 0))
  values.append(v_last)
  return np.concatenate(values, axis=-1).astype(np.float32)


def loop_conv_descriptor(pools: Sequence[np.ndarray], threshold: float = 0.5) -> np.ndarray:
  """Per-image loops: each significant neuron of the last block marks its children below.

  For every image and every (i, j, c) of the last block above tau, the
  s x s square of positions it covers in block b (s = 2^(B-b)) gets +1 in
  that block's significance matrix S_b; characteristic values are then the
  S_b-weighted means of each channel (SPEC.md 2.3-2.4).
  """
  nb = len(pools)
  out = []
  for n in range(pools[0].shape[0]):
    last = pools[-1][n]
    h, w, c_last = last.shape
    tau = threshold * last.max()
    sig = [np.zeros(p.shape[1:3], np.float32) for p in pools[:-1]]
    v_last = np.zeros(c_last, np.float32)
    for c in range(c_last):
      where = np.argwhere(last[:, :, c] > tau)
      if len(where):
        v_last[c] = last[where[:, 0], where[:, 1], c].mean()
      for i, j in where:
        for b in range(nb - 1):
          s = 2 ** (nb - 1 - b)
          sig[b][i * s:(i + 1) * s, j * s:(j + 1) * s] += 1
    values = []
    for b in range(nb - 1):
      total = sig[b].sum()
      block = pools[b][n]
      values.append(np.einsum("hw,hwc->c", sig[b], block) / total if total > 0
                    else np.zeros(block.shape[-1], np.float32))
    values.append(v_last)
    out.append(np.concatenate(values))
  return np.stack(out).astype(np.float32)


def run(*, batch: int, repeats: int, loop_repeats: int = 1, model_rows: Sequence[dict] = (),
        log=print) -> dict[str, Any]:
  """Timings of the three implementations, their agreement, and the jax share of a forward."""
  log(f"[descriptors] VGG16-shaped pools at 224, batch {batch} ...")
  pools = synthetic_pools(batch)
  device = jax.devices()[0]
  pools_dev = [jax.device_put(p, device) for p in pools]
  fn = jax.jit(lambda ps: desc.conv_descriptor(ps))
  out_j = np.asarray(jax.block_until_ready(fn(pools_dev)))
  out_n = numpy_conv_descriptor(pools)
  kept: list[np.ndarray] = []
  t_loop = timing.timed(lambda: kept.append(loop_conv_descriptor(pools)),
                        repeats=loop_repeats, warmup=0)
  out_l = kept[0]
  times = timing.interleaved({"jax": lambda: fn(pools_dev),
                              "numpy": lambda: numpy_conv_descriptor(pools)},
                             repeats=repeats, warmup=0, syncs={"jax": jax.block_until_ready})
  scale = float(np.abs(out_n).max())
  res: dict[str, Any] = {
      "batch": batch, "pool_shapes": [list(s) for s in VGG16_POOLS_224],
      "jax_images_per_s": timing.rate(batch, times["jax"]),
      "numpy_images_per_s": timing.rate(batch, times["numpy"]),
      "loop_images_per_s": timing.rate(batch, t_loop),
      "jax_seconds": times["jax"], "numpy_seconds": times["numpy"], "loop_seconds": t_loop,
      "max_abs_diff_jax_numpy_rel": float(np.abs(out_j - out_n).max() / scale),
      "max_abs_diff_loop_numpy_rel": float(np.abs(out_l - out_n).max() / scale),
  }
  res["jax_over_numpy"] = res["jax_images_per_s"] / res["numpy_images_per_s"]
  res["jax_over_loop"] = res["jax_images_per_s"] / res["loop_images_per_s"]
  # Share of the whole step: descriptor time per image / model+descriptors time per image.
  for row in model_rows:
    if (row["backbone"] == "vgg16" and row["dtype"] == "float32"
        and row.get("image_size") == 224):
      res["share_of_model_step"] = row["jax_images_per_s"] / res["jax_images_per_s"]
      res["share_reference"] = f"vgg16 float32 batch {row['batch']} (section model)"
      break
  return res
