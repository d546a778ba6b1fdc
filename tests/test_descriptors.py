"""conv_descriptor against literal loops written from SPEC.md section 2.

The references below are deliberately naive (explicit loops over blocks,
channels and positions, float64) so that they share no code or trick with
the vectorised implementation.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbir_jax import descriptors as desc

ATOL = 1e-5  # float32 vectorised sums vs float64 loops, values O(1)


def literal_conv_descriptor(pools, tau_fraction, relative, masks="channel"):
  """SPEC.md 2, step by step, for one image (pools: list of [H, W, C] float64)."""
  B = len(pools)
  last = pools[-1]
  H_B, W_B, C_B = last.shape
  if relative:
    peak = 0.0
    for i in range(H_B):
      for j in range(W_B):
        for c in range(C_B):
          peak = max(peak, last[i, j, c])
    tau = tau_fraction * peak
  else:
    tau = tau_fraction
  # 1. masks M_c (strictly greater); the notebook variant shares one spatial mask.
  M = np.zeros((H_B, W_B, C_B))
  for i in range(H_B):
    for j in range(W_B):
      spatial = max(last[i, j, c] for c in range(C_B)) > tau
      for c in range(C_B):
        M[i, j, c] = 1.0 if (last[i, j, c] > tau if masks == "channel" else spatial) else 0.0
  # 2. count map N
  N = np.zeros((H_B, W_B))
  for i in range(H_B):
    for j in range(W_B):
      for c in range(C_B):
        N[i, j] += M[i, j, c]
  values = []
  for b in range(B - 1):
    O = pools[b]
    Hb, Wb, Cb = O.shape
    s = 2 ** (B - 1 - b)
    # 3. significance matrix S_b with floor correspondence
    S = np.zeros((Hb, Wb))
    for ii in range(Hb):
      for jj in range(Wb):
        if ii < s * H_B and jj < s * W_B:
          S[ii, jj] = N[ii // s, jj // s]
    den = 0.0
    for ii in range(Hb):
      for jj in range(Wb):
        den += S[ii, jj]
    v = np.zeros(Cb)
    for k in range(Cb):
      num = 0.0
      for ii in range(Hb):
        for jj in range(Wb):
          num += S[ii, jj] * O[ii, jj, k]
      v[k] = num / den if den > 0 else 0.0
    values.append(v)
  v = np.zeros(C_B)
  for c in range(C_B):
    num = den = 0.0
    for i in range(H_B):
      for j in range(W_B):
        num += M[i, j, c] * last[i, j, c]
        den += M[i, j, c]
    v[c] = num / den if den > 0 else 0.0
  values.append(v)
  return np.concatenate(values)


def upsampling_conv_descriptor(pools, tau_fraction, relative):
  """Second reference: the paper's recursive 2x2-children marking, done as repeated upsampling."""
  last = np.asarray(pools[-1], np.float64)
  n = last.shape[0]
  tau = (tau_fraction * last.reshape(n, -1).max(1))[:, None, None, None] if relative else tau_fraction
  M = (last > tau).astype(np.float64)
  count = M.sum(-1)  # [n, H_B, W_B]
  out = []
  S = count
  maps = [None] * len(pools)
  for b in range(len(pools) - 2, -1, -1):
    S = np.repeat(np.repeat(S, 2, axis=1), 2, axis=2)  # each neuron marks its 2x2 children
    H, W = pools[b].shape[1:3]
    full = np.zeros((n, H, W))
    h, w = min(H, S.shape[1]), min(W, S.shape[2])
    full[:, :h, :w] = S[:, :h, :w]
    maps[b] = full
  for b in range(len(pools) - 1):
    O = np.asarray(pools[b], np.float64)
    num = np.einsum("nhw,nhwc->nc", maps[b], O)
    den = maps[b].sum((1, 2))[:, None]
    out.append(np.where(den > 0, num / np.where(den > 0, den, 1), 0.0))
  den = M.sum((1, 2))
  out.append(np.where(den > 0, (M * last).sum((1, 2)) / np.where(den > 0, den, 1), 0.0))
  return np.concatenate(out, axis=1)


def pool_sizes(h, w, B=5):
  sizes = []
  for _ in range(B):
    h, w = h // 2, w // 2
    sizes.append((h, w))
  return sizes


