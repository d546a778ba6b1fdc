"""VGG16 weight porting: torchvision .pth and Keras .h5 -> Flax, checked against independent references.

Random weights (He-scaled, so activations stay O(1) through 16 layers) are
written in each source's own layout, ported by launch/port_weights.py, loaded
back and run through the Flax VGG16. References: a PyTorch nn.Sequential with
torchvision's layer indices (torchvision layout) and a NumPy forward on the
HWIO/H,W,C arrays as Keras stores them (Keras layout).

Relative error here means max|a - b| / max|b| with b the reference; float32
agreement to 1e-4 leaves room only for summation-order rounding.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is needed to write/read .pth test files")
h5py = pytest.importorskip("h5py", reason="h5py is needed to write/read .h5 test files")

import jax  # noqa: E402
from PIL import Image  # noqa: E402

from cbir_jax import backbones, checkpoint, porting  # noqa: E402
from cbir_jax import weights as weights_lib  # noqa: E402
from cbir_jax import preprocessing as pp  # noqa: E402
from cbir_jax.checkpoint import WeightsError  # noqa: E402
from cbir_jax.porting import vgg as vgg_porting  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
PORT_WEIGHTS = REPO / "launch" / "port_weights.py"
RTOL = 1e-4
POOLS = ("pool1", "pool2", "pool3", "pool4", "pool5")

# Configuration "D", written out here rather than imported: the references
# must not share structure tables with the code under test.
CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
TORCH_CONV_IDX = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
TORCH_POOL_IDX = [4, 9, 16, 23, 30]
KERAS_CONVS = ["block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2", "block3_conv1",
               "block3_conv2", "block3_conv3", "block4_conv1", "block4_conv2", "block4_conv3",
               "block5_conv1", "block5_conv2", "block5_conv3"]
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
TV_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
TV_STD = np.array([0.229, 0.224, 0.225], np.float32)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
  """max|a - b| / max|b|, b the reference."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _conv_channels() -> list[tuple[int, int]]:
  out, cin = [], 3
  for v in CFG:
    if v != "M":
      out.append((cin, v))
      cin = v
  return out


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
  return rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))


class TorchVGG16(torch.nn.Module):
  """torchvision's VGG16 layer for layer (same attribute names and indices), eval mode."""

  def __init__(self):
    super().__init__()
    layers, cin = [], 3
    for v in CFG:
      if v == "M":
        layers.append(torch.nn.MaxPool2d(2, 2))
      else:
        layers += [torch.nn.Conv2d(cin, v, 3, padding=1), torch.nn.ReLU(inplace=False)]
        cin = v
    self.features = torch.nn.Sequential(*layers)
    self.avgpool = torch.nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = torch.nn.Sequential(
        torch.nn.Linear(512 * 7 * 7, 4096), torch.nn.ReLU(), torch.nn.Dropout(),
        torch.nn.Linear(4096, 4096), torch.nn.ReLU(), torch.nn.Dropout(),
        torch.nn.Linear(4096, 1000))

  def forward(self, x):
    out = {}
    pool = 0
    for i, layer in enumerate(self.features):
      x = layer(x)
      if i in TORCH_POOL_IDX:
        pool += 1
        out[f"pool{pool}"] = x.permute(0, 2, 3, 1)  # NHWC like the Flax model
    x = torch.flatten(self.avgpool(x), 1)
    for i, layer in enumerate(self.classifier):
      x = layer(x)
      if i == 1:
        out["fc6"] = x
      elif i == 4:
        out["fc7"] = x
    out["logits"] = x
    return {k: v.numpy() for k, v in out.items()}


def torch_reference(sd: dict[str, np.ndarray], images: np.ndarray) -> dict[str, np.ndarray]:
  """torchvision-style forward: RGB /255, mean/std, NCHW."""
  model = TorchVGG16().eval()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  x = (images.astype(np.float32) / 255.0 - TV_MEAN) / TV_STD
  with torch.no_grad():
    return model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))


