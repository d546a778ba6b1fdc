"""VGG16 with its real ImageNet conv weights (../shared/data/vgg16-imagenet-notop): golden checks.

The no-top Keras file is ported by the product (launch/port_weights.py's library
call) and loaded as a user would; the pool outputs of real photos are compared
with an independent PyTorch forward built from the .h5 arrays read here with
h5py (own layer list, own preprocessing). Relative error is max|a - b| / max|b|
per pool, b the reference; float32 agreement to 1e-4 leaves room only for
summation order. A retrieval check on food7 shows the weights carry meaning.
"""
from __future__ import annotations

import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is the independent reference forward")
h5py = pytest.importorskip("h5py", reason="h5py reads the reference weights")

import jax  # noqa: E402
from PIL import Image  # noqa: E402

from cbir_jax import backbones, inference, porting, search  # noqa: E402
from cbir_jax import descriptors as desc  # noqa: E402
from cbir_jax import weights as weights_lib  # noqa: E402

NOTOP = "vgg16-imagenet-notop/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
RTOL = 1e-4
POOLS = ("pool1", "pool2", "pool3", "pool4", "pool5")
# Written out here, not imported: the reference shares no tables with the porter.
CONV_LAYERS = (("block1_conv1", "block1_conv2"), ("block2_conv1", "block2_conv2"),
               ("block3_conv1", "block3_conv2", "block3_conv3"),
               ("block4_conv1", "block4_conv2", "block4_conv3"),
               ("block5_conv1", "block5_conv2", "block5_conv3"))
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def notop_file(shared_data) -> pathlib.Path:
  path = shared_data / NOTOP
  if not path.is_file():
    pytest.skip(f"{path} not present")
  return path


@pytest.fixture(scope="module")
def real_weights(notop_file, tmp_path_factory):
  """(params, info) of the real no-top file, ported into a temporary weights directory."""
  out = tmp_path_factory.mktemp("vgg16_keras_notop")
  porting.port_and_save("vgg16", "keras", notop_file, out, overwrite=True)
  return weights_lib.load("vgg16", out)


