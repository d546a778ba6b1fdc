"""gpu_canvas: device box reduction against Pillow's Image.reduce and a literal loop; canvases."""
import jax
import numpy as np
import pytest
from PIL import Image

from cbir_jax import canvas, gpu_canvas


def _literal_reduce(a: np.ndarray, f: int) -> np.ndarray:
  """Mean of each f x f block (edge blocks over the pixels they hold), rounded half up."""
  h, w, c = a.shape
  out = np.zeros((-(-h // f), -(-w // f), c), np.uint8)
  for i in range(out.shape[0]):
    for j in range(out.shape[1]):
      block = a[i * f:(i + 1) * f, j * f:(j + 1) * f].astype(np.int64)
      out[i, j] = np.floor(block.sum(axis=(0, 1)) / (block.shape[0] * block.shape[1]) + 0.5)
  return out


@pytest.mark.parametrize("shape,factor", [((37, 53, 3), 4), ((64, 48, 3), 2), ((31, 30, 3), 7)])
def test_box_reduce_matches_pillow_reduce(shape, factor):
  a = np.random.default_rng(factor).integers(0, 256, shape, dtype=np.uint8)
  got = np.asarray(gpu_canvas.box_reduce(jax.numpy.asarray(a), factor))
  np.testing.assert_array_equal(got, _literal_reduce(a, factor))
  # Pillow's integer arithmetic rounds through a fixed-point reciprocal: within 1 level.
  ref = np.asarray(Image.fromarray(a).reduce(factor))
  assert got.shape == ref.shape and np.abs(got.astype(int) - ref).max() <= 1


def test_assemble_places_reduces_and_buckets():
  rng = np.random.default_rng(0)
  big = rng.integers(0, 256, (1300, 700, 3), dtype=np.uint8)  # factor 3 for a 640 canvas
  small = rng.integers(0, 256, (200, 120, 3), dtype=np.uint8)
  canvases, sizes, factors = gpu_canvas.assemble([jax.numpy.asarray(big), small, None],
                                                 (320, 640))
  # The host's flat layout (canvas.py): each image's rows back to back at its slot's start.
  assert canvases.shape == (3, 640 * 640 * 3) and canvases.dtype == np.uint8
  assert factors == [3, 1, 1]
  np.testing.assert_array_equal(sizes, [[434, 234], [200, 120], [0, 0]])
  c = np.asarray(canvases)
  np.testing.assert_array_equal(c[0, :434 * 234 * 3], _literal_reduce(big, 3).ravel())
  np.testing.assert_array_equal(c[1, :200 * 120 * 3], small.ravel())
  host, host_sizes = canvas.assemble([_literal_reduce(big, 3), small, None], (320, 640))
  np.testing.assert_array_equal(sizes, host_sizes)
  for j, (h, w) in enumerate(sizes):
    np.testing.assert_array_equal(c[j, :h * w * 3], host[j, :h * w * 3])
  only_small, _, _ = gpu_canvas.assemble([small, None], (320, 640))
  assert only_small.shape == (2, 320 * 320 * 3)  # the smallest bucket that holds the batch
