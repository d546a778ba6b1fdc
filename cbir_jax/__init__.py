"""cbir_jax: image-retrieval descriptors from deep-network activations, in JAX.

Implements Staszewski et al., TNNLS 2021 (FC, Conv and FC+Conv descriptors);
see SPEC.md for the method and README.md for the jobs.
"""
from cbir_jax import backbones, descriptors, preprocessing
from cbir_jax.descriptors import DescriptorConfig, conv_descriptor, describe
from cbir_jax.store import StoreError, load_descriptors

__version__ = "0.1.0"

__all__ = ["__version__", "backbones", "descriptors", "preprocessing", "DescriptorConfig",
           "conv_descriptor", "describe", "load_descriptors", "StoreError"]