class TorchVGG16Conv(torch.nn.Module):
  """The 13 convs + ReLU + 2x2/2 max-pools (floor), weights from the .h5 (HWIO -> OIHW)."""

  def __init__(self, h5_path: pathlib.Path):
    super().__init__()
    self.blocks = torch.nn.ModuleList()
    with h5py.File(h5_path, "r") as f:
      for names in CONV_LAYERS:
        layers = []
        for name in names:
          kernel_name, bias_name = (n.decode() if isinstance(n, bytes) else n
                                    for n in f[name].attrs["weight_names"])
          kernel = np.asarray(f[name][kernel_name], np.float32)  # (3, 3, in, out)
          conv = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3], 3, padding=1)
          conv.weight.data = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
          conv.bias.data = torch.from_numpy(np.asarray(f[name][bias_name], np.float32))
          layers += [conv, torch.nn.ReLU()]
        self.blocks.append(torch.nn.Sequential(*layers, torch.nn.MaxPool2d(2, 2)))

  @torch.no_grad()
  def forward(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 RGB [N, H, W, 3] -> pool outputs NHWC, with Keras' caffe preprocessing."""
    x = images[..., ::-1].astype(np.float32) - CAFFE_MEAN_BGR
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    out = {}
    for b, block in enumerate(self.blocks, start=1):
      x = block(x)
      out[f"pool{b}"] = x.permute(0, 2, 3, 1).numpy()
    return out


def _photos(shared_data: pathlib.Path) -> list[Image.Image]:
  """Two imagenet-sample photos and two food7 photos of different classes."""
  imagenet = sorted((shared_data / "imagenet-sample" / "images").iterdir())[:2]
  food = [sorted((shared_data / "food7" / c).iterdir())[0] for c in ("rojak", "satay")]
  return [Image.open(f).convert("RGB") for f in imagenet + food]


@pytest.mark.parametrize("hw", [(224, 224), (101, 75)], ids=["224", "101x75"])
def test_pools_match_independent_torch_forward(notop_file, real_weights, shared_data, hw):
  params, info = real_weights
  assert info.has_fc is False and info.preprocessing.name == "caffe"
  images = np.stack([np.asarray(im.resize(hw[::-1], Image.BILINEAR))
                     for im in _photos(shared_data)])
  ref = TorchVGG16Conv(notop_file).eval()(images)

  backbone = backbones.get("vgg16")
  feats = jax.jit(backbone.features)(params, info.preprocessing(images))
  assert feats.fc is None and feats.logits is None
  errors = {name: rel_err(got, ref[name]) for name, got in zip(POOLS, feats.blocks)}
  print(f"{hw}: max relative error per pool " + ", ".join(f"{k} {v:.1e}"
                                                          for k, v in errors.items()))
  assert all(e <= RTOL for e in errors.values()), errors
  h, w = hw
  for name, got in zip(POOLS, feats.blocks):  # every 2x2/2 pool floors
    h, w = h // 2, w // 2
    assert got.shape[1:3] == (h, w), name
  assert float(np.max(ref["pool5"])) > 1.0  # real activations, not an all-zero network

  # The extraction step (uint8 in, descriptors out) on the same photos: its
  # baselines are the closed forms of the reference pool5.
  step = inference.jit_describe(backbone, preprocessing=info.preprocessing,
                                kinds=("mac", "spoc", "gem"))
  out = step(params, images)
  p5 = ref["pool5"].astype(np.float64)
  want = {"mac": p5.max((1, 2)), "spoc": p5.mean((1, 2)),
          "gem": (np.maximum(p5, desc.GEM_EPS) ** 3).mean((1, 2)) ** (1 / 3)}
  for kind, value in want.items():
    assert rel_err(out[kind], value) <= RTOL, kind


# 20 photos per food7 class at 112x112: ~4x cheaper than 224 (measured P@5 of the
# conv descriptor 0.45 at 112, 0.46 at 224; GeM 0.48 and 0.60). Chance is
# 19/139 = 0.137; the same subset through random He-normal conv weights gives
# 0.27-0.30 (colour alone), so 0.38 is a margin real weights must earn.
PER_CLASS = 20
SIZE = 112
MIN_P_AT_5 = 0.38


def test_retrieval_on_food7_is_well_above_chance(real_weights, shared_data):
  params, info = real_weights
  root = shared_data / "food7"
  files, labels = [], []
  for c, name in enumerate(sorted(p.name for p in root.iterdir() if p.is_dir())):
    chosen = sorted((root / name).iterdir())[:PER_CLASS]
    files += chosen
    labels += [c] * len(chosen)
  labels = np.asarray(labels)
  assert len(set(labels)) == 7 and len(files) == 7 * PER_CLASS

  kinds = ("conv", "gem")
  step = inference.jit_describe(backbones.get("vgg16"), preprocessing=info.preprocessing,
                                kinds=kinds)
  rows = {k: [] for k in kinds}
  for i in range(0, len(files), 35):  # 4 equal batches: one compilation
    x = np.stack([np.asarray(Image.open(f).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
                  for f in files[i:i + 35]])
    out = step(params, x)
    for k in kinds:
      rows[k].append(np.asarray(out[k]))
  for k in kinds:
    d = np.concatenate(rows[k])
    top = search.l1_topk(d, d, 5, exclude=np.arange(len(d)))  # each query left out of its ranking
    p_at_5 = float(np.mean(labels[np.asarray(top.indices)] == labels[:, None]))
    print(f"food7 {PER_CLASS}/class at {SIZE}x{SIZE}: {k} P@5 {p_at_5:.3f} (chance 0.137)")
    assert p_at_5 >= MIN_P_AT_5, (k, p_at_5)
