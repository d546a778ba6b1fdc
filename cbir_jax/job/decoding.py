"""The job's decoder (`--decoder`): Pillow through the input stream, or nvImageCodec per batch.

`gpu_decode.select_decoder` picks it ("auto": nvImageCodec on a GPU when the extra is
installed, else Pillow, saying why). With nvImageCodec, baseline JPEGs of a folder go to it a
batch at a time and everything else to the Pillow path with its exact failure reasons
(`gpu_decode.decode_rows` for the host resize, `decode_batch` + canvases for the device
resize). The batches are the input stream's (`input_pipeline.Batch`), in the same order, so
the step loop, row assembly and resumption do not change. Decoding runs on the feed thread
(job/feed.py), ahead of the step; nvImageCodec has its own threads.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from cbir_jax import canvas, gpu_canvas, gpu_decode, input_pipeline
from cbir_jax.job.errors import ExtractError


def select(kind: str, source_type: str) -> gpu_decode.Selection:
  """The decoder for the job; nvImageCodec reads folders only (TFDS records stay on Pillow).

  Raises:
    ExtractError: "nvimgcodec" asked for and not available (no extra, no GPU).
  """
  if source_type != "folder" and kind != gpu_decode.PILLOW:
    if kind in ("nvimgcodec", "nvimgcodec-cpu"):
      raise ExtractError(f"--decoder={kind} reads image folders only, not {source_type} input")
    return gpu_decode.Selection(None, f"{gpu_decode.PILLOW} (host): {source_type} input")
  try:
    return gpu_decode.select_decoder(kind)
  except (ImportError, RuntimeError, ValueError) as e:
    raise ExtractError(f"--decoder={kind}: {e}") from None


def _fit(img: Any, largest: int) -> Any:
  """A host image within the largest canvas (Pillow's integer box reduction, as canvas.py)."""
  if isinstance(img, np.ndarray):
    f = canvas.box_factor(img.shape[0], img.shape[1], largest)
    if f > 1:
      return np.asarray(Image.fromarray(img).reduce(f))
  return img


def _canvases(images: Sequence[Any], buckets: Sequence[int]) -> tuple[Any, np.ndarray]:
  """Canvases and (height, width) sizes: on the device when any image is there, else host."""
  import jax

  if any(isinstance(im, jax.Array) for im in images):
    canvases, sizes, _ = gpu_canvas.assemble(images, buckets)
    return canvases, sizes
  return canvas.assemble([_fit(im, max(buckets)) if im is not None else None for im in images],
                         buckets)


def nv_batches(keys: Sequence[str], positions: np.ndarray, *, decoder: gpu_decode.NvDecoder,
               tally: gpu_decode.DecoderTally, batch_size: int, image_size: int, draft: bool,
               max_pixels: int, buckets: Sequence[int] | None) -> Iterator[input_pipeline.Batch]:
  """Fixed-size batches of the files at `positions` (-1: padding), as the input stream's."""
  for start in range(0, len(positions), batch_size):
    pos = positions[start:start + batch_size]
    b = input_pipeline.Batch.padding(batch_size, image_size, buckets=buckets)
    rows = [j for j, p in enumerate(pos) if p >= 0]
    b.index[rows], b.valid[rows] = pos[rows], True
    paths = [keys[int(pos[j])] for j in rows]
    if buckets:
      got = gpu_decode.decode_batch(paths, decoder=decoder, max_pixels=max_pixels,
                                    pillow=_placed(image_size, buckets, draft, max_pixels))
      images = [None] * batch_size
      for j, im in zip(rows, got.images):
        images[j] = im
      b.images, b.sizes = _canvases(images, buckets)
    else:
      got = gpu_decode.decode_rows(paths, image_size, decoder=decoder, draft=draft,
                                   max_pixels=max_pixels)
      b.images[rows] = got.images
    for j, (w, h), err in zip(rows, got.sizes, got.errors):
      b.width[j], b.height[j] = (0, 0) if err else (w, h)
      b.ok[j], b.error[j] = not err, err or ""
    tally.add(got.decoders, got.routes)
    yield b


def _placed(image_size: int, buckets: Sequence[int], draft: bool, max_pixels: int
            ) -> Callable[[bytes], tuple[np.ndarray, tuple[int, int]]]:
  """The Pillow decode of the canvas path (draft, placed, no resize), for decode_batch."""
  def decode(data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
    placed, size = canvas.decode_placed(data, image_size, buckets=buckets, draft=draft,
                                        max_pixels=max_pixels)
    px = placed.pixels
    return (np.repeat(px[..., None], 3, axis=-1) if px.ndim == 2 else px), size
  return decode


__all__ = ["nv_batches", "select"]
