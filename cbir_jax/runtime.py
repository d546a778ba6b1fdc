"""Process-level runtime facts and settings: which accelerator JAX runs on, and XLA:CPU flags.

`platform_info` records the backend and devices in manifests and benchmark output;
`warn_if_gpu_unused` says in one line when an NVIDIA GPU sits idle because the
installed jaxlib has no CUDA backend. `tune_xla_cpu` is the launchers' XLA:CPU
setting: on JAX 0.10, XLA:CPU hands whole convolution blocks to YNNPACK by default;
sending them to XLA's own kernels instead made VGG16 1.3x and the extraction job
1.4-1.5x faster on the project's 2-core Xeon (docs/benchmarks.md, 1b). That flag
only affects the CPU backend, so GPU/TPU hosts are unchanged.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import shutil
import subprocess
from typing import Any, Callable, MutableMapping

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
# XLA aborts on flags it does not know, so only jaxlib versions where this one
# was measured get it; newer versions keep XLA's defaults until re-measured.
_MEASURED_JAXLIB = ("0.10.",)
OPT_OUT_ENV = "CBIR_JAX_DEFAULT_XLA_FLAGS"

NVIDIA_DEVICE = "/dev/nvidia0"
CUDA_INSTALL = 'pip install -e ".[cuda12]" (or ".[cuda13]" with an NVIDIA driver >= 580)'
CUDA_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin")


def tune_xla_cpu(environ: MutableMapping[str, str] = os.environ) -> bool:
  """Adds YNN_OFF to XLA_FLAGS (call before the first JAX computation); returns whether it did.

  Leaves XLA_FLAGS alone when the user already chose a YNN setting, when
  $CBIR_JAX_DEFAULT_XLA_FLAGS=1, or on a jaxlib where the flag was not measured.
  """
  flags = environ.get("XLA_FLAGS", "")
  if environ.get(OPT_OUT_ENV) == "1" or "xla_cpu_experimental_ynn_fusion_type" in flags:
    return False
  if not _version("jaxlib").startswith(_MEASURED_JAXLIB):  # "" when jaxlib is not installed
    return False
  environ["XLA_FLAGS"] = f"{flags} {YNN_OFF}".strip()
  return True


@dataclasses.dataclass(frozen=True)
class PlatformInfo:
  """Where a job or benchmark ran, as recorded on disk (manifests, benchmark JSON)."""
  backend: str  # JAX's default backend ("cpu", "gpu", "tpu")
  device_kind: str  # the first device's kind, e.g. "NVIDIA H100 80GB HBM3" or "cpu"
  device_count: int  # over all processes
  local_device_count: int  # of this process
  process_count: int  # the multi-host layout
  process_index: int
  jax: str = ""  # library versions ("" when unknown)
  jaxlib: str = ""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "PlatformInfo":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  def line(self) -> str:
    """One line for logs: 'JAX 0.11.2 on gpu: 1 x NVIDIA H100 80GB HBM3 (process 0 of 1)'."""
    return (f"JAX {self.jax} on {self.backend}: {self.local_device_count} x {self.device_kind}"
            f" (process {self.process_index} of {self.process_count}, "
            f"{self.device_count} devices in all)")


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return ""


def platform_info() -> dict[str, Any]:
  """JAX's backend, device kind and counts, process layout and versions (PlatformInfo.to_dict()).

  Starts JAX's backends if nothing has yet; call after `tune_xla_cpu` and after
  `jax.distributed.initialize` where a job uses them.
  """
  import jax

  local = jax.local_devices()
  return PlatformInfo(
      backend=jax.default_backend(), device_kind=local[0].device_kind if local else "",
      device_count=jax.device_count(), local_device_count=len(local),
      process_count=jax.process_count(), process_index=jax.process_index(),
      jax=jax.__version__, jaxlib=_version("jaxlib")).to_dict()


def _nvidia_smi_gpus(command: str, timeout_s: float) -> list[str]:
  """The 'GPU 0: ...' lines of `nvidia-smi -L`; [] when it is absent, fails or hangs."""
  exe = shutil.which(command)
  if exe is None:
    return []
  try:
    out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=timeout_s,
                         check=False).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [line.strip() for line in out.splitlines() if line.strip().startswith("GPU ")]


def nvidia_gpu_evidence(*, device: str = NVIDIA_DEVICE, smi: str = "nvidia-smi",
                        timeout_s: float = 5.0) -> str | None:
  """What shows an NVIDIA GPU on this host ("/dev/nvidia0", or nvidia-smi's first line), or None.

  Cheap and without JAX: the device node first, then `nvidia-smi -L` (containers
  may expose the GPU under another minor number, or only through the tool).
  """
  if os.path.exists(device):
    return device
  gpus = _nvidia_smi_gpus(smi, timeout_s)
  return f"nvidia-smi: {gpus[0]}" if gpus else None


def warn_if_gpu_unused(log: Callable[[str], None], *, backend: str | None = None,
                       **probe: Any) -> bool:
  """Logs one line when an NVIDIA GPU is visible but JAX's default backend is the CPU; returns
  whether it warned. `backend`, when the caller does not know it, is asked of JAX only once a
  GPU is seen (CPU-only hosts never start JAX here); `probe` goes to `nvidia_gpu_evidence`."""
  evidence = nvidia_gpu_evidence(**probe)
  if evidence is None:
    return False
  if backend is None:
    import jax

    backend = jax.default_backend()
  if backend != "cpu":
    return False
  plugins = [f"{p} {v}" for p in CUDA_PLUGINS if (v := _version(p))]
  if plugins:  # installed but not started: JAX logged why (driver, libraries) just before
    why = (f"JAX's CUDA plugin ({', '.join(plugins)}) did not start; JAX's own warning above "
           f"says why (often an NVIDIA driver older than the plugin needs)")
  else:
    why = f"the installed jaxlib has no CUDA backend: install one with {CUDA_INSTALL}"
  log(f"warning: an NVIDIA GPU is visible ({evidence}) but JAX runs on the CPU: {why}")
  return True
