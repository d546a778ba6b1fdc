"""The backbone interface every network fills for the descriptor code.

A backbone's Flax module returns `(logits, intermediates)`; the interface names
which intermediates are the method's "blocks" (shallowest first, strides
2..32) and which form its "FC" part. Descriptor code sees only `Features`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cbir_jax import preprocessing as pp


class Features(NamedTuple):
  """What one forward pass gives the descriptor code."""
  blocks: tuple[jax.Array, ...]  # O_1..O_B, NHWC, shallowest first
  fc: jax.Array | None  # [N, D_fc]; None when the network ran without its FC layers
  logits: jax.Array | None  # [N, num_classes]; None likewise


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A network as the method sees it.

  Attributes:
    name: registry name, recorded in checkpoints and manifests.
    make_module: builds the Flax module for a compute dtype.
    block_names: intermediates used as blocks, shallowest first.
    fc_names: intermediates concatenated (in this order) into the FC part.
    block_channels: channels of each block (descriptor sizes).
    fc_dim: size of the FC part.
    preprocessing: the preprocessing of the weights this backbone ships or
      usually comes with; a checkpoint's recorded one always wins.
    image_size: default square input size.
    fc_params: top-level parameter groups of the FC head that weights may
      lack (VGG16's fc6, fc7, fc8 in a no-top file); when set,
      `make_module(with_fc=False, ...)` builds the network without them.
      Empty: the FC part cannot be dropped.
  """
  name: str
  make_module: Callable[..., nn.Module]
  block_names: tuple[str, ...]
  fc_names: tuple[str, ...]
  block_channels: tuple[int, ...]
  fc_dim: int
  preprocessing: pp.Preprocessing
  image_size: int = 224
  fc_params: tuple[str, ...] = ()

  def without_fc(self) -> "Backbone":
    """The same network without its FC layers: blocks only, no FC part, no logits.

    Raises:
      ValueError: the backbone has no FC head to drop (`fc_params` empty).
    """
    if not self.fc_params:
      raise ValueError(f"backbone {self.name!r} cannot run without FC layers")
    return dataclasses.replace(
        self, make_module=functools.partial(self.make_module, with_fc=False), fc_names=(),
        fc_dim=0, fc_params=())

  def for_params(self, params: Any) -> "Backbone":
    """The variant `params` run: `without_fc()` when they hold none of the FC layers.

    Raises:
      ValueError: params hold some of the FC layers but not all.
    """
    present = [n for n in self.fc_params if n in params]
    if not self.fc_params or len(present) == len(self.fc_params):
      return self
    if present:
      missing = [n for n in self.fc_params if n not in params]
      raise ValueError(f"{self.name} parameters have FC layers {present} but not {missing}")
    return self.without_fc()

  def module(self, dtype: Any = jnp.float32) -> nn.Module:
    return self.make_module(dtype=dtype)

  def init(self, rng: jax.Array, image_size: int | None = None) -> Any:
    """Random float32 parameters (tests, benchmarks, demos)."""
    size = image_size or self.image_size
    return self.module().init(rng, jnp.zeros((1, size, size, 3), jnp.float32))["params"]

  def random_params(self, seed: int = 0, image_size: int | None = None) -> Any:
    """Seeded random float32 parameters built in NumPy: He-normal kernels, zero biases (the
    networks here have no other parameters: batch norm is folded into the convolutions).

    For tests, demos and benchmarks without a checkpoint. Flax's `init` compiles
    every initialiser and runs a forward pass (tens of seconds on a CPU); this
    only traces shapes. Equal seeds give equal parameters.
    """
    rng = np.random.default_rng(seed)

    def make(path, s):
      if getattr(path[-1], "key", None) != "kernel":
        return np.zeros(s.shape, np.float32)
      fan_in = int(np.prod(s.shape[:-1]))
      return (rng.standard_normal(s.shape) * np.sqrt(2.0 / max(fan_in, 1))).astype(np.float32)

    return jax.tree_util.tree_map_with_path(make, self.param_shapes(image_size))

  def param_shapes(self, image_size: int | None = None) -> Any:
    """Parameter ShapeDtypeStructs without allocating them (for checkpoint checks)."""
    size = image_size or self.image_size
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda r, x: self.module().init(r, x)["params"],
                          jax.random.key(0), x)

  def features(self, params: Any, x: jax.Array, *, dtype: Any = jnp.float32) -> Features:
    """Runs the network on preprocessed float input [N, H, W, 3].

    Params without the FC layers (no-top weights, see `for_params`) run the
    conv layers only; `fc` and `logits` are then None.
    """
    net = self.for_params(params)
    logits, inter = net.module(dtype).apply({"params": params}, x)
    blocks = tuple(inter[n] for n in net.block_names)
    fc = (jnp.concatenate([inter[n].astype(jnp.float32) for n in net.fc_names], axis=-1)
          if net.fc_names else None)
    return Features(blocks=blocks, fc=fc,
                    logits=None if logits is None else logits.astype(jnp.float32))
