"""Smoke test of the benchmark library entry (tiny settings; no speed assertions)."""
import json
import math

import numpy as np
import pytest

from cbir_jax import benchmark
from cbir_jax import descriptors as desc
from cbir_jax.backbones import vgg
from cbir_jax.benchmark import descriptors_stage, flops, report, torch_peer


def _positive(x, where):
  assert isinstance(x, (int, float)) and math.isfinite(x) and x > 0, f"{where}: {x!r}"


def test_every_section_gives_finite_positive_figures(shared_data, tmp_path):
  config = benchmark.BenchmarkConfig(
      preset="cpu", backbones=("vgg_tiny",), batch_sizes=(2,), dtypes=("float32",), repeats=1,
      xla_variants=("ynn_off=--xla_cpu_experimental_ynn_fusion_type=",),
      image_size=64, descriptor_batch=1, data_dir=str(shared_data), pipeline_images=3,
      pipeline_threads=(1, 2), e2e_backbone="vgg_tiny", e2e_batch=2, e2e_limit=3,
      search_sizes=(300,), search_dims=(24,), search_queries=5, search_k=4, search_repeats=1,
      search_max_gb=1.0, scaling_devices=(2,), scaling_backbone="vgg_tiny", scaling_batch=2,
      scaling_image_size=64)
  result = benchmark.run(config, log=lambda msg: None)
  assert result["errors"] == {}
  assert set(result["sections"]) == set(benchmark.SECTIONS)
  # Everything is JSON, and the environment is recorded.
  back = json.loads(json.dumps(result))
  assert {"environment", "config", "sections", "errors", "summary", "seconds"} <= set(back)
  env = back["environment"]
  assert env["versions"]["jax"] and env["cpu"]["cores"] >= 1 and env["date_utc"]

  s = back["sections"]
  (m,) = s["model"]
  for key in ("jax_images_per_s", "flops_per_image_xla", "jax_flops_per_s"):
    _positive(m[key], f"model.{key}")
  # XLA's count covers convs and FCs plus a little (bias, pooling, descriptors).
  analytic = flops.vgg_flops(((1, 4), (1, 8), (1, 8), (1, 16), (1, 16)), 64, fc_dim=32,
                             num_classes=10)
  assert analytic <= m["flops_per_image_xla"] <= 1.1 * analytic

  (v,) = s["xla_flags"]
  assert v["variant"] == "ynn_off" and v["backbone"] == "vgg_tiny"
  _positive(v["jax_images_per_s"], "xla_flags.jax_images_per_s")

  d = s["descriptors"]
  for impl in ("jax", "numpy", "loop"):
    _positive(d[f"{impl}_images_per_s"], f"descriptors.{impl}")
  assert d["max_abs_diff_jax_numpy_rel"] < 1e-5
  assert d["max_abs_diff_loop_numpy_rel"] < 1e-5

  p = s["pipeline"]
  assert p["num_images"] == 3
  assert {(r["reader"], r["threads"], r["draft"]) for r in p["rows"]} == {
      (reader, t, draft) for draft in (False, True)
      for reader, t in (("pillow", 1), ("tf.data", 1), ("tf.data", 2))}
  for r in p["rows"]:
    _positive(r["images_per_s"], f"pipeline {r}")

  e = s["end_to_end"]
  assert e["images"] == 3 and e["failed"] == 0 and e["compiles"] == 1
  _positive(e["images_per_s"], "end_to_end.images_per_s")
  assert 0 <= e["input_wait_share"] <= 1

  (q,) = s["search"]
  _positive(q["jax_queries_per_s"], "search.jax")
  _positive(q["faiss_queries_per_s"], "search.faiss")
  assert q["topk_index_agreement"] == 1.0 and q["topk_set_agreement"] == 1.0
  assert q["max_distance_diff_rel"] < 1e-5

  (sc,) = s["scaling"]
  assert sc["devices"] == 2 and sc["fake_devices"]
  _positive(sc["images_per_s"], "scaling")

  figures = {r["figure"]: r["value"] for r in back["summary"]}
  assert "search jax/faiss N=300 D=24" in figures
  text = "\n".join(report.section_tables(back) + [report.summary_table(back)])
  assert "Summary" in text and "l1_topk" in text
  md = report.markdown(back)
  assert md.count("| jax/faiss |") == 1 and "**Summary**" in md


def test_search_skips_databases_over_the_memory_cap():
  from cbir_jax.benchmark import search

  (row,) = search.run(sizes=(1000,), dims=(1000,), num_queries=2, k=1, repeats=1, max_gb=1e-3,
                      log=lambda msg: None)
  assert "skipped" in row and "jax_queries_per_s" not in row


def test_vgg16_flop_count_matches_the_published_figure():
  # Simonyan & Zisserman's VGG16 at 224x224: 15.47 G multiply-adds.
  assert flops.vgg_flops(vgg.VGG16_BLOCKS, 224) == pytest.approx(2 * 15.47e9, rel=2e-3)


def test_gpu_peaks_are_found_by_device_kind():
  assert flops.gpu_model("NVIDIA H100 80GB HBM3") == "H100 SXM"
  assert flops.gpu_model("NVIDIA H100 PCIe") == "H100 PCIe"
  assert flops.gpu_model("NVIDIA H200") == "H200"
  assert flops.gpu_model("NVIDIA A100-SXM4-40GB") == "A100"
  assert flops.gpu_model("cpu") is None
  assert flops.GPU_PEAKS_TFLOPS["H100 SXM"]["bfloat16"] == pytest.approx(989.4)


@pytest.mark.parametrize("size", [64, 70])  # 70: odd pool sizes, cropped positions
def test_peer_and_loop_descriptors_match_the_library(size):
  """The peers time the same maths: torch and the per-neuron loop agree with cbir_jax."""
  shapes, s = [], size
  for c in (4, 8, 8, 16, 16):
    s //= 2
    shapes.append((s, c))
  pools = descriptors_stage.synthetic_pools(2, shapes, seed=size)
  ref = np.asarray(desc.conv_descriptor(pools))
  np.testing.assert_allclose(descriptors_stage.loop_conv_descriptor(pools), ref,
                             rtol=1e-5, atol=1e-6)
  if size % 32 == 0:  # the vectorised NumPy form assumes floor-exact pools
    np.testing.assert_allclose(descriptors_stage.numpy_conv_descriptor(pools), ref,
                               rtol=1e-5, atol=1e-6)
  ok, why = torch_peer.available()
  if not ok:
    pytest.skip(why)
  import torch

  got = torch_peer.conv_descriptor([torch.from_numpy(p).permute(0, 3, 1, 2) for p in pools])
  np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-6)
