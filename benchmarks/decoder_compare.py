"""Decoder comparison for gpu_check: Pillow on the host against nvImageCodec (GPU or CPU backend).

Per decoder: images/s, host CPU-seconds per image (every thread of this process, the decoder's
own included) and the pixel differences to Pillow's decode. Runs anywhere: on a machine without
a GPU nvImageCodec runs its CPU backend and the figures say so.

  PYTHONPATH=. python3 -m benchmarks.decoder_compare [FOLDER_OR_FILES ...] --count 200
"""
from __future__ import annotations

import argparse
import io
import os
import pathlib
import sys
import time
import zipfile
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

from cbir_jax import decode, gpu_canvas, gpu_decode


def use_wheels(folder: str | os.PathLike) -> str | None:
  """Makes wheels carried to a host without a package index importable; returns the site dir.

  Each `*.whl` in `folder` (nvidia-nvimgcodec-cu13 and nvidia-nvjpeg, 29 MB together) is
  unpacked once into `folder`/site, which goes first on sys.path. Both wheels put files under
  the `nvidia` namespace (nvImageCodec finds libnvjpeg at ../cu13/lib beside itself), so an
  already imported `nvidia` package (JAX's CUDA wheels) is extended to the new folder too.
  """
  wheels = sorted(pathlib.Path(folder).glob("*.whl"))
  if not wheels:
    return None
  site = pathlib.Path(folder) / "site"
  done = site / "unpacked.txt"
  names = "\n".join(w.name for w in wheels)
  if not done.is_file() or done.read_text() != names:
    for w in wheels:
      with zipfile.ZipFile(w) as z:
        z.extractall(site)
    done.write_text(names)
  sys.path.insert(0, str(site))
  pkg = sys.modules.get("nvidia")
  if pkg is not None and str(site / "nvidia") not in list(pkg.__path__):
    pkg.__path__.append(str(site / "nvidia"))
  return str(site)


