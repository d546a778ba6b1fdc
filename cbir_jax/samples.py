"""The small set of public-domain / CC0 sample photos that ships with the package.

For first runs and demos (extract, then search) without any data of your own;
each file's origin and licence are in sample_images/LICENSES.md.
"""
from __future__ import annotations

import pathlib

_DIR = pathlib.Path(__file__).resolve().parent / "sample_images"


def sample_images_dir() -> pathlib.Path:
  """The folder of sample photos (10 JPEGs, no labels)."""
  return _DIR


def sample_images() -> list[pathlib.Path]:
  """The sample photos' paths, sorted."""
  return sorted(p for p in _DIR.iterdir() if p.suffix == ".jpg")
