"""Backbone registry: name -> `Backbone`. A new network registers here only.

Test-only variants are registered hidden: `get` finds them, but `names()` (what launchers
offer as `--model`) lists them only when $CBIR_JAX_TEST_BACKBONES=1 (tests/conftest.py sets it).
"""
from __future__ import annotations

import os

from cbir_jax import preprocessing as pp
from cbir_jax.backbones import efficientnet_lite, vgg
from cbir_jax.backbones.base import Backbone, Features

BACKBONES: dict[str, Backbone] = {}
HIDDEN: set[str] = set()  # test-only: left out of names() unless TEST_BACKBONES_ENV is "1"
TEST_BACKBONES_ENV = "CBIR_JAX_TEST_BACKBONES"


def register(backbone: Backbone, *, hidden: bool = False) -> Backbone:
  BACKBONES[backbone.name] = backbone
  if hidden:
    HIDDEN.add(backbone.name)
  return backbone


def names(*, include_hidden: bool | None = None) -> tuple[str, ...]:
  """Registered names, sorted; test-only ones only with $CBIR_JAX_TEST_BACKBONES=1 (or if asked)."""
  if include_hidden is None:
    include_hidden = os.environ.get(TEST_BACKBONES_ENV) == "1"
  return tuple(sorted(n for n in BACKBONES if include_hidden or n not in HIDDEN))


# What each VGG and each EfficientNet-Lite shares; fc_params are the layers no-top weights lack
# (see Backbone.without_fc).
_VGG = dict(block_names=("pool1", "pool2", "pool3", "pool4", "pool5"), fc_names=("fc6", "fc7"),
            preprocessing=pp.TORCHVISION, fc_params=("fc6", "fc7", "fc8"))
_LITE = dict(block_names=("block1", "block2", "block3", "block4", "block5"),
             fc_names=("pooled",), preprocessing=pp.EFFICIENTNET_LITE)

register(Backbone(name="vgg16", make_module=vgg.VGG16, block_channels=(64, 128, 256, 512, 512),
                  fc_dim=8192, **_VGG))
# Test-only: same structure as VGG16 at a fraction of the cost.
register(Backbone(name="vgg_tiny", make_module=vgg._VGGTiny, block_channels=(4, 8, 8, 16, 16),
                  fc_dim=64, **_VGG), hidden=True)
# EfficientNet-Lite0: blocks 1-4 are the last MBConv output at strides 2-16,
# block 5 the 1280-channel head at stride 32 (see efficientnet_lite.EfficientNetLite).
register(Backbone(name="efficientnet_lite0", make_module=efficientnet_lite.EfficientNetLite0,
                  block_channels=(16, 24, 40, 112, 1280), fc_dim=1280, **_LITE))
# Test-only: same structure as EfficientNet-Lite0 at a fraction of the cost.
register(Backbone(name="efficientnet_lite_tiny",
                  make_module=efficientnet_lite._EfficientNetLiteTiny,
                  block_channels=(8, 8, 16, 16, 32), fc_dim=32, **_LITE), hidden=True)

# The one whose real ImageNet weights ship in weights/; VGG16 is one flag away.
DEFAULT_BACKBONE = "efficientnet_lite0"


def get(name: str) -> Backbone:
  """Returns a registered backbone, with a clear error for unknown names."""
  try:
    return BACKBONES[name]
  except KeyError:
    raise ValueError(f"unknown backbone {name!r}; known: {list(names())}") from None


__all__ = ["Backbone", "Features", "BACKBONES", "DEFAULT_BACKBONE", "HIDDEN", "get", "names",
           "register"]
