"""Throughput benchmarks of cbir_jax, side by side with what users would use instead.

Sections: model + descriptors vs PyTorch eager (and the same under other XLA
flags, each in a fresh process), the descriptor stage alone, input decoding
vs bare Pillow, the extraction job end to end, exact L1 search vs faiss, and
device scaling. `run(BenchmarkConfig())` returns every
figure as a JSON-ready dict; launch/benchmark.py prints its tables.
Defaults depend on the host: a CPU preset that fits in minutes on two cores,
and a GPU preset (VGG16 at 224, float32 and bfloat16, batch 64..512).
"""
from __future__ import annotations

import dataclasses
import os
import time
import traceback
from typing import Annotated, Any, Callable, Sequence

from cbir_jax import choices
from benchmarks import report, timing
from cbir_jax.choices import ComputeDtype, Model, OneOf

SECTIONS: tuple[str, ...] = ("model", "xla_flags", "descriptors", "input", "end_to_end",
                             "search", "scaling")
PRESETS: tuple[str, ...] = ("auto", "cpu", "gpu")
PEER_LAYOUTS: tuple[str, ...] = ("auto", "channels_last", "nchw")
Section = Annotated[str, OneOf(SECTIONS, "section")]


@dataclasses.dataclass
class BenchmarkConfig:
  """What to measure. Fields left None take the preset's value (see `resolve`).

  Attributes:
    preset: default settings: "auto" picks "gpu" when JAX's backend is not the CPU.
    sections: sections to run, in this order (default: the preset's).
    backbones: section model: backbones.
    batch_sizes: section model: batch sizes.
    dtypes: section model: compute dtypes.
    repeats: timed repeats per figure (median reported).
    image_size: input size (default: the backbone's, 224).
    xla_variants: section xla_flags: "name=XLA flags" sets under which each
      backbone's float32 figure at the first batch size is re-measured, each
      in its own process, against the same peer.
    peer: run the PyTorch peer (section 1) and faiss (section 5).
    peer_layout: the peer's memory layout, "channels_last", "nchw" or "auto"
      (the faster one for the backbone, see torch_peer.FASTER_LAYOUT).
    descriptor_batch: section 2 batch (VGG16 pools at 224).
    images: the folder that holds the photo folders `input_folder` and `e2e_folder`
      (food7/ and imagenet-sample/ of the project's shared data).
    input_folder: section input: photo folder under `images` (ImageNet-size photos).
    input_images: section input: photos of `input_folder` decoded.
    input_phone_images: section input: phone-size (4032x3024) JPEGs made from the first
      photos of `input_folder`, cached in the temp dir (0: none).
    input_threads: section input: decode thread counts of the product (default: 1 and
      every core).
    input_rounds: section input: alternating rounds.
    e2e_folder: section end_to_end: photo folder under `images`.
    e2e_backbone: section end_to_end: backbone of the extraction job.
    e2e_batch: section end_to_end: batch of the extraction job.
    e2e_limit: section end_to_end: photos extracted (0: all).
    search_sizes: section search: database sizes N.
    search_dims: section search: descriptor dimensions D.
    search_queries: section search: queries per search.
    search_k: section search: k of the top-k.
    search_repeats: section search: timed repeats per figure.
    search_max_gb: section search: databases larger than this (GB) are skipped.
    scaling_devices: section scaling: device counts.
    scaling_backbone: section scaling: backbone.
    scaling_batch: section scaling: global batch.
    scaling_image_size: section scaling: input size.
  """
  preset: Annotated[str, OneOf(PRESETS, "preset")] = "auto"
  sections: Sequence[Section] | None = None
  backbones: Sequence[Model] | None = None
  batch_sizes: Sequence[int] | None = None
  dtypes: Sequence[ComputeDtype] | None = None
  repeats: int | None = None
  image_size: int | None = None
  xla_variants: Sequence[str] | None = None
  peer: bool = True
  peer_layout: Annotated[str, OneOf(PEER_LAYOUTS, "peer_layout")] = "auto"
  descriptor_batch: int | None = None
  images: str = "../shared/data"
  input_folder: str = "imagenet-sample/images"
  input_images: int | None = None
  input_phone_images: int | None = None
  input_threads: Sequence[int] | None = None
  input_rounds: int | None = None
  e2e_folder: str = "food7"
  e2e_backbone: Model | None = None
  e2e_batch: int | None = None
  e2e_limit: int | None = None
  search_sizes: Sequence[int] | None = None
  search_dims: Sequence[int] | None = None
  search_queries: int | None = None
  search_k: int = 10
  search_repeats: int | None = None
  search_max_gb: float | None = None
  scaling_devices: Sequence[int] | None = None
  scaling_backbone: Model | None = None
  scaling_batch: int | None = None
  scaling_image_size: int | None = None


