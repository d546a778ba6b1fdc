"""Balanced Conv (cbir_jax.balance) against literal loops and closed-form facts."""
import numpy as np
import pytest

from cbir_jax import balance

DIMS = (2, 3, 5, 4)  # a small 4-block Conv, 14 values


def unequal_rows(n=60, seed=0):
  """Rows whose blocks differ in size by orders of magnitude, as VGG16's do."""
  rng = np.random.default_rng(seed)
  mags = np.repeat([300.0, 40.0, 2.0, 0.05], DIMS)
  return (rng.random((n, sum(DIMS))) * mags).astype(np.float32)


def literal_block_l1(x, dims, i, j):
  """m_b by the definition: for each pair, for each block, sum |x_i - x_j| over its columns."""
  out = [0.0] * len(dims)
  for a, b in zip(i, j):
    col = 0
    for blk, d in enumerate(dims):
      out[blk] += sum(abs(float(x[a, c]) - float(x[b, c])) for c in range(col, col + d))
      col += d
  return np.array(out) / len(i)


def test_pairs_are_distinct_seeded_and_cover_every_ordered_pair():
  i, j = balance.sample_pairs(5, 20000, seed=3)
  assert len(i) == len(j) == 20000 and (i != j).all()
  assert ((0 <= i) & (i < 5) & (0 <= j) & (j < 5)).all()
  i2, j2 = balance.sample_pairs(5, 20000, seed=3)
  np.testing.assert_array_equal(i, i2)
  np.testing.assert_array_equal(j, j2)
  assert not np.array_equal(i, balance.sample_pairs(5, 20000, seed=4)[0])
  # Uniform over the 20 ordered pairs: each within 5 standard deviations of 1000.
  counts = np.bincount(i * 5 + j, minlength=25).reshape(5, 5)
  assert (np.diag(counts) == 0).all()
  off = counts[~np.eye(5, dtype=bool)]
  sd = np.sqrt(20000 * (1 / 20) * (19 / 20))
  assert np.abs(off - 1000).max() < 5 * sd
  with pytest.raises(ValueError, match="at least 2 rows"):
    balance.sample_pairs(1, 10, 0)


def test_block_l1_equals_a_literal_loop():
  x = unequal_rows(30)
  i, j = balance.sample_pairs(len(x), 300, seed=1)
  ref = literal_block_l1(x, DIMS, i, j)
  # float64 accumulation of float32 values: only summation order differs.
  np.testing.assert_allclose(balance.block_l1(x, DIMS, (i, j), chunk=7), ref, rtol=1e-10)
  np.testing.assert_allclose(balance.block_l1(x, DIMS, (i, j)), ref, rtol=1e-10)


def test_balanced_blocks_contribute_equally_and_keep_the_total():
  x = unequal_rows()
  s = balance.block_scales(x, DIMS, num_pairs=5000, seed=0)
  pairs = balance.sample_pairs(len(x), 5000, 0)
  before = balance.block_l1(x, DIMS, pairs)
  assert before[0] > 100 * before[3]  # the test rows are unbalanced to start with
  after = balance.block_l1(balance.apply(x, s), DIMS, pairs)
  # On the sample the scales were learned from, each block's share is T / B exactly, up to
  # the float32 rounding of the scaled rows (relative 1e-6).
  np.testing.assert_allclose(after, before.sum() / len(DIMS), rtol=1e-5)
  np.testing.assert_allclose(after.sum(), before.sum(), rtol=1e-5)
  # The closed form: s_b = T / (B m_b).
  np.testing.assert_allclose(s.scales, before.sum() / (len(DIMS) * before), rtol=1e-12)
  np.testing.assert_allclose(s.block_l1, before, rtol=1e-12)
  # On another sample of the same rows the shares are equal only on average: within 15%.
  other = balance.block_l1(balance.apply(x, s), DIMS, balance.sample_pairs(len(x), 5000, 9))
  np.testing.assert_allclose(other, other.mean(), rtol=0.15)


