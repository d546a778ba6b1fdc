"""EfficientNet-Lite0 (Tan & Le 2019, "lite" variant) as a Flax module, NHWC, inference only.

The embedded default backbone: its ImageNet weights can be shipped (Apache-2.0).
Returns the last feature map at each resolution as the method's five blocks.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Stage(NamedTuple):
  """A run of MBConv blocks; only the first one strides and changes width."""
  repeats: int
  kernel: int
  stride: int
  expand_ratio: int
  channels: int


# EfficientNet-Lite0: the B0 layout without squeeze-excite, ReLU6 instead of
# swish, and the stem (32) and head (1280) not scaled (the "fix_head_stem" rule).
LITE0_STAGES: tuple[Stage, ...] = (
    Stage(1, 3, 1, 1, 16), Stage(2, 3, 2, 6, 24), Stage(2, 5, 2, 6, 40), Stage(3, 3, 2, 6, 80),
    Stage(3, 5, 1, 6, 112), Stage(4, 5, 2, 6, 192), Stage(1, 3, 1, 6, 320))

NUM_BLOCKS = 5  # feature maps at strides 2, 4, 8, 16, 32


def _conv(features: int, kernel: int, *, stride: int = 1, dtype: Any, name: str) -> nn.Conv:
  # "SAME" in lax is TensorFlow's rule (output ceil(in / stride), the odd pixel
  # of padding at the bottom/right), which is what the weights were trained
  # with. Batch norm is folded into kernel and bias when weights are ported.
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                 use_bias=True, dtype=dtype, param_dtype=jnp.float32, name=name)


def depthwise_conv(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
  """Depthwise k x k convolution, "SAME" padding, as k*k shifted multiply-adds: x [N, H, W, C]
  and kernel [k, k, 1, C] (HWIO, one input channel per group), stride on both spatial axes,
  give [N, ceil(H / stride), ceil(W / stride), C].

  Same result as lax.conv_general_dilated with feature_group_count = channels,
  but XLA:CPU runs that grouped convolution about 5x slower than these
  elementwise taps (measured on 112x112x96, 3x3); on accelerators the taps
  fuse into one elementwise kernel.
  """
  n, h, w, c = x.shape
  k = kernel.shape[0]
  # TensorFlow's "SAME": output ceil(size / stride), the odd padded pixel after, not before.
  pads = jax.lax.padtype_to_pads((h, w), (k, k), (stride, stride), "SAME")
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  oh, ow = -(-h // stride), -(-w // stride)
  out = None
  for i in range(k):
    for j in range(k):
      tap = jax.lax.slice(x, (0, i, j, 0), (n, i + (oh - 1) * stride + 1,
                                            j + (ow - 1) * stride + 1, c), (1, stride, stride, 1))
      term = tap * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


class DepthwiseConv(nn.Module):
  """Depthwise convolution with bias; params shaped like a grouped nn.Conv's."""
  kernel_size: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.kernel_size, self.kernel_size, 1, c), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
    x = x.astype(self.dtype)
    return depthwise_conv(x, kernel.astype(self.dtype), self.stride) + bias.astype(self.dtype)


class MBConv(nn.Module):
  """Inverted residual: 1x1 expand, ReLU6, depthwise kxk, ReLU6, 1x1 project (linear)."""
  channels: int
  kernel: int
  stride: int
  expand_ratio: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    inputs = x
    hidden = x.shape[-1] * self.expand_ratio
    if self.expand_ratio != 1:
      x = nn.relu6(_conv(hidden, 1, dtype=self.dtype, name="expand")(x))
    x = nn.relu6(DepthwiseConv(self.kernel, self.stride, dtype=self.dtype, name="depthwise")(x))
    x = _conv(self.channels, 1, dtype=self.dtype, name="project")(x)
    if self.stride == 1 and inputs.shape[-1] == self.channels:
      x = x + inputs
    return x


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite with batch norm folded into the convolutions.

  Any input size works; every stride-2 layer gives ceil(H / 2) rows.

  Which map is each block: block k is the last feature map at stride 2^k.
  For k = 1..4 that is the output of the last MBConv at that stride (linear
  bottleneck, so values may be negative). For k = 5 it is the head (1x1 conv to
  1280 + ReLU6), not the last MBConv (320 channels): it is the last map at
  stride 32, it is non-negative like the paper's pool5 (the relative threshold
  tau = 0.5 * max assumes that), and the FC part ("pooled") is its spatial
  mean, as VGG's FC6 reads pool5. The last MBConv output is still returned as
  "mbconv_out" for experiments.

  Returns:
    (logits, intermediates) with intermediates "block1".."block5", "mbconv_out",
    "pooled" (the global-average-pooled head, [N, head_channels]) and "logits".
  """
  stages: Sequence[Stage] = LITE0_STAGES
  stem_channels: int = 32
  head_channels: int = 1280
  num_classes: int = 1000
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    x = x.astype(self.dtype)
    x = nn.relu6(_conv(self.stem_channels, 3, stride=2, dtype=self.dtype, name="stem")(x))
    stride = 2
    last_at_stride: dict[int, jnp.ndarray] = {stride: x}
    i = 0
    for stage in self.stages:
      for r in range(stage.repeats):
        s = stage.stride if r == 0 else 1
        x = MBConv(stage.channels, stage.kernel, s, stage.expand_ratio, dtype=self.dtype,
                   name=f"mbconv{i}")(x)
        stride *= s
        last_at_stride[stride] = x
        i += 1
    if stride != 2 ** NUM_BLOCKS:
      raise ValueError(f"stages must reach stride {2 ** NUM_BLOCKS}, got {stride}")
    out: dict[str, jnp.ndarray] = {"mbconv_out": x}
    x = nn.relu6(_conv(self.head_channels, 1, dtype=self.dtype, name="head")(x))
    last_at_stride[stride] = x
    for k in range(1, NUM_BLOCKS + 1):
      out[f"block{k}"] = last_at_stride[2 ** k]
    x = jnp.mean(x, axis=(1, 2))
    out["pooled"] = x
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                 name="classifier")(x)  # dropout omitted: inference only
    out["logits"] = x
    return x, out


EfficientNetLite0 = functools.partial(EfficientNetLite, stages=LITE0_STAGES)
# Tiny variant for fast tests of shapes, jobs and descriptors (not a real network).
_EfficientNetLiteTiny = functools.partial(
    EfficientNetLite, stages=(Stage(1, 3, 1, 1, 8), Stage(1, 3, 2, 2, 8), Stage(1, 3, 2, 2, 16),
                              Stage(2, 3, 2, 2, 16), Stage(1, 3, 2, 2, 24)),
    stem_channels=8, head_channels=32, num_classes=10)
