"""The small set of public-domain / CC0 sample photos that ships with the package.

For first runs and demos (extract, then search) without any data of your own;
each file's origin and licence are in sample_images/LICENSES.md.
"""
from __future__ import annotations

import pathlib

SAMPLE_IMAGES_DIR = pathlib.Path(__file__).resolve().parent / "sample_images"  # 10 JPEGs, no labels


def sample_images() -> list[pathlib.Path]:
  """The sample photos' paths, sorted."""
  return sorted(p for p in SAMPLE_IMAGES_DIR.iterdir() if p.suffix == ".jpg")
