"""The jitted step: uint8 images (or canvases, resized on the device) -> preprocessing -> backbone
-> descriptors.

Everything runs in one compiled function so the large block tensors never
leave the device; only the descriptor rows come back.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from cbir_jax import descriptors as desc
from cbir_jax import preprocessing as pp
from cbir_jax import resize
from cbir_jax import sharding
from cbir_jax.backbones import Backbone

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str) -> Any:
  try:
    return DTYPES[name]
  except KeyError:
    raise ValueError(f"unknown dtype {name!r}; known: {sorted(DTYPES)}") from None


def describe_fn(backbone: Backbone, *, preprocessing: pp.Preprocessing,
                kinds: Sequence[str] = desc.KINDS,
                config: desc.DescriptorConfig = desc.DescriptorConfig(),
                dtype: Any = jnp.float32
                ) -> Callable[[Any, jax.Array], dict[str, jax.Array]]:
  """The pure step `(params, uint8 images [N, H, W, 3]) -> {kind: [N, D]}` (not jitted)."""
  kinds = tuple(kinds)

  def step(params: Any, images: jax.Array) -> dict[str, jax.Array]:
    f = backbone.features(params, preprocessing(images), dtype=dtype)
    return desc.describe(f.blocks, f.fc, kinds=kinds, config=config)

  return step


def jit_sharded(step: Callable[..., Any], mesh: Mesh | None, *, batched: int = 1
                ) -> Callable[..., Any]:
  """`step(params, *inputs)` compiled once per input shape; sharded over `mesh` when given.

  With a mesh, parameters are replicated and the `batched` inputs are split on "data";
  outputs stay split the same way, so each host reads back only its rows.
  """
  if mesh is None:
    return jax.jit(step)
  batch = sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(sharding.replicated(mesh), *[batch] * batched),
                 out_shardings=batch)


def jit_describe(backbone: Backbone, *, mesh: Mesh | None = None, **kwargs: Any
                 ) -> Callable[[Any, jax.Array], dict[str, jax.Array]]:
  """`describe_fn` compiled once per input shape; sharded over `mesh` as `jit_sharded`."""
  return jit_sharded(describe_fn(backbone, **kwargs), mesh)


def on_canvases(step: Callable[[Any, jax.Array], Any], image_size: int | tuple[int, int]
                ) -> Callable[[Any, jax.Array, jax.Array], Any]:
  """`step(params, uint8 images)` as `(params, uint8 canvases [N, C, C, 3], int32 sizes [N, 2])`
  (not jitted): each image is resized from its canvas to `image_size` as Pillow's BILINEAR
  does (`resize.resize_canvases`) first. One compile per canvas bucket; the sizes are data."""
  out_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)

  def canvas_step(params: Any, canvases: jax.Array, sizes: jax.Array) -> Any:
    return step(params, resize.resize_canvases(canvases, sizes, out_size))

  return canvas_step


def describe_canvas_fn(backbone: Backbone, *, image_size: int | tuple[int, int], **kwargs: Any
                       ) -> Callable[[Any, jax.Array, jax.Array], dict[str, jax.Array]]:
  """`describe_fn` behind the device resize (`on_canvases`; not jitted)."""
  return on_canvases(describe_fn(backbone, **kwargs), image_size)


def jit_describe_canvas(backbone: Backbone, *, image_size: int | tuple[int, int],
                        mesh: Mesh | None = None, **kwargs: Any
                        ) -> Callable[[Any, jax.Array, jax.Array], dict[str, jax.Array]]:
  """`describe_canvas_fn` compiled once per canvas bucket; sharded over `mesh` as `jit_sharded`."""
  return jit_sharded(describe_canvas_fn(backbone, image_size=image_size, **kwargs), mesh,
                     batched=2)