# XLA:CPU in JAX 0.10 hands whole conv blocks to YNNPACK by default; with the
# list emptied, convolutions go to XLA's own (Eigen) kernels. Measured here
# side by side because which is faster depends on the CPU and the shapes.
YNN_DEFAULT = "default="
YNN_OFF = "ynn_off=--xla_cpu_experimental_ynn_fusion_type="


def _presets(cores: int) -> dict[str, dict[str, Any]]:
  cpu = dict(
      sections=SECTIONS, backbones=("vgg16", "efficientnet_lite0"), batch_sizes=(8,),
      dtypes=("float32",), repeats=5, xla_variants=(YNN_DEFAULT, YNN_OFF), descriptor_batch=8,
      input_images=256, input_phone_images=100, input_threads=tuple(sorted({1, cores})),
      input_rounds=3,
      e2e_backbone="efficientnet_lite0", e2e_batch=16, e2e_limit=0,
      search_sizes=(10_000, 100_000), search_dims=(1472, 9664), search_queries=32,
      search_repeats=2, search_max_gb=4.0, scaling_devices=(1, 2, 4, 8),
      scaling_backbone="vgg16", scaling_batch=8, scaling_image_size=224)
  gpu = dict(
      sections=("model", "descriptors", "search", "scaling"), backbones=("vgg16",),
      batch_sizes=(64, 128, 256, 512), dtypes=("float32", "bfloat16"), repeats=5,
      xla_variants=(),
      descriptor_batch=64, input_images=1024, input_phone_images=100,
      input_threads=tuple(sorted({1, max(1, cores // 2), cores})), input_rounds=3,
      e2e_backbone="vgg16", e2e_batch=128, e2e_limit=0,
      search_sizes=(100_000, 1_000_000), search_dims=(1472, 9664), search_queries=256,
      search_repeats=2, search_max_gb=8.0, scaling_devices=(1, 2, 4, 8),
      scaling_backbone="vgg16", scaling_batch=256, scaling_image_size=224)
  return {"cpu": cpu, "gpu": gpu}


def resolve(config: BenchmarkConfig) -> BenchmarkConfig:
  """Fills the None fields from the preset; checks names early, before anything runs."""
  import jax

  preset = config.preset
  if preset == "auto":
    preset = "cpu" if jax.default_backend() == "cpu" else "gpu"
  presets = _presets(timing.cpu_info()["cores"])
  if preset not in presets:
    raise ValueError(f"preset must be one of {PRESETS}, got {config.preset!r}")
  values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
  for k, v in presets[preset].items():
    if values.get(k) is None:
      values[k] = v
  values["preset"] = preset
  out = BenchmarkConfig(**values)
  choices.check(out)  # sections, backbones, dtypes, peer_layout: the flags' own lists
  if min(out.batch_sizes) < 1 or out.repeats < 1 or out.input_rounds < 1:
    raise ValueError("batch sizes, repeats and input rounds must be >= 1")
  return out


def _summary(result: dict[str, Any]) -> list[dict[str, Any]]:
  s = result["sections"]
  rows: list[dict[str, Any]] = []
  add = lambda figure, value, note="": rows.append(  # noqa: E731
      {"figure": figure, "value": value, "note": note})
  for r in s.get("model", []):
    tag = f"{r['backbone']} {r['dtype']} b{r['batch']}"
    if "jax_over_torch" in r:
      add(f"model+desc jax/torch, {tag}", r["jax_over_torch"],
          f"{r['jax_images_per_s']:.3g} vs {r['torch_images_per_s']:.3g} images/s")
    else:
      add(f"model+desc jax images/s, {tag}", r["jax_images_per_s"], r.get("peer", ""))
    if r.get("jax_fraction_of_peak"):
      add(f"fraction of peak, {tag}", r["jax_fraction_of_peak"], r["peak_source"])
  for r in s.get("xla_flags", []):
    value = r.get("jax_over_torch", r["jax_images_per_s"])
    add(f"xla flags {r['variant']}: jax/torch, {r['backbone']} b{r['batch']}"
        if "jax_over_torch" in r else f"xla flags {r['variant']}: jax images/s", value,
        f"XLA_FLAGS+={r['xla_flags']!r}")
  if "descriptors" in s:
    d = s["descriptors"]
    add("descriptor stage jax/numpy", d["jax_over_numpy"])
    add("descriptor stage jax/python loop", d["jax_over_loop"])
    if "share_of_model_step" in d:
      add("descriptor share of model step", d["share_of_model_step"], d["share_reference"])
  for p in s.get("input", {}).get("sets", []):
    add(f"input per CPU-s, product/Pillow full, {p['set']}",
        p["product_over_pillow_full_per_cpu_s"], "product: 1 thread, draft")
    add(f"input per CPU-s, product/Pillow draft, {p['set']}",
        p["product_over_pillow_draft_per_cpu_s"], "wrapper cost: 1 = none")
    add(f"input wall images/s, product {s['input']['threads'][-1]}/1 threads, {p['set']}",
        p["product_threads_speedup_wall"])
    add(f"input CPU-s per image, canvases/host resize, {p['set']}",
        p["canvas_over_host_cpu_s_per_image"], "whole runs, start-up included")
    if p["canvas_over_host_steady"] is not None:  # None: too few batches for a second half
      add(f"input CPU-s per image past start-up, canvases/host resize, {p['set']}",
          p["canvas_over_host_steady"], "device resize: issue 17 wants <= 0.55 / 0.9")
  if "end_to_end" in s:
    e = s["end_to_end"]
    add(f"extraction images/s ({e['backbone']})", e["images_per_s"],
        f"{e['images']} images of {e['folder']}")
    add("extraction input-wait share", e["input_wait_share"])
  for r in s.get("search", []):
    if "jax_over_faiss" in r:
      add(f"search jax/faiss N={r['n']} D={r['dim']}", r["jax_over_faiss"],
          f"{r['jax_queries_per_s']:.3g} vs {r['faiss_queries_per_s']:.3g} queries/s, "
          f"same ranks {r['topk_index_agreement']:.3f}, same sets {r['topk_set_agreement']:.3f}")
  if s.get("scaling"):
    last = s["scaling"][-1]
    add(f"scaling {last['devices']} vs {s['scaling'][0]['devices']} device(s)",
        last["relative_to_first"], "fake CPU devices: overhead, not speed-up"
        if last.get("fake_devices") else last["device_kind"])
  add("total benchmark seconds", result["seconds"])
  return rows


def run(config: BenchmarkConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the configured sections; a failing section is recorded, the others still run.

  Returns:
    {"environment", "config", "sections": {name: figures}, "errors",
    "section_seconds", "summary", "seconds"}.
  """
  t0 = time.perf_counter()
  cfg = resolve(config)
  data_dir = os.path.abspath(cfg.images)
  result: dict[str, Any] = {"environment": timing.environment(),
                            "config": dataclasses.asdict(cfg), "sections": {}, "errors": {}}
  sections = result["sections"]
  result["section_seconds"] = {}
  for name in cfg.sections:
    t_section = time.perf_counter()
    try:
      if name == "model":
        from benchmarks import model
        sections[name] = model.run(
            backbone_names=cfg.backbones, batch_sizes=cfg.batch_sizes, dtypes=cfg.dtypes,
            repeats=cfg.repeats, image_size=cfg.image_size, peer=cfg.peer,
            peer_layout=cfg.peer_layout, log=log)
      elif name == "xla_flags":
        from benchmarks import model
        sections[name] = model.run_xla_variants(
            cfg.xla_variants, backbone_names=cfg.backbones, batch=cfg.batch_sizes[0],
            repeats=cfg.repeats, image_size=cfg.image_size, peer=cfg.peer,
            peer_layout=cfg.peer_layout, log=log)
      elif name == "descriptors":
        from benchmarks import descriptors_stage
        sections[name] = descriptors_stage.run(
            batch=cfg.descriptor_batch, repeats=cfg.repeats,
            model_rows=sections.get("model", []), log=log)
      elif name == "input":
        from benchmarks import pipeline
        sections[name] = pipeline.run(
            data_dir=data_dir, folder=cfg.input_folder, num_images=cfg.input_images,
            phone_images=cfg.input_phone_images, image_size=cfg.image_size or 224, batch=16,
            threads=cfg.input_threads, rounds=cfg.input_rounds, log=log)
      elif name == "end_to_end":
        from benchmarks import end_to_end
        sections[name] = end_to_end.run(
            data_dir=data_dir, folder=cfg.e2e_folder, backbone=cfg.e2e_backbone,
            batch=cfg.e2e_batch, limit=cfg.e2e_limit, log=log)
      elif name == "search":
        from benchmarks import search
        sections[name] = search.run(
            sizes=cfg.search_sizes, dims=cfg.search_dims, num_queries=cfg.search_queries,
            k=cfg.search_k, repeats=cfg.search_repeats, max_gb=cfg.search_max_gb,
            faiss_peer=cfg.peer, log=log)
      elif name == "scaling":
        from benchmarks import scaling
        sections[name] = scaling.run(
            device_counts=cfg.scaling_devices, backbone=cfg.scaling_backbone,
            batch=cfg.scaling_batch, image_size=cfg.scaling_image_size,
            dtype=cfg.dtypes[0], repeats=cfg.repeats, log=log)
    except Exception as e:  # record and go on: one broken section must not hide the others
      result["errors"][name] = f"{type(e).__name__}: {e}"
      log(traceback.format_exc())
    result["section_seconds"][name] = time.perf_counter() - t_section
  result["seconds"] = time.perf_counter() - t0
  result["summary"] = _summary(result)
  return result


__all__ = ["SECTIONS", "BenchmarkConfig", "resolve", "run", "report"]
