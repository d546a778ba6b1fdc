"""Checks an accelerator host in minutes: descriptors vs the CPU, step images/s, the job end to end.

  PYTHONPATH=. python3 launch/gpu_check.py --json=/tmp/gpu_check.json
  PYTHONPATH=. python3 launch/gpu_check.py --sweep=vgg16:64,256 --phone_count=0
Flags are the fields of cbir_jax.benchmark.gpu_check.GpuCheckConfig (defaults fit
in 9 minutes on one H100). Figures print as they come; --json is rewritten after
each, so a run cut short keeps them. Exit status 1 when a check failed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import typing

from absl import app, flags

from cbir_jax import runtime
from cbir_jax.benchmark import gpu_check, report

_JSON = flags.DEFINE_string("json", None, "Write every figure here as JSON (after each one).")


def _define(field: dataclasses.Field, hint: typing.Any) -> None:
  """An absl flag for one config field: lists for tuples, None defaults allowed."""
  args = typing.get_args(hint)
  base = next((a for a in args if a is not type(None)), hint) if args else hint
  doc = f"GpuCheckConfig.{field.name}"
  if typing.get_origin(hint) is tuple:
    flags.DEFINE_list(field.name, list(field.default), doc)
  elif base is bool:
    flags.DEFINE_bool(field.name, field.default, doc)
  elif base is int:
    flags.DEFINE_integer(field.name, field.default, doc)
  elif base is float:
    flags.DEFINE_float(field.name, field.default, doc)
  else:
    flags.DEFINE_string(field.name, field.default, doc)


_HINTS = typing.get_type_hints(gpu_check.GpuCheckConfig)
_FIELDS = dataclasses.fields(gpu_check.GpuCheckConfig)
for _f in _FIELDS:
  _define(_f, _HINTS[_f.name])


def _config() -> gpu_check.GpuCheckConfig:
  values = {f.name: flags.FLAGS[f.name].value for f in _FIELDS}
  # "--sweep=vgg16:32,64" arrives split at commas: regroup the batches with their backbone.
  sweep: list[str] = []
  for item in values["sweep"]:
    if ":" in item or not sweep:
      sweep.append(item)
    else:
      sweep[-1] += f",{item}"
  values["sweep"] = tuple(sweep)
  values["dtypes"] = tuple(values["dtypes"])
  return gpu_check.GpuCheckConfig(**values)


def _save(path: str, result: dict) -> None:
  tmp = f"{path}.tmp"
  pathlib.Path(tmp).write_text(json.dumps(result, indent=1))
  os.replace(tmp, path)  # a reader (or a kill) never sees half a file


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.tune_xla_cpu()  # CPU-only flag, applied on measured jaxlib versions only
  cfg = _config()
  gpu_check.parse_sweep(cfg.sweep)  # bad flags fail before anything heavy starts
  save = (lambda r: _save(_JSON.value, r)) if _JSON.value else (lambda r: None)
  result = gpu_check.run(cfg, log=lambda msg: print(msg, flush=True), on_update=save)
  for t in report.gpu_check_tables(result):
    print("\n" + t)
  print(f"\n{'PASSED' if result['passed'] else 'FAILED'} in {result['seconds']:.0f} s"
        + (f"; JSON: {_JSON.value}" if _JSON.value else ""))
  if not result["passed"]:
    raise SystemExit(1)


if __name__ == "__main__":
  app.run(main)
