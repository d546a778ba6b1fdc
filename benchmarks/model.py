"""Section 1: model + descriptors on one device, JAX vs the PyTorch eager peer.

Inputs are synthetic uint8 images already on the device; the JAX step is the
library's (preprocessing, backbone and descriptors in one jit), compiled once
ahead of time so XLA's cost analysis gives its FLOP count. The peer runs the
same network with the same weights and the same descriptor maths, and the two
are timed alternately (see `timing.interleaved`).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from cbir_jax import backbones, inference
from cbir_jax.backbones import vgg
from benchmarks import flops as flops_lib
from benchmarks import timing, torch_peer

KINDS = ("fc_conv",)  # FC+Conv needs every part: the FC layers, all blocks, the Conv maths


def analytic_flops(backbone: str, image_size: int) -> float | None:
  """Closed-form FLOPs per image where we have one (VGG16), else None."""
  if backbone == "vgg16":
    return float(flops_lib.vgg_flops(vgg.VGG16_BLOCKS, image_size))
  return None


def random_params(backbone: backbones.Backbone, image_size: int, seed: int = 0) -> Any:
  """Random parameters, initialised in one compiled call (eager init compiles every op)."""
  return jax.jit(lambda key: backbone.init(key, image_size))(jax.random.key(seed))


def jax_step(backbone: backbones.Backbone, params: Any, batch: int, image_size: int,
             dtype: str, device: Any, seed: int = 0) -> tuple[Any, Any, Any, float | None]:
  """(compiled step, device params, device images, XLA FLOPs per image)."""
  fn = jax.jit(inference.describe_fn(backbone, preprocessing=backbone.preprocessing,
                                     kinds=KINDS, dtype=inference.compute_dtype(dtype)))
  p = jax.device_put(params, device)
  x = jax.device_put(timing.synthetic_images(batch, image_size, seed), device)
  compiled = fn.lower(p, x).compile()
  total = flops_lib.xla_flops(compiled)
  return compiled, p, x, (total / batch if total else None)


def run(*, backbone_names: Sequence[str], batch_sizes: Sequence[int], dtypes: Sequence[str],
        repeats: int, image_size: int | None = None, peer: bool = True,
        peer_layout: str = "auto", log=print) -> list[dict[str, Any]]:
  """One row per (backbone, dtype, batch): images/s of JAX and of the peer, FLOP/s, peak share.

  The peer runs float32 only (the question is the same maths at the same
  precision); on a GPU host it runs on CUDA when the installed torch sees it
  (the project pins a CPU build, so usually it reports why it did not run).
  """
  device = jax.devices()[0]
  threads = timing.cpu_info()["cores"]
  wants_peer = peer and any(n in torch_peer.FASTER_LAYOUT for n in backbone_names)
  ok, why = torch_peer.available(device.platform) if wants_peer else (False, "")
  torch_device = "cuda" if device.platform == "gpu" else "cpu"
  rows = []
  for name in backbone_names:
    backbone = backbones.get(name)
    size = image_size or backbone.image_size
    peer_step = None
    params = None
    note = ""
    if peer and ok and name in torch_peer.FASTER_LAYOUT:
      try:
        layout = (torch_peer.FASTER_LAYOUT[name] if peer_layout == "auto" else peer_layout)
        peer_step, params, note = torch_peer.make_step(
            name, None, threads=threads, channels_last=layout == "channels_last",
            device=torch_device)
      except Exception as e:  # a missing optional package: report, keep the JAX side
        note = f"peer unavailable: {type(e).__name__}: {e}"
    elif peer:
      note = why if (not ok and why) else f"no PyTorch peer for {name}"
    if params is None:
      params = jax.tree.map(np.asarray, random_params(backbone, size))
    for dtype in dtypes:
      peak, peak_src = flops_lib.device_peak(device, dtype)
      bf16_peak, _ = flops_lib.device_peak(device, "bfloat16")
      for batch in batch_sizes:
        log(f"[model] {name} {dtype} batch {batch} ...")
        step, p, x, xla = jax_step(backbone, params, batch, size, dtype, device)
        fns = {"jax": lambda: step(p, x)}
        syncs = {"jax": jax.block_until_ready}
        row: dict[str, Any] = {"backbone": name, "dtype": dtype, "batch": batch,
                               "image_size": size, "device": device.device_kind,
                               "platform": device.platform}
        out_j = jax.block_until_ready(step(p, x))  # warm-up, and the agreement check
        use_peer = peer_step is not None and dtype == "float32"
        if use_peer:
          import torch

          xt = torch.from_numpy(np.asarray(x)).to(torch_device)
          out_t = torch_peer.synchronize(peer_step(xt))  # warm-up
          fns["torch"] = lambda: peer_step(xt)
          syncs["torch"] = torch_peer.synchronize
          a = np.asarray(out_j["fc_conv"], np.float64)
          b = out_t.cpu().numpy().astype(np.float64)
          scale = max(np.abs(a).max(), 1e-30)
          row["peer_max_abs_diff_rel"] = float(np.abs(a - b).max() / scale)
          # Masks thresholded at tau can flip for values within rounding of
          # tau; the median row difference is the robust agreement figure.
          row["peer_median_abs_diff_rel"] = float(np.median(np.abs(a - b)) / scale)
        # A second untimed call each: oneDNN (torch) and the allocators settle
        # over the first calls, and a median of few repeats must not see that.
        times = timing.interleaved(fns, repeats=repeats, warmup=1, syncs=syncs)
        ips = timing.rate(batch, times["jax"])
        row.update({"jax_images_per_s": ips, "jax_seconds": times["jax"],
                    "flops_per_image_xla": xla,
                    "flops_per_image_analytic": analytic_flops(name, size)})
        fpi = row["flops_per_image_analytic"] or xla
        row["flops_per_image"] = fpi
        row["jax_flops_per_s"] = fpi * ips if fpi else None
        row["peak_flops_per_s"] = peak
        row["peak_source"] = peak_src
        row["jax_fraction_of_peak"] = (row["jax_flops_per_s"] / peak
                                       if peak and row["jax_flops_per_s"] else None)
        row["jax_fraction_of_bf16_peak"] = (row["jax_flops_per_s"] / bf16_peak
                                            if bf16_peak and row["jax_flops_per_s"] else None)
        if use_peer:
          tps = timing.rate(batch, times["torch"])
          row.update({"peer": note, "torch_images_per_s": tps, "torch_seconds": times["torch"],
                      "jax_over_torch": ips / tps})
        else:
          row["peer"] = note or "float32 only"
        rows.append(row)
        del step, p, x, out_j
  return rows


def _variant_subprocess(flags: str, kw: dict[str, Any]) -> dict[str, Any]:
  import json
  import os
  import re
  import subprocess
  import sys

  env = dict(os.environ)
  # The parent's flags stay (e.g. a device count), minus any setting the variant overrides.
  base = env.get("XLA_FLAGS", "")
  for f in flags.split():
    base = re.sub(rf"{re.escape(f.split('=')[0])}=\S*", "", base)
  env["XLA_FLAGS"] = f"{base} {flags}".strip()
  proc = subprocess.run([sys.executable, "-m", "benchmarks.model", json.dumps(kw)],
                        env=env, capture_output=True, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("[")]
  if proc.returncode or not lines:
    raise RuntimeError(f"model run with XLA_FLAGS={flags!r} failed (exit {proc.returncode}): "
                       f"{proc.stderr[-2000:]}")
  return json.loads(lines[-1])[0]


def run_xla_variants(variants: Sequence[str], *, backbone_names: Sequence[str], batch: int,
                     repeats: int,
                     image_size: int | None = None, peer: bool = True,
                     peer_layout: str = "auto", log=print) -> list[dict[str, Any]]:
  """The section-1 figure under several XLA flag sets, each in a fresh process.

  XLA reads XLA_FLAGS once, when the backend starts, so a flag's before/after
  needs a process per setting. Each process times JAX against the same
  PyTorch peer, so the jax/torch ratios compare across variants even when the
  machine's load changes between them.

  Args:
    variants: "name=flags" strings, e.g. "ynn_off=--xla_cpu_experimental_ynn_fusion_type=".
  """
  rows = []
  for backbone_name in backbone_names:
    for v in variants:
      name, _, flags = v.partition("=")
      log(f"[xla_flags] {backbone_name} float32 batch {batch}, {name}: XLA_FLAGS+={flags!r} ...")
      kw = dict(backbone_names=[backbone_name], batch_sizes=[batch], dtypes=["float32"],
                repeats=repeats, image_size=image_size, peer=peer, peer_layout=peer_layout)
      row = _variant_subprocess(flags, kw)
      row.update(variant=name, xla_flags=flags)
      rows.append(row)
  return rows


if __name__ == "__main__":
  import json
  import sys

  print(json.dumps(run(**json.loads(sys.argv[1]), log=lambda msg: None)))
