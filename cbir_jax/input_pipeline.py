"""Host input: list images, decode and resize them in parallel with tf.data.

Decoding goes through Pillow inside tf.data's parallel map because Pillow
handles what photo collections contain (EXIF rotation, CMYK, palette, 16-bit,
animated GIF) and refuses decompression bombs; tf.data supplies the thread
pool, ordering and prefetch. A file that cannot be decoded becomes a row with
`ok=False` and a reason, never an exception, so one bad file cannot stop a job.
"""
from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import stat
import warnings
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Pillow's default limit (~89 Mpx) warns, and raises only at twice that; we
# raise at the limit itself so a bomb is always a reported failure.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


@dataclasses.dataclass(frozen=True)
class Record:
  """One input image: where it comes from and its label (-1 when unknown)."""
  key: str  # a file path, or a TFDS id
  label: int = -1
  label_name: str = ""


@dataclasses.dataclass
class Batch:
  """A fixed-size batch; rows past the input's end are padding (valid=False, index=-1)."""
  images: np.ndarray  # uint8 [B, S, S, 3]
  index: np.ndarray  # int64 [B]: position of the record in the input list
  width: np.ndarray  # int32 [B]: original size, before resizing
  height: np.ndarray
  ok: np.ndarray  # bool [B]: decoded (False for failures and padding)
  valid: np.ndarray  # bool [B]: a real input row (False only for padding)
  error: list[str]  # per row, "" when ok
  # Filled only by sources that carry them with the bytes (TFDS): per-row key and label.
  key: list[str] | None = None
  label: np.ndarray | None = None


