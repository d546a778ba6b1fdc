"""Host side of the device resize: decode an image (draft as usual) and place it in a canvas.

A batch travels as flat uint8 canvases [B, C * C * 3] of one bucket side C: image j is stored
contiguously at the start of its slot (row stride = its width, as a decoder writes it), with
its (height, width) beside; `resize.resize_canvases` unpacks and resizes in the step. Bytes
past the image are never read with a non-zero weight, so slots are neither zeroed nor
cleared between batches (`BufferPool`), and simplejpeg decodes straight into them
(`turbo_decode`). GPU-decoded images take the same layout on the device (`gpu_canvas`).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import mmap
import threading
from typing import Sequence

import numpy as np
from PIL import Image

from cbir_jax import decode

# Canvas sides, measured on how JPEGs land after draft for a 224 input (docs/resize.md):
# imagenet-sample's longer sides are 500 for 90% of photos (15% fit 320, 99.4% fit 640, all
# fit 1024), phone photos (4032x3024) draft to 504x378, food7's to 224-244 (99.7% fit 320).
# Not 640 at the top: the six imagenet-sample photos between 640 and 964 box-reduced by 2
# land below 224 on a side, and their pixels then differ from Pillow's by 0.4-2.8 levels on
# average (up to 83), which alone breaks the 99.9th percentile target.
BUCKETS: tuple[int, ...] = (320, 640, 1024)


@dataclasses.dataclass(frozen=True)
class Placed:
  """One decoded image ready for a canvas: its pixels and the box reduction it took."""
  pixels: np.ndarray  # uint8 [h, w, 3] or [h, w] (grey, replicated when placed)
  reduced: int  # integer box factor applied on the host (1: none)


def box_factor(height: int, width: int, largest: int) -> int:
  """The smallest integer factor that brings both sides within `largest` (1: fits already)."""
  return max(1, -(-height // largest), -(-width // largest))


def _placed(img: Image.Image, largest: int) -> Placed:
  """The image as RGB (or L) pixels fitting `largest`, box-reduced on the host if needed."""
  if img.mode not in ("L", "RGB"):
    img = decode._to_rgb(img)
  f = box_factor(img.height, img.width, largest)
  if f > 1:  # Pillow's reduce: mean of f x f blocks, partial blocks at the edges averaged
    img = img.reduce(f)
  return Placed(np.asarray(img, dtype=np.uint8), f)


def decode_placed(data: bytes, image_size: int | tuple[int, int], *,
                  buckets: Sequence[int] = BUCKETS, draft: bool = True,
                  max_pixels: int = decode.MAX_PIXELS) -> tuple[Placed, tuple[int, int]]:
  """Decodes bytes for the device resize: (pixels fitting the largest bucket, (width, height)).

  Same checks, draft and EXIF handling as `decode.decode_image`; no resize.

  Raises:
    ValueError: with the reason, for anything that is not a decodable image.
  """
  largest = max(buckets)
  return decode.decode_with(data, decode._size(image_size), lambda img: _placed(img, largest),
                            draft=draft, max_pixels=max_pixels)


def bucket_for(sizes: np.ndarray, buckets: Sequence[int] = BUCKETS) -> int:
  """The smallest bucket holding every (height, width) in `sizes` [N, 2]."""
  need = int(sizes.max()) if sizes.size else 0
  for b in sorted(buckets):
    if need <= b:
      return b
  raise ValueError(f"an image of side {need} exceeds the largest canvas {max(buckets)}")


def slot_bytes(side: int) -> int:
  """Bytes of one flat canvas slot of side `side` (RGB)."""
  return side * side * 3


def side_of(canvases: np.ndarray) -> int:
  """The canvas side C of flat canvases [B, C * C * 3]."""
  side = math.isqrt(canvases.shape[-1] // 3)
  if slot_bytes(side) != canvases.shape[-1]:
    raise ValueError(f"not flat canvases of RGB squares: {canvases.shape}")
  return side


def put(slot: np.ndarray, pixels: np.ndarray) -> None:
  """Stores [h, w, 3] (or grey [h, w], replicated) contiguously at the start of a flat slot."""
  h, w = pixels.shape[:2]
  slot[:h * w * 3].reshape(h, w, 3)[...] = pixels if pixels.ndim == 3 else pixels[..., None]


def assemble(pixels: Sequence[np.ndarray | None], buckets: Sequence[int] = BUCKETS
             ) -> tuple[np.ndarray, np.ndarray]:
  """Rows -> (flat canvases uint8 [B, C * C * 3], sizes int32 [B, 2]); None rows: size 0.

  C is the smallest bucket that holds the batch's largest image, so a batch of small images
  sends less to the device; only `len(buckets)` canvas shapes ever reach the step. The
  bytes past each image are left as allocated (never read with weight; see module doc).
  """
  sizes = np.array([(0, 0) if p is None else p.shape[:2] for p in pixels], np.int32)
  sizes = sizes.reshape(-1, 2)  # [0, 2] for no rows
  out = np.empty((len(pixels), slot_bytes(bucket_for(sizes, buckets))), np.uint8)
  for j, p in enumerate(pixels):
    if p is not None:
      put(out[j], p)
  return out, sizes


class BufferPool:
  """Flat canvas buffers [B, C * C * 3] handed back by consumers, reused without clearing.

  Fresh buffers of tens of MB come from the kernel as untouched pages, and the first write
  to each page faults; in the first 768-photo stream of a process on the 2-core VM that was
  15-45% of its CPU with NumPy's 2 MB pages, a third of that with 4 kB pages (docs/resize.md).
  One pool per process (`POOL`), so a stream also reuses the buffers of the streams before
  it. Only a consumer that no longer reads a batch's canvases (nor device arrays that may
  alias them: JAX's CPU backend can share host memory) may hand them back (`Batch.recycle`).
  """

  def __init__(self):
    self._keep = 0  # per shape: buffers beyond it are dropped (freed)
    self._free: dict[tuple[int, int], collections.deque] = collections.defaultdict(
        collections.deque)
    self._lock = threading.Lock()

  def hold(self, n: int) -> None:
    """Keeps up to `n` free buffers of each shape (a stream's batches in flight)."""
    self._keep = max(self._keep, n)

  def take(self, batch: int, side: int) -> np.ndarray:
    with self._lock:
      free = self._free[(batch, side)]
      if free:
        return free.pop()
    # Anonymous memory of small pages, not `np.empty`'s 2 MB ones: only the pages a slot's
    # image covers are zeroed at first touch (a 500x375 image fills 46% of a 640 slot).
    return np.frombuffer(mmap.mmap(-1, batch * slot_bytes(side)), np.uint8).reshape(batch, -1)

  def give(self, buf: np.ndarray) -> None:
    key = (buf.shape[0], side_of(buf))
    with self._lock:
      if len(self._free[key]) < self._keep:
        self._free[key].append(buf)


POOL = BufferPool()
