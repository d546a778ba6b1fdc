"""Hostile and awkward image files, built from scratch, each with what the product must do with it.

Every case is a file (or a directory entry) plus either a reference for the
decoded pixels (good files) or a pattern its failure reason must match (bad
files). References are computed here independently of cbir_jax: from the
pixel values the file was made from, or with NumPy.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
import pathlib
import struct
import zlib
from typing import Callable

import numpy as np
from PIL import Image

SIZE = 32  # decode size used by the suite: small, so jobs stay fast


def rgb_pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
  """A smooth, asymmetric colour image (no two quadrants alike; survives JPEG well)."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float64)
  r = 255 * x / max(w - 1, 1)
  g = 255 * y / max(h - 1, 1)
  b = 255 * (x + 2 * y) / max(w + 2 * h - 3, 1)
  if seed % 2:
    b = 255 - b
  b = (b + 17 * seed) * (255 / (255 + 17 * seed))  # stays in [0, 255], no sharp edges
  return np.stack([r, g, b], -1).round().astype(np.uint8)


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int,
              rows: Callable[[int], bytes], *, level: int = 9) -> bytes:
  """A PNG written chunk by chunk (no Pillow), rows streamed so huge images cost no memory.

  Args:
    rows: y -> the raw row bytes (without the filter byte) for row y.
  """
  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

  ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
  comp = zlib.compressobj(level)
  idat = bytearray()
  for y in range(height):
    idat += comp.compress(b"\x00" + rows(y))
  idat += comp.flush()
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", bytes(idat))
          + chunk(b"IEND", b""))


