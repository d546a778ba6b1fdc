"""One image, bytes to pixels: read a file, decode it with Pillow, resize it to the model's input.

Pillow handles what photo collections contain (EXIF rotation, CMYK, palette, 16-bit, animated
GIF); everything here is per image and thread-safe, so `input_pipeline` can run it on every core.
"""
from __future__ import annotations

import inspect
import io
import os
import stat
from typing import Callable, TypeVar

import numpy as np
from PIL import Image, ImageFile, ImageOps

# A legitimate 100-150 Mpx medium-format or stitched photo decodes; a header claiming far more
# (the robustness suite's 100000x100000 PNG) is refused before any pixel is decoded.
MAX_PIXELS = 2 ** 28  # 268 Mpx
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
T = TypeVar("T")


def _readable_extensions() -> frozenset[str]:
  """File extensions of the formats this Pillow build can decode to pixels.

  Left out: stub formats (BUFR, GRIB, HDF5, WMF on Linux: Pillow identifies them but has no
  decoder), MPEG (Pillow reads the header only; the pixels would be black) and EPS/PS without
  Ghostscript. Files with those extensions are counted as skipped, not silently dropped.
  """
  Image.init()
  from PIL import EpsImagePlugin

  def readable(fmt: str) -> bool:
    if fmt == "MPO":  # multi-picture JPEGs open through the JPEG plugin
      return "JPEG" in Image.OPEN
    if fmt not in Image.OPEN or fmt == "MPEG":
      return False
    if fmt == "EPS":
      return bool(EpsImagePlugin.has_ghostscript())
    factory = Image.OPEN[fmt][0]
    return not (inspect.isclass(factory) and issubclass(factory, ImageFile.StubImageFile))

  return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items()
                   if readable(fmt))


IMAGE_EXTENSIONS = _readable_extensions()


def _to_rgb(img: Image.Image) -> Image.Image:
  """Any Pillow mode -> 8-bit RGB, keeping 16-bit images' full range."""
  if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    a = np.asarray(img, dtype=np.float64)
    peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
    a = np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(a, "L").convert("RGB")
  if img.mode == "F":
    a = np.clip(np.asarray(img, dtype=np.float64), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "L").convert("RGB")
  if img.mode in ("P", "PA"):
    img = img.convert("RGBA")  # palette transparency becomes alpha first
  return img if img.mode == "RGB" else img.convert("RGB")  # L, LA, RGBA, CMYK, YCbCr, 1, ...


def _size(image_size: int | tuple[int, int]) -> tuple[int, int]:
  """(height, width) from a square int or a (height, width) pair."""
  return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def _pillow_limit_at_least(max_pixels: int) -> None:
  """Raises Pillow's process-wide bomb limit to ours, so that our check decides.

  Pillow warns above `Image.MAX_IMAGE_PIXELS` and raises at twice that, from inside
  `Image.open`; there is no per-call setting. Only ever raised, to the limit this module
  enforces itself, so Pillow's warning can only fire for an image we refuse anyway.
  """
  limit = Image.MAX_IMAGE_PIXELS
  if limit is not None and limit < max_pixels:
    Image.MAX_IMAGE_PIXELS = max_pixels