def random_pools(rng, n, h, w, channels, sparsity=0.5):
  """Non-negative activations with exact zeros, like post-ReLU max-pool outputs."""
  pools = []
  for (hb, wb), c in zip(pool_sizes(h, w, len(channels)), channels):
    x = rng.standard_normal((n, hb, wb, c)).astype(np.float32)
    pools.append(np.maximum(x, 0) * (rng.random((n, hb, wb, c)) > sparsity))
  return pools


SMALL_CHANNELS = (3, 4, 5, 6, 7)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("hw", [(224, 224), (100, 75), (67, 131)])
@pytest.mark.parametrize("threshold,relative", [(0.5, True), (0.9, True), (0.8, False)])
def test_matches_literal_loops(n, hw, threshold, relative):
  rng = np.random.default_rng(hash((n, hw, threshold)) % 2**32)
  pools = random_pools(rng, n, *hw, SMALL_CHANNELS)
  got = np.asarray(jax.jit(lambda p: desc.conv_descriptor(p, threshold=threshold,
                                                          relative=relative))(pools))
  assert got.shape == (n, sum(SMALL_CHANNELS)) and got.dtype == np.float32
  for i in range(n):
    want = literal_conv_descriptor([np.float64(p[i]) for p in pools], threshold, relative)
    np.testing.assert_allclose(got[i], want, atol=ATOL, rtol=0)


def test_vgg16_sizes_against_literal_loops():
  # The real VGG16 channel counts at 224 (1472 values), one image: the loop is slow, so
  # subsample channels of the early blocks by checking only the full result's shape there.
  rng = np.random.default_rng(0)
  channels = (64, 128, 256, 512, 512)
  pools = random_pools(rng, 1, 224, 224, channels)
  got = np.asarray(desc.conv_descriptor(pools))
  assert got.shape == (1, 1472)
  want = upsampling_conv_descriptor(pools, 0.5, True)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  # Literal loops on the last two blocks (channel loop cost is what it is).
  small = [p[..., :8] for p in pools[:-1]] + [pools[-1][..., :40]]
  got_small = np.asarray(desc.conv_descriptor(small))
  np.testing.assert_allclose(got_small[0], literal_conv_descriptor(
      [np.float64(p[0]) for p in small], 0.5, True), atol=ATOL, rtol=0)


def test_nothing_significant_gives_zero_not_nan():
  rng = np.random.default_rng(1)
  pools = random_pools(rng, 3, 64, 64, SMALL_CHANNELS)
  pools[-1][1] = 0.0  # image 1: last block all zero -> max 0 -> nothing > 0
  out = np.asarray(desc.conv_descriptor(pools))
  assert np.isfinite(out).all()
  assert (out[1] == 0).all()
  # A threshold above every activation: absolute, whole batch has nothing significant.
  out = np.asarray(desc.conv_descriptor(pools, threshold=1e6, relative=False))
  assert (out == 0).all()
  # Relative threshold 1.0: strictly greater than the maximum is impossible.
  out = np.asarray(desc.conv_descriptor(pools, threshold=1.0))
  assert (out == 0).all()


def test_some_channels_empty():
  rng = np.random.default_rng(2)
  pools = random_pools(rng, 2, 96, 96, SMALL_CHANNELS)
  pools[-1][..., :3] *= 0.1  # these last-block channels never exceed 0.5 * max
  got = np.asarray(desc.conv_descriptor(pools))
  v_last = got[:, -SMALL_CHANNELS[-1]:]
  assert (v_last[:, :3] == 0).all() and (v_last[:, 3:] > 0).any()
  for i in range(2):
    np.testing.assert_allclose(got[i], literal_conv_descriptor(
        [np.float64(p[i]) for p in pools], 0.5, True), atol=ATOL, rtol=0)


@pytest.mark.parametrize("hw", [(224, 224), (100, 75), (37, 45)])
def test_cheap_form_equals_upsampling_form(hw):
  rng = np.random.default_rng(3)
  pools = random_pools(rng, 3, *hw, SMALL_CHANNELS)
  np.testing.assert_allclose(np.asarray(desc.conv_descriptor(pools)),
                             upsampling_conv_descriptor(pools, 0.5, True), atol=ATOL, rtol=0)


