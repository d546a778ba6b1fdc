"""cbir_jax: image-retrieval descriptors from deep-network activations, in JAX.

Implements Staszewski et al., TNNLS 2021 (FC, Conv and FC+Conv descriptors);
see SPEC.md for the method and README.md for the jobs.
"""
import importlib

__version__ = "0.1.0"

# Loaded on first use (PEP 562), so that importing a light submodule does not import JAX:
# the input engine's worker processes import `cbir_jax.decode_workers` and must stay free
# of JAX (and of accelerators). `cbir_jax.load_descriptors` etc. work as before.
_LAZY = {"backbones": None, "descriptors": None, "preprocessing": None,
         "DescriptorConfig": "descriptors", "conv_descriptor": "descriptors",
         "describe": "descriptors", "load_descriptors": "store", "StoreError": "store"}


def __getattr__(name: str):
  if name not in _LAZY:
    raise AttributeError(f"module 'cbir_jax' has no attribute {name!r}")
  module = importlib.import_module(f"cbir_jax.{_LAZY[name] or name}")
  return module if _LAZY[name] is None else getattr(module, name)


def __dir__() -> list[str]:
  return sorted([*globals(), *_LAZY])


__all__ = ["__version__", "backbones", "descriptors", "preprocessing", "DescriptorConfig",
           "conv_descriptor", "describe", "load_descriptors", "StoreError"]
