"""Slowed jobs for tests that must land a signal or a kill mid-job (and reads that hang).

A process started with `env(delay)` waits `delay` seconds after each batch its step loop
takes (`cbir_jax.job.feed.Feed.get`), through `site_hooks/sitecustomize.py`, which Python
imports at startup from the PYTHONPATH (so do the job's decode worker processes). With
`fifo_reads_block(env)`, its file reads open FIFOs the plain blocking way, so a FIFO with a
writer that never writes stands for a file on a dead network mount. The product holds no
hook for either.
"""
from __future__ import annotations

import os
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
SITE = HERE / "site_hooks"
REPO = HERE.parent
# CBIR_JAX_*: the Ray launcher forwards it, with PYTHONPATH, to its task processes (ray_job).
VAR = "CBIR_JAX_TEST_STEP_DELAY_S"
FIFO_VAR = "CBIR_JAX_TEST_BLOCKING_FIFO_READS"


def _with_site(base: dict[str, str] | None) -> dict[str, str]:
  out = dict(os.environ if base is None else base)
  path = [str(SITE), str(REPO)] + [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
  out["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
  return out


def env(delay: float, base: dict[str, str] | None = None) -> dict[str, str]:
  """`base` (default: this process' environment) with every step slowed by `delay` s."""
  out = _with_site(base)
  out[VAR] = str(delay)
  return out


def fifo_reads_block(base: dict[str, str] | None = None) -> dict[str, str]:
  """`base` with the job's reads of FIFOs blocking (a stand-in for a dead mount)."""
  out = _with_site(base)
  out[FIFO_VAR] = "1"
  return out
