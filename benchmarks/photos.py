"""JPEG sets the benchmarks make themselves: photo-size and phone-size copies of real photos.

Each output is a source photo, randomly cropped (so copies differ), resized to the
target size and given mild noise: a plain upscale is smoother than a camera's
output and would decode faster than real phone photos of the same size. Sets are
cached under a folder named by their recipe, so reruns skip the making.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile
from typing import Sequence

import numpy as np
from PIL import Image

_DONE = "done.json"  # written last: a folder without it is incomplete and is remade


@dataclasses.dataclass(frozen=True)
class PhotoSet:
  """How to make a set: `count` JPEGs of width x height from `sources`, round-robin.

  Attributes:
    sources: the photos to copy from (any format Pillow reads).
    count: JPEGs to make.
    width, height: output size (landscape; phones' 4032x3024 by default).
    quality: JPEG quality (phones save at about 90).
    noise: standard deviation of the added Gaussian noise, in 8-bit levels.
    crop: the smallest share of each source side a crop keeps.
    seed: seeds crops and noise; the same recipe gives the same bytes.
  """
  sources: tuple[str, ...]
  count: int
  width: int = 4032
  height: int = 3024
  quality: int = 90
  noise: float = 3.0
  crop: float = 0.8
  seed: int = 0

  def key(self) -> str:
    """A short digest of the recipe (and the sources' sizes), naming its cache folder."""
    d = dataclasses.asdict(self)
    d["sources"] = [(s, os.path.getsize(s)) for s in self.sources]
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _make_one(spec: PhotoSet, i: int, noise_field: np.ndarray, path: str) -> None:
  rng = np.random.default_rng((spec.seed, i))
  with Image.open(spec.sources[i % len(spec.sources)]) as src:
    img = src.convert("RGB")
  keep = rng.uniform(spec.crop, 1.0, size=2)
  w, h = int(img.width * keep[0]), int(img.height * keep[1])
  x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
  img = img.resize((spec.width, spec.height), Image.BICUBIC, box=(x, y, x + w, y + h))
  # A random window of one shared noise field: the per-image work is one add and
  # one clip (NumPy releases the GIL for both), not millions of random draws.
  oy = int(rng.integers(0, noise_field.shape[0] - spec.height + 1))
  ox = int(rng.integers(0, noise_field.shape[1] - spec.width + 1))
  a = np.asarray(img, np.int16) + noise_field[oy:oy + spec.height, ox:ox + spec.width]
  Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path, quality=spec.quality)


def _cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make(spec: PhotoSet, root: str | os.PathLike | None = None, *,
         threads: int | None = None) -> list[str]:
  """The set's JPEG paths, made now or found complete in `root`/<recipe key>.

  Args:
    spec: the recipe.
    root: cache folder (default: the system's temp dir / cbir_jax_bench_photos).
    threads: parallel makers (default: every core; Pillow and NumPy release the GIL).

  Returns:
    sorted paths of `spec.count` JPEG files, alone in one folder.
  """
  if not spec.sources or spec.count < 1:
    raise ValueError("a photo set needs sources and count >= 1")
  root = pathlib.Path(root or pathlib.Path(tempfile.gettempdir()) / "cbir_jax_bench_photos")
  folder = root / f"{spec.width}x{spec.height}_{spec.count}_{spec.key()}"
  images = folder / "images"  # only JPEGs in it: a job can take the folder as its input
  paths = [str(images / f"{i:05d}.jpg") for i in range(spec.count)]
  if (folder / _DONE).is_file():
    return paths
  images.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(spec.seed)
  margin = 64
  shape = (spec.height + margin, spec.width + margin, 3)
  field = np.rint(rng.standard_normal(shape, dtype=np.float32) * spec.noise).astype(np.int16)
  workers = threads or _cores()
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    list(pool.map(lambda i: _make_one(spec, i, field, paths[i]), range(spec.count)))
  (folder / _DONE).write_text(json.dumps(dataclasses.asdict(spec)))
  return paths


def describe(paths: Sequence[str]) -> dict[str, float]:
  """Count, mean megapixels and mean file size of a set (recorded next to its figures)."""
  pixels, sizes = [], []
  for p in paths:
    with Image.open(p) as img:
      pixels.append(img.width * img.height)
    sizes.append(os.path.getsize(p))
  return {"images": len(paths), "mean_megapixels": float(np.mean(pixels)) / 1e6,
          "mean_file_mb": float(np.mean(sizes)) / 1e6}
