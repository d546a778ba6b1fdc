"""Backbone registry: name -> `Backbone`. A new network registers here only."""
from __future__ import annotations

from cbir_jax import preprocessing as pp
from cbir_jax.backbones import vgg
from cbir_jax.backbones.base import Backbone, Features

_VGG_BLOCKS = ("pool1", "pool2", "pool3", "pool4", "pool5")

BACKBONES: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
  BACKBONES[backbone.name] = backbone
  return backbone


register(Backbone(
    name="vgg16", make_module=vgg.VGG16, block_names=_VGG_BLOCKS, fc_names=("fc6", "fc7"),
    block_channels=(64, 128, 256, 512, 512), fc_dim=8192, preprocessing=pp.TORCHVISION))
# Test-only: same structure as VGG16 at a fraction of the cost.
register(Backbone(
    name="vgg_tiny", make_module=vgg._VGGTiny, block_names=_VGG_BLOCKS, fc_names=("fc6", "fc7"),
    block_channels=(4, 8, 8, 16, 16), fc_dim=64, preprocessing=pp.TORCHVISION))

DEFAULT_BACKBONE = "vgg16"  # becomes efficientnet_lite0 once it is registered


def get(name: str) -> Backbone:
  """Returns a registered backbone, with a clear error for unknown names."""
  try:
    return BACKBONES[name]
  except KeyError:
    raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}") from None


__all__ = ["Backbone", "Features", "BACKBONES", "DEFAULT_BACKBONE", "get", "register"]
