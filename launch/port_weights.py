"""Ports a pretrained weights file (PyTorch / Keras) into a cbir_jax weights directory.

Example:
  python launch/port_weights.py --model=vgg16 --source=torchvision
    --input=vgg16-397923af.pth --output=weights/vgg16_torchvision
A VGG16 file with the conv layers only (Keras' ..._notop.h5, a torchvision state
dict of features.* only) gives weights without FC layers: conv, mac, spoc, gem.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from cbir_jax import backbones, porting
from cbir_jax import descriptors as desc

_MODEL = flags.DEFINE_string("model", backbones.DEFAULT_BACKBONE, "Backbone name.")
_SOURCE = flags.DEFINE_string(
    "source", None, "Format of --input: torchvision | keras | efficientnet_lite_pytorch "
    "(default: the model's only one).")
_INPUT = flags.DEFINE_string("input", None, "Weights file to port.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Weights directory to write.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output directory.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # orbax's INFO lines would bury the checksum warning
    logging.set_verbosity(logging.WARNING)
  try:
    info = porting.port_and_save(_MODEL.value, _SOURCE.value, _INPUT.value, _OUTPUT.value,
                                 overwrite=_OVERWRITE.value)
  except (ValueError, OSError) as e:  # WeightsError is a ValueError
    sys.exit(f"port_weights: error: {e}")
  logging.info("wrote %s: model %s from %s %s (sha256 %s), preprocessing %s",
               _OUTPUT.value, info.model, info.source, info.source_file, info.source_sha256,
               info.preprocessing.name)
  usable = ", ".join(k for k in desc.KINDS if k not in desc.FC_KINDS)
  head = "" if info.has_fc else f", no FC layers (descriptor kinds {usable})"
  print(f"{_OUTPUT.value}: {info.model} from {info.source} ({info.source_file}), "
        f"preprocessing {info.preprocessing.name}{head}, params sha256 "
        f"{info.params_sha256[:12]}")


if __name__ == "__main__":
  app.run(main)
