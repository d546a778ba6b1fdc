"""Test-only (tests/step_delay.py): slows the step loop of a job started by a test.

Imported by Python at startup when this folder is on the PYTHONPATH. With
CBIR_JAX_TEST_STEP_DELAY_S set, every batch the step loop takes from its feed
(`Feed.get`) is handed over that many seconds late, so a kill or a signal lands mid-job.
Without it, nothing is imported or changed. cbir_jax.job.feed imports only the standard
library, so importing it this early changes nothing else in the process.
"""
import os

_DELAY_S = float(os.environ.get("CBIR_JAX_TEST_STEP_DELAY_S") or 0)

if _DELAY_S > 0:
  import functools
  import time

  from cbir_jax.job import feed as _feed

  _get = _feed.Feed.get

  @functools.wraps(_get)
  def _slow_get(self, *args, **kwargs):
    got = _get(self, *args, **kwargs)
    if got is not None:  # None: a stop was asked while waiting; no delay on the way out
      time.sleep(_DELAY_S)
    return got

  _feed.Feed.get = _slow_get