def test_same_padded_block_sizes():
  # "Same"-padded backbones halve with ceil: 113, 57, 29, 15, 8. The last block's
  # window then covers positions past the block's end, which correspond to nothing.
  rng = np.random.default_rng(4)
  sizes = [(113, 101), (57, 51), (29, 26), (15, 13), (8, 7)]
  pools = [np.maximum(rng.standard_normal((2, h, w, c)), 0).astype(np.float32)
           for (h, w), c in zip(sizes, SMALL_CHANNELS)]
  got = np.asarray(desc.conv_descriptor(pools))
  for i in range(2):
    np.testing.assert_allclose(got[i], literal_conv_descriptor(
        [np.float64(p[i]) for p in pools], 0.5, True), atol=ATOL, rtol=0)


def test_spatial_mask_variant():
  rng = np.random.default_rng(5)
  pools = random_pools(rng, 2, 64, 64, SMALL_CHANNELS)
  got = np.asarray(desc.conv_descriptor(pools, masks="spatial"))
  for i in range(2):
    np.testing.assert_allclose(got[i], literal_conv_descriptor(
        [np.float64(p[i]) for p in pools], 0.5, True, masks="spatial"), atol=ATOL, rtol=0)
  assert not np.allclose(got, np.asarray(desc.conv_descriptor(pools)))


def test_bfloat16_pools_accumulate_in_float32():
  rng = np.random.default_rng(6)
  pools = random_pools(rng, 2, 128, 128, SMALL_CHANNELS)
  got = np.asarray(desc.conv_descriptor([jnp.asarray(p, jnp.bfloat16) for p in pools]))
  assert got.dtype == np.float32
  ref = upsampling_conv_descriptor([np.asarray(jnp.asarray(p, jnp.bfloat16), np.float64)
                                    for p in pools], 0.5, True)
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)  # same bf16 inputs; f32 sums


def test_describe_kinds_and_baselines():
  rng = np.random.default_rng(7)
  pools = random_pools(rng, 2, 64, 64, SMALL_CHANNELS)
  fc = rng.random((2, 10)).astype(np.float32)
  out = desc.describe(pools, fc)
  assert list(out) == list(desc.KINDS)
  dims = desc.dimensions(SMALL_CHANNELS, 10)
  for k, v in out.items():
    assert v.shape == (2, dims[k]) and v.dtype == np.float32
  np.testing.assert_array_equal(out["fc_conv"], np.concatenate([out["fc"], out["conv"]], 1))
  np.testing.assert_allclose(out["mac"], pools[-1].max((1, 2)))
  np.testing.assert_allclose(out["spoc"], pools[-1].mean((1, 2)), rtol=1e-6)
  np.testing.assert_allclose(out["gem"], literal_gem(pools[-1], 3.0, 1e-6), rtol=1e-5)
  assert desc.dimensions((64, 128, 256, 512, 512), 8192) == {
      "fc": 8192, "conv": 1472, "fc_conv": 9664, "mac": 512, "spoc": 512, "gem": 512}
  with pytest.raises(ValueError, match="unknown descriptor kinds"):
    desc.describe(pools, fc, kinds=("fc", "rmac"))


def test_describe_without_fc_part():
  """A network run without its FC layers (no-top weights) gives fc=None: FC kinds refused."""
  rng = np.random.default_rng(8)
  pools = random_pools(rng, 2, 64, 64, SMALL_CHANNELS)
  out = desc.describe(pools, None, kinds=("conv", "mac", "spoc", "gem"))
  assert list(out) == ["conv", "mac", "spoc", "gem"]
  with_fc = desc.describe(pools, np.ones((2, 3), np.float32), kinds=("conv", "gem"))
  np.testing.assert_array_equal(out["conv"], with_fc["conv"])
  for kinds in (("fc",), ("conv", "fc_conv")):
    with pytest.raises(ValueError, match=r"need the network's FC layers"):
      desc.describe(pools, None, kinds=kinds)
  assert set(desc.FC_KINDS) < set(desc.KINDS)


# --- GeM (Radenovic, Tolias, Chum, TPAMI 2019) ---------------------------------------------


def literal_gem(last, p, eps):
  """f_c = (mean_ij max(x_ijc, eps)^p)^(1/p), one number at a time, float64."""
  last = np.asarray(last, np.float64)
  n, h, w, c = last.shape
  out = np.zeros((n, c))
  for k in range(n):
    for ch in range(c):
      total = 0.0
      for i in range(h):
        for j in range(w):
          total += max(last[k, i, j, ch], eps) ** p
      out[k, ch] = (total / (h * w)) ** (1.0 / p)
  return out


