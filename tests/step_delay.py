"""Slowed jobs for tests that must land a signal or a kill mid-job.

A process started with `env(delay)` waits `delay` seconds after each batch its step loop
takes (`cbir_jax.job.feed.Feed.get`), through `step_delay_site/sitecustomize.py`, which
Python imports at startup from the PYTHONPATH. The product holds no hook for this.
"""
from __future__ import annotations

import os
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
SITE = HERE / "step_delay_site"
REPO = HERE.parent
# CBIR_JAX_*: the Ray launcher forwards it, with PYTHONPATH, to its task processes (ray_job).
VAR = "CBIR_JAX_TEST_STEP_DELAY_S"


def env(delay: float, base: dict[str, str] | None = None) -> dict[str, str]:
  """`base` (default: this process' environment) with every step slowed by `delay` s."""
  out = dict(os.environ if base is None else base)
  path = [str(SITE), str(REPO)] + [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
  out["PYTHONPATH"] = os.pathsep.join(path)
  out[VAR] = str(delay)
  return out
