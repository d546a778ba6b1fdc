"""Where the shipped weights live, and loading the weights a job asks for or an index records.

The package's `pretrained/<model>/` holds the shipped checkpoints (no PyTorch needed; they
are in the wheel too); CBIR_JAX_WEIGHTS_DIR points to a folder of `<model>/` directories
to use others. Indexes record
weights by name and digest (`manifest.WeightsRecord`), so they keep working when the
checkout or that directory moves: `load_recorded` finds them again by digest.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Sequence

from cbir_jax import backbones, checkpoint
from cbir_jax import descriptors as desc
from cbir_jax import preprocessing as pp
from cbir_jax.manifest import WeightsRecord

ENV_VAR = "CBIR_JAX_WEIGHTS_DIR"
# Inside the package, so that a wheel or a plain `pip install .` carries them.
_SHIPPED = pathlib.Path(__file__).resolve().parent / "pretrained"


def default_weights_dir(model: str) -> pathlib.Path:
  """The weights directory used when none is given: `model`'s folder in $CBIR_JAX_WEIGHTS_DIR,
  else in the shipped ones."""
  return pathlib.Path(os.environ.get(ENV_VAR) or _SHIPPED) / model


def load(model: str, directory: str | os.PathLike | None = None
         ) -> tuple[Any, checkpoint.WeightsInfo]:
  """(params, WeightsInfo) of `model` from `directory` (None: `default_weights_dir(model)`),
  checked against its parameter shapes; the info's preprocessing is the one to apply.

  Raises:
    WeightsError: missing directory (with how to make one), another model's
      weights, wrong shapes or a damaged checkpoint.
  """
  backbone = backbones.get(model)
  path = pathlib.Path(directory) if directory is not None else default_weights_dir(model)
  if not (path / checkpoint.INFO_FILE).is_file():
    msg = (f"{path}: no weights for model {model!r} there; make them with "
           "cbir-port (see weights/README.md)")
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
  and gem, not the kinds built from FC activations (`descriptors.FC_KINDS`); the
  WeightsError names the files that have them.
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


def random_params(backbone: backbones.Backbone, image_size: int, seed: int = 0) -> Any:
  """`--weights=random`: `backbone.random_params(seed, image_size)` (NumPy, no compile)."""
  return backbone.random_params(seed, image_size)


class WeightsNotFound(checkpoint.WeightsError):
  """No weights with the recorded digest; `found` lists the digests of other weights seen."""

  def __init__(self, message: str, found: list[str]):
    super().__init__(message)
    self.found = found


@dataclasses.dataclass(frozen=True)
class Loaded:
  """Weights ready to use: parameters, their record (digest filled in), their preprocessing."""
  params: Any
  record: WeightsRecord
  preprocessing: pp.Preprocessing


def record_for(model: str, choice: str | None, *, seed: int = 0) -> WeightsRecord:
  """The request for `--weights=choice` (None: shipped; "random"; or a directory).

  A directory that is the shipped folder of `model` is recorded as shipped.
  """
  if choice == "random":
    return WeightsRecord(kind="random", name="random", source="random", seed=seed)
  if choice is None:
    return WeightsRecord(kind="shipped", name=model)
  path = pathlib.Path(choice).resolve()
  if path in {p.resolve() for p in _shipped_dirs(model)}:
    return WeightsRecord(kind="shipped", name=model)
  return WeightsRecord(kind="directory", name=path.name, dir=str(path))


def _shipped_dirs(model: str) -> list[pathlib.Path]:
  return list(dict.fromkeys([default_weights_dir(model), _SHIPPED / model]))


def _candidates(record: WeightsRecord, model: str) -> list[pathlib.Path]:
  """Where to look: the recorded folder first; with a digest to check, the shipped ones too."""
  if record.kind == "directory":
    first = [pathlib.Path(record.dir)]
    return first + (_shipped_dirs(model) if record.params_sha256 else [])
  return _shipped_dirs(model) if record.params_sha256 else [default_weights_dir(model)]


def _recorded_digest(path: pathlib.Path) -> str:
  try:
    return json.loads((path / checkpoint.INFO_FILE).read_text()).get("params_sha256", "")
  except (OSError, ValueError, AttributeError):
    return ""


def load_recorded(model: str, record: WeightsRecord, *, image_size: int) -> Loaded:
  """The weights `record` names, found by digest; the one loader for jobs and queries.

  A job passes `record_for(...)` (no digest yet: the chosen weights are loaded and
  their digest recorded); the query side passes an index's record and gets the
  same weights back wherever they now are (the recorded folder, else the shipped
  weights folder, $CBIR_JAX_WEIGHTS_DIR or the repository's, with the same digest).

  Raises:
    WeightsError: no weights with the recorded digest, or a folder that cannot be used.
  """
  backbone = backbones.get(model)
  if record.kind == "random":
    params = random_params(backbone, image_size, int(record.seed or 0))
    return _checked(params, record, backbone.preprocessing,
                    dataclasses.replace(record, params_sha256=checkpoint.params_sha256(params)))
  tried, others, first_error = [], [], None
  for path in _candidates(record, model):
    want, have = record.params_sha256, _recorded_digest(path)
    if want and have not in ("", want):
      tried.append(f"{path} (other weights, params_sha256 {have[:12]})")
      others.append(have)
      continue
    try:
      params, info = load(model, path)
    except checkpoint.WeightsError as e:
      tried.append(f"{path} ({'missing' if not path.exists() else 'unusable'})")
      first_error = first_error or e
      continue
    found = _found(record, params, info)
    if record.kind == "directory" and path.resolve() != pathlib.Path(record.dir).resolve():
      found = dataclasses.replace(found, kind="shipped", name=model, dir="")
    return _checked(params, record, info.preprocessing, found)
  if not record.params_sha256 and first_error is not None:
    raise first_error  # the user's own choice: its own message says what is wrong
  raise WeightsNotFound(
      f"the weights with params_sha256 {record.params_sha256[:12]} ({record.kind} "
      f"{record.name!r}) are not found: looked in {'; '.join(tried)}. Restore them (or set "
      f"{ENV_VAR} to the folder holding {model}/)", others)


def load_from(model: str, record: WeightsRecord, directory: str | os.PathLike, *,
              image_size: int) -> Loaded:
  """The weights `record` names, read from `directory` only (they moved; the user says where).

  The folder is taken only if it holds the same weights: its parameters' digest must equal
  the recorded params_sha256 (checked before loading when weights.json records it, and
  always on the loaded arrays).

  Raises:
    WeightsError: random weights (nothing to load), no recorded digest to check against,
      a folder without usable weights, or other weights.
  """
  path = pathlib.Path(directory)
  want = record.params_sha256
  if record.kind == "random":
    raise checkpoint.WeightsError(
        f"the index was made with random weights (seed {record.seed}), made again on every "
        f"load; there is no weights folder to give, drop --weights={directory}")
  if not want:
    raise checkpoint.WeightsError(
        f"the index records no digest of its weights, so {path} cannot be checked against "
        "them; extract the collection again to use other weights")

  def other(have: str) -> checkpoint.WeightsError:
    return checkpoint.WeightsError(
        f"{path} holds other weights (params_sha256 {have[:12]}) than the index was made with "
        f"({want[:12]}, {record.kind} {record.name!r}); give the folder of those weights")

  have = _recorded_digest(path)
  if have and have != want:
    raise other(have)
  params, info = load(model, path)  # its own message for a missing or unusable folder
  found = _found(record, params, info, kind="directory", name=path.name, dir=str(path.resolve()))
  if found.params_sha256 != want:
    raise other(found.params_sha256)
  return Loaded(params=params, record=found, preprocessing=info.preprocessing)


def _found(record: WeightsRecord, params: Any, info: checkpoint.WeightsInfo, **changes: Any
           ) -> WeightsRecord:
  """`record` filled in from the weights loaded: their digest, and what weights.json says."""
  return dataclasses.replace(
      record, params_sha256=info.params_sha256 or checkpoint.params_sha256(params),
      source=info.source, source_file=info.source_file, source_sha256=info.source_sha256,
      has_fc_head=info.has_fc, **changes)


def _checked(params: Any, wanted: WeightsRecord, prep: pp.Preprocessing, found: WeightsRecord
             ) -> Loaded:
  if wanted.params_sha256 and found.params_sha256 != wanted.params_sha256:
    raise checkpoint.WeightsError(
        f"the weights found ({found.kind} {found.name!r}, params_sha256 "
        f"{found.params_sha256[:12]}) are not the ones recorded ({wanted.params_sha256[:12]})")
  return Loaded(params=params, record=found, preprocessing=prep)


__all__ = ["ENV_VAR", "Loaded", "WeightsNotFound", "default_weights_dir", "load", "load_from",
           "load_recorded", "random_params", "record_for"]
