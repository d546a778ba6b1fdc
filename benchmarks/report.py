"""Plain-text tables of a benchmark result (the launcher prints them; the JSON keeps all)."""
from __future__ import annotations

from typing import Any, Sequence


def _fmt(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, float):
    if v == 0:
      return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
      return f"{v:.3g}"
    if a >= 100:
      return f"{v:.0f}"
    if a >= 10:
      return f"{v:.1f}"
    return f"{v:.3g}"
  return str(v)


_MARKDOWN = False  # set by `markdown()` while it renders


def table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
  """A fixed-width table (or a Markdown one): `columns` are (key in each row, header)."""
  cells = [[h for _, h in columns]] + [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
  if _MARKDOWN:
    lines = [f"**{title}**", ""]
    for j, c in enumerate(cells):
      lines.append("| " + " | ".join(x.replace("|", "/") for x in c) + " |")
      if j == 0:
        lines.append("|" + "---|" * len(c))
    return "\n".join(lines)
  widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
  lines = [title, "-" * len(title)]
  for j, c in enumerate(cells):
    lines.append("  ".join(s.rjust(w) for s, w in zip(c, widths)))
    if j == 0:
      lines.append("  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _gflops(x: float | None) -> float | None:
  return x / 1e9 if x else None


def section_tables(result: dict[str, Any]) -> list[str]:
  """One table per section present in `result["sections"]`."""
  s = result["sections"]
  out = []
  if "model" in s:
    rows = [dict(r, gflop=_gflops(r.get("flops_per_image")),
                 gflops=_gflops(r.get("jax_flops_per_s"))) for r in s["model"]]
    out.append(table("1. Model + descriptors (fc_conv), inputs on device, images/s", rows, [
        ("backbone", "backbone"), ("dtype", "dtype"), ("batch", "batch"),
        ("jax_images_per_s", "jax"), ("torch_images_per_s", "torch"),
        ("jax_over_torch", "jax/torch"), ("gflop", "GFLOP/img"), ("gflops", "jax GFLOP/s"),
        ("jax_fraction_of_peak", "of peak"), ("jax_fraction_of_bf16_peak", "of bf16 peak"),
        ("peer_max_abs_diff_rel", "max diff")]))
  if s.get("xla_flags"):
    out.append(table("1b. XLA CPU flags, each in a fresh process: before/after", s["xla_flags"], [
        ("variant", "variant"), ("xla_flags", "XLA_FLAGS added"), ("backbone", "backbone"),
        ("batch", "batch"), ("jax_images_per_s", "jax"), ("torch_images_per_s", "torch"),
        ("jax_over_torch", "jax/torch")]))
  if "descriptors" in s:
    d = s["descriptors"]
    rows = [{"impl": name, "ips": d[f"{name}_images_per_s"],
             "ratio": d[f"{name}_images_per_s"] / d["jax_images_per_s"]}
            for name in ("jax", "numpy", "loop")]
    out.append(table(f"2. Conv descriptor stage alone, VGG16 pools at 224, batch {d['batch']}"
                     f" (share of model step: {_fmt(d.get('share_of_model_step'))})",
                     rows, [("impl", "implementation"), ("ips", "images/s"),
                            ("ratio", "vs jax")]))
  if "input" in s:
    p = s["input"]
    out.append(table(f"3. Input: JPEG -> {p['image_size']}px uint8, medians of {p['rounds']} "
                     "alternating rounds", p["rows"], [
                         ("set", "photos"), ("variant", "reader"), ("workers", "processes"),
                         ("threads", "threads"), ("draft", "draft"), ("images_per_s", "images/s"),
                         ("steady_images_per_s", "past start-up"),
                         ("images_per_cpu_s", "images/CPU-s"), ("cores_busy", "cores busy")]))
    out.append(table(f"3c. Input pipeline alone at {p['threads'][-1]} threads: decode into "
                     "canvases (device resize) vs decode + host resize, host CPU ms per image "
                     "(issue 17: <= 0.55 ImageNet-size, <= 0.9 phone-size)", p["sets"], [
                         ("set", "photos"), ("images", "images"),
                         ("host_cpu_ms_per_image", "decode + host resize"),
                         ("canvas_cpu_ms_per_image", "canvases"),
                         ("canvas_over_host_cpu_s_per_image", "canvas / host"),
                         ("host_steady_cpu_ms_per_image", "host, past start-up"),
                         ("canvas_steady_cpu_ms_per_image", "canvases, past start-up"),
                         ("canvas_over_host_steady", "canvas / host past start-up")]))
    out.append(table("3b. Input ratios (per CPU-second; product at 1 thread with draft)",
                     p["sets"], [
                         ("set", "photos"), ("images", "images"),
                         ("mean_megapixels", "Mpx"), ("mean_file_mb", "MB"),
                         ("product_over_pillow_full_per_cpu_s", "product/Pillow full"),
                         ("product_over_pillow_draft_per_cpu_s", "product/Pillow draft"),
                         ("pillow_draft_over_full_per_cpu_s", "Pillow draft/full"),
                         ("product_threads_speedup_wall", f"wall {p['threads'][-1]}/1 threads"),
                         ("best_processes", "processes x threads"),
                         ("processes_over_threads_steady",
                          f"those / {p['threads'][-1]} threads past start-up")]))
  if "end_to_end" in s:
    e = s["end_to_end"]
    out.append(table("4. End to end: extraction job", [e], [
        ("folder", "folder"), ("backbone", "backbone"), ("batch", "batch"),
        ("images", "images"), ("seconds", "seconds"), ("images_per_s", "images/s"),
        ("input_wait_share", "input wait share"), ("images_per_cpu_s", "images/CPU-s"),
        ("compiles", "compiles")]))
  if "search" in s:
    out.append(table("5. Exact L1 top-k: queries/s", s["search"], [
        ("n", "N"), ("dim", "D"), ("queries", "Q"), ("k", "k"),
        ("jax_queries_per_s", "l1_topk"), ("faiss_queries_per_s", "faiss"),
        ("jax_over_faiss", "jax/faiss"), ("topk_index_agreement", "same ranks"),
        ("topk_set_agreement", "same top-k set"), ("max_distance_diff_rel", "max dist diff"),
        ("skipped", "note")]))
  if "scaling" in s:
    out.append(table("6. Scaling, same global batch", s["scaling"], [
        ("devices", "devices"), ("fake_devices", "fake"), ("backbone", "backbone"),
        ("batch", "batch"), ("images_per_s", "images/s"),
        ("relative_to_first", "vs 1 device")]))
  for name, err in result.get("errors", {}).items():
    out.append(f"{name}: FAILED: {err}")
  return out


def summary_table(result: dict[str, Any]) -> str:
  return table("Summary", result["summary"], [("figure", "figure"), ("value", "value"),
                                              ("note", "note")])


def markdown(result: dict[str, Any]) -> str:
  """Every table of `result` as Markdown (for docs/benchmarks.md), the summary last."""
  global _MARKDOWN
  _MARKDOWN = True
  try:
    return "\n\n".join(section_tables(result) + [summary_table(result)]) + "\n"
  finally:
    _MARKDOWN = False


def gpu_check_tables(result: dict[str, Any]) -> list[str]:
  """The GPU check's tables: accuracy, the step sweep, the job end to end, what was skipped."""
  out = []
  acc = [dict(r, kinds=", ".join(f"{k} {_fmt(v)}" for k, v in r.get("rel_l1_by_kind", {}).items()))
         for r in result["accuracy"]]
  if acc:
    out.append(table("Descriptors vs the CPU float32 run (row-wise relative L1)", acc, [
        ("backbone", "backbone"), ("weights", "weights"), ("dtype", "dtype"),
        ("precision", "precision"), ("images", "images"), ("max_rel_l1", "max rel L1"),
        ("tolerance_rel_l1", "tolerance"), ("passed", "passed"), ("kinds", "by kind"),
        ("error", "error")]))
  if result["model"]:
    rows = [dict(r, tflops=(r["flops_per_s"] / 1e12 if r.get("flops_per_s") else None),
                 gflop=_gflops(r.get("flops_per_image"))) for r in result["model"]]
    out.append(table("Step (preprocessing + backbone + every descriptor kind), inputs on device",
                     rows, [
                         ("backbone", "backbone"), ("dtype", "dtype"), ("batch", "batch"),
                         ("images_per_s", "images/s"), ("gflop", "GFLOP/img"),
                         ("tflops", "TFLOP/s"), ("fraction_of_peak", "of dtype peak"),
                         ("fraction_of_bf16_peak", "of bf16 peak"), ("compile_s", "compile s"),
                         ("error", "error")]))
  if result["end_to_end"]:
    out.append(table("Extraction job end to end on made JPEGs", result["end_to_end"], [
        ("set", "photos"), ("images", "images"), ("mean_megapixels", "Mpx"),
        ("mean_file_mb", "MB"), ("decode_workers", "processes"), ("decode_threads", "threads"),
        ("decode_images_per_s", "input alone images/s"),
        ("decode_images_per_cpu_s", "input images/CPU-s"),
        ("job_images_per_s", "job images/s"),
        ("job_steady_images_per_s", "after compile"), ("job_input_wait_share", "job input wait"),
        ("job_compiles", "compiles"), ("error", "error")]))
  if result.get("input_scaling"):
    out.append(table("Input pipeline alone (draft): threads in the main process vs worker "
                     "processes", result["input_scaling"], [
                         ("set", "photos"), ("engine", "engine"), ("workers", "processes"),
                         ("threads", "threads"), ("images", "images"), ("batch", "batch"),
                         ("images_per_s", "images/s"),
                         ("steady_images_per_s", "past start-up"),
                         ("images_per_cpu_s", "images/CPU-s"),
                         ("first_batch_s", "first batch s"), ("error", "error")]))
  if result["skipped"]:
    out.append(table("Skipped", result["skipped"], [
        ("backbone", "backbone"), ("dtype", "dtype"), ("batch", "batch"), ("why", "why")]))
  for name, err in result.get("errors", {}).items():
    out.append(f"{name}: FAILED: {err}")
  return out
