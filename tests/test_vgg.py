"""The Flax VGG: output names and shapes, post-ReLU FC, bfloat16 compute, adaptive pooling, compiles."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbir_jax import backbones, inference, sharding
from cbir_jax import descriptors as desc
from cbir_jax import preprocessing as pp
from cbir_jax.backbones import vgg
from cbir_jax.job import jit_cache

POOLS = ("pool1", "pool2", "pool3", "pool4", "pool5")
VGG16_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_output_shapes(h: int, w: int) -> dict[str, tuple[int, ...]]:
  """Shapes only (jax.eval_shape): no VGG16 weights are allocated or run."""
  b = backbones.get("vgg16")
  x = jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32)
  _, inter = jax.eval_shape(lambda p, x: b.module().apply({"params": p}, x),
                            b.param_shapes(), x)
  return {k: tuple(v.shape) for k, v in inter.items()}


@pytest.mark.parametrize("h, w", [(224, 224), (100, 75)])
def test_vgg16_output_names_and_shapes(h, w):
  shapes = _vgg16_output_shapes(h, w)
  assert set(shapes) == set(POOLS) | {"fc6", "fc7", "logits"}
  # Each 2x2/2 max-pool floors: 224 -> 112 ... 7; 100x75 -> 50x37, 25x18, 12x9, 6x4, 3x2.
  for name, c in zip(POOLS, VGG16_CHANNELS):
    h, w = h // 2, w // 2
    assert shapes[name] == (2, h, w, c), name
  assert shapes["fc6"] == shapes["fc7"] == (2, 4096)
  assert shapes["logits"] == (2, 1000)


def test_vgg16_params_do_not_depend_on_input_size():
  # FC6 always sees pool5 adaptive-pooled to 7x7, so one checkpoint serves all sizes.
  a = backbones.get("vgg16").param_shapes(224)
  b = backbones.get("vgg16").param_shapes(100)
  assert jax.tree.map(lambda s: s.shape, a) == jax.tree.map(lambda s: s.shape, b)
  assert a["fc6"]["kernel"].shape == (7 * 7 * 512, 4096)


@pytest.fixture(scope="module")
def tiny():
  """vgg_tiny with He-scaled NumPy random params: compiling jax.random's init costs ~15 s here."""
  b = backbones.get("vgg_tiny")
  rng = np.random.default_rng(0)

  def draw(s):
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    scale = np.sqrt(2.0 / fan_in) if len(s.shape) > 1 else 0.1
    return (rng.standard_normal(s.shape) * scale).astype(np.float32)

  return b, jax.tree.map(draw, b.param_shapes())


