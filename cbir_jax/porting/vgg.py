"""VGG16 weights from torchvision (.pth state dict) and Keras (.h5) into cbir_jax's Flax VGG16.

Both porters check every tensor name and shape against the source layout
before converting anything, so a wrong file fails fast with the first mismatch.
SPEC.md section 6 lists what each source needs (layout, FC6 order, preprocessing).
A file with the 13 conv layers and none of the FC layers (Keras' `..._notop.h5`,
a torchvision state dict of `features.*` only) ports as weights without FC
layers (`WeightsInfo.has_fc` False); one with some FC layers must have all.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any, Mapping

import numpy as np
from absl import logging

from cbir_jax import preprocessing as pp
from cbir_jax.backbones.vgg import VGG16_BLOCKS
from cbir_jax.checkpoint import WeightsError, WeightsInfo, check_shapes, file_sha256
from cbir_jax.porting import FULL_FILES, register, torch_state_dict

MODEL = "vgg16"
NUM_CLASSES = 1000
FC_DIM = 4096
POOL5_HW = (7, 7)  # FC6 sees pool5 adaptive-pooled to 7x7 in both sources

# torchvision embeds the first 8 hex digits of the file's SHA-256 in its name.
TORCHVISION_SHA256_PREFIX = "397923af"
TORCHVISION_FILE = "vgg16-397923af.pth"
# keras.applications checks this md5 ("file_hash") when it downloads the file.
KERAS_MD5 = "64373286793e3c8b2b4e3219cbf3544b"
KERAS_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
KERAS_NOTOP_MD5 = "6d6bbae143d832006294945121d1f1fc"
KERAS_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
FULL_FILES[MODEL] = {"keras": KERAS_FILE, "torchvision": TORCHVISION_FILE}


def _conv_layers() -> tuple[tuple[str, str, int, int], ...]:
  """(Flax name, Keras name, in channels, out channels) of the 13 convs, in network order."""
  convs, cin = [], 3
  for b, (n, cout) in enumerate(VGG16_BLOCKS, start=1):
    for i in range(1, n + 1):
      convs.append((f"conv{b}_{i}", f"block{b}_conv{i}", cin, cout))
      cin = cout
  return tuple(convs)


_CONVS = _conv_layers()
# torchvision's `features` index of each conv (ReLUs and pools take the others).
_TORCH_CONV_INDEX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_FC6_IN = VGG16_BLOCKS[-1][1] * POOL5_HW[0] * POOL5_HW[1]
# (flax name, torch classifier index, keras layer, in, out)
_FCS: tuple[tuple[str, int, str, int, int], ...] = (
    ("fc6", 0, "fc1", _FC6_IN, FC_DIM),
    ("fc7", 3, "fc2", FC_DIM, FC_DIM),
    ("fc8", 6, "predictions", FC_DIM, NUM_CLASSES),
)


# ---------------------------------------------------------------------------- torchvision

def torchvision_shapes(*, with_fc: bool = True) -> dict[str, tuple[int, ...]]:
  """State-dict names and shapes of torchvision's VGG16 (`features.*` only without FC)."""
  shapes: dict[str, tuple[int, ...]] = {}
  for idx, (_, _, cin, cout) in zip(_TORCH_CONV_INDEX, _CONVS):
    shapes[f"features.{idx}.weight"] = (cout, cin, 3, 3)
    shapes[f"features.{idx}.bias"] = (cout,)
  for _, idx, _, fin, fout in _FCS if with_fc else ():
    shapes[f"classifier.{idx}.weight"] = (fout, fin)
    shapes[f"classifier.{idx}.bias"] = (fout,)
  return shapes


def _warn_unknown_torchvision(path: pathlib.Path, sha256: str, *, has_fc: bool) -> None:
  if has_fc and sha256.startswith(TORCHVISION_SHA256_PREFIX):
    return
  stem = path.stem.rsplit("-", 1)
  if len(stem) == 2 and len(stem[1]) == 8 and not sha256.startswith(stem[1].lower()):
    # torch.hub names files <name>-<sha256 prefix>: a mismatch means a damaged download.
    logging.warning("%s: SHA-256 %s does not start with %s from its file name: the file may be "
                    "damaged or renamed", path, sha256, stem[1])
  if has_fc:
    logging.warning("%s: unknown checksum (SHA-256 %s; official %s starts with %s); porting "
                    "anyway", path, sha256, TORCHVISION_FILE, TORCHVISION_SHA256_PREFIX)
  else:  # torchvision publishes no conv-only file, so there is nothing to compare with
    logging.warning("%s: unknown checksum (SHA-256 %s): a features-only state dict, not an "
                    "official torchvision file (that is %s, with FC layers); porting anyway",
                    path, sha256, TORCHVISION_FILE)


