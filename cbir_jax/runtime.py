"""Process-level XLA settings the launchers apply before JAX starts its backends.

On JAX 0.10, XLA:CPU hands whole convolution blocks to YNNPACK by default;
sending them to XLA's own kernels instead made VGG16 1.3x and the extraction
job 1.4-1.5x faster on the project's 2-core Xeon (docs/benchmarks.md, 1b).
The flag only affects the CPU backend, so GPU/TPU hosts are unchanged.
"""
from __future__ import annotations

import importlib.metadata
import os
from typing import MutableMapping

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
# XLA aborts on flags it does not know, so only jaxlib versions where this one
# was measured get it; newer versions keep XLA's defaults until re-measured.
_MEASURED_JAXLIB = ("0.10.",)
OPT_OUT_ENV = "CBIR_JAX_DEFAULT_XLA_FLAGS"


def tune_xla_cpu(environ: MutableMapping[str, str] = os.environ) -> bool:
  """Adds YNN_OFF to XLA_FLAGS; call before the first JAX computation.

  Leaves XLA_FLAGS alone when the user already chose a YNN setting, when
  $CBIR_JAX_DEFAULT_XLA_FLAGS=1, or on a jaxlib where the flag was not measured.

  Returns:
    Whether the flag was added.
  """
  flags = environ.get("XLA_FLAGS", "")
  if environ.get(OPT_OUT_ENV) == "1" or "xla_cpu_experimental_ynn_fusion_type" in flags:
    return False
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return False
  if not version.startswith(_MEASURED_JAXLIB):
    return False
  environ["XLA_FLAGS"] = f"{flags} {YNN_OFF}".strip()
  return True
