r"""Ports a pretrained weights file (PyTorch / Keras) into a cbir_jax weights directory.

  cbir-port --model=vgg16 --source=torchvision \
      --input=vgg16-397923af.pth --output=weights/vgg16_torchvision
A VGG16 file with the conv layers only (Keras' ..._notop.h5, a torchvision state
dict of features.* only) gives weights without FC layers: conv, mac, spoc, gem.
Flags are the fields of cbir_jax.porting.PortConfig (--model is required).
"""
from __future__ import annotations

from cbir_jax import cli, porting
from cbir_jax import descriptors as desc

FLAGS = cli.define(porting.PortConfig)


def main() -> None:
  c = FLAGS.config()
  info = porting.port_and_save(c.model, c.source, c.input, c.output, overwrite=c.overwrite)
  usable = ", ".join(k for k in desc.KINDS if k not in desc.FC_KINDS)
  head = "" if info.has_fc else f", no FC layers (descriptor kinds {usable})"
  print(f"{c.output}: {info.model} from {info.source} ({info.source_file}, sha256 "
        f"{info.source_sha256[:12]}), preprocessing {info.preprocessing.name}{head}, params "
        f"sha256 {info.params_sha256[:12]}")


def run() -> None:
  """The `cbir-port` console script."""
  cli.run("port_weights", main, gpu_warning=False)
