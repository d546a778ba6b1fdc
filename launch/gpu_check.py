"""Checks an accelerator host in minutes: descriptors vs the CPU, step images/s, the job end to end.

  PYTHONPATH=. python3 launch/gpu_check.py --json=/tmp/gpu_check.json
  PYTHONPATH=. python3 launch/gpu_check.py --sweep=vgg16:64,256 --phone_count=0
Flags are the fields of benchmarks.gpu_check.GpuCheckConfig (defaults fit
in 9 minutes on one H100). Figures print as they come; --json is rewritten after
each, so a run cut short keeps them. Exit status 1 when a check failed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import sys

# benchmarks/ is the checkout's, not part of the installed package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import gpu_check, report  # noqa: E402
from cbir_jax import cli  # noqa: E402


@dataclasses.dataclass
class Output:
  """Where the figures go.

  Attributes:
    json: write every figure here as JSON (after each one).
  """
  json: str | None = None


FLAGS = cli.define(gpu_check.GpuCheckConfig)
OUTPUT = cli.define(Output)


def _regroup(sweep: tuple[str, ...]) -> tuple[str, ...]:
  """"--sweep=vgg16:32,64" arrives split at commas: the batches go back to their backbone."""
  out: list[str] = []
  for item in sweep:
    if ":" in item or not out:
      out.append(item)
    else:
      out[-1] += f",{item}"
  return tuple(out)


def _save(path: str, result: dict) -> None:
  tmp = f"{path}.tmp"
  pathlib.Path(tmp).write_text(json.dumps(result, indent=1))
  os.replace(tmp, path)  # a reader (or a kill) never sees half a file


def main() -> int:
  cfg = FLAGS.config(sweep=_regroup(FLAGS.values()["sweep"]))
  path = OUTPUT.config().json
  gpu_check.parse_sweep(cfg.sweep)  # bad flags fail before anything heavy starts
  save = (lambda r: _save(path, r)) if path else (lambda r: None)
  result = gpu_check.run(cfg, log=lambda msg: print(msg, flush=True), on_update=save)
  for t in report.gpu_check_tables(result):
    print("\n" + t)
  print(f"\n{'PASSED' if result['passed'] else 'FAILED'} in {result['seconds']:.0f} s"
        + (f"; JSON: {path}" if path else ""))
  return 0 if result["passed"] else 1


if __name__ == "__main__":
  cli.run("gpu_check", main, gpu_warning=False)  # gpu_check.run warns itself