def png_header_only(width: int, height: int) -> bytes:
  """A PNG whose header claims width x height RGB but whose data is a few bytes."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
          + chunk(b"IEND", b""))


@functools.cache
def real_bomb() -> bytes:
  """A genuine 16385x16385 greyscale PNG of zeros: every pixel is there, compressed."""
  return png_bytes(16385, 16385, 8, 0, lambda y: bytes(16385))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def resize_ref(rgb: np.ndarray, size: int = SIZE) -> np.ndarray:
  """Bilinear resize of a uint8 RGB array to size x size (the product's contract, SPEC 4)."""
  return np.asarray(Image.fromarray(rgb, "RGB").resize((size, size), Image.BILINEAR))


@dataclasses.dataclass
class ImageCase:
  """One entry of the hostile folder.

  Attributes:
    name: case name (for the ledger).
    filename: file name inside the folder (may hold spaces, non-ASCII, newlines).
    make: writes the entry at the given path.
    expect: uint8 [SIZE, SIZE, 3] reference for a good file, or None for a bad one.
    atol: allowed max abs difference for good files (lossy formats).
    reason: regex the failure reason must match (bad files).
    size: (width, height) the product must report for a good file (None: don't check).
  """
  name: str
  filename: str
  make: Callable[[pathlib.Path], None]
  expect: np.ndarray | None = None
  atol: float = 0.0
  reason: str = ""
  size: tuple[int, int] | None = None

  @property
  def good(self) -> bool:
    return self.expect is not None


def _writer(data: bytes) -> Callable[[pathlib.Path], None]:
  return lambda p: p.write_bytes(data)


def _solid(rgb: tuple[int, int, int]) -> np.ndarray:
  return np.broadcast_to(np.array(rgb, np.uint8), (SIZE, SIZE, 3)).copy()


def image_cases() -> list[ImageCase]:
  """The hostile folder's files (regular files only; links and specials are in `special_cases`)."""
  rng = np.random.default_rng(7)
  cases: list[ImageCase] = []
  base = rgb_pattern(48, 64)
  jpeg = encode(Image.fromarray(base), "JPEG", quality=95)
  png = encode(Image.fromarray(base), "PNG")
  # JPEG is lossy: compare with the bilinear resize of the pattern, to a JPEG-sized tolerance.
  cases.append(ImageCase("control: RGB JPEG", "control.jpg", _writer(jpeg), resize_ref(base),
                         atol=12, size=(64, 48)))
  cases.append(ImageCase("upper-case extension .JPG", "UPPER.JPG", _writer(jpeg),
                         resize_ref(base), atol=12, size=(64, 48)))
  cases.append(ImageCase("PNG content with a .jpg name", "really_png.jpg", _writer(png),
                         resize_ref(base), atol=1, size=(64, 48)))

  # ---- bad files
  cases.append(ImageCase("zero-byte file", "empty.jpg", _writer(b""), reason=r"empty|0 bytes"))
  cases.append(ImageCase("truncated JPEG (half the bytes)", "truncated.jpg",
                         _writer(jpeg[:len(jpeg) // 2]), reason=r"truncat|decode"))
  cases.append(ImageCase("truncated PNG (half the bytes)", "truncated.png",
                         _writer(png[:len(png) // 2]), reason=r"truncat|decode"))
  cases.append(ImageCase("random bytes named .jpg", "random.jpg",
                         _writer(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()),
                         reason=r"identify|not an image"))
  cases.append(ImageCase("text file named .jpg", "notes.jpg",
                         _writer(b"shopping list\neggs\nmilk\n" * 20),
                         reason=r"identify|not an image"))
  cases.append(ImageCase("text file named .png", "readme.png",
                         _writer("plain text, not a picture\n".encode() * 20),
                         reason=r"identify|not an image"))
  cases.append(ImageCase("HTML page saved as .png", "page.png", _writer(
      b"<!DOCTYPE html><html><head><title>404 Not Found</title></head>"
      b"<body><h1>Not Found</h1><img src='x.png'></body></html>\n"),
      reason=r"identify|not an image"))
  cases.append(ImageCase("decompression bomb: PNG header claims 100000x100000",
                         "bomb_header.png", _writer(png_header_only(100_000, 100_000)),
                         reason=r"bomb|exceed|limit"))
  # 16385 x 16385 = 268.47 Mpx: one row over the product's 2**28-pixel limit (which lets a
  # 100-150 Mpx camera photo through) and below the 2 x limit where Pillow itself would
  # raise, so only the product's own check stands between it and an 805 MB RGB decode.
  # Real, well-compressed data (~270 KB on disk).
  cases.append(ImageCase("decompression bomb: real 16385x16385 PNG of zeros (just over the "
                         "268 Mpx limit)", "bomb_real.png",
                         lambda p: p.write_bytes(real_bomb()), reason=r"bomb|exceed|limit"))

  # ---- unusual but valid
  one = np.array([[[200, 30, 90]]], np.uint8)
  cases.append(ImageCase("1x1 image", "one_pixel.png", _writer(encode(Image.fromarray(one), "PNG")),
                         _solid((200, 30, 90)), size=(1, 1)))
  long = np.zeros((10, 20000, 3), np.uint8)
  long[:, :10000] = (255, 0, 0)
  long[:, 10000:] = (0, 0, 255)
  cases.append(ImageCase("20000x10 image (20000 px on one side)", "long_20000x10.png",
                         _writer(encode(Image.fromarray(long), "PNG")), resize_ref(long),
                         atol=1, size=(20000, 10)))

  grey = (rgb_pattern(40, 40)[..., 0] // 2 + 60).astype(np.uint8)
  cases.append(ImageCase("greyscale (L) PNG", "grey.png",
                         _writer(encode(Image.fromarray(grey, "L"), "PNG")),
                         resize_ref(np.repeat(grey[..., None], 3, -1)), atol=1, size=(40, 40)))
  bilevel = (np.indices((40, 40)).sum(0) // 5 % 2).astype(bool)
  bl = Image.fromarray(bilevel)
  cases.append(ImageCase("bilevel (mode 1) PNG", "bilevel.png", _writer(encode(bl, "PNG")),
                         resize_ref(np.repeat(bilevel[..., None] * np.uint8(255), 3, -1)),
                         atol=1, size=(40, 40)))

  # Palette: 4 colours in quadrants; reference = palette lookup done with NumPy.
  pal_colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [250, 250, 20]], np.uint8)
  idx = np.zeros((40, 40), np.uint8)
  idx[:20, 20:], idx[20:, :20], idx[20:, 20:] = 1, 2, 3
  pimg = Image.fromarray(idx, "P")
  pimg.putpalette(pal_colours.flatten().tolist() + [0] * (768 - 12))
  cases.append(ImageCase("palette (P) PNG", "palette.png", _writer(encode(pimg, "PNG")),
                         resize_ref(pal_colours[idx]), atol=1, size=(40, 40)))
  cases.append(ImageCase("palette GIF with a transparent index", "palette_transparent.gif",
                         _writer(encode(pimg, "GIF", transparency=3)),
                         resize_ref(pal_colours[idx]), atol=1, size=(40, 40)))

  la = np.stack([grey, np.full_like(grey, 128)], -1)
  cases.append(ImageCase("grey + alpha (LA) PNG", "grey_alpha.png",
                         _writer(encode(Image.fromarray(la, "LA"), "PNG")),
                         resize_ref(np.repeat(grey[..., None], 3, -1)), atol=1, size=(40, 40)))
  rgba = np.concatenate([rgb_pattern(40, 40, 1), np.full((40, 40, 1), 77, np.uint8)], -1)
  cases.append(ImageCase("RGBA PNG", "rgba.png", _writer(encode(Image.fromarray(rgba, "RGBA"),
                                                                 "PNG")),
                         resize_ref(rgba[..., :3]), atol=1, size=(40, 40)))

  # CMYK: reference by the naive formula R = (255 - C)(255 - K)/255 on solid colours.
  def cmyk_solid(c, m, y, k):
    return Image.new("CMYK", (40, 40), (c, m, y, k))
  def cmyk_to_rgb(c, m, y, k):
    return tuple(int(round((255 - v) * (255 - k) / 255)) for v in (c, m, y))
  cases.append(ImageCase("CMYK TIFF", "cmyk.tiff", _writer(encode(cmyk_solid(0, 255, 255, 0),
                                                                   "TIFF")),
                         _solid(cmyk_to_rgb(0, 255, 255, 0)), atol=1, size=(40, 40)))
  cases.append(ImageCase("CMYK JPEG", "cmyk.jpg", _writer(encode(cmyk_solid(200, 40, 0, 30),
                                                                  "JPEG", quality=95)),
                         _solid(cmyk_to_rgb(200, 40, 0, 30)), atol=6, size=(40, 40)))

  # 16-bit: value v/65535 of full scale must become round(v/65535*255), not clip at 255.
  g16 = (np.arange(40 * 40, dtype=np.uint32).reshape(40, 40) * 40 + 200).astype(np.uint16)
  g16_ref = np.clip(np.round(g16 / 65535 * 255), 0, 255).astype(np.uint8)
  cases.append(ImageCase("16-bit greyscale PNG", "grey16.png",
                         lambda p: p.write_bytes(png_bytes(
                             40, 40, 16, 0, lambda y: g16[y].astype(">u2").tobytes())),
                         resize_ref(np.repeat(g16_ref[..., None], 3, -1)), atol=1, size=(40, 40)))
  rgb16 = (rgb_pattern(40, 40, 2).astype(np.uint16) * 257)
  cases.append(ImageCase("16-bit RGB PNG (48 bits per pixel)", "rgb16.png",
                         lambda p: p.write_bytes(png_bytes(
                             40, 40, 16, 2, lambda y: rgb16[y].astype(">u2").tobytes())),
                         resize_ref(rgb_pattern(40, 40, 2)), atol=1, size=(40, 40)))

  # EXIF orientation 6: stored landscape, shown rotated 90 degrees clockwise.
  stored = rgb_pattern(24, 40, 3)
  exif = Image.Exif()
  exif[0x0112] = 6
  rotated = np.rot90(stored, k=-1)  # clockwise: what a viewer shows, 40 high x 24 wide
  cases.append(ImageCase("EXIF-rotated JPEG (orientation 6)", "exif_rotated.jpg",
                         _writer(encode(Image.fromarray(stored), "JPEG", quality=95,
                                        exif=exif.tobytes())),
                         resize_ref(np.ascontiguousarray(rotated)), atol=12, size=(24, 40)))

  # Damaged or nonsensical EXIF must not cost the picture: it is decoded unrotated.
  exif9 = Image.Exif()
  exif9[0x0112] = 9  # orientations are 1..8
  cases.append(ImageCase("JPEG with an invalid EXIF orientation (9)", "exif_orientation_9.jpg",
                         _writer(encode(Image.fromarray(stored), "JPEG", quality=95,
                                        exif=exif9.tobytes())),
                         resize_ref(stored), atol=12, size=(40, 24)))
  bad_exif = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\xff\xff\xff\xff"
  cases.append(ImageCase("JPEG with a corrupt EXIF block", "exif_corrupt.jpg",
                         _writer(encode(Image.fromarray(stored), "JPEG", quality=95,
                                        exif=bad_exif)),
                         resize_ref(stored), atol=12, size=(40, 24)))
  damaged = bytearray(png)
  at = damaged.index(b"IDAT") + 10
  damaged[at] ^= 0xFF  # one flipped byte in the compressed pixels
  cases.append(ImageCase("PNG with one corrupted byte in its pixel data", "bitflip.png",
                         _writer(bytes(damaged)), reason=r"decode|broken|crc"))

  frames = [Image.new("RGB", (30, 30), c) for c in ((250, 10, 10), (10, 250, 10), (10, 10, 250))]
  cases.append(ImageCase("animated GIF (first frame)", "animated.gif",
                         _writer(encode(frames[0], "GIF", save_all=True, append_images=frames[1:],
                                        duration=100, loop=0)),
                         _solid((250, 10, 10)), atol=3, size=(30, 30)))
  webp = encode(Image.fromarray(base), "WEBP", lossless=True)
  cases.append(ImageCase("lossless WebP", "lossless.webp", _writer(webp), resize_ref(base),
                         atol=1, size=(64, 48)))
  cases.append(ImageCase("BMP", "plain.bmp", _writer(encode(Image.fromarray(base), "BMP")),
                         resize_ref(base), atol=1, size=(64, 48)))

  # ---- awkward names (content: the control PNG)
  for name, fn in (("non-ASCII file name", "café_日本語_ñ.png"),
                   ("file name with spaces", "holiday photo 1 .png"),
                   ("file name with a newline", "line\nbreak.png"),
                   ("file name with a tab and quotes", "tab\there \"q\" 'x'.png"),
                   ("file name that is not valid UTF-8", os.fsdecode(b"latin1_\xe9t\xe9.png"))):
    cases.append(ImageCase(name, fn, _writer(png), resize_ref(base), atol=1, size=(64, 48)))
  # Bad files with awkward names: the failures file must hold them without breaking.
  cases.append(ImageCase("bad file whose name is not valid UTF-8", os.fsdecode(b"broken_\xff.jpg"),
                         _writer(b"not an image"), reason=r"identify|not an image"))
  cases.append(ImageCase("bad file with a newline and a tab in its name", "broken\nname\t2.png",
                         _writer(b""), reason=r"empty|0 bytes"))
  return cases


@dataclasses.dataclass
class SpecialCase:
  """A directory entry that is not a plain image file: links, loops, FIFOs, permissions."""
  name: str
  filenames: tuple[str, ...]  # the entries the job lists (each must fail with `reason`)
  make: Callable[[pathlib.Path], None]  # builds the entries inside the folder
  reason: str


def special_cases(good_png: bytes) -> list[SpecialCase]:
  def loop(folder: pathlib.Path) -> None:
    os.symlink("loop_b.jpg", folder / "loop_a.jpg")
    os.symlink("loop_a.jpg", folder / "loop_b.jpg")

  def broken(folder: pathlib.Path) -> None:
    os.symlink("does_not_exist.png", folder / "dangling.png")

  def fifo(folder: pathlib.Path) -> None:
    os.mkfifo(folder / "pipe.jpg")

  return [
      SpecialCase("symlink loop between two files", ("loop_a.jpg", "loop_b.jpg"), loop,
                  r"symbolic link|loop|ELOOP|Errno 40"),
      SpecialCase("dangling symlink", ("dangling.png",), broken, r"No such file|not found|exist"),
      SpecialCase("FIFO named .jpg (reading it would block forever)", ("pipe.jpg",), fifo,
                  r"regular file|FIFO|pipe|special"),
  ]


def dir_loop(folder: pathlib.Path) -> None:
  """A subfolder holding a symlink to its parent: a walk that follows links never ends."""
  sub = folder / "sub"
  sub.mkdir(exist_ok=True)
  os.symlink("..", sub / "up")
  os.symlink(".", sub / "self.jpg")  # a directory link with an image extension
