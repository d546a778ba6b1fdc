"""Pixel preprocessing that goes with a set of weights (SPEC.md section 6).

Images travel to the device as uint8 RGB; the scaling below runs inside the
jitted step, so a checkpoint's recorded preprocessing is always the one applied.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """`x = (pixel[order] * scale - mean) / std`, per channel, from uint8 RGB.

  Attributes:
    name: preset name recorded in checkpoints and manifests.
    channel_order: "rgb" or "bgr" (Keras/caffe weights expect BGR).
    scale: multiplies the 0..255 pixel value before the mean is removed.
    mean: per-channel mean, in the channel order and units after `scale`.
    std: per-channel divisor, same order and units.
  """
  name: str
  channel_order: str
  scale: float
  mean: tuple[float, float, float]
  std: tuple[float, float, float]

  def __post_init__(self) -> None:
    if self.channel_order not in ("rgb", "bgr"):
      raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {self.channel_order!r}")

  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    """Maps uint8 (or 0..255 float) RGB images [N, H, W, 3] to float32 network input."""
    x = images.astype(jnp.float32)
    if self.channel_order == "bgr":
      x = x[..., ::-1]
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    return (x * self.scale - mean) / std

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
    return cls(name=d["name"], channel_order=d["channel_order"], scale=float(d["scale"]),
               mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]))


TORCHVISION = Preprocessing("torchvision", "rgb", 1.0 / 255.0,
                            (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CAFFE = Preprocessing("caffe", "bgr", 1.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0))
EFFICIENTNET_LITE = Preprocessing("efficientnet_lite", "rgb", 1.0,
                                  (127.0, 127.0, 127.0), (128.0, 128.0, 128.0))