@pytest.mark.parametrize("p", [1.0, 3.0, 7.5])
@pytest.mark.parametrize("hw", [(7, 7), (3, 2), (1, 1)])
def test_gem_matches_literal_loop(p, hw):
  rng = np.random.default_rng(int(p * 10) + hw[0])
  # Post-ReLU-like maps with exact zeros, plus a few negatives (clamped to eps).
  x = np.maximum(rng.standard_normal((3, *hw, 6)), -0.1).astype(np.float32) * 4
  got = np.asarray(desc.gem(x, p=p))
  assert got.dtype == np.float32 and got.shape == (3, 6)
  np.testing.assert_allclose(got, literal_gem(x, p, desc.GEM_EPS), rtol=2e-6, atol=0)


def test_gem_closed_forms():
  eps, p = desc.GEM_EPS, desc.GEM_P
  assert p == 3.0  # the baseline
  # Constant maps: the generalised mean of a constant is the constant; zeros clamp to eps.
  const = np.full((2, 5, 4, 3), 2.5, np.float32)
  np.testing.assert_allclose(desc.gem(const), 2.5, rtol=1e-6)
  np.testing.assert_allclose(desc.gem(np.zeros((1, 4, 4, 2), np.float32)), eps, rtol=1e-5)
  np.testing.assert_allclose(desc.gem(np.full((1, 3, 3, 2), -7.0, np.float32)), eps, rtol=1e-5)
  # One non-zero position v among H*W: ((v^p + (HW - 1) eps^p) / HW)^(1/p).
  x = np.zeros((1, 7, 7, 1), np.float32)
  x[0, 3, 5, 0] = 6.0
  want = ((6.0 ** p + 48 * eps ** p) / 49) ** (1 / p)
  np.testing.assert_allclose(desc.gem(x)[0, 0], want, rtol=1e-6)
  assert abs(want - 6.0 / 49 ** (1 / 3)) < 1e-9  # eps^3 is negligible here


def test_gem_between_mean_and_max():
  rng = np.random.default_rng(11)
  x = (rng.random((4, 6, 5, 8)) * 10 + 0.01).astype(np.float32)  # all > eps: no clamping
  spoc, mac = np.asarray(desc.spoc(x)), np.asarray(desc.mac(x))
  np.testing.assert_allclose(desc.gem(x, p=1.0), spoc, rtol=1e-6)  # p = 1 is the mean
  g3 = np.asarray(desc.gem(x))
  assert np.all(spoc <= g3 * (1 + 1e-6)) and np.all(g3 <= mac * (1 + 1e-6))  # power means
  # Large p tends to the max: max * (1/HW)^(1/p) <= GeM_p <= max (30 positions here).
  g = np.asarray(desc.gem(x, p=200.0))
  assert np.all(g <= mac * (1 + 1e-6)) and np.all(g >= mac * 30 ** (-1 / 200) * (1 - 1e-6))
  assert np.max(np.abs(g - mac) / mac) < 0.02


def test_gem_large_values_do_not_overflow():
  """x^p overflows float32 past ~3.4e38: 1e3^50 would; the scaled form does not."""
  x = np.zeros((1, 2, 2, 1), np.float32)
  x[0, 0, 0, 0], x[0, 1, 1, 0] = 1000.0, 500.0
  got = float(desc.gem(x, p=50.0)[0, 0])
  want = ((1000.0 ** 50 + 500.0 ** 50 + 2 * 1e-6 ** 50) / 4) ** (1 / 50)  # float64: fine
  assert np.isfinite(got) and got == pytest.approx(want, rel=1e-5)


def test_gem_bfloat16_input_computed_in_float32():
  rng = np.random.default_rng(12)
  x = jnp.asarray(np.maximum(rng.standard_normal((2, 7, 7, 16)), 0), jnp.bfloat16)
  got = jax.jit(desc.gem)(x)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, literal_gem(np.asarray(x, np.float64), 3.0, 1e-6), rtol=1e-5)


def test_config_validation():
  with pytest.raises(ValueError):
    desc.DescriptorConfig(masks="notebook")
  with pytest.raises(ValueError):
    desc.DescriptorConfig(threshold=-1)
