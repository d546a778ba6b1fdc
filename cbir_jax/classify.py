"""Top-5 ImageNet classes (names and probabilities) for a folder of images, and accuracy.

The check that a checkpoint is right: same weights, recorded preprocessing and
input pipeline as the descriptor jobs, judged by a number anyone can compare.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from cbir_jax import backbones, canvas, inference, input_pipeline, resize, sharding
from cbir_jax import preprocessing as pp
from cbir_jax import weights as weights_lib
from cbir_jax.choices import ComputeDtype, Model, Resize
from cbir_jax.job import labels as labels_lib

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
    labels_csv: CSV with columns file, class_index (optional class_name), read as
      extraction's --labels_csv: adds top-1 and top-5 accuracy over the images it labels.
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


def top_k_fn(backbone: backbones.Backbone, preprocessing: pp.Preprocessing, *,
             dtype: Any = jnp.float32, k: int = TOP_K
             ) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
  """The pure step `(params, uint8 images [N, H, W, 3]) -> (probabilities, class indices)`,
  both [N, k], best first (softmax over the logits, in float32)."""

  def step(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = backbone.features(params, preprocessing(images), dtype=dtype).logits
    return jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), k)

  return step


def classify_folder(c: ClassifyConfig, *, log: Callable[[str], None] | None = None) -> Result:
  """Classifies every image under `c.images` (resized bilinearly to the backbone's square
  input, no crop; the batch size rounded up to a multiple of the local devices).

  `c.labels_csv` is read as the extraction job reads it (`job.labels.labels_from_csv`:
  images it does not list are classified but not scored); `log` receives a warning line
  (labels CSV rows without an image) and, with the device resize, the canvas sides that ran.
  Returns per-image predictions in path order and top-1/top-5 over labelled images; raises
  ValueError for no images, or labels that match none of them (ExtractError: a labels CSV
  that cannot be used).
  """
  backbone = backbones.get(c.model)
  params, info = weights_lib.load(c.model, c.weights)
  root = pathlib.Path(c.images)
  records = input_pipeline.folder_records(root)
  if not records:
    raise ValueError(f"{root}: no images found (extensions "
                     f"{sorted(input_pipeline.IMAGE_EXTENSIONS)})")
  rel = [pathlib.Path(r.key).relative_to(root).as_posix() for r in records]
  label = [-1] * len(rel)
  if c.labels_csv:
    lab = labels_lib.labels_from_csv(c.labels_csv, [r.key for r in records], str(root))
    label, matched, unused = lab.labels.tolist(), lab.report.labelled, lab.report.unused_keys
    if not matched:
      raise ValueError(f"none of the {len(rel)} images under {root} is listed in the labels CSV "
                       f"(e.g. {rel[0]!r}); its 'file' column must be paths relative to {root}")
    if unused and log is not None:
      log(f"warning: {unused} files of the labels CSV are not under {root}; scoring the "
          f"{matched} found")

  # One process, its local devices: parameters replicated, the batch split.
  mesh = sharding.data_mesh(jax.local_devices())
  n_dev = mesh.devices.size
  batch_size = -(-c.batch_size // n_dev) * n_dev
  size = backbone.image_size
  on_device = resize.resolve(c.resize, jax.default_backend()) == "device"
  step = top_k_fn(backbone, info.preprocessing, dtype=inference.compute_dtype(c.dtype))
  step = inference.jit_sharded(inference.on_canvases(step, size) if on_device else step, mesh,
                               batched=2 if on_device else 1)
  params = sharding.replicate(params, mesh)

  predictions: list[Prediction] = []
  buckets_ran: dict[int, int] = {}  # canvas side -> batches (which compiled step ran)
  for batch in input_pipeline.image_batches([r.key for r in records], image_size=size,
                                            batch_size=batch_size, draft=c.draft,
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


def class_name(index: int) -> str:
  """The ImageNet name of a class index, or the index itself."""
  names = imagenet_class_names()
  return names[index] if 0 <= index < len(names) else str(index)


def report_lines(result: Result) -> Iterator[str]:
  """One line per image, then the accuracy line (`top1=0.820 top5=0.960 n=1000`) when
  images were labelled.

  `chelsea.jpg<TAB>tabby 0.62, tiger cat 0.21, ...`: the top classes by name with their
  probabilities, then `label=<index> <name>` when the labels CSV has the image.
  """
  for p in result.predictions:
    if p.error:
      yield f"{p.file}\tERROR {p.error}"
      continue
    classes = ", ".join(f"{class_name(c)} {s:.2f}" for c, s in zip(p.top, p.scores))
    truth = f"\tlabel={p.label} {class_name(p.label)}" if p.label >= 0 else ""
    yield f"{p.file}\t{classes}{truth}"
  if result.n:
    yield f"top1={result.top1:.3f} top5={result.top5:.3f} n={result.n}"


def run(config: ClassifyConfig, *, log: Callable[[str], None]) -> Result:
  """launch/classify.py: classifies the folder and prints `report_lines`."""
  result = classify_folder(config, log=log)
  for line in report_lines(result):
    print(line)
  return result
