"""Pillow's BILINEAR resize as pure jnp: images in fixed-size canvases -> network input size.

The host decodes each image into a flat uint8 canvas slot (stored contiguously, row stride =
its width; `canvas`) and sends its height and width with it; the step unpacks each slot into
the top-left corner of a square canvas (`unpack`), builds per-image separable weight
matrices from the sizes (traced as data, so no size recompiles) and resizes on the device.

Reference: Pillow's `src/libImaging/Resample.c` (`precompute_coeffs`, `normalize_coeffs_8bpc`,
`ImagingResampleHorizontal_8bpc` / `Vertical_8bpc`), which `Image.resize(size, BILINEAR)` runs
with reducing_gap None: a horizontal pass, rounding to uint8, then a vertical pass (Pillow 13
swaps the order for some shapes: `vertical_first`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import PIL

from cbir_jax.choices import RESIZE_MODES

# Pillow applies its float coefficients as 22-bit fixed point (32 bits minus 8 for the pixel
# and 2 for overflow); quantising ours the same way removes most one-level rounding differences.
PRECISION_BITS = 22
# "auto" per platform (`jax.default_backend()`), from docs/resize.md: on the CPU backend the
# dense resize costs more CPU than Pillow's on the host; accelerators take the work off the host.
AUTO: dict[str, str] = {"cpu": "host"}
# Pillow >= 13 picks the pass order per image (`vertical_first`); earlier ones never do.
VERTICAL_FIRST_RULE = int(PIL.__version__.split(".")[0]) >= 13


def resolve(mode: str, platform: str) -> str:
  """"device" or "host" for a resize setting ("auto", "device", "host") on `platform`."""
  if mode not in RESIZE_MODES:
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")
  return AUTO.get(platform, "device") if mode == "auto" else mode


def bilinear_weights(in_size: jax.Array, out_size: int, extent: int) -> jax.Array:
  """Pillow's BILINEAR taps for one axis, as a dense matrix [out_size, extent] (float32).

  Output pixel i takes input pixels x < `in_size` with weight
  `max(0, 1 - |x + 0.5 - c_i| / s)`, where `c_i = (i + 0.5) * scale`, `scale = in_size /
  out_size` and `s = max(scale, 1)` (the triangle widens when shrinking: antialiasing), each
  row renormalised to sum 1. Pillow's tap window [round(c - s), round(c + s)) clipped to
  [0, in_size) is exactly where this triangle is non-zero, so the dense form has the same
  taps; columns from `in_size` to `extent` (canvas padding) get weight 0.

  Args:
    in_size: the image's length on this axis (traced int scalar, >= 1; 0 gives a zero row).
    out_size: output length (static).
    extent: the canvas length on this axis (static, >= in_size).
  """
  # The distance from tap x to centre i, over the support, in integers until one division:
  # |(x + 0.5) - (i + 0.5) * n / out| / max(n / out, 1) = |(2x + 1) out - (2i + 1) n| /
  # (2 max(n, out)). float32 arithmetic on the centre itself is off by ~n * 6e-8 pixels,
  # which moves Pillow's 22-bit coefficients by up to ~80 units.
  n = jnp.asarray(in_size, jnp.int32)
  i = jnp.arange(out_size, dtype=jnp.int32)
  x = jnp.arange(extent, dtype=jnp.int32)
  num = jnp.abs((2 * x[None, :] + 1) * out_size - (2 * i[:, None] + 1) * n)
  den = 2 * jnp.maximum(n, out_size)
  w = jnp.maximum(0.0, 1.0 - num.astype(jnp.float32) / den.astype(jnp.float32))
  w = jnp.where(x[None, :] < n, w, 0.0)
  total = jnp.sum(w, axis=1, keepdims=True)
  w = jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)
  one = float(1 << PRECISION_BITS)
  return jnp.round(w * one) / one  # w >= 0: Pillow's (int)(0.5 + w * 2^22)


def _to_uint8(x: jax.Array) -> jax.Array:
  """Pillow's clip8 after its + 2^21 rounding term: floor(x + 0.5) clipped to 0..255."""
  return jnp.clip(jnp.floor(x + 0.5), 0, 255)


def vertical_first(sizes: jax.Array, out_size: tuple[int, int]) -> jax.Array:
  """Per image, whether Pillow runs the vertical pass first (bool [N]).

  Resample.c up to Pillow 12 always runs the horizontal pass first. Pillow 13.0.0 (the one
  installed here) runs the vertical pass first when the height shrinks by more than twice
  what the width shrinks: `h > out_h and h - out_h > 2 * (w - out_w)`; this rule matched
  every one of 1,248 shapes probed (docs/resize.md). The order moves intermediate rounding:
  the wrong one leaves ~20% of values one level off.
  """
  h, w = sizes[:, 0], sizes[:, 1]
  if not VERTICAL_FIRST_RULE:
    return jnp.zeros(h.shape, bool)
  out_h, out_w = out_size
  return (h > out_h) & (h - out_h > 2 * (w - out_w))