def params_from_torchvision(sd: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """Converts a torchvision VGG16 state dict (numpy arrays, shapes checked) to Flax params.

  Conv OIHW -> HWIO; Linear [out, in] -> Dense [in, out]. torchvision flattens
  pool5 as C,H,W while the Flax model flattens NHWC as H,W,C, so FC6's input
  rows are permuted. A state dict without `classifier.*` gives conv params only.
  """
  params: dict[str, dict[str, np.ndarray]] = {}
  for idx, (name, _, _, _) in zip(_TORCH_CONV_INDEX, _CONVS):
    params[name] = {"kernel": np.transpose(sd[f"features.{idx}.weight"], (2, 3, 1, 0)),
                    "bias": sd[f"features.{idx}.bias"]}
  for name, idx, _, fin, fout in _FCS if _has_classifier(sd) else ():
    w = sd[f"classifier.{idx}.weight"]
    if name == "fc6":
      c = VGG16_BLOCKS[-1][1]
      # [out, C, H, W] -> [H, W, C, out] -> [H*W*C, out]
      kernel = np.transpose(w.reshape(fout, c, *POOL5_HW), (2, 3, 1, 0)).reshape(fin, fout)
    else:
      kernel = w.T
    params[name] = {"kernel": kernel, "bias": sd[f"classifier.{idx}.bias"]}
  return {k: {n: np.ascontiguousarray(a, np.float32) for n, a in v.items()}
          for k, v in params.items()}


def _has_classifier(sd: Mapping[str, Any]) -> bool:
  # Any classifier tensor means a full file, which must then have all of them.
  return any(k.startswith("classifier.") for k in sd)


@register(MODEL, "torchvision")
def port_torchvision(path: str | os.PathLike) -> tuple[dict[str, Any], WeightsInfo]:
  """Reads torchvision's `vgg16-397923af.pth` (or a state dict of the same layout: keys
  `features.N.weight/bias` and `classifier.{0,3,6}.weight/bias`, or `features.*` only, which
  gives the params of `backbones.get("vgg16").without_fc()` and `has_fc` False)."""
  path = pathlib.Path(path)
  sd = torch_state_dict(path)
  has_fc = _has_classifier(sd)
  check_shapes({k: tuple(v.shape) for k, v in sd.items()}, torchvision_shapes(with_fc=has_fc),
               what=str(path))
  for k, v in sd.items():
    if not v.is_floating_point():
      raise WeightsError(f"{path}: tensor {k} has dtype {v.dtype}, expected floating point")
  params = params_from_torchvision({k: v.detach().float().numpy() for k, v in sd.items()})
  sha = file_sha256(path)
  _warn_unknown_torchvision(path, sha, has_fc=has_fc)
  return params, WeightsInfo(model=MODEL, preprocessing=pp.TORCHVISION, source="torchvision",
                             source_file=path.name, source_sha256=sha, has_fc=has_fc)


# ---------------------------------------------------------------------------------- Keras

def keras_shapes(*, with_fc: bool = True) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
  """Keras layer names -> (kernel shape, bias shape), in network order (convs only without FC)."""
  shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
  for _, layer, cin, cout in _CONVS:
    shapes[layer] = ((3, 3, cin, cout), (cout,))
  for _, _, layer, fin, fout in _FCS if with_fc else ():
    shapes[layer] = ((fin, fout), (fout,))
  return shapes


def _h5_names(attrs: Any, key: str) -> list[str] | None:
  """A list-of-strings attribute as Keras writes it (bytes or str, possibly chunked)."""
  if key in attrs:
    values = list(attrs[key])
  elif f"{key}0" in attrs:  # Keras splits attributes over 64 KiB into key0, key1, ...
    values, n = [], 0
    while f"{key}{n}" in attrs:
      values.extend(attrs[f"{key}{n}"])
      n += 1
  else:
    return None
  return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _keras_layers(root: Any, what: str) -> dict[str, list[Any]]:
  """Layer name -> its weight datasets (not read yet) in saved order, for layers with weights."""
  layers = _h5_names(root.attrs, "layer_names")
  if layers is None:
    raise WeightsError(f"{what}: not a Keras weights file (no 'layer_names' attribute)")
  out: dict[str, list[Any]] = {}
  for layer in layers:
    if layer not in root:
      raise WeightsError(f"{what}: layer {layer} is listed but has no group")
    names = _h5_names(root[layer].attrs, "weight_names")
    if names is None:
      raise WeightsError(f"{what}: layer {layer} has no 'weight_names' attribute")
    if names:
      out[layer] = [root[layer][n] for n in names]
  return out


def _keras_has_fc(layers: Mapping[str, list[Any]]) -> bool:
  # A no-top file has none of the FC layers; one that has any must have all.
  return any(layer in layers for _, _, layer, _, _ in _FCS)


def _check_keras(layers: Mapping[str, list[Any]], what: str) -> None:
  """Names and shapes only, so a wrong file fails before anything large is read."""
  expected = keras_shapes(with_fc=_keras_has_fc(layers))
  for layer, (kshape, bshape) in expected.items():
    if layer not in layers:
      raise WeightsError(f"{what}: missing layer {layer} (expected kernel {kshape}, bias {bshape})")
    arrays = layers[layer]
    if len(arrays) != 2:
      raise WeightsError(f"{what}: layer {layer} has {len(arrays)} weights, expected 2 "
                         "(kernel, bias)")
    for part, a, shape in (("kernel", arrays[0], kshape), ("bias", arrays[1], bshape)):
      if tuple(a.shape) != shape:
        raise WeightsError(f"{what}: tensor {layer}/{part} has shape {tuple(a.shape)}, "
                           f"expected {shape}")
      if not np.issubdtype(a.dtype, np.floating):
        raise WeightsError(f"{what}: tensor {layer}/{part} has dtype {a.dtype}, "
                           "expected floating point")
  extra = [n for n in layers if n not in expected]
  if extra:
    raise WeightsError(f"{what}: unexpected layer with weights {extra[0]} "
                       f"({len(extra)} unexpected in all)")


def _read_keras(path: pathlib.Path) -> dict[str, list[np.ndarray]]:
  """Checked float32 [kernel, bias] per Keras layer name."""
  import h5py

  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise WeightsError(f"{path}: cannot be read as an HDF5 file ({e}); "
                       "is it truncated or not a Keras .h5?") from e
  try:
    with f:
      root = f
      if "layer_names" not in f.attrs and "model_weights" in f:
        root = f["model_weights"]  # a whole saved model: the weights live in this group
      layers = _keras_layers(root, str(path))
      _check_keras(layers, str(path))
      return {layer: [np.asarray(d, np.float32) for d in ds] for layer, ds in layers.items()}
  except WeightsError:
    raise
  except (OSError, KeyError, ValueError, TypeError) as e:  # damaged datasets show up on read
    raise WeightsError(f"{path}: cannot be read as a Keras weights file "
                       f"({type(e).__name__}: {e}); is it truncated?") from e


@register(MODEL, "keras")
def port_keras(path: str | os.PathLike) -> tuple[dict[str, Any], WeightsInfo]:
  """Reads Keras' `vgg16_weights_tf_dim_ordering_tf_kernels.h5` or its `..._notop.h5`.

  Classic Keras 1/2 layout: layers `block{b}_conv{i}`, then `fc1`, `fc2`,
  `predictions` (absent from the no-top file, which ports as `has_fc` False), each with
  [kernel, bias] listed in its `weight_names` attribute. Kernels are HWIO and FC1 expects
  pool5 flattened as H,W,C: exactly the Flax model's layout, so only names
  change. These are caffe weights: BGR input, mean removed.
  """
  path = pathlib.Path(path)
  layers = _read_keras(path)
  has_fc = _keras_has_fc(layers)
  flax_name = {layer: name for name, layer, _, _ in _CONVS}
  flax_name.update({layer: name for name, _, layer, _, _ in _FCS})
  params = {flax_name[layer]: {"kernel": np.ascontiguousarray(k, np.float32),
                               "bias": np.ascontiguousarray(b, np.float32)}
            for layer, (k, b) in layers.items()}
  with open(path, "rb") as f:
    md5 = hashlib.file_digest(f, "md5").hexdigest()
  official, official_md5 = (KERAS_FILE, KERAS_MD5) if has_fc else (KERAS_NOTOP_FILE,
                                                                    KERAS_NOTOP_MD5)
  if md5 != official_md5:
    logging.warning("%s: unknown checksum (md5 %s; official %s has md5 %s); porting anyway",
                    path, md5, official, official_md5)
  return params, WeightsInfo(model=MODEL, preprocessing=pp.CAFFE, source="keras",
                             source_file=path.name, source_sha256=file_sha256(path),
                             has_fc=has_fc)
