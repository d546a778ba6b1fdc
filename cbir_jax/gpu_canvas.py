"""Canvases for the device resize from images already on the device (nvImageCodec GPU decodes).

The layout of the host canvases (`canvas`): flat uint8 [B, C * C * 3], each image stored
contiguously at the start of its slot (row stride = its width), its (height, width) in an int32
[B, 2], C the smallest bucket that holds the batch; an image larger than the largest bucket is
first reduced by an integer box factor (`canvas.box_factor`; Pillow's `Image.reduce`: mean of
f x f blocks, partial edge blocks over their pixels). Here all of it runs on the device, so a
GPU-decoded image never visits the host; the step cannot tell the two apart.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cbir_jax import canvas


@functools.partial(jax.jit, static_argnums=1)
def box_reduce(image: jax.Array, factor: int) -> jax.Array:
  """uint8 [H, W, C] -> [ceil(H/f), ceil(W/f), C]: each pixel the rounded mean of its block.

  Blocks cut by the bottom or right edge average only the pixels they hold, as Pillow's
  `Image.reduce` does. Compiled once per (shape, factor): a photo set of one camera is one
  compile; every distinct size of a mixed collection is one more (jit's cache keeps them).
  """
  h, w, c = image.shape
  oh, ow = -(-h // factor), -(-w // factor)
  padded = jnp.pad(image.astype(jnp.int32), ((0, oh * factor - h), (0, ow * factor - w), (0, 0)))
  sums = padded.reshape(oh, factor, ow, factor, c).sum(axis=(1, 3))
  rows = jnp.minimum(factor, h - jnp.arange(oh) * factor)
  cols = jnp.minimum(factor, w - jnp.arange(ow) * factor)
  count = (rows[:, None] * cols[None, :])[..., None]
  return ((sums + count // 2) // count).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnums=1)
def _place(image: jax.Array, side: int) -> jax.Array:
  """[h, w, 3] -> its flat slot [side * side * 3]: the pixels back to back, zeros after."""
  flat = image.reshape(-1)
  return jnp.pad(flat, (0, canvas.slot_bytes(side) - flat.shape[0]))


def assemble(images: Sequence[Any], buckets: Sequence[int], *, device: Any = None
             ) -> tuple[jax.Array, np.ndarray, list[int]]:
  """Images (jax.Array on the device, NumPy, or None) -> (canvases, sizes, box factors).

  Args:
    images: uint8 [h, w, 3] per item, as `gpu_decode.decode_batch` gives them; None (a failed
      item) becomes a black canvas of size 0x0.
    buckets: canvas sides; only these shapes reach the step.
    device: where host images go (default: where the first device image is, else JAX's).

  Returns:
    flat canvases uint8 [B, C * C * 3] on the device (the host layout, `canvas`), sizes
    int32 [B, 2] (height, width) after any reduction, and the box factor each image took.
  """
  largest = max(buckets)
  if device is None:
    device = next((next(iter(im.devices())) for im in images if isinstance(im, jax.Array)),
                  jax.devices()[0])
  reduced, factors = [], []
  for im in images:
    f = 1 if im is None else canvas.box_factor(im.shape[0], im.shape[1], largest)
    if im is not None:
      im = jax.device_put(im, device)
      im = box_reduce(im, f) if f > 1 else im
    reduced.append(im)
    factors.append(f)
  sizes = np.array([(0, 0) if im is None else im.shape[:2] for im in reduced], np.int32)
  side = canvas.bucket_for(sizes, buckets)  # the reduction made every image fit
  black = jax.device_put(np.zeros(canvas.slot_bytes(side), np.uint8), device)
  canvases = jnp.stack([black if im is None else _place(im, side) for im in reduced])
  return canvases, sizes.reshape(-1, 2), factors
