"""JPEG decoding with nvImageCodec on NVIDIA GPUs; Pillow (`decode.decode_image`) for the rest.

Baseline JPEGs go to nvImageCodec; everything else, and anything it returns no image for, goes
through the Pillow path unchanged, so a bad file's failure reason is the one Pillow gives.
Install with `pip install cbir-jax[gpu-decode]`; without it (or without a GPU) callers decode on
the host as before, and `select_decoder(...).description` says which decoder ran.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
from typing import Any, Callable, Sequence, Union

import numpy as np
from PIL import Image

from cbir_jax import decode

PILLOW = "pillow"
NVIMGCODEC = "nvimgcodec"
KINDS = ("auto", PILLOW, NVIMGCODEC, "nvimgcodec-cpu")  # --decoder values a job may offer

Item = Union[bytes, str, os.PathLike]  # an item is the file's bytes or its path

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_BASELINE = (0xC0, 0xC1)  # sequential Huffman: what nvJPEG's engines and libjpeg-turbo agree on


@dataclasses.dataclass(frozen=True)
class JpegHeader:
  """The first start-of-frame segment of a JPEG: coding process, bit depth, stored size."""
  sof: int
  precision: int
  height: int
  width: int
  components: int


def jpeg_header(data: bytes) -> JpegHeader | None:
  """The frame header of a JPEG stream, or None when `data` is not a JPEG with one.

  Walks the marker segments from SOI to the first SOFn (header bytes only, no entropy data).
  """
  if data[:2] != b"\xff\xd8":
    return None
  i, n = 2, len(data)
  while i + 4 <= n:
    if data[i] != 0xFF:
      return None  # segments must follow each other; anything else is a damaged header
    m = data[i + 1]
    if m == 0xFF:  # fill byte before a marker
      i += 1
      continue
    if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
      i += 2
      continue
    if m in (0xD9, 0xDA):  # end of image or start of scan before any frame header
      return None
    length = int.from_bytes(data[i + 2:i + 4], "big")
    if m in _SOF:
      seg = data[i + 4:i + 2 + length]
      if len(seg) < 6:
        return None
      return JpegHeader(sof=m, precision=seg[0], height=int.from_bytes(seg[1:3], "big"),
                        width=int.from_bytes(seg[3:5], "big"), components=seg[5])
    i += 2 + length
  return None


@dataclasses.dataclass(frozen=True)
class Route:
  """Where one file goes: `decoder` is NVIMGCODEC or PILLOW, `why` says why Pillow."""
  decoder: str
  why: str = ""
  orientation: int = 1  # EXIF orientation as Pillow reads it (1 = as stored)


def route(data: bytes, *, max_pixels: int = decode.MAX_PIXELS) -> Route:
  """Baseline 8-bit grey or YCbCr JPEGs -> nvImageCodec; anything else -> Pillow, with why.

  Reads headers only: the SOF segment here and EXIF through Pillow's `Image.open` (the same
  reading `decode_image` does, so both paths turn an image the same way).
  """
  h = jpeg_header(data)
  if h is None:
    return Route(PILLOW, "not a JPEG")
  if h.sof not in _BASELINE:
    return Route(PILLOW, "progressive JPEG" if h.sof == 0xC2 else f"JPEG coding SOF{h.sof - 0xC0}")
  if h.precision != 8:
    return Route(PILLOW, f"{h.precision}-bit JPEG")
  if h.components not in (1, 3):
    return Route(PILLOW, f"{h.components}-component JPEG (CMYK/YCCK)")
  if not data[-4096:].rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):  # the tail: no copy of it all
    # Pillow refuses a truncated JPEG; a GPU engine may return the part it read. Files with
    # trailers after the image (some cameras) take the Pillow path too: slower, never wrong.
    return Route(PILLOW, "no end-of-image marker at the end (truncated or trailer)")
  if h.width * h.height > max_pixels or not h.width or not h.height:
    return Route(PILLOW, "size over the pixel limit or zero")  # Pillow refuses it, with the reason
  try:
    with Image.open(io.BytesIO(data)) as img:
      orientation = img.getexif().get(0x0112, 1)
      fmt, adobe = img.format, img.info.get("adobe_transform")
  except Exception:  # pylint: disable=broad-except  # Pillow's path gives the exact reason
    return Route(PILLOW, "header unreadable by Pillow")
  if fmt != "JPEG":
    return Route(PILLOW, f"{fmt} file")  # MPO: Pillow picks the frame
  if h.components == 3 and adobe == 0:
    return Route(PILLOW, "RGB-coded JPEG (Adobe transform 0)")
  return Route(NVIMGCODEC, orientation=orientation if orientation in range(1, 9) else 1)


def orient(image: Any, orientation: int) -> Any:
  """`image` [H, W, C] turned as Pillow's `ImageOps.exif_transpose` turns EXIF `orientation`.

  Works on NumPy and JAX arrays alike (slicing and transpose), so device images stay on device.
  """
  t = (1, 0, 2)
  return {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
          5: lambda a: a.transpose(t), 6: lambda a: a[::-1].transpose(t),
          7: lambda a: a[::-1, ::-1].transpose(t), 8: lambda a: a[:, ::-1].transpose(t),
          }.get(orientation, lambda a: a)(image)


def _import_nvimgcodec():
  """The nvImageCodec module, or None when the `gpu-decode` extra is not installed."""
  # Its per-file parse errors go to stderr; the job records its own reasons instead.
  os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
  try:
    from nvidia import nvimgcodec  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return nvimgcodec


class NvDecoder:
  """One nvImageCodec decoder: on a GPU (hardware engine, then CUDA, then CPU backends, in
  nvImageCodec's own priority order) or CPU-only (libjpeg-turbo; what CI runs).

  Not thread-safe: use one per thread; each batch call already decodes on several threads.
  """

  def __init__(self, *, device: Any = None, threads: int = 0):
    nv = _import_nvimgcodec()
    if nv is None:
      raise ImportError("nvImageCodec is not installed: pip install 'cbir-jax[gpu-decode]'")
    self._nv, self.device, self.host_copies = nv, device, 0
    kinds = (["HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU", "CPU_ONLY"] if device is not None
             else ["CPU_ONLY"])
    device_id = (nv.NVIMGCODEC_DEVICE_CPU_ONLY if device is None
                 else getattr(device, "local_hardware_id", None) or 0)
    self._decoder = nv.Decoder(device_id=device_id, max_num_cpu_threads=threads,
                               backends=[nv.Backend(getattr(nv.BackendKind, k)) for k in kinds])
    # Orientation is applied by `orient` from Pillow's reading, not by the backend, so the GPU
    # engines, the CPU backend and the Pillow path cannot disagree about it.
    self._params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB,
                                   sample_format=nv.SampleFormat.I_RGB)
    where = f"GPU {device}" if device is not None else "CPU-only backend"
    self.description = (f"{NVIMGCODEC} {getattr(nv, '__version__', '?')} on {where}, "
                        f"{PILLOW} for other files")

  def decode(self, datas: Sequence[bytes]) -> list[Any]:
    """[H, W, 3] uint8 per JPEG as stored (not turned), or None where nvImageCodec gave none.

    GPU: a jax.Array on the device, shared with nvImageCodec's buffer through DLPack (no host
    copy). CPU-only: a NumPy array viewing the decoder's host buffer.
    """
    return self._decode([self._nv.CodeStream(d) for d in datas]) if datas else []

  def decode_padded(self, datas: Sequence[bytes], side: int) -> list[Any]:
    """Each JPEG decoded straight into a [side, side, 3] canvas (top-left, zeros around) through
    a region of interest larger than the image, or None where the backend cannot.

    A probe for the device canvas path: canvases of one shape need no per-size compilation
    (`gpu_canvas` compiles its placement once per image size). nvImageCodec's CPU decoders
    refuse regions past the image; whether nvJPEG's engines take them is measured by
    `decoder_compare` on a GPU host.
    """
    region = self._nv.Region(0, 0, side, side)
    return self._decode([self._nv.CodeStream(d).get_sub_code_stream(region=region)
                         for d in datas])

  def _decode(self, streams: list[Any]) -> list[Any]:
    out = self._decoder.decode(streams, params=self._params)
    convert = np.asarray if self.device is None else self._to_jax
    return [None if im is None else convert(im) for im in out]

  def _to_jax(self, im: Any) -> Any:
    """The decoded GPU image as a jax.Array sharing its buffer (DLPack; JAX waits on the
    decoder's stream). A layout JAX cannot take without a copy (padded rows) is copied through
    the host instead and counted in `host_copies`, which the comparison reports."""
    import jax  # pylint: disable=import-outside-toplevel
    try:
      return jax.dlpack.from_dlpack(im, copy=False)
    except (ValueError, RuntimeError, TypeError, BufferError):
      self.host_copies += 1
      return jax.device_put(np.asarray(im.cpu()), self.device)


@dataclasses.dataclass(frozen=True)
class Selection:
  """The decoder a job uses (None: Pillow on the host) and the line saying so."""
  decoder: NvDecoder | None
  description: str


def _gpu_device() -> Any:
  import jax  # pylint: disable=import-outside-toplevel
  gpus = [d for d in jax.local_devices() if d.platform == "gpu"]
  return gpus[0] if gpus else None


def select_decoder(kind: str = "auto", *, threads: int = 0) -> Selection:
  """The decoder for `kind` (one of KINDS).

  "auto": nvImageCodec on the first local GPU when the extra is installed and a
  GPU is present, else Pillow on the host, saying why. "nvimgcodec": the same but an error if
  it cannot be had. "nvimgcodec-cpu": nvImageCodec's CPU-only backend (tests, comparisons).
  """
  if kind not in KINDS:
    raise ValueError(f"decoder must be one of {', '.join(KINDS)}, got {kind!r}")
  if kind == PILLOW:
    return Selection(None, f"{PILLOW} (host), as asked")
  if kind == "nvimgcodec-cpu":
    nv = NvDecoder(threads=threads)
    return Selection(nv, nv.description)
  device = _gpu_device()
  if device is None and kind == "auto":  # nvImageCodec is not even imported (its loader prints)
    return Selection(None, f"{PILLOW} (host): no GPU")
  if _import_nvimgcodec() is None:
    if kind == NVIMGCODEC:
      raise ImportError("nvImageCodec is not installed: pip install 'cbir-jax[gpu-decode]'")
    return Selection(None, f"{PILLOW} (host): nvImageCodec not installed (extra gpu-decode)")
  if device is None:
    raise RuntimeError("decoder nvimgcodec asks for a GPU and JAX sees none "
                       "(nvimgcodec-cpu runs its CPU backend)")
  try:
    nv = NvDecoder(device=device, threads=threads)
  except RuntimeError as e:  # e.g. a driver older than the wheel's CUDA 13
    if kind == NVIMGCODEC:
      raise
    return Selection(None, f"{PILLOW} (host): nvImageCodec cannot start on {device}: {e}")
  return Selection(nv, nv.description)


def _read(item: Item) -> tuple[bytes | None, str]:
  """(bytes, "") or (None, reason) worded as `decode.safe_decode` words a read failure."""
  if not isinstance(item, (str, os.PathLike)):
    return bytes(item), ""
  try:
    return decode.read_file(os.fspath(item)), ""
  except (OSError, ValueError) as e:  # ValueError: a path os.open refuses (a NUL byte)
    reason = str(e) if isinstance(e, ValueError) else f"cannot read file: {e}"
    return None, reason or type(e).__name__


@dataclasses.dataclass(frozen=True)
class DecodedBatch:
  """Per item, in input order: the image and who decoded it, or why there is none.

  Attributes:
    images: [H, W, 3] uint8 with EXIF orientation applied, at full resolution; a jax.Array on
      the GPU for nvImageCodec GPU decodes, a NumPy array otherwise; None where `errors` says
      (`decode_rows`: one [N, H, W, 3] array of the resized rows instead).
    sizes: (width, height) as shown (after orientation); (0, 0) on failure.
    errors: "" or the reason, exactly as the Pillow path words it.
    decoders: NVIMGCODEC or PILLOW per item ("" when the file could not be read).
    routes: why an item went to Pillow ("" when nvImageCodec was asked).
  """
  images: Any
  sizes: list[tuple[int, int]]
  errors: list[str]
  decoders: list[str]
  routes: list[str]


def _nv_pass(datas: list[bytes | None], routes: list[Route], decoder: NvDecoder | None
             ) -> dict[int, Any]:
  """Index -> oriented nvImageCodec image, for the items it decoded."""
  todo = [i for i, r in enumerate(routes) if r.decoder == NVIMGCODEC]
  if decoder is None or not todo:
    return {}
  try:
    out = decoder.decode([datas[i] for i in todo])
  except RuntimeError as e:  # a CUDA or library failure: this batch goes to Pillow, the job goes on
    logging.warning("nvImageCodec failed on a batch of %d, decoding it with Pillow: %s",
                    len(todo), e)
    return {}
  return {i: orient(im, routes[i].orientation) for i, im in zip(todo, out) if im is not None}


PillowDecode = Callable[[bytes], tuple[Any, tuple[int, int]]]


def decode_batch(items: Sequence[Item], *, decoder: NvDecoder | None,
                 max_pixels: int = decode.MAX_PIXELS,
                 pillow: PillowDecode | None = None) -> DecodedBatch:
  """Decodes a batch: baseline JPEGs with `decoder` at full resolution, the rest with Pillow.

  For the device-resize path: images decoded on the GPU stay there (`gpu_canvas.assemble`
  makes canvases of them on the device). Never raises for a bad input; a JPEG nvImageCodec
  returns nothing for is retried with Pillow (decoder "pillow", route "nvimgcodec gave no
  image").

  Args:
    decoder: from `select_decoder`; None decodes everything with Pillow.
    max_pixels: images declaring more are refused (by the Pillow path, with its reason).
    pillow: the host decode for Pillow items, bytes -> (pixels, (width, height)), raising
      ValueError with the reason; default: full resolution, as `decode.decode_image` reads.
      The job's canvas path passes its draft decode-and-place here.
  """
  pillow = pillow or (lambda data: decode.decode_full(data, max_pixels=max_pixels))
  read = [_read(item) for item in items]
  datas, errors = [data for data, _ in read], [err for _, err in read]
  routes = [Route("") if data is None else
            Route(PILLOW, "host decoder selected") if decoder is None else
            route(data, max_pixels=max_pixels) for data in datas]
  nv = _nv_pass(datas, routes, decoder)
  out = DecodedBatch([], [], errors, [], [])
  for i, (data, r) in enumerate(zip(datas, routes)):
    img, size = None, (0, 0)
    if i in nv:
      img, size = nv[i], (int(nv[i].shape[1]), int(nv[i].shape[0]))
    elif data is not None:
      try:
        img, size = pillow(data)
      except ValueError as e:
        errors[i] = str(e)
    out.images.append(img)
    out.sizes.append(size)
    out.decoders.append(NVIMGCODEC if i in nv else PILLOW if data is not None else "")
    # Why Pillow: the item's route, or nvImageCodec's missing image.
    out.routes.append("" if data is None or i in nv else r.why or "nvimgcodec gave no image")
  return out


@dataclasses.dataclass
class DecoderTally:
  """What the summary and the manifest say about decoding: the decoder line, items per
  decoder, and why items went to Pillow. Typed record with its dict form for the manifest."""
  description: str
  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  pillow_routes: dict[str, int] = dataclasses.field(default_factory=dict)

  def add(self, decoders: Sequence[str], routes: Sequence[str]) -> None:
    """Counts one batch (`DecodedBatch` fields); unread files are not counted."""
    for name, why in zip(decoders, routes):
      if name:
        self.counts[name] = self.counts.get(name, 0) + 1
      if name == PILLOW and why:
        self.pillow_routes[why] = self.pillow_routes.get(why, 0) + 1

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def decode_rows(items: Sequence[Item], image_size: int | tuple[int, int], *,
                decoder: NvDecoder | None, draft: bool = True,
                max_pixels: int = decode.MAX_PIXELS) -> DecodedBatch:
  """`decode.safe_decode` for a batch, with baseline JPEGs decoded by `decoder`: a
  `DecodedBatch` whose `images` are the rows [N, H, W, 3] uint8 (black where failed).

  Pillow items are exactly `decode_image(data, image_size, draft=draft)`; nvImageCodec items are
  decoded at full resolution (no DCT draft scaling) and resized on the host with Pillow's
  BILINEAR, as `decode_image(..., draft=False)` does. On a GPU this copies the decoded image to
  the host: the host-resize path for comparisons; the job's device path uses `decode_batch`.
  """
  h, w = decode._size(image_size)
  got = decode_batch(items, decoder=decoder, max_pixels=max_pixels,
                     pillow=lambda data: decode.decode_image(data, (h, w), draft=draft,
                                                             max_pixels=max_pixels))
  rows = np.zeros((len(got.images), h, w, 3), np.uint8)
  for i, (img, name) in enumerate(zip(got.images, got.decoders)):
    if name == NVIMGCODEC:
      rows[i] = np.asarray(Image.fromarray(np.asarray(img)).resize((w, h), Image.BILINEAR))
    elif img is not None:
      rows[i] = img
  return dataclasses.replace(got, images=rows)