def decode_image(data: bytes, image_size: int | tuple[int, int], *, draft: bool = True,
                 max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
  """Decodes encoded image bytes to uint8 RGB [H, W, 3] resized bilinearly (no crop).

  Args:
    image_size: output size, square int or (height, width).
    draft: decode JPEGs at the smallest 1/2..1/8 DCT scale that is still at least the
      output size (Pillow's `Image.draft`), then resize as usual: several times faster on
      photos much larger than the output; False decodes at full resolution (exact).
    max_pixels: images declaring more pixels are refused before decoding (bombs).

  Returns:
    (image, (original width, original height)) with EXIF orientation applied.

  Raises:
    ValueError: with the reason, for anything that is not a decodable image.
  """
  h, w = _size(image_size)

  def resized(img: Image.Image) -> np.ndarray:
    if img.mode == "L":  # grey: resize one channel, then replicate (same values, 1/3 the work)
      return np.asarray(img.resize((w, h), Image.BILINEAR).convert("RGB"), dtype=np.uint8)
    return np.asarray(_to_rgb(img).resize((w, h), Image.BILINEAR), dtype=np.uint8)

  return decode_with(data, (h, w), resized, draft=draft, max_pixels=max_pixels)


def decode_with(data: bytes, target: tuple[int, int], finish: Callable[[Image.Image], T], *,
                draft: bool = True, max_pixels: int = MAX_PIXELS) -> tuple[T, tuple[int, int]]:
  """Opens, checks and (draft) decodes `data` for a (height, width) `target`, then `finish`es it.

  `finish` receives the first frame with EXIF orientation applied, in its own mode; what it
  raises is reported like a decode error. Returns (finish's result, (original width,
  original height)). `decode_image` finishes with the host resize, `canvas` with placement
  in a canvas.
  """
  h, w = target
  if not data:
    raise ValueError("empty file (0 bytes)")
  _pillow_limit_at_least(max_pixels)
  try:
    img = Image.open(io.BytesIO(data))
    declared = img.size
    if declared[0] * declared[1] > max_pixels:
      raise ValueError(f"image of {declared[0]}x{declared[1]} pixels exceeds the "
                       f"decompression-bomb limit of {max_pixels} pixels")
    # Read as exif_transpose reads it. No try: for some formats (PNG) this loads the pixels,
    # and a load error swallowed here would let a damaged file through on the next load.
    turned = img.getexif().get(0x0112, 1) in _TRANSPOSED  # shown rotated by 90 degrees
    if draft and img.format in ("JPEG", "MPO"):
      # Pillow picks the smallest 1/2..1/8 DCT scale whose size is still >= the request,
      # which is in stored orientation.
      img.draft("RGB", (h, w) if turned else (w, h))
    img.seek(0)  # animated images: the first frame
    ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of the pixels
    return finish(img), (declared[::-1] if turned else declared)
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise ValueError(f"decompression bomb refused (limit {max_pixels} pixels): {e}") from e
  except ValueError:
    raise
  except Image.UnidentifiedImageError:
    raise ValueError("not an image Pillow can identify (unknown format or not an image)") from None
  except Exception as e:  # Pillow raises many types for broken files
    raise ValueError(f"cannot decode image: {type(e).__name__}: {e}") from e


def decode_full(data: bytes, *, max_pixels: int = MAX_PIXELS
                ) -> tuple[np.ndarray, tuple[int, int]]:
  """`decode_image` without its resize: uint8 RGB [H, W, 3] at full resolution, with its bomb
  limit, EXIF orientation and failure reasons; returns (image, (width, height))."""
  return decode_with(data, (0, 0), lambda img: np.asarray(_to_rgb(img)), draft=False,
                     max_pixels=max_pixels)


def read_file(path: str) -> bytes:
  """The bytes of a regular file; anything else (FIFO, device, socket) is an OSError.

  O_NONBLOCK because a plain open() of a FIFO waits for a writer forever and
  would hang the job on one odd directory entry (no effect on regular files).
  """
  fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
  with os.fdopen(fd, "rb") as f:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      raise OSError(f"not a regular file (FIFO, device or socket): {path}")
    return f.read()


def safe_decode(fetch: Callable[[], bytes], image_size: int | tuple[int, int], *,
                draft: bool = True, max_pixels: int = MAX_PIXELS
                ) -> tuple[np.ndarray, int, int, str]:
  """(image, width, height, error) of `fetch()`'s bytes; never raises for a bad input.

  A file that cannot be read or decoded gives a black image, size 0x0 and the reason, so
  one bad file cannot stop a job.
  """
  try:
    img, (w, h) = decode_image(fetch(), image_size, draft=draft, max_pixels=max_pixels)
    return img, w, h, ""
  except (OSError, ValueError) as e:
    reason = str(e) if isinstance(e, ValueError) else f"cannot read file: {e}"
    return np.zeros((*_size(image_size), 3), np.uint8), 0, 0, reason or type(e).__name__
