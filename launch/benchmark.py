"""Throughput benchmarks: JAX vs PyTorch eager, faiss, Pillow; one table per section, summary last.

  python launch/benchmark.py                       # CPU or GPU preset, by the host
  python launch/benchmark.py --sections=model --backbones=vgg16 --batch_sizes=8
  python launch/benchmark.py --sections=input --json=/tmp/input.json   # decoding only
  python launch/benchmark.py --preset=gpu --json=/tmp/bench.json   # VGG16, f32+bf16, b64..512
Every figure, the environment and the settings go to --json. Defaults on a
2-core CPU take under 10 minutes; see docs/benchmarks.md for recorded runs. The
bounded check of an accelerator host is launch/gpu_check.py.
"""
from __future__ import annotations

import json
import os
import pathlib

from absl import app, flags

from cbir_jax import benchmark
from cbir_jax.benchmark import report

_REPO = pathlib.Path(__file__).resolve().parents[1]

_PRESET = flags.DEFINE_enum("preset", "auto", ["auto", "cpu", "gpu"],
                            "Default settings: auto picks gpu when JAX's backend is not cpu.")
_SECTIONS = flags.DEFINE_list("sections", None, f"Sections to run, from "
                              f"{', '.join(benchmark.SECTIONS)} (default: the preset's).")
_BACKBONES = flags.DEFINE_list("backbones", None, "Backbones for section model.")
_BATCHES = flags.DEFINE_list("batch_sizes", None, "Batch sizes for section model.")
_DTYPES = flags.DEFINE_list("dtypes", None, "Compute dtypes (float32, bfloat16, float16).")
_REPEATS = flags.DEFINE_integer("repeats", None, "Timed repeats per figure (median reported).")
_SIZE = flags.DEFINE_integer("image_size", None, "Input size (default: the backbone's, 224).")
_XLA_FLAGS = flags.DEFINE_string("xla_flags", None, "Added to XLA_FLAGS for this run (all "
                                 "sections), e.g. "
                                 "--xla_flags=--xla_cpu_experimental_ynn_fusion_type=")
_VARIANTS = flags.DEFINE_list("xla_variants", None, "Section xla_flags: NAME=FLAGS sets, each "
                              "re-measuring every backbone at the first batch in a fresh process "
                              "(default on CPU: default=,ynn_off=--xla_cpu_experimental_ynn_"
                              "fusion_type=).")
_PEER = flags.DEFINE_bool("peer", True, "Run the PyTorch and faiss peers.")
_LAYOUT = flags.DEFINE_enum("peer_layout", "auto", ["auto", "channels_last", "nchw"],
                            "PyTorch peer's memory layout (auto: the faster per backbone).")
_DATA = flags.DEFINE_string("data_dir", str(_REPO.parent / "shared" / "data"),
                            "Folder with food7/ and imagenet-sample/.")
_IN_DIR = flags.DEFINE_string("input_folder", "imagenet-sample/images", "JPEG folder under "
                              "--data_dir for section input (food7's photos are 224x224 "
                              "already; ImageNet's are ~500x375).")
_E2E_DIR = flags.DEFINE_string("e2e_folder", "food7", "Image folder under --data_dir for section "
                               "end_to_end.")
_IN_N = flags.DEFINE_integer("input_images", None, "Photos of --input_folder decoded in section "
                             "input.")
_IN_PHONE = flags.DEFINE_integer("input_phone_images", None, "Phone-size (4032x3024) JPEGs made "
                                 "from the first photos of --input_folder, cached in the temp "
                                 "dir (0: none).")
_IN_T = flags.DEFINE_list("input_threads", None, "Decode thread counts of the product's pipeline "
                          "(default: 1 and every core).")
