"""VGG16 (Simonyan & Zisserman 2015) as a Flax module, NHWC, inference only.

Returns every max-pool output and the post-ReLU FC activations, which are what
the paper's descriptors are built from. Weights come from `cbir_jax.porting`.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

# (convs per block, channels): the 13 conv layers of configuration "D".
VGG16_BLOCKS: tuple[tuple[int, int], ...] = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


def _adaptive_avg_matrix(size: int, out: int) -> np.ndarray:
  """Row i averages input bins [floor(i*size/out), ceil((i+1)*size/out)) like torch."""
  a = np.zeros((out, size), np.float32)
  for i in range(out):
    lo = (i * size) // out
    hi = -((-(i + 1) * size) // out)
    a[i, lo:hi] = 1.0 / (hi - lo)
  return a


def adaptive_avg_pool(x: jnp.ndarray, out_hw: tuple[int, int]) -> jnp.ndarray:
  """torch.nn.AdaptiveAvgPool2d on NHWC; the identity when sizes already match."""
  _, h, w, _ = x.shape
  if (h, w) == tuple(out_hw):
    return x
  ah = jnp.asarray(_adaptive_avg_matrix(h, out_hw[0]), x.dtype)
  aw = jnp.asarray(_adaptive_avg_matrix(w, out_hw[1]), x.dtype)
  return jnp.einsum("ih,jw,nhwc->nijc", ah, aw, x)


class VGG(nn.Module):
  """VGG with 2x2/2 max-pools (floor) after each block and a 4096-4096-classes head.

  Any input of at least 32x32 works: like torchvision, pool5 is
  adaptive-average-pooled to 7x7 before FC6 when it is not 7x7 already (the
  224x224 case is untouched). Dropout is absent: this is inference only.

  `with_fc=False` is the network without its head (Keras' include_top=False):
  only the conv layers have parameters, for weights files that hold nothing
  else ("no-top" files).

  Returns:
    (logits, intermediates) with intermediates "pool1".."pool5" (post-ReLU,
    after the pool), "fc6", "fc7" (post-ReLU) and "logits"; without the head,
    (None, {"pool1".."pool5"}).
  """
  blocks: Sequence[tuple[int, int]] = VGG16_BLOCKS
  num_classes: int = 1000
  fc_dim: int = 4096
  with_fc: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray | None, dict[str, jnp.ndarray]]:
    if x.shape[1] < 32 or x.shape[2] < 32:
      raise ValueError(f"VGG needs inputs of at least 32x32, got {x.shape[1:3]}")
    out: dict[str, jnp.ndarray] = {}
    x = x.astype(self.dtype)
    for b, (n_convs, channels) in enumerate(self.blocks, start=1):
      for i in range(1, n_convs + 1):
        x = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    param_dtype=jnp.float32, name=f"conv{b}_{i}")(x)
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      out[f"pool{b}"] = x
    if not self.with_fc:
      return None, out
    x = adaptive_avg_pool(x, (7, 7))
    x = x.reshape(x.shape[0], -1)  # H, W, C flatten order (torch's C, H, W is permuted at porting)
    for name in ("fc6", "fc7"):
      x = nn.relu(nn.Dense(self.fc_dim, dtype=self.dtype, param_dtype=jnp.float32, name=name)(x))
      out[name] = x
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="fc8")(x)
    out["logits"] = x
    return x, out


VGG16 = functools.partial(VGG, blocks=VGG16_BLOCKS)
# Tiny variant for fast tests of shapes, sharding and jobs (not a real network).
_VGGTiny = functools.partial(VGG, blocks=((1, 4), (1, 8), (1, 8), (1, 16), (1, 16)),
                             fc_dim=32, num_classes=10)