def _two_passes(x: jax.Array, first: jax.Array, second: jax.Array) -> jax.Array:
  """Pass along axis 2 with `first` [N, A, X], round to uint8, along axis 1 with `second`
  [N, B, Y], round: float32 [N, B, A, C] holding uint8 values."""
  # HIGHEST: on GPUs the default float32 matmul may run in TF32 (10-bit mantissa), far too
  # coarse for results that must round to the same uint8 as Pillow's.
  hi = jax.lax.Precision.HIGHEST
  x = _to_uint8(jnp.einsum("nyxc,njx->nyjc", x, first, precision=hi))
  return _to_uint8(jnp.einsum("nyjc,niy->nijc", x, second, precision=hi))


def unpack(canvases: jax.Array, sizes: jax.Array, side: int) -> jax.Array:
  """Flat canvases uint8 [N, side * side * 3] -> [N, side, side, 3], image n top-left.

  Slot n holds its image's rows back to back (row stride sizes[n, 1]); pixel (y, x) is the
  3 bytes at (y * width + x) * 3. Outside the image the gathered values are whatever the
  slot holds (other rows, earlier batches): finite uint8, which `bilinear_weights` gives
  weight exactly 0, so they never reach an output (tested against zero-filled canvases).
  """
  y = jnp.arange(side, dtype=jnp.int32)[:, None]
  x = jnp.arange(side, dtype=jnp.int32)[None, :]

  def one(flat: jax.Array, width: jax.Array) -> jax.Array:
    pixels = flat.reshape(side * side, 3)
    return jnp.take(pixels, jnp.clip(y * width + x, 0, side * side - 1), axis=0, mode="clip")

  return jax.vmap(one)(canvases, jnp.asarray(sizes, jnp.int32)[:, 1])


def resize_canvases(canvases: jax.Array, sizes: jax.Array, out_size: tuple[int, int]
                    ) -> jax.Array:
  """Resizes each image of flat canvases to `out_size` as Pillow's BILINEAR does.

  Args:
    canvases: uint8 [N, C * C * 3] (`canvas` layout); image n fills the first
      sizes[n, 0] * sizes[n, 1] * 3 bytes of its slot.
    sizes: int32 [N, 2], (height, width) of each image; a zero size (padding, failure) gives
      a black image.
    out_size: (height, width) of the output (static).

  Returns:
    uint8 [N, out_h, out_w, 3].
  """
  side = math.isqrt(canvases.shape[1] // 3)
  return resize_square(unpack(canvases, sizes, side), sizes, out_size)


def resize_square(canvases: jax.Array, sizes: jax.Array, out_size: tuple[int, int]
                  ) -> jax.Array:
  """`resize_canvases` on unpacked canvases uint8 [N, CH, CW, C], image n in
  [:sizes[n, 0], :sizes[n, 1]] (anything finite around it)."""
  out_h, out_w = out_size
  _, ch, cw, _ = canvases.shape
  flip = vertical_first(sizes, out_size)
  x = canvases.astype(jnp.float32)
  tr = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731
  pick = lambda a, b: jnp.where(flip[:, None, None, None], a, b)  # noqa: E731
  if out_h == out_w and ch == cw:
    # Vertical first on an image is horizontal first on its transpose, transposed back: with
    # square canvases and output both orders share one pair of passes.
    x = pick(tr(x), x)
    hs, ws = jnp.where(flip, sizes[:, 1], sizes[:, 0]), jnp.where(flip, sizes[:, 0], sizes[:, 1])
    wy = jax.vmap(lambda n: bilinear_weights(n, out_h, ch))(hs)
    wx = jax.vmap(lambda n: bilinear_weights(n, out_w, cw))(ws)
    y = _two_passes(x, wx, wy)
    return pick(tr(y), y).astype(jnp.uint8)
  wy = jax.vmap(lambda n: bilinear_weights(n, out_h, ch))(sizes[:, 0])  # [N, out_h, CH]
  wx = jax.vmap(lambda n: bilinear_weights(n, out_w, cw))(sizes[:, 1])  # [N, out_w, CW]
  y = _two_passes(x, wx, wy)  # other shapes: both orders, each image takes Pillow's
  return pick(tr(_two_passes(tr(x), wy, wx)), y).astype(jnp.uint8)
