"""Throughput benchmarks: JAX vs PyTorch eager, faiss, Pillow; one table per section, summary last.

  python launch/benchmark.py                       # CPU or GPU preset, by the host
  python launch/benchmark.py --sections=model --backbones=vgg16 --batch_sizes=8
  python launch/benchmark.py --sections=input --json=/tmp/input.json   # decoding only
  python launch/benchmark.py --preset=gpu --json=/tmp/bench.json   # VGG16, f32+bf16, b64..512
Every figure, the environment and the settings go to --json. Defaults on a
2-core CPU take under 10 minutes; see docs/benchmarks.md for recorded runs. The
bounded check of an accelerator host is launch/gpu_check.py. Flags are the fields of
benchmarks.BenchmarkConfig and of Output below.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import sys

# benchmarks/ is the checkout's, not part of the installed package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import benchmarks as benchmark  # noqa: E402
from benchmarks import report  # noqa: E402
from cbir_jax import cli  # noqa: E402


@dataclasses.dataclass
class Output:
  """Where the figures go, and XLA flags for the whole run.

  Attributes:
    json: write every figure here as JSON.
    markdown: write the tables here as Markdown.
    xla_flags: added to XLA_FLAGS for this run (all sections), e.g.
      --xla_flags=--xla_cpu_experimental_ynn_fusion_type=
  """
  json: str | None = None
  markdown: str | None = None
  xla_flags: str | None = None


_SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
FLAGS = cli.define(benchmark.BenchmarkConfig, defaults={"images": str(_SHARED)})
OUTPUT = cli.define(Output)


def main() -> int:
  out = OUTPUT.config()
  if out.xla_flags:  # read when JAX's backend starts, which has not happened yet
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {out.xla_flags}".strip()
  cli.warn_if_gpu_unused("benchmark")
  result = benchmark.run(FLAGS.config())
  env = result["environment"]
  print(f"\n{env['date_utc']}  {env['cpu']['model']} ({env['cpu']['cores']} cores), "
        f"backend {env['backend']} x{env['num_devices']} ({', '.join(sorted(set(env['devices'])))})"
        f", load average {', '.join(f'{x:.1f}' for x in env['load_average'] or [])}")
  for t in report.section_tables(result):
    print("\n" + t)
  if out.json:
    pathlib.Path(out.json).write_text(json.dumps(result, indent=1))
    print(f"\nJSON: {out.json}")
  if out.markdown:
    pathlib.Path(out.markdown).write_text(report.markdown(result))
    print(f"Markdown: {out.markdown}")
  print("\n" + report.summary_table(result))
  return 1 if result["errors"] else 0


if __name__ == "__main__":
  # XLA's own defaults: the benchmark measures them against the launchers' setting
  # (section xla_flags), so it leaves XLA_FLAGS as the user has them.
  cli.run("benchmark", main, gpu_warning=False, tune_xla=False)
