"""Decoder comparison for gpu_check: Pillow on the host against nvImageCodec (GPU or CPU backend).

Per decoder: images/s, host CPU-seconds per image (every thread of this process, the decoder's
own included) and the pixel differences to Pillow's decode. Runs anywhere: on a machine without
a GPU nvImageCodec runs its CPU backend and the figures say so.

  PYTHONPATH=. python3 -m cbir_jax.benchmark.decoder_compare [FOLDER_OR_FILES ...] --count 200
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


def pixel_difference(got: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> dict[str, Any]:
  """Mean, 99.9th percentile and max absolute difference over all pixels and channels."""
  if any(g.shape != r.shape for g, r in zip(got, ref)):
    return {"shape_mismatches": sum(g.shape != r.shape for g, r in zip(got, ref))}
  d = np.concatenate([np.abs(g.astype(np.int16) - r).ravel() for g, r in zip(got, ref)])
  return {"mean_abs": float(d.mean()), "p99_9_abs": float(np.percentile(d, 99.9)),
          "max_abs": int(d.max()), "shape_mismatches": 0}


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
  wall, cpu = _clocked(lambda: [pillow_full(d) for d in datas])
  out = [_rate("pillow full decode (1 thread)", len(datas), wall, cpu)]
  wall, cpu = _clocked(lambda: [decode.decode_image(d, image_size) for d in datas])
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


def _differences(sub: list[bytes], nv: gpu_decode.NvDecoder, image_size: int
                 ) -> dict[str, Any]:
  got = gpu_decode.decode_batch(sub, decoder=nv)
  ok = [i for i, e in enumerate(got.errors) if not e]
  out = {"full_resolution_difference": pixel_difference(
      [np.asarray(got.images[i]) for i in ok], [pillow_full(sub[i]) for i in ok])}
  rows = gpu_decode.decode_rows(sub, image_size, decoder=nv)
  for draft in (False, True):  # draft: the product's default, DCT-scaled JPEG decodes
    ref = [decode.decode_image(d, image_size, draft=draft)[0] for d in sub]
    out[f"rows_difference_vs_pillow_{'draft' if draft else 'no_draft'}"] = pixel_difference(
        [rows.images[i] for i in ok], [ref[i] for i in ok])
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
