"""Weight porting: other frameworks' files -> Flax params + WeightsInfo.

One module per source format. Each porter reads a file without executing code
from it (torch.load(weights_only=True), h5py), checks every tensor name and
shape, and returns float32 Flax params plus the preprocessing those weights
were trained with.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from cbir_jax.checkpoint import WeightsInfo

# (model, source) -> porter(path) -> (params, WeightsInfo). Filled by the porter modules.
Porter = Callable[[str | os.PathLike], tuple[Any, WeightsInfo]]
PORTERS: dict[tuple[str, str], Porter] = {}


def register(model: str, source: str) -> Callable[[Porter], Porter]:
  def deco(fn: Porter) -> Porter:
    PORTERS[(model, source)] = fn
    return fn
  return deco


def port(model: str, source: str, path: str | os.PathLike) -> tuple[Any, WeightsInfo]:
  """Ports `path` for `model` from `source`; clear errors for unknown combinations."""
  _load_porters()
  try:
    fn = PORTERS[(model, source)]
  except KeyError:
    known = ", ".join(f"{m}/{s}" for m, s in sorted(PORTERS))
    raise ValueError(f"no porter for model {model!r} from source {source!r}; known: {known}") from None
  return fn(path)


def _load_porters() -> None:
  # Imported lazily: porter modules import torch/h5py, which users of the
  # shipped checkpoints never need.
  import importlib
  for name in ("vgg", "efficientnet_lite"):
    try:
      importlib.import_module(f"cbir_jax.porting.{name}")
    except ModuleNotFoundError as e:
      if e.name and e.name.startswith("cbir_jax"):
        continue  # porter module not written (yet)
      raise
