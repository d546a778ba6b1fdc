"""JPEGs decoded by simplejpeg (libjpeg-turbo) straight into a canvas slot, as Pillow draws them.

The canvas path (device resize) spends most of its host CPU in the JPEG decode. Pillow feeds
libjpeg in chunks through Python, returns a new image and needs a copy to become NumPy;
simplejpeg decodes from the bytes in one call into a buffer we hand it: the batch's canvas
slot. Both run libjpeg-turbo with the same settings (ISLOW DCT, fancy upsampling), and the
DCT scale here is the one Pillow's `draft` picks, so the pixels are Pillow's (tests compare
every imagenet-sample photo). Anything else (other formats, CMYK/YCCK, MPO, images still
larger than the largest canvas after draft, headers or data simplejpeg refuses) goes to the
Pillow path (`canvas.decode_placed`), so a bad file keeps Pillow's exact failure reason.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

try:  # a required dependency; absent only where nothing was installed (a GPU host running
  import simplejpeg  # launch/gpu_check.py from a checkout): Pillow then decodes every row
except ImportError:
  simplejpeg = None

from cbir_jax import decode
from cbir_jax.gpu_decode import orient

SIMPLEJPEG = "simplejpeg"  # the decoder's name in the job's tallies (DecoderTally)
MISSING = "simplejpeg not installed"  # the route of every row without it


def available() -> bool:
  """Whether simplejpeg is importable (else the canvas path decodes with Pillow only)."""
  return simplejpeg is not None


_ORIENTATION = 0x0112


def draft_scale(size: tuple[int, int], request: tuple[int, int]) -> int:
  """The DCT scale denominator Pillow 13's `JpegImageFile.draft(mode, request)` picks.

  `size` and `request` are (width, height), in stored orientation: the largest of 8, 4, 2
  whose reduction still leaves each side at least the request (`min(W // w, H // h) >= s`),
  else 1. Pillow's decoded size is then ceil(W / s) x ceil(H / s).
  """
  scale = min(size[0] // request[0], size[1] // request[1])
  return next((s for s in (8, 4, 2) if scale >= s), 1)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A JPEG simplejpeg will decode: its bytes, decoded size (stored orientation), turn."""
  data: bytes
  height: int
  width: int
  orientation: int  # EXIF, as Pillow reads it (1: as stored)
  original: tuple[int, int]  # (width, height) as shown, as `decode.decode_with` reports it

  @property
  def shape(self) -> tuple[int, int]:
    """(height, width) once turned: what lands in the canvas."""
    turned = self.orientation in decode._TRANSPOSED
    return (self.width, self.height) if turned else (self.height, self.width)


def plan(data: bytes, target: tuple[int, int], *, largest: int, draft: bool = True,
         max_pixels: int = decode.MAX_PIXELS) -> Plan | str:
  """How `data` would decode for a (height, width) `target`: a Plan, or why Pillow takes it.

  Reads headers only: Pillow's lazy open (format, mode, size, and EXIF orientation exactly as
  `decode.decode_with` reads it, XMP included) and simplejpeg's header at the planned scale.
  """
  if simplejpeg is None:
    return MISSING
  if data[:2] != b"\xff\xd8":
    return "not a JPEG"
  decode._pillow_limit_at_least(max_pixels)
  try:
    # JPEG's opener only (it also recognises MPO): trying every other format first doubled
    # the time of this open.
    with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
      fmt, mode, size = img.format, img.mode, img.size
      orientation = img.getexif().get(_ORIENTATION, 1)
  except Exception:  # pylint: disable=broad-except  # Pillow's path gives the exact reason
    return "header unreadable by Pillow"
  if fmt != "JPEG":
    return f"{fmt} file"  # MPO: Pillow picks the frame
  if mode not in ("RGB", "L"):
    return f"{mode} JPEG"
  if size[0] * size[1] > max_pixels or not size[0] or not size[1]:
    return "size over the pixel limit or zero"  # refused by Pillow's path, with the reason
  turned = orientation in decode._TRANSPOSED
  h, w = target
  s = draft_scale(size, (h, w) if turned else (w, h)) if draft else 1
  dh, dw = -(-size[1] // s), -(-size[0] // s)
  if max(dh, dw) > largest:
    return "larger than the largest canvas after draft (box reduction)"
  try:  # simplejpeg picks its scale from minimum sizes: make sure it lands on Pillow's
    got = simplejpeg.decode_jpeg_header(data, min_height=dh, min_width=dw)
  except ValueError:
    return "header refused by simplejpeg"
  if tuple(got[:2]) != (dh, dw):
    return "simplejpeg scale differs from Pillow's draft"
  return Plan(data, dh, dw, orientation if orientation in range(1, 9) else 1,
              size[::-1] if turned else size)


def decode_into(p: Plan, slot: np.ndarray) -> tuple[int, int]:
  """Decodes `p` into the start of the flat uint8 `slot` (row stride = width); (h, w) placed.

  Raises:
    ValueError: simplejpeg's, for data it refuses (strict: libjpeg warnings too, as Pillow
      refuses truncated files); the caller then decodes with Pillow for its exact reason.
  """
  n = p.height * p.width * 3
  stored = p.orientation == 1  # the common case: libjpeg writes the slot, no copy
  img = simplejpeg.decode_jpeg(p.data, "RGB", buffer=slot[:n] if stored else None,
                               min_height=p.height, min_width=p.width)
  if img.shape != (p.height, p.width, 3):
    raise ValueError(f"simplejpeg decoded {img.shape}, planned {(p.height, p.width, 3)}")
  if not stored:  # turned photos: decoded aside, then one strided copy does exif_transpose's
    shown = orient(img, p.orientation)
    slot[:n].reshape(shown.shape)[...] = shown
  return p.shape
