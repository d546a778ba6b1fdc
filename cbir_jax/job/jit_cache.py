"""JAX's persistent compilation cache for jobs: a rerun loads the step instead of compiling it.

On by default (`ExtractConfig.compilation_cache`); the directory is per user, because JAX
trusts what it finds there (an entry is code it will run). JAX reads the setting at its first
compile in the process, so `enable` runs before the job touches JAX. Hits and misses are
counted through `jax.monitoring` (public events) for the summary, and so are the step's
compilations (`CompileCounter`).
"""
from __future__ import annotations

import collections
import contextlib
import os
import threading
from typing import Any, Iterator, Mapping

ENV = "CBIR_JAX_COMPILATION_CACHE"
OFF = ("none", "off", "")
HITS, MISSES = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"
# Recorded once per executable JAX makes, around the XLA compile or the persistent cache's
# load that stands in for it (both happen on the thread that called the jitted function).
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"

_counts: collections.Counter = collections.Counter()
_lock = threading.Lock()
_listening = False
_watching = threading.local()  # .counter: the CompileCounter of this thread's `watch`


def cache_dir(setting: str, environ: Mapping[str, str] = os.environ) -> str | None:
  """The directory for a `compilation_cache` setting; None when off."""
  if setting.strip().lower() in OFF:
    return None
  if setting != "auto":
    return os.path.abspath(os.path.expanduser(setting))
  if environ.get(ENV):
    return cache_dir(environ[ENV], {})
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "cbir_jax", "jax")


def _count(event: str, **_: Any) -> None:
  if event in (HITS, MISSES):
    with _lock:
      _counts[event] += 1


def _compiled(event: str, _duration_secs: float, **_: Any) -> None:
  counter = getattr(_watching, "counter", None)
  if event == BACKEND_COMPILE and counter is not None:
    counter.count += 1


def _listen() -> None:
  """Registers the cache and compile listeners, once for the process."""
  import jax

  global _listening
  with _lock:
    if not _listening:
      jax.monitoring.register_event_listener(_count)
      jax.monitoring.register_event_duration_secs_listener(_compiled)
      _listening = True


def enable(setting: str) -> str | None:
  """Points JAX at the cache (unless it was given one already, with "auto"); returns the
  directory in use, or None when off."""
  import jax

  _listen()
  current = jax.config.jax_compilation_cache_dir
  if setting == "auto" and current:
    return current
  path = cache_dir(setting)
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  os.makedirs(path, mode=0o700, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  # The step of a small model compiles in well under JAX's default 1 s threshold; keep it too.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path


class CompileCounter:
  """Counts the executables made (compiled, or loaded from the persistent cache) for the
  calls made inside `watch()` on the calling thread: one per input shape or bucket."""

  def __init__(self) -> None:
    self.count = 0

  @contextlib.contextmanager
  def watch(self) -> Iterator[None]:
    _listen()  # one listener for the process; the thread's `counter` says who is counted
    _watching.counter = self
    try:
      yield
    finally:
      _watching.counter = None


def counts() -> tuple[int, int]:
  """(hits, misses) of the persistent cache in this process so far."""
  with _lock:
    return _counts[HITS], _counts[MISSES]


__all__ = ["CompileCounter", "ENV", "cache_dir", "counts", "enable"]
