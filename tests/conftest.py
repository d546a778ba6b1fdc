"""Test setup: 8 fake CPU devices for sharding tests, TensorFlow kept off accelerators."""
import os
import pathlib

# Must happen before jax is imported anywhere in the test process.
# The same XLA:CPU flags the launchers add (cbir_jax.runtime), so that in-process
# results and launcher subprocesses (which inherit this environment) agree.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
from cbir_jax import runtime  # noqa: E402  (imports no JAX backend)

runtime.tune_xla_cpu()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # only affects TensorFlow/torch here
# The test-only backbones (vgg_tiny, efficientnet_lite_tiny) as --model values of the
# launchers the tests start; users' launchers offer only the real ones.
os.environ.setdefault("CBIR_JAX_TEST_BACKBONES", "1")
# Jobs keep JAX's persistent compilation cache (job/jit_cache.py); tests, and the launchers
# they start, keep theirs in a fresh folder of this run instead of the user's cache.
if "CBIR_JAX_COMPILATION_CACHE" not in os.environ:
  import tempfile  # noqa: E402

  os.environ["CBIR_JAX_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="cbir_jax_jit_cache_")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """../shared/data (read-only). Tests that need it fail loudly if it is missing in CI."""
  if not SHARED_DATA.is_dir():
    if os.environ.get("CI"):
      raise RuntimeError(f"{SHARED_DATA} is missing; CI must provide ../shared/data")
    pytest.skip(f"{SHARED_DATA} not present")
  return SHARED_DATA
