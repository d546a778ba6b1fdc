"""The decoder comparison's streamed pixel statistics against NumPy on the whole data."""
import numpy as np

from benchmarks import decoder_compare


def test_difference_tally_in_chunks_equals_numpy_on_everything():
  rng = np.random.default_rng(0)
  shapes = [(37, 53, 3), (64, 48, 3), (5, 200, 3), (90, 90, 3)]
  got = [rng.integers(0, 256, s, dtype=np.uint8) for s in shapes]
  # References near the decodes (small differences, a few large ones), as decoders differ.
  ref = [np.clip(g.astype(int) + rng.integers(-2, 3, g.shape)
                 + 60 * (rng.random(g.shape) < 0.002), 0, 255).astype(np.uint8) for g in got]
  tally = decoder_compare.DifferenceTally()
  for i in range(0, len(got), 3):  # chunks of 3 and 1
    tally.add(got[i:i + 3], ref[i:i + 3])
  d = np.concatenate([np.abs(g.astype(int) - r).ravel() for g, r in zip(got, ref)])
  res = tally.result()
  assert res["shape_mismatches"] == 0
  assert np.isclose(res["mean_abs"], d.mean(), rtol=1e-12)
  assert res["max_abs"] == d.max() and res["max_abs"] >= 50
  assert res["p99_9_abs"] == np.percentile(d, 99.9, method="inverted_cdf")
  assert decoder_compare.pixel_difference(got, ref) == res


def test_difference_tally_counts_shape_mismatches_instead_of_comparing():
  a = np.zeros((4, 4, 3), np.uint8)
  tally = decoder_compare.DifferenceTally()
  tally.add([a, a], [a, np.zeros((4, 5, 3), np.uint8)])
  assert tally.result()["shape_mismatches"] == 1