def test_fc_activations_are_post_relu(tiny):
  b, params = tiny
  x = np.random.default_rng(1).standard_normal((4, 224, 224, 3)).astype(np.float32)
  _, inter = jax.jit(b.module().apply)({"params": params}, x)
  # Recompute FC6/FC7 before the ReLU; at 224x224 pool5 is 7x7, so FC6 sees it as is.
  p5 = np.asarray(inter["pool5"])
  assert p5.shape[1:3] == (7, 7)
  flat = p5.reshape(4, -1)
  pre6 = flat @ np.asarray(params["fc6"]["kernel"]) + np.asarray(params["fc6"]["bias"])
  pre7 = (np.asarray(inter["fc6"]) @ np.asarray(params["fc7"]["kernel"])
          + np.asarray(params["fc7"]["bias"]))
  assert (pre6 < 0).any() and (pre7 < 0).any()  # the ReLU has something to do
  np.testing.assert_allclose(inter["fc6"], np.maximum(pre6, 0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(inter["fc7"], np.maximum(pre7, 0), rtol=1e-5, atol=1e-5)
  for name in POOLS + ("fc6", "fc7"):
    assert float(jnp.min(inter[name])) >= 0.0, name


# bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2% per op); through
# 5 convs and 3 dense layers vgg_tiny measured ~0.4-0.7% here; 2% leaves margin.
BF16_RTOL = 2e-2


def test_bfloat16_compute_with_float32_params(tiny):
  b, params = tiny
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  x = np.random.default_rng(2).uniform(-2.0, 2.0, (4, 64, 64, 3)).astype(np.float32)
  features = jax.jit(b.features, static_argnames="dtype")
  f32 = features(params, x, dtype=jnp.float32)
  bf16 = features(params, x, dtype=jnp.bfloat16)
  assert all(blk.dtype == jnp.bfloat16 for blk in bf16.blocks)  # really computed in bf16
  assert bf16.fc.dtype == jnp.float32 and bf16.logits.dtype == jnp.float32
  for got, want, name in zip(bf16.blocks + (bf16.fc, bf16.logits),
                             f32.blocks + (f32.fc, f32.logits), POOLS + ("fc", "logits")):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err <= BF16_RTOL, f"{name}: bf16 relative error {err:.3g}"
    assert err > 0, f"{name}: identical to float32, so bf16 was not used"


@pytest.mark.parametrize("hw", [(5, 9), (13, 13), (7, 7), (3, 20)])
def test_adaptive_avg_pool_matches_torch(hw):
  torch = pytest.importorskip("torch", reason="torch is the reference for AdaptiveAvgPool2d")
  x = np.random.default_rng(sum(hw)).standard_normal((2, *hw, 5)).astype(np.float32)
  got = np.asarray(vgg.adaptive_avg_pool(jnp.asarray(x), (7, 7)))
  want = torch.nn.AdaptiveAvgPool2d((7, 7))(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(got, want.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


def _counting(backbone: backbones.Backbone) -> tuple[backbones.Backbone, list[int]]:
  """The backbone, with a counter bumped each time its module is built (once per trace)."""
  traces = [0]

  def make_module(**kw):
    traces[0] += 1
    return backbone.make_module(**kw)

  return dataclasses.replace(backbone, make_module=make_module), traces


@pytest.mark.parametrize("use_mesh", [False, True])
def test_jit_describe_compiles_once_per_shape(tiny, use_mesh):
  b, params = tiny
  b, traces = _counting(b)
  mesh = sharding.data_mesh() if use_mesh else None
  step = inference.jit_describe(b, mesh=mesh, preprocessing=pp.TORCHVISION)
  if mesh is not None:
    params = sharding.replicate(params, mesh)
  n = len(jax.devices())  # 8 fake CPU devices (conftest): one row each
  rng = np.random.default_rng(0)

  def batch(h, w):
    x = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    return jax.device_put(x, sharding.batch_sharding(mesh)) if mesh is not None else jnp.asarray(x)

  compiles = jit_cache.CompileCounter()  # executables made (public jax.monitoring events)

  def run(x):
    with compiles.watch():
      return step(params, x)

  outs = [run(batch(64, 64)) for _ in range(3)]
  assert traces[0] == 1 and compiles.count == 1
  assert not np.allclose(outs[0]["conv"], outs[1]["conv"])  # really different batches
  run(batch(64, 48))
  assert traces[0] == 2 and compiles.count == 2
  run(batch(64, 64))
  assert traces[0] == 2 and compiles.count == 2


# --- without the FC layers (no-top weights) ---------------------------------------------------


def test_vgg16_without_fc_has_conv_params_only():
  full = backbones.get("vgg16")
  bare = full.without_fc()
  shapes = bare.param_shapes()
  assert set(shapes) == set(full.param_shapes()) - {"fc6", "fc7", "fc8"}
  assert len(shapes) == 13
  for name in shapes:  # the same conv layers as the full network
    assert (jax.tree.map(lambda s: s.shape, shapes[name])
            == jax.tree.map(lambda s: s.shape, full.param_shapes()[name]))
  assert bare.fc_names == () and bare.fc_dim == 0 and bare.name == "vgg16"
  x = jax.ShapeDtypeStruct((2, 101, 75, 3), jnp.float32)
  logits, inter = jax.eval_shape(lambda p, x: bare.module().apply({"params": p}, x), shapes, x)
  assert logits is None and set(inter) == set(POOLS)
  assert inter["pool5"].shape == (2, 3, 2, 512)  # 101x75 floors to 3x2
  with pytest.raises(ValueError, match="cannot run without FC layers"):
    backbones.get("efficientnet_lite0").without_fc()


def test_features_pick_the_network_the_params_hold(tiny):
  """Conv-only params run the conv layers only: same blocks as with the head, no fc/logits."""
  b, params = tiny
  conv_only = {k: v for k, v in params.items() if not k.startswith("fc")}
  assert b.for_params(params) is b
  assert b.for_params(conv_only).fc_names == ()
  with pytest.raises(ValueError, match=r"have FC layers \['fc6'\] but not \['fc7', 'fc8'\]"):
    b.for_params({**conv_only, "fc6": params["fc6"]})
  x = np.random.default_rng(3).standard_normal((2, 64, 48, 3)).astype(np.float32)
  features = jax.jit(b.features)
  full, bare = features(params, x), features(conv_only, x)
  assert bare.fc is None and bare.logits is None and full.fc.shape == (2, 64)
  for got, want in zip(bare.blocks, full.blocks):  # same convs; compiled apart, hence rtol
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_describe_step_on_conv_only_params(tiny):
  b, params = tiny
  conv_only = {k: v for k, v in params.items() if not k.startswith("fc")}
  kinds = ("conv", "mac", "spoc", "gem")
  images = np.random.default_rng(4).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
  step = inference.jit_describe(b, preprocessing=pp.TORCHVISION, kinds=kinds)
  bare, full = step(conv_only, images), step(params, images)
  for k in kinds:
    assert bare[k].shape == full[k].shape
    np.testing.assert_allclose(bare[k], full[k], rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="need the network's FC layers"):
    inference.jit_describe(b, preprocessing=pp.TORCHVISION, kinds=("conv", "fc"))(
        conv_only, images)


def test_extraction_job_with_conv_only_weights(tmp_path):
  """The job loads conv-only weights (has_fc False) and writes conv, mac, spoc, gem: the same
  rows as full weights with the same conv layers."""
  from PIL import Image

  from cbir_jax import checkpoint, extract, store

  b = backbones.get("vgg_tiny")
  full = b.random_params(0, 32)
  conv_only = {k: v for k, v in full.items() if not k.startswith("fc")}
  dirs = {"full": tmp_path / "full", "conv_only": tmp_path / "conv_only"}
  checkpoint.save(dirs["full"], full, checkpoint.WeightsInfo("vgg_tiny", pp.TORCHVISION))
  checkpoint.save(dirs["conv_only"], conv_only,
                  checkpoint.WeightsInfo("vgg_tiny", pp.TORCHVISION, has_fc=False))
  images = tmp_path / "imgs"
  images.mkdir()
  rng = np.random.default_rng(5)
  for i in range(5):
    Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(
        images / f"img{i}.png")
  kinds = ("conv", "mac", "spoc", "gem")
  got = {}
  for name, wdir in dirs.items():
    out = tmp_path / f"out_{name}"
    extract.run(extract.ExtractConfig(output=str(out), images=str(images), model="vgg_tiny",
                                      weights=str(wdir), kinds=kinds, image_size=32,
                                      progress="none"), log=lambda m: None)
    got[name] = {k: store.load_descriptors(out, k)[0] for k in kinds}
  dims = desc.dimensions(b.block_channels, b.fc_dim)
  for k in kinds:
    assert got["conv_only"][k].shape == (5, dims[k])
    np.testing.assert_allclose(got["conv_only"][k], got["full"][k], rtol=1e-6, atol=1e-6)