_IN_ROUNDS = flags.DEFINE_integer("input_rounds", None, "Alternating rounds in section input.")
_E2E_MODEL = flags.DEFINE_string("e2e_backbone", None, "Backbone of the extraction job.")
_E2E_BATCH = flags.DEFINE_integer("e2e_batch", None, "Batch of the extraction job.")
_E2E_LIMIT = flags.DEFINE_integer("e2e_limit", None, "Images of food7 to extract (0: all).")
_S_SIZES = flags.DEFINE_list("search_sizes", None, "Database sizes N (e.g. 10000,100000,1000000).")
_S_DIMS = flags.DEFINE_list("search_dims", None, "Descriptor dimensions D.")
_S_Q = flags.DEFINE_integer("search_queries", None, "Queries per search.")
_S_K = flags.DEFINE_integer("search_k", 10, "k of the top-k.")
_S_REP = flags.DEFINE_integer("search_repeats", None, "Timed repeats per search figure.")
_S_GB = flags.DEFINE_float("search_max_gb", None, "Skip databases larger than this (GB).")
_SC_DEV = flags.DEFINE_list("scaling_devices", None, "Device counts for section scaling.")
_SC_MODEL = flags.DEFINE_string("scaling_backbone", None, "Backbone for section scaling.")
_SC_BATCH = flags.DEFINE_integer("scaling_batch", None, "Global batch for section scaling.")
_SC_SIZE = flags.DEFINE_integer("scaling_image_size", None, "Input size for section scaling.")
_JSON = flags.DEFINE_string("json", None, "Write every figure here as JSON.")
_MD = flags.DEFINE_string("markdown", None, "Write the tables here as Markdown.")


def _ints(v):
  return None if v is None else tuple(int(x) for x in v)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _XLA_FLAGS.value:  # read when JAX's backend starts, which has not happened yet
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_XLA_FLAGS.value}".strip()
  config = benchmark.BenchmarkConfig(
      preset=_PRESET.value, sections=_SECTIONS.value, backbones=_BACKBONES.value,
      batch_sizes=_ints(_BATCHES.value), dtypes=_DTYPES.value, repeats=_REPEATS.value,
      image_size=_SIZE.value, xla_variants=_VARIANTS.value, peer=_PEER.value,
      peer_layout=_LAYOUT.value,
      data_dir=_DATA.value, input_folder=_IN_DIR.value, input_images=_IN_N.value,
      input_phone_images=_IN_PHONE.value, input_threads=_ints(_IN_T.value),
      input_rounds=_IN_ROUNDS.value, e2e_folder=_E2E_DIR.value, e2e_backbone=_E2E_MODEL.value,
      e2e_batch=_E2E_BATCH.value, e2e_limit=_E2E_LIMIT.value,
      search_sizes=_ints(_S_SIZES.value), search_dims=_ints(_S_DIMS.value),
      search_queries=_S_Q.value, search_k=_S_K.value, search_repeats=_S_REP.value,
      search_max_gb=_S_GB.value, scaling_devices=_ints(_SC_DEV.value),
      scaling_backbone=_SC_MODEL.value, scaling_batch=_SC_BATCH.value,
      scaling_image_size=_SC_SIZE.value)
  result = benchmark.run(config)
  env = result["environment"]
  print(f"\n{env['date_utc']}  {env['cpu']['model']} ({env['cpu']['cores']} cores), "
        f"backend {env['backend']} x{env['num_devices']} ({', '.join(sorted(set(env['devices'])))})"
        f", load average {', '.join(f'{x:.1f}' for x in env['load_average'] or [])}")
  for t in report.section_tables(result):
    print("\n" + t)
  if _JSON.value:
    pathlib.Path(_JSON.value).write_text(json.dumps(result, indent=1))
    print(f"\nJSON: {_JSON.value}")
  if _MD.value:
    pathlib.Path(_MD.value).write_text(report.markdown(result))
    print(f"Markdown: {_MD.value}")
  print("\n" + report.summary_table(result))
  if result["errors"]:
    raise SystemExit(1)


if __name__ == "__main__":
  app.run(main)