def numpy_keras_reference(layers: dict[str, list[np.ndarray]], images: np.ndarray
                          ) -> dict[str, np.ndarray]:
  """Keras VGG16 in NumPy: caffe preprocessing (BGR, mean removed), HWIO convs, H,W,C flatten."""
  x = images[..., ::-1].astype(np.float32) - CAFFE_MEAN_BGR
  out, conv, block = {}, 0, 0
  for v in CFG:
    if v == "M":
      n, h, w, c = x.shape
      x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
      block += 1
      out[f"pool{block}"] = x
      continue
    kernel, bias = layers[KERAS_CONVS[conv]]
    conv += 1
    n, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # im2col with (dy, dx, cin) ordering = HWIO kernel flattened row-major.
    cols = np.concatenate([xp[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], -1)
    x = np.maximum(cols.reshape(-1, 9 * c) @ kernel.reshape(9 * c, -1) + bias, 0)
    x = x.reshape(n, h, w, -1)
  x = x.reshape(x.shape[0], -1)  # Keras Flatten on channels-last: H, W, C
  x = out["fc6"] = np.maximum(x @ layers["fc1"][0] + layers["fc1"][1], 0)
  x = out["fc7"] = np.maximum(x @ layers["fc2"][0] + layers["fc2"][1], 0)
  out["logits"] = x @ layers["predictions"][0] + layers["predictions"][1]  # pre-softmax
  return out


@jax.jit
def _flax_forward(params, x):
  return backbones.get("vgg16").module().apply({"params": params}, x)[1]


def flax_forward(params, info: checkpoint.WeightsInfo, images: np.ndarray) -> dict[str, np.ndarray]:
  """The Flax VGG16 with the preprocessing recorded in the weights info."""
  x = info.preprocessing(images)
  return {k: np.asarray(v) for k, v in _flax_forward(params, x).items()}


def run_port(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(PORT_WEIGHTS), *args], capture_output=True,
                        text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def photos(shared_data: pathlib.Path) -> dict[str, np.ndarray]:
  """A real photo at 224x224 and another at 100x75 (H x W), uint8 RGB, batch of 1 each."""
  files = sorted((shared_data / "imagenet-sample" / "images").iterdir())[:2]
  ims = [Image.open(f).convert("RGB") for f in files]
  return {"224": np.asarray(ims[0].resize((224, 224), Image.BILINEAR))[None],
          "odd": np.asarray(ims[1].resize((75, 100), Image.BILINEAR))[None]}


# ------------------------------------------------------------------------- torchvision

def random_torchvision_sd(seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  sd = {}
  for idx, (cin, cout) in zip(TORCH_CONV_IDX, _conv_channels()):
    sd[f"features.{idx}.weight"] = _he(rng, (cout, cin, 3, 3), 9 * cin)
    sd[f"features.{idx}.bias"] = rng.standard_normal(cout, dtype=np.float32) * 0.1
  for idx, fin, fout in ((0, 25088, 4096), (3, 4096, 4096), (6, 4096, 1000)):
    sd[f"classifier.{idx}.weight"] = _he(rng, (fout, fin), fin)
    sd[f"classifier.{idx}.bias"] = rng.standard_normal(fout, dtype=np.float32) * 0.1
  return sd


@pytest.fixture(scope="module")
def torchvision_sd() -> dict[str, np.ndarray]:
  return random_torchvision_sd(0)


def test_torchvision_port_matches_pytorch(tmp_path, photos, torchvision_sd):
  sd = torchvision_sd
  src = tmp_path / "vgg16-random.pth"
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, src)
  out = tmp_path / "weights"
  proc = run_port("--model=vgg16", "--source=torchvision", f"--input={src}", f"--output={out}")
  assert proc.returncode == 0, proc.stderr
  assert "unknown checksum" in proc.stderr  # random file: warned about, not refused

  params, info = checkpoint.load(out, model="vgg16",
                                 expected=backbones.get("vgg16").param_shapes())
  assert info.source == "torchvision" and info.source_file == src.name
  assert info.source_sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
  assert info.preprocessing == pp.TORCHVISION

  for key, names in (("224", POOLS + ("fc6", "fc7", "logits")),
                     ("odd", POOLS + ("fc7", "logits"))):
    ref = torch_reference(sd, photos[key])
    got = flax_forward(params, info, photos[key])
    for name in names:
      err = rel_err(got[name], ref[name])
      assert err <= RTOL, f"{key} {name}: relative error {err:.2e}"
  assert got["pool5"].shape == (1, 3, 2, 512)  # 100x75 floors to 3x2; FC6 saw it pooled to 7x7


# ------------------------------------------------------------------------------- Keras

def keras_layers_from(sd: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
  """The torchvision-layout weights rewritten as Keras stores them (HWIO, [in, out], FC1 rows
  in H,W,C order). Reusing the arrays saves drawing another 138M random numbers."""
  layers = {}
  for name, idx in zip(KERAS_CONVS, TORCH_CONV_IDX):
    layers[name] = [sd[f"features.{idx}.weight"].transpose(2, 3, 1, 0),
                    sd[f"features.{idx}.bias"]]
  w6 = sd["classifier.0.weight"].reshape(4096, 512, 7, 7)  # [out, C, H, W]
  layers["fc1"] = [w6.transpose(2, 3, 1, 0).reshape(25088, 4096), sd["classifier.0.bias"]]
  layers["fc2"] = [sd["classifier.3.weight"].T, sd["classifier.3.bias"]]
  layers["predictions"] = [sd["classifier.6.weight"].T, sd["classifier.6.bias"]]
  return layers


def write_keras_h5(path: pathlib.Path, layers: dict[str, list[np.ndarray] | list[tuple]]) -> None:
  """Classic Keras layout (as in the official file): top-level groups, attrs layer_names /
  weight_names, weights named `<layer>_W_1:0` / `<layer>_b_1:0`. Shape tuples instead of
  arrays make unwritten (tiny) datasets for the refusal tests. Weightless layers included."""
  pools = {"block1_conv2": "block1_pool", "block2_conv2": "block2_pool",
           "block3_conv3": "block3_pool", "block4_conv3": "block4_pool",
           "block5_conv3": "block5_pool"}
  order = ["input_1"]
  for name in KERAS_CONVS:
    order += [name] + ([pools[name]] if name in pools else [])
  order += ["flatten", "fc1", "fc2", "predictions"]
  weightless = {"input_1", "flatten", *pools.values()}
  order = [n for n in order if n in layers or n in weightless]
  order += [n for n in layers if n not in order]
  with h5py.File(path, "w") as f:
    f.attrs["keras_version"] = b"1.2.2"
    f.attrs["backend"] = b"tensorflow"
    f.attrs["layer_names"] = [n.encode() for n in order]
    for name in order:
      g = f.create_group(name)
      weights = layers.get(name, [])
      wnames = [f"{name}_{part}_1:0" for part in ("W", "b")][:len(weights)]
      g.attrs["weight_names"] = [n.encode() for n in wnames]
      for n, w in zip(wnames, weights):
        if isinstance(w, tuple):
          g.create_dataset(n, shape=w, dtype=np.float32)
        else:
          g.create_dataset(n, data=w)


def test_keras_port_matches_numpy_reference(tmp_path, photos, torchvision_sd, caplog):
  # Saving/loading and the launcher are covered by the torchvision test: port only.
  layers = keras_layers_from(torchvision_sd)
  src = tmp_path / "vgg16_keras_random.h5"
  write_keras_h5(src, layers)
  with caplog.at_level(logging.WARNING):
    params, info = porting.port("vgg16", "keras", src)
  assert "unknown checksum" in caplog.text
  checkpoint.check_tree(params, backbones.get("vgg16").param_shapes(), what="ported")
  assert info.source == "keras" and info.source_file == src.name
  assert info.source_sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
  assert info.preprocessing == pp.CAFFE

  ref = numpy_keras_reference(layers, photos["224"])
  got = flax_forward(params, info, photos["224"])
  for name in POOLS + ("fc6", "fc7", "logits"):
    err = rel_err(got[name], ref[name])
    assert err <= RTOL, f"{name}: relative error {err:.2e}"


# ------------------------------------------------------------------- no-top (conv layers only)

def test_keras_notop_port_through_launcher(tmp_path, torchvision_sd):
  """A Keras no-top file: ported by the launcher with a checksum warning; loads as conv-only."""
  layers = {k: v for k, v in keras_layers_from(torchvision_sd).items() if k in KERAS_CONVS}
  src = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
  write_keras_h5(src, layers)
  out = tmp_path / "weights"
  proc = run_port("--model=vgg16", "--source=keras", f"--input={src}", f"--output={out}")
  assert proc.returncode == 0, proc.stderr
  md5 = hashlib.md5(src.read_bytes()).hexdigest()
  assert (f"unknown checksum (md5 {md5}; official vgg16_weights_tf_dim_ordering_tf_kernels_"
          "notop.h5 has md5 6d6bbae143d832006294945121d1f1fc); porting anyway") in proc.stderr
  assert "no FC layers" in proc.stdout

  info = checkpoint.read_info(out)
  assert info.has_fc is False and info.source == "keras" and info.preprocessing == pp.CAFFE
  params, loaded = weights_lib.load("vgg16", out)
  assert loaded == info and len(params) == 13 and not any(k.startswith("fc") for k in params)
  for flax_name, layer in zip(sorted(params, key=_conv_order), KERAS_CONVS):
    np.testing.assert_array_equal(params[flax_name]["kernel"], layers[layer][0])  # HWIO as is
    np.testing.assert_array_equal(params[flax_name]["bias"], layers[layer][1])


def _conv_order(name: str) -> tuple[int, int]:
  b, i = name.removeprefix("conv").split("_")
  return int(b), int(i)


def test_keras_notop_official_checksum_is_not_warned_about(tmp_path, monkeypatch, caplog):
  layers = {k: v for k, v in _cheap_keras().items() if k in KERAS_CONVS}
  src = tmp_path / "notop.h5"
  write_keras_h5(src, layers)
  md5 = hashlib.md5(src.read_bytes()).hexdigest()
  # The full file's checksum does not make a no-top file official...
  monkeypatch.setattr(vgg_porting, "KERAS_MD5", md5)
  with caplog.at_level(logging.WARNING):
    _, info = porting.port("vgg16", "keras", src)
  assert info.has_fc is False and "unknown checksum" in caplog.text
  # ... its own does.
  caplog.clear()
  monkeypatch.setattr(vgg_porting, "KERAS_NOTOP_MD5", md5)
  with caplog.at_level(logging.WARNING):
    porting.port("vgg16", "keras", src)
  assert "unknown checksum" not in caplog.text


def test_torchvision_features_only_port(tmp_path, torchvision_sd, caplog):
  sd = {k: v for k, v in torchvision_sd.items() if k.startswith("features.")}
  src = tmp_path / "vgg16_features.pth"
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, src)
  with caplog.at_level(logging.WARNING):
    info = porting.port_and_save("vgg16", "torchvision", src, tmp_path / "w")
  assert "a features-only state dict" in caplog.text and "vgg16-397923af.pth" in caplog.text
  assert info.has_fc is False and info.preprocessing == pp.TORCHVISION
  params, _ = weights_lib.load("vgg16", tmp_path / "w")
  assert not any(k.startswith("fc") for k in params) and len(params) == 13
  for flax_name, idx in zip(sorted(params, key=_conv_order), TORCH_CONV_IDX):
    np.testing.assert_array_equal(params[flax_name]["kernel"],
                                  sd[f"features.{idx}.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params[flax_name]["bias"], sd[f"features.{idx}.bias"])


@pytest.mark.parametrize("source, keep, message", [
    ("keras", ("fc1",), "missing layer fc2"),
    ("keras", ("fc1", "fc2"), "missing layer predictions"),
    ("torchvision", ("classifier.0.weight", "classifier.0.bias"),
     "missing tensor classifier.3.weight"),
    ("torchvision", ("classifier.6.bias",), "missing tensor classifier.0.weight"),
], ids=["keras_fc1_only", "keras_no_predictions", "torch_fc6_only", "torch_one_bias"])
def test_some_fc_layers_but_not_all_are_refused(tmp_path, source, keep, message):
  """A file with any FC layer is a full file and must have all of them (no silent no-top)."""
  path = tmp_path / "partial"
  if source == "keras":
    layers = {k: v for k, v in _cheap_keras().items() if k in KERAS_CONVS or k in keep}
    write_keras_h5(path, layers)
  else:
    sd = {k: v for k, v in _cheap_sd().items() if k.startswith("features.") or k in keep}
    torch.save(sd, path)
  with pytest.raises(WeightsError, match=message):
    porting.port("vgg16", source, path)


def test_weights_info_has_fc_field():
  info = checkpoint.WeightsInfo(model="vgg16", preprocessing=pp.CAFFE, source="keras",
                                has_fc=False)
  assert checkpoint.WeightsInfo.from_dict(info.to_dict()) == info
  old = info.to_dict()
  del old["has_fc"]  # weights.json written before the field: those weights had FC layers
  assert checkpoint.WeightsInfo.from_dict(old).has_fc is True
  with pytest.raises(ValueError, match="has_fc must be true or false"):
    checkpoint.WeightsInfo.from_dict({**info.to_dict(), "has_fc": "false"})


def test_check_kinds():
  full = checkpoint.WeightsInfo(model="vgg16", preprocessing=pp.CAFFE, source="keras")
  notop = dataclasses.replace(full, has_fc=False,
                              source_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")
  weights_lib.check_kinds(full, ["fc", "conv", "fc_conv", "mac", "spoc", "gem"])
  weights_lib.check_kinds(notop, ["conv", "mac", "spoc", "gem"])
  for kinds, named in ((["conv", "fc"], "fc"), (["fc_conv"], "fc_conv"),
                       (["fc", "fc_conv"], "fc, fc_conv")):
    with pytest.raises(ValueError) as e:
      weights_lib.check_kinds(notop, kinds)
    msg = str(e.value)
    assert isinstance(e.value, WeightsError)
    assert f"descriptor kind(s) {named} need" in msg and "have no FC layers" in msg
    assert "_notop.h5" in msg  # where these weights came from
    # Which files would do, the weights' own source first; what works with these weights.
    assert ("vgg16_weights_tf_dim_ordering_tf_kernels.h5 (keras) or vgg16-397923af.pth "
            "(torchvision)") in msg
    assert msg.endswith("ask for conv, mac, spoc, gem")
  tv = dataclasses.replace(notop, source="torchvision")
  with pytest.raises(ValueError, match=r"vgg16-397923af\.pth \(torchvision\) or "
                                       r"vgg16_weights_tf_dim_ordering_tf_kernels\.h5 \(keras\)"):
    weights_lib.check_kinds(tv, ["fc"])


# ----------------------------------------------------------------------------- refusals

def _cheap_sd() -> dict[str, "torch.Tensor"]:
  """Right names and shapes as stride-0 tensors: KiBs on disk, not 528 MiB."""
  return {k: torch.zeros(()).expand(shape)
          for k, shape in vgg_porting.torchvision_shapes().items()}


def _cheap_keras() -> dict[str, list[tuple]]:
  """Right layers and shapes; written as unallocated datasets (tiny file)."""
  return {k: [kshape, bshape] for k, (kshape, bshape) in vgg_porting.keras_shapes().items()}


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.update({"classifier.0.weight": torch.zeros(()).expand(4096, 512 * 6 * 6)}),
     "tensor classifier.0.weight has shape (4096, 18432), expected (4096, 25088)"),
    (lambda sd: sd.pop("features.28.bias"), "missing tensor features.28.bias"),
    (lambda sd: sd.update({"features.30.weight": torch.zeros(3)}), "unexpected tensor features.30"),
], ids=["wrong_shape", "missing", "unexpected"])
def test_torchvision_refuses_bad_tensors(tmp_path, edit, message):
  sd = _cheap_sd()
  edit(sd)
  path = tmp_path / "bad.pth"
  torch.save(sd, path)
  assert path.stat().st_size < 1 << 20
  with pytest.raises(WeightsError, match=message.replace("(", r"\(").replace(")", r"\)")):
    porting.port("vgg16", "torchvision", path)


def test_torchvision_refuses_truncated_file(tmp_path):
  path = tmp_path / "vgg16.pth"
  torch.save(_cheap_sd(), path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(WeightsError, match="cannot be read as a PyTorch file"):
    porting.port("vgg16", "torchvision", path)


class _RunsCodeOnLoad:
  """A pickle payload that would create a directory if it were ever unpickled fully."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (os.makedirs, (self.marker,))


def test_torchvision_refuses_code_in_pickle(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  sd = _cheap_sd()
  sd["features.0.weight"] = _RunsCodeOnLoad(str(marker))
  torch.save(sd, path)
  with pytest.raises(WeightsError, match="refused by weights-only loading.*os.makedirs"):
    porting.port("vgg16", "torchvision", path)
  assert not marker.exists()


@pytest.mark.parametrize("edit, message", [
    (lambda ls: ls.update({"fc1": [(512 * 6 * 6, 4096), (4096,)]}),
     "tensor fc1/kernel has shape (18432, 4096), expected (25088, 4096)"),
    (lambda ls: ls.update({"block3_conv1": [(3, 3, 128, 256), (128,)]}),
     "tensor block3_conv1/bias has shape (128,), expected (256,)"),
    (lambda ls: ls.pop("block5_conv3"), "missing layer block5_conv3"),
    (lambda ls: ls.update({"fc3": [(4, 4), (4,)]}), "unexpected layer with weights fc3"),
], ids=["wrong_kernel_shape", "wrong_bias_shape", "missing", "unexpected"])
def test_keras_refuses_bad_tensors(tmp_path, edit, message):
  layers = _cheap_keras()
  edit(layers)
  path = tmp_path / "bad.h5"
  write_keras_h5(path, layers)
  assert path.stat().st_size < 1 << 20
  with pytest.raises(WeightsError, match=message.replace("(", r"\(").replace(")", r"\)")):
    porting.port("vgg16", "keras", path)


def test_keras_refuses_truncated_file(tmp_path):
  path = tmp_path / "vgg16.h5"
  write_keras_h5(path, _cheap_keras())
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(WeightsError, match="cannot be read as an HDF5 file"):
    porting.port("vgg16", "keras", path)


def test_missing_file_and_non_empty_output(tmp_path):
  with pytest.raises(WeightsError, match="no such weights file"):
    porting.port("vgg16", "keras", tmp_path / "nope.h5")
  keep = tmp_path / "out" / "precious.txt"
  keep.parent.mkdir()
  keep.write_text("x")
  with pytest.raises(WeightsError, match="not empty"):
    porting.port_and_save("vgg16", "keras", tmp_path / "nope.h5", keep.parent)
  assert keep.read_text() == "x"


def test_launcher_prints_one_line_error(tmp_path):
  sd = _cheap_sd()
  del sd["classifier.6.weight"]
  path = tmp_path / "bad.pth"
  torch.save(sd, path)
  proc = run_port("--model=vgg16", "--source=torchvision", f"--input={path}",
                  f"--output={tmp_path / 'out'}")
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("port_weights: error: ") and "missing tensor classifier.6.weight" in last
  assert not (tmp_path / "out").exists()
