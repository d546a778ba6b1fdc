"""Smoke tests of the benchmarks and the GPU check: tiny settings on the CPU, no speed asserts."""
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import benchmarks as benchmark
from cbir_jax import input_pipeline, samples
from cbir_jax import descriptors as desc
from cbir_jax.backbones import vgg
from benchmarks import (descriptors_stage, flops, gpu_check, photos, pipeline, report,
                                torch_peer)


def _positive(x, where):
  assert isinstance(x, (int, float)) and math.isfinite(x) and x > 0, f"{where}: {x!r}"


def test_every_section_gives_finite_positive_figures(shared_data, tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the made phone-size JPEGs go here
  config = benchmark.BenchmarkConfig(
      preset="cpu", backbones=("vgg_tiny",), batch_sizes=(2,), dtypes=("float32",), repeats=1,
      xla_variants=("ynn_off=--xla_cpu_experimental_ynn_fusion_type=",),
      image_size=64, descriptor_batch=1, images=str(shared_data), input_images=3,
      input_phone_images=1, input_threads=(1, 2), input_rounds=2,
      e2e_backbone="vgg_tiny", e2e_batch=2, e2e_limit=3,
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

  p = s["input"]
  sets = ("imagenet-sample/images", "phone-size")
  assert [x["set"] for x in p["sets"]] == list(sets)
  assert [x["images"] for x in p["sets"]] == [3, 1]
  assert p["sets"][1]["mean_megapixels"] == pytest.approx(4032 * 3024 / 1e6)
  processes = pipeline.default_processes(pipeline.cores())  # worker processes x threads
  assert p["processes"] == [list(x) for x in processes]
  assert sorted((r["set"], r["variant"], r["workers"], r["threads"], r["draft"])
                for r in p["rows"]) == sorted(
      (name, variant, w, t, draft) for name in sets
      for variant, w, t, draft in (("pillow", 0, 1, False), ("pillow", 0, 1, True),
                                   ("product", 0, 1, True), ("product", 0, 2, True),
                                   *(("product", w, t, True) for w, t in processes),
                                   ("product-canvas", 0, 2, True)))
  for r in p["rows"]:
    assert len(r["wall_s"]) == len(r["cpu_s"]) == 2  # one figure per round
    for key in ("images_per_s", "images_per_cpu_s", "steady_images_per_s"):
      _positive(r[key], f"input {key} {r}")
  for x in p["sets"]:
    for key in ("product_over_pillow_full_per_cpu_s", "product_over_pillow_draft_per_cpu_s",
                "pillow_draft_over_full_per_cpu_s", "product_threads_speedup_wall",
                "processes_over_threads_steady", "processes_over_threads_wall",
                "canvas_over_host_cpu_s_per_image"):
      _positive(x[key], f"input {key}")

  e = s["end_to_end"]
  assert e["images"] == 3 and e["failed"] == 0 and e["compiles"] == 1
  _positive(e["images_per_s"], "end_to_end.images_per_s")
  _positive(e["images_per_cpu_s"], "end_to_end.images_per_cpu_s")
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
  assert "input per CPU-s, product/Pillow full, phone-size" in figures
  text = "\n".join(report.section_tables(back) + [report.summary_table(back)])
  assert "Summary" in text and "l1_topk" in text
  md = report.markdown(back)
  assert md.count("| jax/faiss |") == 1 and "**Summary**" in md


def test_search_skips_databases_over_the_memory_cap():
  from benchmarks import search

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


# --- the GPU check, run on the CPU with tiny models ----------------------------------------

REPO = pathlib.Path(__file__).resolve().parents[1]
_TINY = ["--allow_cpu", "--sweep=vgg_tiny:2,4,efficientnet_lite_tiny:2", "--image_size=64",
         "--accuracy_images=3", "--repeats=2", "--e2e_backbone=efficientnet_lite_tiny",
         "--e2e_batch=4", "--photo_count=5", "--photo_width=120", "--photo_height=90",
         "--phone_count=2", "--phone_width=400", "--phone_height=300", "--scaling_cores=1",
         "--decoder_images=3", "--job_photos=4", "--job_decoders=pillow,nvimgcodec-cpu"]


def test_gpu_check_launcher_runs_every_part_and_writes_complete_rows(tmp_path):
  out = tmp_path / "check.json"
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, str(REPO / "launch" / "gpu_check.py"), *_TINY,
                         f"--photo_root={tmp_path / 'photos'}", f"--json={out}"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "PASSED" in proc.stdout and "[model] vgg_tiny bfloat16 batch 4:" in proc.stdout
  r = json.loads(out.read_text())
  assert r["passed"] is True and r["errors"] == {} and r["skipped"] == []
  assert r["environment"]["platform_info"]["backend"] == "cpu"

  runs = [(d, p) for d, p in gpu_check.ACCURACY_RUNS]
  assert [(a["backbone"], a["dtype"], a["precision"]) for a in r["accuracy"]] == [
      (b, d, p) for b in ("vgg_tiny", "efficientnet_lite_tiny") for d, p in runs]
  for a in r["accuracy"]:
    assert a["passed"] and a["tolerance_rel_l1"] == gpu_check.TOLERANCES[
        f"{a['dtype']}/{a['precision']}"]
    assert set(a["rel_l1_by_kind"]) == set(desc.KINDS)
    if a["dtype"] == "float32":  # the same program on the same CPU: bit-identical
      assert a["max_rel_l1"] == 0.0
    else:  # bfloat16 differs, but within its bound
      assert 0.0 < a["max_rel_l1"] <= gpu_check.TOLERANCES["bfloat16/default"]

  points = [(m["backbone"], m["dtype"], m["batch"]) for m in r["model"]]
  assert sorted(points) == sorted(
      [("vgg_tiny", d, b) for d in ("float32", "bfloat16") for b in (2, 4)]
      + [("efficientnet_lite_tiny", d, 2) for d in ("float32", "bfloat16")])
  assert points[:4] == [("vgg_tiny", "float32", 2), ("vgg_tiny", "bfloat16", 2),
                        ("efficientnet_lite_tiny", "float32", 2),
                        ("efficientnet_lite_tiny", "bfloat16", 2)]  # breadth first
  for m in r["model"]:
    for key in ("images_per_s", "flops_per_image", "flops_per_s", "compile_s"):
      _positive(m[key], f"model {key}")
    assert len(m["seconds"]) == 2

  assert [e["set"] for e in r["end_to_end"]] == ["photo-size", "phone-size"]
  for e, count, mpx in zip(r["end_to_end"], (5, 2), (120 * 90, 400 * 300)):
    assert e["images"] == e["job_images"] == count and e["job_failed"] == 0
    assert e["mean_megapixels"] == pytest.approx(mpx / 1e6) and e["job_compiles"] == 1
    assert 0 <= e["job_input_wait_share"] <= 1
    for key in ("decode_images_per_s", "decode_images_per_cpu_s", "job_images_per_s"):
      _positive(e[key], f"end_to_end {key}")
    assert e["decode_draft"] is True
    assert (e["decode_workers"], e["decode_threads"]) == input_pipeline.decode_parallelism()

  # The decoder comparison (nvImageCodec's CPU backend here) and the job once per decoder.
  (d,) = r["decoders"]
  assert d["images"] == 3 and d["decoder"].startswith("nvimgcodec")
  for row in d["rows"]:
    _positive(row["images_per_s"], "decoders images_per_s")
  assert [j["decoder"] for j in r["decoder_jobs"]] == ["pillow", "nvimgcodec-cpu"]
  for j, ran in zip(r["decoder_jobs"], ("pillow", "nvimgcodec")):
    assert j["images"] == 4 and j["failed"] == 0 and j["decoder_ran"]["counts"] == {ran: 4}
    assert j["resize"] == "host"  # auto on the CPU backend
    assert 0 < j["device_busy_share"] <= 1
    for key in ("images_per_s", "step_rate_images_per_s", "host_cpu_s_per_image"):
      _positive(j[key], f"decoder_jobs {key}")

  # The input sweep (up to --scaling_cores=1 here): a thread, a process, the product's choice.
  assert [(x["set"], x["engine"], x["workers"], x["threads"], x["images"])
          for x in r["input_scaling"]] == [
      (name, *setting, n) for name, n in (("photo-size", 5), ("phone-size", 2))
      for setting in (("threads", 0, 1), ("processes", 1, 1),
                      ("auto", *input_pipeline.decode_parallelism()))]
  for x in r["input_scaling"]:
    for key in ("images_per_s", "images_per_cpu_s", "first_batch_s"):
      _positive(x[key], f"input_scaling {key}")


def test_gpu_check_quick_shrinks_every_part():
  from benchmarks import gpu_check_decoders

  full = gpu_check.GpuCheckConfig()
  q = gpu_check_decoders.quick(full)
  assert full.job_photos == 24000 and full.job_decoders == ("pillow", "nvimgcodec")
  assert q.job_photos <= 2048 and q.decoder_images <= 100 and q.photo_count <= 512
  assert len(gpu_check.parse_sweep(q.sweep)) == 2 and q.scaling_photo_images == 0
  assert q.budget_s <= full.budget_s and q.e2e_reserve_s <= full.e2e_reserve_s


def test_the_input_sweep_counts_powers_of_two_then_every_core():
  assert [pipeline.core_counts(c) for c in (1, 2, 3, 16, 24)] == [
      [1], [1, 2], [1, 2, 3], [1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 24]]


def test_descriptor_check_fails_when_the_reference_parameters_are_perturbed(monkeypatch):
  """Proof that the check can fail: a 20% change of the reference's weights must be caught."""
  import jax

  rng = np.random.default_rng(0)

  def perturbed(params):
    return jax.tree.map(lambda a: np.asarray(a) * (1 + 0.2 * rng.standard_normal(
        np.shape(a))).astype(np.asarray(a).dtype), params)

  monkeypatch.setattr(gpu_check, "_params_for_reference", perturbed)
  cfg = gpu_check.GpuCheckConfig(sweep=("vgg_tiny:2",), dtypes=("float32",), repeats=1,
                                 image_size=64, accuracy_images=3, photo_count=0,
                                 phone_count=0, decoder_images=0, job_photos=0,
                                 allow_cpu=True)
  result = gpu_check.run(cfg, log=lambda msg: None)
  assert result["passed"] is False and result["errors"] == {}
  by_run = {(a["dtype"], a["precision"]): a for a in result["accuracy"]}
  for run in (("float32", "highest"), ("float32", "default")):
    assert not by_run[run]["passed"]
    assert by_run[run]["max_rel_l1"] > gpu_check.TOLERANCES["float32/default"]
  assert len(result["model"]) == 1 and "images_per_s" in result["model"][0]


def test_gpu_check_refuses_a_cpu_backend_unless_allowed():
  cfg = gpu_check.GpuCheckConfig(sweep=("vgg_tiny:2",))
  updates = []
  result = gpu_check.run(cfg, log=lambda msg: None, on_update=updates.append)
  assert result["passed"] is False and "platform" in result["errors"]
  assert result["accuracy"] == result["model"] == result["end_to_end"] == []
  assert updates and updates[-1] is result


def test_sweep_runs_breadth_first_and_skips_what_the_budget_cannot_hold():
  sweep = gpu_check.parse_sweep(["vgg_tiny:2,4,8", "efficientnet_lite_tiny:16"])
  assert sweep == [("vgg_tiny", (2, 4, 8)), ("efficientnet_lite_tiny", (16,))]
  order = gpu_check._sweep_order(sweep, ("float32", "bfloat16"))
  assert order == [("vgg_tiny", "float32", 2), ("vgg_tiny", "bfloat16", 2),
                   ("efficientnet_lite_tiny", "float32", 16),
                   ("efficientnet_lite_tiny", "bfloat16", 16),
                   ("vgg_tiny", "float32", 4), ("vgg_tiny", "bfloat16", 4),
                   ("vgg_tiny", "float32", 8), ("vgg_tiny", "bfloat16", 8)]
  added = []
  cfg = gpu_check.GpuCheckConfig(sweep=("vgg_tiny:2,4",), budget_s=100.0, e2e_reserve_s=50.0)
  # Past the deadline (100 - 50 s) from the start: nothing is compiled, all is recorded.
  gpu_check.model_sweep(cfg, lambda: 60.0, lambda part, row: added.append((part, row)),
                        lambda msg: None)
  assert [(p, r["batch"]) for p, r in added] == [("skipped", 2), ("skipped", 2),
                                                  ("skipped", 4), ("skipped", 4)]
  assert all("time budget" in r["why"] for _, r in added)


@pytest.mark.parametrize("entry", ["vgg_tiny", "vgg_tiny:", "vgg_tiny:0", "vgg_tiny:a,b",
                                   "no_such_net:2"])
def test_bad_sweep_entries_are_refused(entry):
  with pytest.raises(ValueError):
    gpu_check.parse_sweep([entry])


def test_descriptor_difference_is_the_row_wise_relative_l1():
  ref = {"a": np.array([[1.0, -2.0, 3.0], [0.5, 0.5, 0.0]])}
  got = {"a": ref["a"] + np.array([[0.1, 0.0, -0.2], [0.0, 0.0, 0.01]])}
  d = gpu_check.descriptor_difference(got, ref)
  literal = max(sum(abs(g - r) for g, r in zip(gr, rr)) / sum(abs(r) for r in rr)
                for gr, rr in zip(got["a"], ref["a"]))
  assert d["max_rel_l1"] == pytest.approx(literal) == pytest.approx(0.05)
  assert d["max_abs_rel"] == pytest.approx(0.2 / 3.0)
  got["a"][1, 1] = np.nan
  assert gpu_check.descriptor_difference(got, ref)["max_rel_l1"] == float("inf")


def test_photo_sets_have_the_recipe_size_differ_and_are_made_once(tmp_path):
  from PIL import Image

  sources = tuple(str(p) for p in samples.sample_images()[:3])
  spec = photos.PhotoSet(sources, 4, width=160, height=120)
  paths = photos.make(spec, tmp_path)
  assert len(paths) == 4 and len({os.path.dirname(p) for p in paths}) == 1
  assert sorted(os.listdir(os.path.dirname(paths[0]))) == [os.path.basename(p) for p in paths]
  for p in paths:
    with Image.open(p) as img:
      assert (img.format, img.size, img.mode) == ("JPEG", (160, 120), "RGB")
  blobs = [pathlib.Path(p).read_bytes() for p in paths]
  assert len(set(blobs)) == 4  # crops and noise differ, also for the same source
  mtimes = [os.stat(p).st_mtime_ns for p in paths]
  assert photos.make(spec, tmp_path) == paths  # cached: not remade
  assert [os.stat(p).st_mtime_ns for p in paths] == mtimes
  again = photos.make(spec, tmp_path / "elsewhere")  # the recipe fixes the bytes
  assert [pathlib.Path(p).read_bytes() for p in again] == blobs
  noisier = photos.make(dataclasses.replace(spec, noise=8.0), tmp_path)
  assert pathlib.Path(noisier[0]).read_bytes() != blobs[0]


def test_the_benchmark_package_imports_no_peer_library():
  """The GPU host has no TensorFlow or faiss: importing the benchmarks must not need them."""
  code = ("import sys\n"
          "import benchmarks as benchmark\n"
          "from benchmarks import (descriptors_stage, end_to_end, flops, gpu_check, model,"
          " photos, pipeline, report, scaling, search, timing, torch_peer)\n"
          "timing.versions()\n"
          "print(sorted({'tensorflow', 'torch', 'faiss'} & set(sys.modules)))\n")
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == "[]"
  # The launcher too, up to its flags (absl exits after --help).
  proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "launch" / "gpu_check.py"),
                         "--help"], env=env, capture_output=True, text=True, timeout=300)
  imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
              if line.startswith("import time:")}
  assert "cbir_jax" in imported and not {"tensorflow", "torch", "faiss"} & imported


@pytest.mark.parametrize("buckets", [None, (320, 640, 1024)])
def test_pipeline_steady_figures_cover_the_second_half_of_the_batches(buckets):
  from benchmarks import pipeline  # pylint: disable=import-outside-toplevel
  keys = [str(p) for p in samples.sample_images()][:8]
  out = pipeline.product(keys, 64, batch=2, threads=1, draft=True, buckets=buckets)
  # 4 batches: the second half is the last 2 (4 images), timed from the 2nd batch's arrival.
  assert out["steady_images_per_s"] > 0
  assert 0 < out["steady_cpu_ms_per_image"] < 1e4
  one = pipeline.product(keys[:2], 64, batch=2, threads=1, draft=True, buckets=buckets)
  assert one["steady_cpu_ms_per_image"] is None  # one batch: no second half to time