def pillow_full(data: bytes) -> np.ndarray:
  """Pillow's full-resolution RGB decode with EXIF orientation: the reference pixels."""
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def _clocked(fn: Callable[[], Any]) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) of one call."""
  t, c = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - t, time.process_time() - c


def _sync(images: Sequence[Any]) -> None:
  """Waits for device images (nvImageCodec decodes asynchronously on its CUDA stream)."""
  for im in images:
    if hasattr(im, "block_until_ready"):
      im.block_until_ready()


class DifferenceTally:
  """Absolute pixel differences accumulated chunk by chunk, as a 256-bin histogram.

  Full-resolution photos are large (a 4032x3024 decode is 36 MB), so the comparison never holds
  more than one chunk of decodes; |difference| of uint8 values is an integer in 0..255, so the
  histogram gives the mean, the max and the percentile exactly.
  """

  def __init__(self) -> None:
    self.counts = np.zeros(256, np.int64)
    self.shape_mismatches = 0

  def add(self, got: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> None:
    for g, r in zip(got, ref):
      if g.shape != r.shape:
        self.shape_mismatches += 1
        continue
      d = np.abs(g.astype(np.int16) - r.astype(np.int16)).ravel()
      self.counts += np.bincount(d, minlength=256)

  def result(self) -> dict[str, Any]:
    n = int(self.counts.sum())
    if self.shape_mismatches or not n:
      return {"shape_mismatches": self.shape_mismatches, "values": n}
    values = np.arange(256)
    # The 99.9th percentile as the smallest difference that at least 99.9% of values reach
    # or stay under (no interpolation between neighbouring integer levels).
    p999 = int(np.searchsorted(np.cumsum(self.counts), 0.999 * n))
    return {"mean_abs": float((values * self.counts).sum() / n), "p99_9_abs": float(p999),
            "max_abs": int(values[self.counts > 0].max()), "shape_mismatches": 0}


def pixel_difference(got: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> dict[str, Any]:
  """Mean, 99.9th percentile and max absolute difference over all pixels and channels."""
  tally = DifferenceTally()
  tally.add(got, ref)
  return tally.result()


def _rate(name: str, count: int, wall: float, cpu: float, **extra: Any) -> dict[str, Any]:
  return {"decoder": name, "images": count, "images_per_s": count / max(wall, 1e-9),
          "host_cpu_s_per_image": cpu / max(count, 1), **extra}


def compare(datas: Sequence[bytes], *, kind: str = "auto", image_size: int = 224,
            batch: int = 64, diff_images: int = 100) -> dict[str, Any]:
  """Times Pillow (full decode; and the product's rows, draft on) and nvImageCodec on `datas`.

  Args:
    datas: encoded images (JPEGs mostly; others show the routing).
    kind: `gpu_decode.select_decoder` kind; on a machine without a GPU "auto" falls back to
      the CPU backend so that nvImageCodec still has figures.
    image_size: rows' size for the row comparison.
    batch: images per nvImageCodec call.
    diff_images: how many images the pixel comparison covers (full resolution is large).
  """
  sel = gpu_decode.select_decoder(kind)
  if sel.decoder is None:
    sel = gpu_decode.select_decoder("nvimgcodec-cpu")
  nv = sel.decoder
  pillow_full(datas[0])  # imports and first-call costs outside the clock
  nv.decode([datas[0]])
  rows = _time_pillow(datas, image_size) + _time_nv(datas, nv, batch)
  return {"decoder": sel.description, "images": len(datas), "image_size": image_size,
          "rows": rows, **_differences(list(datas[:diff_images]), nv, image_size),
          "padded_decode": padded_probe(nv, datas[0])}


def padded_probe(nv: gpu_decode.NvDecoder, data: bytes) -> str:
  """Whether the backend decodes into a larger canvas (region past the image), and right."""
  ref = pillow_full(data)
  side = max(ref.shape[:2]) + 16
  got = nv.decode_padded([data], side)[0]
  if got is None:
    return "not supported (no image)"
  got = np.asarray(got)
  h, w = ref.shape[:2]
  if got.shape != (side, side, 3) or got[h:].any() or got[:, w:].any():
    return f"wrong layout {got.shape}"
  return f"supported, max difference {int(np.abs(got[:h, :w].astype(int) - ref).max())}"


def _time_pillow(datas: Sequence[bytes], image_size: int) -> list[dict[str, Any]]:
  def full() -> None:  # one decode alive at a time: 400 phone photos would be 15 GB
    for d in datas:
      pillow_full(d)
  wall, cpu = _clocked(full)
  out = [_rate("pillow full decode (1 thread)", len(datas), wall, cpu)]
  def rows() -> None:
    for d in datas:
      decode.decode_image(d, image_size)
  wall, cpu = _clocked(rows)
  return out + [_rate(f"pillow rows {image_size}px, draft (product today)", len(datas),
                      wall, cpu)]


def _time_nv(datas: Sequence[bytes], nv: gpu_decode.NvDecoder, batch: int,
             buckets: Sequence[int] = (320, 640)) -> list[dict[str, Any]]:
  """nvImageCodec alone, then with the device canvases (second pass: shapes compiled)."""
  routes: dict[str, int] = {}

  def run(canvases: bool) -> None:
    for i in range(0, len(datas), batch):
      got = gpu_decode.decode_batch(datas[i:i + batch], decoder=nv)
      if canvases:
        gpu_canvas.assemble(got.images, buckets)[0].block_until_ready()
        continue
      _sync(got.images)
      for name in got.decoders:
        routes[name] = routes.get(name, 0) + 1
  wall, cpu = _clocked(lambda: run(False))
  out = [_rate(f"{nv.description} (batch {batch})", len(datas), wall, cpu,
               routed=dict(routes), dlpack_host_copies=nv.host_copies)]
  run(True)  # compiles box_reduce/_place once per distinct image shape
  wall, cpu = _clocked(lambda: run(True))
  return out + [_rate(f"  + device canvases {tuple(buckets)}", len(datas), wall, cpu)]


def _differences(sub: list[bytes], nv: gpu_decode.NvDecoder, image_size: int,
                 chunk: int = 8) -> dict[str, Any]:
  """Pixel differences to Pillow, `chunk` images at a time (device and host memory bounded)."""
  full, rows_vs = DifferenceTally(), {False: DifferenceTally(), True: DifferenceTally()}
  for i in range(0, len(sub), chunk):
    part = sub[i:i + chunk]
    got = gpu_decode.decode_batch(part, decoder=nv)
    ok = [j for j, e in enumerate(got.errors) if not e]
    full.add([np.asarray(got.images[j]) for j in ok], [pillow_full(part[j]) for j in ok])
    del got  # frees the device decodes before the next chunk
    rows = gpu_decode.decode_rows(part, image_size, decoder=nv)
    for draft, tally in rows_vs.items():  # draft: the product's default, DCT-scaled decodes
      ref = [decode.decode_image(part[j], image_size, draft=draft)[0] for j in ok]
      tally.add([rows.images[j] for j in ok], ref)
  out = {"full_resolution_difference": full.result()}
  for draft, tally in rows_vs.items():
    out[f"rows_difference_vs_pillow_{'draft' if draft else 'no_draft'}"] = tally.result()
  return out


def report(result: dict[str, Any], log: Callable[[str], None] = print) -> None:
  log(f"decoder: {result['decoder']}; {result['images']} images")
  for r in result["rows"]:
    extra = (f"  routed {r['routed']}, DLPack host copies {r['dlpack_host_copies']}"
             if "routed" in r else "")
    log(f"  {r['decoder']:<60} {r['images_per_s']:9.1f} images/s  "
        f"{1e3 * r['host_cpu_s_per_image']:7.2f} ms host CPU/image{extra}")
  log(f"  full-resolution pixels vs Pillow: {result['full_resolution_difference']}")
  log(f"  decode into a larger canvas (one shape, no per-size compile): "
      f"{result['padded_decode']}")
  for key in ("no_draft", "draft"):
    log(f"  {result['image_size']}px rows vs Pillow rows ({key.replace('_', ' ')}): "
        f"{result['rows_difference_vs_pillow_' + key]}")


def _paths(args: Sequence[str], count: int) -> list[str]:
  from cbir_jax import samples  # pylint: disable=import-outside-toplevel

  found: list[str] = []
  for a in args or [str(p) for p in samples.sample_images()]:
    p = pathlib.Path(a)
    found += sorted(str(q) for q in p.rglob("*") if q.suffix.lower() in (".jpg", ".jpeg")) \
        if p.is_dir() else [str(p)]
  return (found * (count // max(len(found), 1) + 1))[:count] if found else []


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("inputs", nargs="*", help="JPEG files or folders (default: the sample images)")
  ap.add_argument("--count", type=int, default=100)
  ap.add_argument("--kind", default="auto", choices=gpu_decode.KINDS)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--wheels", default="", help="folder of carried nvImageCodec wheels")
  a = ap.parse_args(argv)
  if a.wheels:
    print(f"wheels unpacked to {use_wheels(a.wheels)}")
  datas = [decode.read_file(p) for p in _paths(a.inputs, a.count)]
  if not datas:
    raise SystemExit("no JPEG files found")
  result = compare(datas, kind=a.kind, batch=a.batch)
  report(result)
  return result


if __name__ == "__main__":
  main()
