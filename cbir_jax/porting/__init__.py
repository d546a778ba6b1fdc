"""Weight porting: other frameworks' files -> Flax params + WeightsInfo.

One module per source format. Each porter reads a file without executing code
from it (torch.load(weights_only=True), h5py), checks every tensor name and
shape, and returns float32 Flax params plus the preprocessing those weights
were trained with.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable, Mapping

from cbir_jax.checkpoint import WeightsError, WeightsInfo
from cbir_jax.choices import Model

# (model, source) -> porter(path) -> (params, WeightsInfo). Filled by the porter modules.
Porter = Callable[[str | os.PathLike], tuple[Any, WeightsInfo]]
PORTERS: dict[tuple[str, str], Porter] = {}
# model -> {source: the official file with the FC head}, for messages about no-top weights.
FULL_FILES: dict[str, dict[str, str]] = {}


@dataclasses.dataclass
class PortConfig:
  """One run of launch/port_weights.py (the arguments of `port_and_save`).

  Attributes:
    model: backbone the weights are for.
    input: weights file to port (a torchvision or EfficientNet-Lite .pth, a Keras .h5).
    output: weights directory to write.
    source: format of `input`: torchvision, keras or efficientnet_lite_pytorch (default:
      the model's only one).
    overwrite: replace a non-empty `output` directory.
  """
  model: Model
  input: str
  output: str
  source: str | None = None
  overwrite: bool = False


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
  if not pathlib.Path(path).is_file():
    raise WeightsError(f"{path}: no such weights file")
  return fn(path)


def _torch_detail(e: Exception) -> str:
  """The informative line of torch's long weights-only error (what it refused)."""
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  rest = [ln for ln in lines[1:] if not ln.startswith(("Please file", "Check the documentation"))]
  return (rest or lines or [type(e).__name__])[0]


def torch_state_dict(path: str | os.PathLike) -> dict[str, Any]:
  """A PyTorch file's tensors by name, read without executing code from it."""
  import pickle

  import torch  # the `port` extra; users of the shipped weights never import it

  try:
    # weights_only: the unpickler only builds tensors and plain containers, so a
    # file crafted to run code on load is refused instead of executed.
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise WeightsError(
        f"{path}: refused by weights-only loading (weights_only=True): its pickle asks for "
        "more than tensors and plain containers (a file that would run code on load, or a "
        f"damaged one); not loaded. torch said: {_torch_detail(e)}") from e
  except Exception as e:  # torch raises RuntimeError, EOFError, ... for damaged files
    raise WeightsError(f"{path}: cannot be read as a PyTorch file "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                       "is it truncated or not a .pth?") from e
  if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
    sd = sd["state_dict"]  # training checkpoints wrap the weights
  if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
    raise WeightsError(f"{path}: expected a state dict (name -> tensor), got {type(sd).__name__}")
  return dict(sd)


def _load_porters() -> None:
  # Imported lazily: porter modules import torch/h5py, which users of the
  # shipped checkpoints never need.
  import importlib
  for name in ("vgg", "efficientnet_lite"):
    importlib.import_module(f"cbir_jax.porting.{name}")


def full_files(model: str, source: str = "") -> list[str]:
  """Official files of `model` with its FC layers, as "file (source)", `source`'s first."""
  _load_porters()
  files = FULL_FILES.get(model, {})
  order = sorted(files, key=lambda s: (s != source, s))
  return [f"{files[s]} ({s})" for s in order]


def sources(model: str) -> list[str]:
  """The source formats registered for `model`."""
  _load_porters()
  return sorted(s for m, s in PORTERS if m == model)


def port_and_save(model: str, source: str | None, input_path: str | os.PathLike,
                  output_dir: str | os.PathLike, *, overwrite: bool = False) -> WeightsInfo:
  """Ports a weights file, checks it against the backbone's parameters and saves it (see
  `PortConfig`; a non-empty `output_dir` is refused without `overwrite`, so that nothing is
  lost). Returns the saved WeightsInfo (with params_sha256 set)."""
  from cbir_jax import backbones, checkpoint

  backbone = backbones.get(model)  # unknown model: clear error before reading the file
  out = pathlib.Path(output_dir)
  if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
    raise checkpoint.WeightsError(f"{out}: exists and is not empty; choose another output "
                                  "directory or pass overwrite")
  if source is None:
    known = sources(model)
    if len(known) != 1:
      raise ValueError(f"model {model!r} has porters for {known or 'no source'}: choose a source")
    source = known[0]
  params, info = port(model, source, input_path)
  if info.model != model:
    raise checkpoint.WeightsError(f"{input_path}: porter gave weights for {info.model!r}, "
                                  f"not {model!r}")
  if not info.has_fc:
    backbone = backbone.without_fc()  # a no-top file: conv layers only
  checkpoint.check_tree(params, backbone.param_shapes(), what=str(input_path))
  return checkpoint.save(out, params, info)
