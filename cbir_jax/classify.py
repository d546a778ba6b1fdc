"""Top-5 ImageNet classes (names and probabilities) for a folder of images, and accuracy.

The check that a checkpoint is right: same weights, recorded preprocessing and
input pipeline as the descriptor jobs, judged by a number anyone can compare.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import os
import pathlib
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cbir_jax import backbones, canvas, input_pipeline, resize, sharding
from cbir_jax import preprocessing as pp
from cbir_jax import weights as weights_lib
from cbir_jax.choices import ComputeDtype, Model, Resize
from cbir_jax.inference import compute_dtype

TOP_K = 5
# The 1000 ImageNet (ILSVRC 2012) classes in the standard order (sorted WordNet ids), as
# "wnid<TAB>name" lines; the names of imagenet-sample's labels.csv, "_" read as " ".
CLASS_NAMES_FILE = pathlib.Path(__file__).with_name("imagenet_classes.txt")


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
  """Name of each ImageNet class index 0..999 ("tench", ..., "tabby", "tiger cat", ...)."""
  lines = CLASS_NAMES_FILE.read_text(encoding="utf-8").splitlines()
  return tuple(line.split("\t", 1)[1] for line in lines if line.strip())


@dataclasses.dataclass
class ClassifyConfig:
  """One run of launch/classify.py.

  Attributes:
    images: folder of images (recursive).
    model: backbone.
    weights: weights directory (default: the shipped weights of `model`).
    labels_csv: CSV with columns file, class_index (optional class_name): adds top-1 and
      top-5 accuracy over the images it lists.
    batch_size: images per step.
    dtype: compute dtype.
    draft: JPEGs decoded at a reduced DCT scale, as the extraction job does by default
      (--nodraft: full decode, the pipeline the reference accuracy was measured with).
    resize: "host" (Pillow after decoding), "device" (in the step, from canvases) or
      "auto" (the platform's default, `resize.resolve`).
  """
  images: str
  model: Model = backbones.DEFAULT_BACKBONE
  weights: str | None = None
  labels_csv: str | None = None
  batch_size: int = 32
  dtype: ComputeDtype = "float32"
  draft: bool = True
  resize: Resize = "auto"


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
  scores: tuple[float, ...] = ()  # softmax probability of each class in `top`


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
             dtype: Any = jnp.float32, k: int = TOP_K
             ) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
  """The pure step `(params, uint8 images [N, H, W, 3]) -> (probabilities, class indices)`,
  both [N, k], best first (softmax over the logits, in float32)."""

  def step(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = backbone.features(params, preprocessing(images), dtype=dtype).logits
    return jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), k)

  return step


def top_k_canvas_fn(backbone: backbones.Backbone, preprocessing: pp.Preprocessing, *,
                    image_size: int, dtype: Any = jnp.float32, k: int = TOP_K
                    ) -> Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """`top_k_fn` behind the device resize: `(params, canvases, sizes) -> (probabilities,
  classes)`, each image resized from its canvas as Pillow's BILINEAR does."""
  step = top_k_fn(backbone, preprocessing, dtype=dtype, k=k)

  def canvas_step(params: Any, canvases: jax.Array, sizes: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    return step(params, resize.resize_canvases(canvases, sizes, (image_size, image_size)))

  return canvas_step


def _label_of(rel: str, labels: Labels | None) -> int:
  if labels is None:
    return -1
  if rel in labels.by_file:
    return labels.by_file[rel]
  return labels.by_file.get(os.path.basename(rel), -1)


def classify_folder(images: str | os.PathLike, *, model: str = backbones.DEFAULT_BACKBONE,
                    weights: str | os.PathLike | None = None,
                    labels: Labels | None = None, batch_size: int = 32,
                    image_size: int | None = None, dtype: str = "float32",
                    draft: bool = True, resize_on: str = "auto",
                    log: Callable[[str], None] | None = None) -> Result:
  """Classifies every image under `images` (resized bilinearly to a square, no crop).

  Args:
    images: folder of images (searched recursively).
    model: registered backbone name.
    weights: weights directory; None means the shipped one for `model`.
    labels: from `read_labels_csv`; images it does not list are classified
      but not scored.
    batch_size: images per step (rounded up to a multiple of the local devices).
    image_size: input side; None means the backbone's (224).
    dtype: compute dtype name ("float32", "bfloat16", "float16").
    draft: reduced-scale JPEG decoding (the extraction job's default); False decodes in
      full, as the reference accuracy was measured (weights/README.md).
    resize_on: "host", "device" or "auto" (`ClassifyConfig.resize`).
    log: receives a warning line (labels CSV rows without an image) and, with the device
      resize, the canvas sides that ran.

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
    raise ValueError(f"{root}: no images found (extensions "
                     f"{sorted(input_pipeline.IMAGE_EXTENSIONS)})")
  rel = [pathlib.Path(r.key).relative_to(root).as_posix() for r in records]
  label = [_label_of(r, labels) for r in rel]
  if labels is not None:
    matched = sum(l >= 0 for l in label)
    if not matched:
      raise ValueError(f"none of the {len(rel)} images under {root} is listed in the labels CSV "
                       f"(e.g. {rel[0]!r}); its 'file' column must be paths relative to {root}")
    if matched < len(labels.by_file) and log is not None:
      log(f"warning: {len(labels.by_file) - matched} files of the labels CSV are not under "
          f"{root}; scoring the {matched} found")

  # One process, its local devices: parameters replicated, the batch split.
  mesh = sharding.data_mesh(jax.local_devices())
  n_dev = mesh.devices.size
  batch_size = -(-batch_size // n_dev) * n_dev
  size = image_size or backbone.image_size
  on_device = resize.resolve(resize_on, jax.default_backend()) == "device"
  batched = sharding.batch_sharding(mesh)
  if on_device:
    step = jax.jit(top_k_canvas_fn(backbone, info.preprocessing, image_size=size,
                                   dtype=compute_dtype(dtype)),
                   in_shardings=(sharding.replicated(mesh), batched, batched))
  else:
    step = jax.jit(top_k_fn(backbone, info.preprocessing, dtype=compute_dtype(dtype)),
                   in_shardings=(sharding.replicated(mesh), batched))
  params = sharding.replicate(params, mesh)

  predictions: list[Prediction] = []
  buckets_ran: dict[int, int] = {}  # canvas side -> batches (which compiled step ran)
  for batch in input_pipeline.image_batches([r.key for r in records], image_size=size,
                                            batch_size=batch_size, draft=draft,
                                            buckets=canvas.BUCKETS if on_device else None):
    inputs = (batch.images, batch.sizes) if on_device else (batch.images,)
    buckets_ran[batch.bucket] = buckets_ran.get(batch.bucket, 0) + 1
    probs, top = (np.asarray(a) for a in step(params, *inputs))
    for row in np.flatnonzero(batch.valid):
      i = int(batch.index[row])
      ok = bool(batch.ok[row])
      predictions.append(Prediction(
          file=rel[i], top=tuple(int(c) for c in top[row]) if ok else (), label=label[i],
          error=batch.error[row], scores=tuple(float(p) for p in probs[row]) if ok else ()))
  if on_device and log is not None:
    log(f"resized on the device; batches per canvas side: {dict(sorted(buckets_ran.items()))}")
  scored = [p for p in predictions if p.label >= 0]
  n = len(scored)
  hit1 = sum(bool(p.top) and p.top[0] == p.label for p in scored)
  hit5 = sum(p.label in p.top for p in scored)
  return Result(predictions=predictions, n=n, top1=hit1 / n if n else float("nan"),
                top5=hit5 / n if n else float("nan"))


def accuracy_line(result: Result) -> str:
  """`top1=0.820 top5=0.960 n=1000`: the last line of launch/classify.py with labels."""
  return f"top1={result.top1:.3f} top5={result.top5:.3f} n={result.n}"


def class_name(index: int, names: Sequence[str] | None = None) -> str:
  """The name of a class index (`names`, default the ImageNet list), or the index itself."""
  names = imagenet_class_names() if names is None else names
  return names[index] if 0 <= index < len(names) else str(index)


def report_lines(result: Result, names: Sequence[str] | None = None) -> Iterator[str]:
  """One line per image, then the accuracy line when images were labelled.

  `chelsea.jpg<TAB>tabby 0.62, tiger cat 0.21, ...`: the top classes by name (`names`,
  default the ImageNet list) with their probabilities, then `label=<index> <name>` when the
  labels CSV has the image.
  """
  for p in result.predictions:
    if p.error:
      yield f"{p.file}\tERROR {p.error}"
      continue
    classes = ", ".join(f"{class_name(c, names)} {s:.2f}" for c, s in zip(p.top, p.scores))
    truth = f"\tlabel={p.label} {class_name(p.label, names)}" if p.label >= 0 else ""
    yield f"{p.file}\t{classes}{truth}"
  if result.n:
    yield accuracy_line(result)


def run(config: ClassifyConfig, *, log: Callable[[str], None], out: Callable[[str], None] = print
        ) -> Result:
  """launch/classify.py: classifies the folder and prints `report_lines`."""
  labels = read_labels_csv(config.labels_csv) if config.labels_csv else None
  result = classify_folder(config.images, model=config.model, weights=config.weights,
                           labels=labels, batch_size=config.batch_size, dtype=config.dtype,
                           draft=config.draft, resize_on=config.resize, log=log)
  for line in report_lines(result):
    out(line)
  return result
