"""Where the shipped weights live, and loading them for a backbone.

The repository's `weights/<model>/` holds ready checkpoints (no PyTorch needed);
CBIR_JAX_WEIGHTS_DIR points elsewhere, e.g. for an installed wheel.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Sequence

from cbir_jax import backbones, checkpoint
from cbir_jax import descriptors as desc

ENV_VAR = "CBIR_JAX_WEIGHTS_DIR"
_REPO_WEIGHTS = pathlib.Path(__file__).resolve().parents[1] / "weights"


def weights_root() -> pathlib.Path:
  """The folder holding one weights directory per model ($CBIR_JAX_WEIGHTS_DIR or repo/weights)."""
  env = os.environ.get(ENV_VAR)
  return pathlib.Path(env) if env else _REPO_WEIGHTS


def default_weights_dir(model: str) -> pathlib.Path:
  """The weights directory used when none is given: `weights_root() / model`."""
  return weights_root() / model


def load(model: str, directory: str | os.PathLike | None = None
         ) -> tuple[Any, checkpoint.WeightsInfo]:
  """Loads `model`'s weights, checked against its parameter shapes.

  Args:
    model: registered backbone name.
    directory: a weights directory; None means `default_weights_dir(model)`.

  Returns:
    (params, WeightsInfo); the info's preprocessing is the one to apply.

  Raises:
    WeightsError: missing directory (with how to make one), another model's
      weights, wrong shapes or a damaged checkpoint.
  """
  backbone = backbones.get(model)
  path = pathlib.Path(directory) if directory is not None else default_weights_dir(model)
  if not (path / checkpoint.INFO_FILE).is_file():
    msg = (f"{path}: no weights for model {model!r} there; make them with "
           "launch/port_weights.py (see weights/README.md)")
    if directory is None:
      msg += f", or set {ENV_VAR} to a folder that holds {model}/"
    raise checkpoint.WeightsError(msg)
  info = checkpoint.read_info(path)
  if not info.has_fc and info.model == model:  # another model's weights: load() says so
    try:
      backbone = backbone.without_fc()
    except ValueError as e:
      raise checkpoint.WeightsError(f"{path}: {checkpoint.INFO_FILE} says the weights have no "
                                    f"FC layers, but {e}") from None
  return checkpoint.load(path, model=model, expected=backbone.param_shapes())


def check_kinds(info: checkpoint.WeightsInfo, kinds: Sequence[str]) -> None:
  """Refuses descriptor kinds these weights cannot give; call it before reading any image.

  Weights without FC layers (`info.has_fc` False, e.g. ported from Keras'
  `vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`) give conv, mac, spoc
  and gem, not the kinds built from FC activations (`descriptors.FC_KINDS`).

  Args:
    info: the weights' record (from `load`, or `checkpoint.read_info(directory)`).
    kinds: the descriptor kinds asked for.

  Raises:
    WeightsError (a ValueError): an FC kind asked of weights without FC layers;
      the message names the files that have them.
  """
  need = [k for k in kinds if k in desc.FC_KINDS]
  if info.has_fc or not need:
    return
  from cbir_jax import porting  # light: porter modules import torch/h5py only when porting

  files = porting.full_files(info.model, info.source)
  where = (f"port a file that has them: {' or '.join(files)}" if files
           else f"use {info.model} weights that have them")
  usable = [k for k in desc.KINDS if k not in desc.FC_KINDS]
  raise checkpoint.WeightsError(
      f"descriptor kind(s) {', '.join(need)} need the network's FC layers, but these "
      f"{info.model} weights have no FC layers (ported from {info.source_file or info.source}, "
      f"conv layers only). For {', '.join(need)}, {where}; with these weights, ask for "
      f"{', '.join(usable)}")