def folder_records(root: str | os.PathLike) -> list[Record]:
  """Every image under `root` (recursive), in sorted path order.

  A file's label is its first-level subfolder (classes numbered in sorted
  name order); files directly in `root` get label -1. Directory symlinks are
  not followed, so a symlink loop cannot trap the walk.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
  paths: list[str] = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
    dirnames.sort()
    for name in filenames:
      if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
        paths.append(os.path.join(dirpath, name))
  paths.sort()
  rel_first = [pathlib.PurePath(os.path.relpath(p, root)).parts for p in paths]
  classes = sorted({parts[0] for parts in rel_first if len(parts) > 1})
  class_index = {c: i for i, c in enumerate(classes)}
  return [Record(key=p, label=class_index[parts[0]] if len(parts) > 1 else -1,
                 label_name=parts[0] if len(parts) > 1 else "")
          for p, parts in zip(paths, rel_first)]


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
  return img.convert("RGB")  # L, LA, RGBA, CMYK, YCbCr, 1, ...


def decode_image(data: bytes, image_size: int | tuple[int, int], *,
                 draft: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
  """Decodes encoded image bytes to uint8 RGB [H, W, 3] resized bilinearly (no crop).

  Args:
    data: the file's bytes.
    image_size: output size, square int or (height, width).
    draft: let JPEG decode at a reduced scale (1/2..1/8) when the output is
      smaller; much faster, slightly different pixels.

  Returns:
    (image, (original width, original height)) with EXIF orientation applied.

  Raises:
    ValueError: with the reason, for anything that is not a decodable image.
  """
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  if not data:
    raise ValueError("empty file (0 bytes)")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(data))
      if img.width * img.height > MAX_PIXELS:
        raise ValueError(f"image of {img.width}x{img.height} pixels exceeds the "
                         f"decompression-bomb limit of {MAX_PIXELS} pixels")
      if draft and img.format == "JPEG":
        img.draft("RGB", (w, h))
      img.seek(0)  # animated images: the first frame
      img = ImageOps.exif_transpose(img)
      size = (img.width, img.height)
      img = _to_rgb(img).resize((w, h), Image.BILINEAR)
      return np.asarray(img, dtype=np.uint8), size
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise ValueError(f"decompression bomb refused: {e}") from e
  except ValueError:
    raise
  except Image.UnidentifiedImageError:
    raise ValueError("not an image Pillow can identify (unknown format or not an image)") from None
  except Exception as e:  # Pillow raises many types for broken files
    raise ValueError(f"cannot decode image: {type(e).__name__}: {e}") from e


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


def _safe_decode(read: Callable[[str], bytes], key: str, image_size: tuple[int, int],
                 draft: bool) -> tuple[np.ndarray, int, int, bool, str]:
  try:
    img, (w, h) = decode_image(read(key), image_size, draft=draft)
    return img, w, h, True, ""
  except (OSError, ValueError) as e:
    reason = str(e) if isinstance(e, ValueError) else f"cannot read file: {e}"
    return np.zeros((*image_size, 3), np.uint8), 0, 0, False, reason


def _tf():
  import tensorflow as tf  # heavy; only the jobs need it

  tf.config.set_visible_devices([], "GPU")  # keep TensorFlow off the accelerators
  return tf


def _size(image_size: int | tuple[int, int]) -> tuple[int, int]:
  return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def _finish(ds, *, batch_size: int, num_threads: int | None, prefetch: int, start_index: int
            ) -> Iterator[Batch]:
  """Batches decoded rows (index, img, w, h, ok, err[, key, label]) and pads the last batch."""
  tf = _tf()
  ds = ds.batch(batch_size).prefetch(prefetch)
  opts = tf.data.Options()
  if num_threads:
    opts.threading.private_threadpool_size = num_threads
  ds = ds.with_options(opts)
  for row in ds.as_numpy_iterator():
    i, img, w, h, ok, err = row[:6]
    key, label = (row[6], row[7]) if len(row) > 6 else (None, None)
    n = len(i)
    pad = batch_size - n
    if pad:
      img = np.concatenate([img, np.zeros((pad, *img.shape[1:]), img.dtype)])
      i = np.concatenate([i, np.full(pad, -1, i.dtype)])
      w, h = (np.concatenate([a, np.zeros(pad, a.dtype)]) for a in (w, h))
      ok = np.concatenate([ok, np.zeros(pad, bool)])
      err = np.concatenate([err, np.full(pad, b"", object)])
      if key is not None:
        key = np.concatenate([key, np.full(pad, b"", object)])
        label = np.concatenate([label, np.full(pad, -1, label.dtype)])
    valid = i >= 0  # sources mark padding rows with a negative index
    index = np.where(valid, i.astype(np.int64) + start_index, -1)
    yield Batch(images=img, index=index, width=w, height=h, ok=ok & valid, valid=valid,
                error=[_text(e) for e in err],
                key=None if key is None else [_text(k) for k in key],
                label=None if label is None else label.astype(np.int64))


def _text(b: bytes | str) -> str:
  return b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b)


def positions_batches(keys: Sequence[str], positions: np.ndarray, *,
                      image_size: int | tuple[int, int], batch_size: int,
                      read: Callable[[str], bytes] = read_file, num_threads: int | None = None,
                      draft: bool = False, prefetch: int = 2) -> Iterator[Batch]:
  """Like `image_batches`, over `keys[positions]`; a negative position is a padding row.

  Jobs use it to lay out their own fixed-size steps (shard-aligned, padded)
  while tf.data still decodes ahead across step and shard boundaries.
  `Batch.index` is the position itself (-1 for padding).
  """
  tf = _tf()
  size = _size(image_size)
  positions = np.asarray(positions, np.int64)

  def load(i: np.ndarray):
    i = int(i)
    if i < 0:  # padding: no read, no failure
      return np.zeros((*size, 3), np.uint8), np.int32(0), np.int32(0), np.bool_(False), b""
    img, w, h, ok, err = _safe_decode(read, keys[i], size, draft)
    return img, np.int32(w), np.int32(h), np.bool_(ok), err.encode("utf-8", "replace")

  def tf_load(i):
    img, w, h, ok, err = tf.numpy_function(load, [i], [tf.uint8, tf.int32, tf.int32,
                                                      tf.bool, tf.string], stateful=False)
    img.set_shape((*size, 3))
    return i, img, w, h, ok, err

  parallel = num_threads if num_threads else tf.data.AUTOTUNE
  ds = tf.data.Dataset.from_tensor_slices(positions).map(
      tf_load, num_parallel_calls=parallel, deterministic=True)
  return _finish(ds, batch_size=batch_size, num_threads=num_threads, prefetch=prefetch,
                 start_index=0)


def encoded_batches(ds, *, image_size: int | tuple[int, int], batch_size: int,
                    num_threads: int | None = None, draft: bool = False, prefetch: int = 2
                    ) -> Iterator[Batch]:
  """Batches from a tf.data dataset of encoded images (TFDS with SkipDecoding).

  Args:
    ds: elements {"index": int64 (negative = padding), "data": encoded bytes,
      "key": string, "label": int64}.
    image_size, batch_size, num_threads, draft, prefetch: as in `image_batches`.
  """
  tf = _tf()
  size = _size(image_size)

  def load(i: np.ndarray, data: bytes):
    if int(i) < 0:
      return np.zeros((*size, 3), np.uint8), np.int32(0), np.int32(0), np.bool_(False), b""
    img, w, h, ok, err = _safe_decode(lambda d: d, data, size, draft)
    return img, np.int32(w), np.int32(h), np.bool_(ok), err.encode("utf-8", "replace")

  def tf_load(ex):
    img, w, h, ok, err = tf.numpy_function(load, [ex["index"], ex["data"]],
                                           [tf.uint8, tf.int32, tf.int32, tf.bool, tf.string],
                                           stateful=False)
    img.set_shape((*size, 3))
    return ex["index"], img, w, h, ok, err, ex["key"], ex["label"]

  parallel = num_threads if num_threads else tf.data.AUTOTUNE
  ds = ds.map(tf_load, num_parallel_calls=parallel, deterministic=True)
  return _finish(ds, batch_size=batch_size, num_threads=num_threads, prefetch=prefetch,
                 start_index=0)


def image_batches(keys: Sequence[str], *, image_size: int | tuple[int, int], batch_size: int,
                  read: Callable[[str], bytes] = read_file, num_threads: int | None = None,
                  draft: bool = False, prefetch: int = 2, start_index: int = 0
                  ) -> Iterator[Batch]:
  """Decoded, resized, fixed-size batches of `keys` in order, prepared in parallel by tf.data.

  Args:
    keys: file paths (or ids that `read` understands), in output order.
    image_size: output size (square int or (height, width)).
    batch_size: rows per batch; the last batch is padded to this size.
    read: key -> encoded bytes (files by default; TFDS readers pass their own).
    num_threads: parallel decodes (default: tf.data autotune).
    draft: JPEG reduced-scale decoding, see `decode_image`.
    prefetch: batches prepared ahead of the consumer.
    start_index: `Batch.index` of keys[0] (a process' or a resumed job's offset).
  """
  for b in positions_batches(keys, np.arange(len(keys)), image_size=image_size,
                             batch_size=batch_size, read=read, num_threads=num_threads,
                             draft=draft, prefetch=prefetch):
    b.index = np.where(b.valid, b.index + start_index, -1)
    yield b


def load_images(paths: Sequence[str], image_size: int | tuple[int, int], *,
                draft: bool = False) -> tuple[np.ndarray, list[str]]:
  """Small-scale helper (queries, tests): decodes `paths` -> (uint8 [N, S, S, 3], errors)."""
  size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  out, errors = [], []
  for p in paths:
    img, _, _, ok, err = _safe_decode(read_file, p, size, draft)
    out.append(img)
    errors.append("" if ok else err)
  return np.stack(out) if out else np.zeros((0, *size, 3), np.uint8), errors