def test_scaling_is_the_identity_on_equal_blocks():
  # Every block a copy of the same two columns' values: equal m_b, so s_b = 1.
  rng = np.random.default_rng(0)
  base = rng.random((40, 2)).astype(np.float32)
  x = np.concatenate([base] * 3, axis=1)
  s = balance.block_scales(x, (2, 2, 2), num_pairs=500)
  np.testing.assert_allclose(s.scales, 1.0, rtol=1e-12)
  np.testing.assert_array_equal(balance.apply(x, s), x)


def test_apply_scales_each_block_and_nothing_else():
  x = unequal_rows(5)
  s = balance.BlockScales(block_dims=DIMS, scales=(2.0, 0.5, 10.0, 1.0),
                          block_l1=(0, 0, 0, 0), num_pairs=1, seed=0)
  y = balance.apply(x, s)
  edges = balance.block_edges(DIMS)
  for b, scale in enumerate(s.scales):
    np.testing.assert_array_equal(y[:, edges[b]:edges[b + 1]],
                                  x[:, edges[b]:edges[b + 1]] * np.float32(scale))
  with pytest.raises(ValueError, match="rows of 13 values, but the scales are for blocks"):
    balance.apply(x[:, :13], s)


def test_a_constant_block_keeps_scale_one():
  x = unequal_rows(20)
  x[:, :2] = 7.0  # block 1 never differs
  s = balance.block_scales(x, DIMS, num_pairs=400)
  assert s.scales[0] == 1.0 and s.block_l1[0] == 0.0
  after = balance.block_l1(balance.apply(x, s), DIMS, balance.sample_pairs(len(x), 400, 0))
  # the three live blocks share the total equally
  np.testing.assert_allclose(after[1:], sum(s.block_l1) / 3, rtol=1e-5)
  np.testing.assert_array_equal(balance.scales_from_l1(np.zeros(3)), np.ones(3))


def test_record_round_trips_and_derived_kinds():
  x = unequal_rows(10)
  s = balance.block_scales(x, DIMS, num_pairs=50, seed=2, source="/idx")
  assert balance.BlockScales(**s.to_dict()) == s
  fc = np.arange(20, dtype=np.float32).reshape(10, 2)
  got = balance.derive("fc_conv_balanced", {"fc": fc, "conv": x}, s)
  np.testing.assert_array_equal(got, np.concatenate([fc, balance.apply(x, s)], axis=1))
  np.testing.assert_array_equal(balance.derive("conv_balanced", {"conv": x}, s),
                                balance.apply(x, s))
  with pytest.raises(ValueError, match="unknown derived kind"):
    balance.derive("mac_balanced", {"conv": x}, s)
  with pytest.raises(ValueError, match="the blocks .* make 14"):
    balance.block_scales(x[:, :12], DIMS)


def test_target_shares_are_met_on_the_sample_and_zero_drops_a_block():
  x = unequal_rows()
  pairs = balance.sample_pairs(len(x), 3000, 0)
  before = balance.block_l1(x, DIMS, pairs)
  for shares in ([0.1, 0.2, 0.3, 0.4], [1, 1, 1, 5], [0, 0, 0, 1]):
    s = balance.block_scales(x, DIMS, num_pairs=3000, seed=0, shares=shares)
    after = balance.block_l1(balance.apply(x, s), DIMS, pairs)
    w = np.asarray(shares, float) / sum(shares)
    np.testing.assert_allclose(after, w * before.sum(), rtol=1e-5, atol=1e-9 * before.sum())
  # Equal shares given explicitly are the default.
  assert balance.block_scales(x, DIMS, shares=[2, 2, 2, 2]).scales == \
      balance.block_scales(x, DIMS).scales
  with pytest.raises(ValueError, match="shares must be 4 non-negative numbers"):
    balance.block_scales(x, DIMS, shares=[1, -1, 1, 1])
  with pytest.raises(ValueError, match="shares must be 4 non-negative numbers"):
    balance.block_scales(x, DIMS, shares=[1, 1, 1])
