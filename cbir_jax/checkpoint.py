"""Weights on disk: an orbax checkpoint plus a JSON that says what they are.

Layout of a weights directory:
  <dir>/params/          orbax StandardCheckpointer tree (float32)
  <dir>/weights.json     model name, source file and SHA-256, preprocessing, FC head or not
The JSON travels with the parameters so inference always applies the
preprocessing the weights were trained with.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Mapping

import jax
import numpy as np

from cbir_jax import preprocessing as pp
from cbir_jax.atomic import sha256_file as file_sha256  # noqa: F401 (the porters' name)

INFO_FILE = "weights.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


class WeightsError(ValueError):
  """A weights file or checkpoint that cannot be used, with the reason."""


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
  """What a weights directory holds (weights.json).

  `has_fc` is False for weights of the conv layers only (a "no-top" file such
  as Keras' `..._notop.h5`): the backbone then runs without its FC head and
  the descriptor kinds built from FC activations cannot be computed
  (`cbir_jax.weights.check_kinds`). Files written before the field existed
  had FC layers and read as True.
  """
  model: str
  preprocessing: pp.Preprocessing
  source: str = "random"  # torchvision | keras | efficientnet_lite_pytorch | random
  source_file: str = ""
  source_sha256: str = ""
  params_sha256: str = ""  # digest of the parameter arrays: identifies the weights in manifests
  format_version: int = FORMAT_VERSION
  has_fc: bool = True

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)  # preprocessing too: a dataclass, as its to_dict gives it

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "WeightsInfo":
    return cls(model=d["model"], preprocessing=pp.Preprocessing.from_dict(d["preprocessing"]),
               source=d.get("source", ""), source_file=d.get("source_file", ""),
               source_sha256=d.get("source_sha256", ""), params_sha256=d.get("params_sha256", ""),
               format_version=int(d.get("format_version", FORMAT_VERSION)),
               has_fc=_bool(d.get("has_fc", True), "has_fc"))


def _bool(value: Any, name: str) -> bool:
  # bool("false") is True: a hand-edited JSON string must not silently mean "has FC".
  if not isinstance(value, bool):
    raise ValueError(f"{name} must be true or false, got {value!r}")
  return value


def params_sha256(params: Any) -> str:
  """Digest over leaf paths, shapes, dtypes and bytes: equal weights give equal digests."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def check_shapes(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                 *, what: str) -> None:
  """Raises WeightsError for the first missing, mis-shaped or unexpected tensor, in the
  order of `expected` (then of `found`)."""
  for name, shape in expected.items():
    if name not in found:
      raise WeightsError(f"{what}: missing tensor {name} (expected shape {shape})")
    if tuple(found[name]) != shape:
      raise WeightsError(f"{what}: tensor {name} has shape {tuple(found[name])}, "
                         f"expected {shape}")
  extra = [n for n in found if n not in expected]
  if extra:
    raise WeightsError(f"{what}: unexpected tensor {extra[0]} ({len(extra)} unexpected in all)")


def check_tree(params: Any, expected: Any, *, what: str) -> None:
  """`check_shapes` of two pytrees, tensors named by their paths, in sorted order."""
  def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return dict(sorted((jax.tree_util.keystr(p), tuple(np.shape(v)))
                       for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]))
  check_shapes(shapes(params), shapes(expected), what=what)


def save(directory: str | os.PathLike, params: Any, info: WeightsInfo) -> WeightsInfo:
  """Writes params (as float32) and the info JSON; returns the info with params_sha256 set."""
  import orbax.checkpoint as ocp  # heavy import, only where checkpoints are touched

  directory = pathlib.Path(directory).absolute()
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  info = dataclasses.replace(info, params_sha256=params_sha256(params))
  directory.mkdir(parents=True, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(directory / PARAMS_DIR, params, force=True)
  ckptr.wait_until_finished()
  (directory / INFO_FILE).write_text(json.dumps(info.to_dict(), indent=2) + "\n")
  return info


def read_info(directory: str | os.PathLike) -> WeightsInfo:
  directory = pathlib.Path(directory)
  path = directory / INFO_FILE
  if not path.is_file():
    raise WeightsError(f"{directory}: not a cbir_jax weights directory (no {INFO_FILE}); "
                       "make one with launch/port_weights.py")
  try:
    return WeightsInfo.from_dict(json.loads(path.read_text()))
  except (ValueError, KeyError, TypeError) as e:
    raise WeightsError(f"{path}: unreadable weights info ({e})") from e


def load(directory: str | os.PathLike, *, model: str | None = None,
         expected: Any = None) -> tuple[Any, WeightsInfo]:
  """(params as nested dicts of float32 numpy arrays, WeightsInfo) of a directory `save`
  wrote; refuses weights recorded for another model than `model`, params of other shapes
  than `expected` (arrays or ShapeDtypeStructs), or params that do not match their digest."""
  import orbax.checkpoint as ocp

  directory = pathlib.Path(directory).absolute()
  info = read_info(directory)
  if model is not None and info.model != model:
    raise WeightsError(f"{directory}: weights are for model {info.model!r}, not {model!r}")
  try:
    params = ocp.StandardCheckpointer().restore(directory / PARAMS_DIR)
  except Exception as e:  # orbax raises many types for damaged directories
    raise WeightsError(f"{directory}: cannot restore the orbax checkpoint in "
                       f"{PARAMS_DIR}/ ({type(e).__name__}: {e})") from e
  params = jax.tree.map(np.asarray, params)
  if expected is not None:
    check_tree(params, expected, what=str(directory))
  if info.params_sha256 and params_sha256(params) != info.params_sha256:
    raise WeightsError(f"{directory}: parameters do not match the digest in {INFO_FILE} "
                       "(damaged or edited checkpoint)")
  return params, info
