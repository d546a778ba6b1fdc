"""Test-only (tests/step_delay.py): hooks in the processes a test starts.

Imported by Python at startup when this folder is on the PYTHONPATH; without the variables
below, nothing is imported or changed.

CBIR_JAX_TEST_STEP_DELAY_S: every batch the step loop takes from its feed (`Feed.get`) is
handed over that many seconds late, so a kill or a signal lands mid-job.
cbir_jax.job.feed imports only the standard library, so importing it this early changes
nothing else in the process.

CBIR_JAX_TEST_BLOCKING_FIFO_READS: `cbir_jax.decode.read_file` opens a FIFO the plain,
blocking way (the product opens it without waiting and refuses it), so a FIFO whose writer
never writes makes a read that never returns, as a file on a dead network mount does.
Patched before anything binds the function (input_pipeline's readers, pickled to the decode
worker processes by name, which run this file too).
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

if os.environ.get("CBIR_JAX_TEST_BLOCKING_FIFO_READS"):
  import functools
  import stat

  from cbir_jax import decode as _decode

  _read_file = _decode.read_file

  @functools.wraps(_read_file)
  def _read_file_blocking_on_fifos(path):
    if stat.S_ISFIFO(os.stat(path).st_mode):
      with open(path, "rb") as f:  # waits for a writer, then for its data or its close
        return f.read()
    return _read_file(path)

  _decode.read_file = _read_file_blocking_on_fifos
