"""Top-5 ImageNet classes for a folder of images, and accuracy against a labels CSV.

The check that a checkpoint is right: same weights, recorded preprocessing and
input pipeline as the descriptor jobs, judged by a number anyone can compare.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import os
import pathlib
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from cbir_jax import backbones, input_pipeline, sharding
from cbir_jax import preprocessing as pp
from cbir_jax import weights as weights_lib
from cbir_jax.inference import compute_dtype

TOP_K = 5


@dataclasses.dataclass(frozen=True)
class Labels:
  """A labels CSV: class index per image file, and class names where given."""
  by_file: dict[str, int]  # file as written in the CSV (relative to the image folder)
  names: dict[int, str]  # class index -> class_name column, when present


@dataclasses.dataclass(frozen=True)
class Prediction:
  file: str  # relative to the image folder
  top: tuple[int, ...]  # TOP_K class indices, best first; empty when not decoded
  label: int = -1  # -1: no label
  error: str = ""  # why the image could not be decoded


@dataclasses.dataclass(frozen=True)
class Result:
  predictions: list[Prediction]
  n: int  # labelled images (undecodable ones count as misses)
  top1: float
  top5: float


def read_labels_csv(path: str | os.PathLike) -> Labels:
  """Reads a CSV with columns `file` and `class_index` (optionally `class_name`).

  Raises:
    ValueError: missing columns, a non-integer or negative class index, or a
      file listed twice (naming the row).
  """
  by_file: dict[str, int] = {}
  names: dict[int, str] = {}
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = {"file", "class_index"} - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f"{path}: labels CSV needs columns 'file' and 'class_index'; "
                       f"missing {sorted(missing)} (has {reader.fieldnames})")
    for row_no, row in enumerate(reader, start=2):
      try:
        label = int(row["class_index"])
      except (TypeError, ValueError):
        raise ValueError(f"{path}:{row_no}: class_index {row['class_index']!r} is not an "
                         "integer") from None
      if label < 0:
        raise ValueError(f"{path}:{row_no}: class_index {label} is negative")
      file = row["file"]
      if file in by_file:
        raise ValueError(f"{path}:{row_no}: file {file!r} is listed twice")
      by_file[file] = label
      if row.get("class_name"):
        names[label] = row["class_name"]
  return Labels(by_file=by_file, names=names)


def top_k_fn(backbone: backbones.Backbone, preprocessing: pp.Preprocessing, *,
             dtype: Any = jnp.float32, k: int = TOP_K) -> Callable[[Any, jax.Array], jax.Array]:
  """The pure step `(params, uint8 images [N, H, W, 3]) -> int32 [N, k]` class indices."""

  def step(params: Any, images: jax.Array) -> jax.Array:
    logits = backbone.features(params, preprocessing(images), dtype=dtype).logits
    return jax.lax.top_k(logits, k)[1]

  return step


def _label_of(rel: str, labels: Labels | None) -> int:
  if labels is None:
    return -1
  if rel in labels.by_file:
    return labels.by_file[rel]
  return labels.by_file.get(os.path.basename(rel), -1)


def classify_folder(images: str | os.PathLike, *, model: str = backbones.DEFAULT_BACKBONE,
                    weights: str | os.PathLike | None = None,
                    labels: Labels | None = None, batch_size: int = 32,
                    image_size: int | None = None, dtype: str = "float32") -> Result:
  """Classifies every image under `images` (resized bilinearly to a square, no crop).

  Args:
    images: folder of images (searched recursively).
    model: registered backbone name.
    weights: weights directory; None means the shipped one for `model`.
    labels: from `read_labels_csv`; images it does not list are classified
      but not scored.
    batch_size: images per step (rounded up to a multiple of the local devices).
    image_size: input side; None means the backbone's (224).
    dtype: compute dtype name ("float32", "bfloat16").

  Returns:
    Per-image predictions in path order, and top-1/top-5 over labelled images.

  Raises:
    ValueError: no images, or labels that match none of the images.
  """
  backbone = backbones.get(model)
  params, info = weights_lib.load(model, weights)
  root = pathlib.Path(images)
  records = input_pipeline.folder_records(root)
  if not records:
    raise ValueError(f"{root}: no images found (extensions {sorted(input_pipeline.IMAGE_EXTENSIONS)})")
  rel = [pathlib.Path(r.key).relative_to(root).as_posix() for r in records]
  label = [_label_of(r, labels) for r in rel]
  if labels is not None:
    matched = sum(l >= 0 for l in label)
    if not matched:
      raise ValueError(f"none of the {len(rel)} images under {root} is listed in the labels CSV "
                       f"(e.g. {rel[0]!r}); its 'file' column must be paths relative to {root}")
    if matched < len(labels.by_file):
      logging.warning("%d files of the labels CSV are not under %s; scoring the %d found",
                      len(labels.by_file) - matched, root, matched)

  # One process, its local devices: parameters replicated, the batch split.
  mesh = sharding.data_mesh(jax.local_devices())
  n_dev = mesh.devices.size
  batch_size = -(-batch_size // n_dev) * n_dev
  step = jax.jit(top_k_fn(backbone, info.preprocessing, dtype=compute_dtype(dtype)),
                 in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)))
  params = sharding.replicate(params, mesh)
  size = image_size or backbone.image_size

  predictions: list[Prediction] = []
  for batch in input_pipeline.image_batches([r.key for r in records], image_size=size,
                                            batch_size=batch_size):
    top = np.asarray(step(params, batch.images))
    for row in np.flatnonzero(batch.valid):
      i = int(batch.index[row])
      ok = bool(batch.ok[row])
      predictions.append(Prediction(file=rel[i], top=tuple(int(c) for c in top[row]) if ok else (),
                                    label=label[i], error=batch.error[row]))
  scored = [p for p in predictions if p.label >= 0]
  n = len(scored)
  hit1 = sum(bool(p.top) and p.top[0] == p.label for p in scored)
  hit5 = sum(p.label in p.top for p in scored)
  return Result(predictions=predictions, n=n, top1=hit1 / n if n else float("nan"),
                top5=hit5 / n if n else float("nan"))


def accuracy_line(result: Result) -> str:
  """`top1=0.820 top5=0.960 n=1000`: the last line of launch/classify.py with labels."""
  return f"top1={result.top1:.3f} top5={result.top5:.3f} n={result.n}"


def report_lines(result: Result, names: dict[int, str] | None = None) -> Iterator[str]:
  """One line per image (file, then top-5 as `index:name` or `index`); accuracy last if labelled."""
  names = names or {}
  for p in result.predictions:
    if p.error:
      yield f"{p.file}\tERROR {p.error}"
      continue
    classes = " ".join(f"{c}:{names[c]}" if c in names else str(c) for c in p.top)
    truth = f"\tlabel={p.label}" if p.label >= 0 else ""
    yield f"{p.file}\t{classes}{truth}"
  if result.n:
    yield accuracy_line(result)
