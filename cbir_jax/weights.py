"""Where the shipped weights live, and loading them for a backbone.

The repository's `weights/<model>/` holds ready checkpoints (no PyTorch needed);
CBIR_JAX_WEIGHTS_DIR points elsewhere, e.g. for an installed wheel.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

from cbir_jax import backbones, checkpoint

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
  return checkpoint.load(path, model=model, expected=backbone.param_shapes())
