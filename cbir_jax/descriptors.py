"""The paper's descriptors as pure `jnp` functions of activations.

Staszewski et al., "A new approach to descriptors generation for image
retrieval by analyzing activations of deep neural network layers", TNNLS 2021;
SPEC.md section 2 is the statement implemented here. No Flax in this module:
callers jit these inside their own step so that pool tensors stay on device.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

KINDS: tuple[str, ...] = ("fc", "conv", "fc_conv", "mac", "spoc", "gem")
# Kinds built from the network's FC part: weights without FC layers (no-top) cannot give them.
FC_KINDS: tuple[str, ...] = ("fc", "fc_conv")
MASK_MODES: tuple[str, ...] = ("channel", "spatial")


@dataclasses.dataclass(frozen=True)
class DescriptorConfig:
  """How significance is decided (SPEC.md section 4). Recorded with every output.

  Attributes:
    threshold: tau, or the fraction of the per-image maximum when `relative`.
    relative: tau = threshold * max_{i,j,c} O_B[i,j,c] per image (the authors'
      notebook default) instead of the absolute `threshold`.
    masks: "channel" is the paper's per-channel masks M_c (default);
      "spatial" is the authors' notebook variant: one mask per position,
      max over channels > tau, shared by every channel.
  """
  threshold: float = 0.5
  relative: bool = True
  masks: str = "channel"

  def __post_init__(self) -> None:
    if self.masks not in MASK_MODES:
      raise ValueError(f"masks must be one of {MASK_MODES}, got {self.masks!r}")
    if not self.threshold >= 0:
      raise ValueError(f"threshold must be >= 0, got {self.threshold}")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _safe_divide(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
  # SPEC 2.4: no significant neuron gives 0, never NaN. The inner `where`
  # keeps the untaken branch finite so gradients and NaN checks stay clean.
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def significance(last: jnp.ndarray, *, threshold: float = 0.5, relative: bool = True,
                 masks: str = "channel") -> jnp.ndarray:
  """Per-channel significance masks M_c of the last block (SPEC.md 2.1).

  `last` is O_B [N, H, W, C], non-negative; `threshold`, `relative` and `masks` are as in
  DescriptorConfig. Returns float32 0/1 of the same shape: O_B > tau (strictly greater).
  """
  last = last.astype(jnp.float32)
  if relative:
    tau = threshold * jnp.max(last, axis=(1, 2, 3), keepdims=True)
  else:
    tau = jnp.float32(threshold)
  if masks == "channel":
    m = last > tau
  elif masks == "spatial":
    m = jnp.broadcast_to(jnp.max(last, axis=-1, keepdims=True) > tau, last.shape)
  else:
    raise ValueError(f"masks must be one of {MASK_MODES}, got {masks!r}")
  return m.astype(jnp.float32)


def _pooled_to_last(block: jnp.ndarray, s: int, h_last: int, w_last: int) -> jnp.ndarray:
  """Sum-pools block b over s x s windows onto the last block's grid: P_b (SPEC 2, cheap form).

  Positions beyond s*H_B (floor-sized pools) correspond to nothing and are
  cropped; a block smaller than s*H_B (ceil-sized "same"-padded backbones) is
  zero-padded, which adds nothing to the sums.
  """
  n, h, w, c = block.shape
  hh, ww = s * h_last, s * w_last
  block = block[:, :min(h, hh), :min(w, ww), :]
  block = jnp.pad(block, ((0, 0), (0, max(0, hh - h)), (0, max(0, ww - w)), (0, 0)))
  return block.reshape(n, h_last, s, w_last, s, c)


def _window_sizes(size: int, s: int, n_last: int) -> jnp.ndarray:
  """How many of `size` block positions fall in each of the n_last windows of width s."""
  starts = np.arange(n_last) * s
  return jnp.asarray(np.clip(size - starts, 0, s), jnp.float32)


def characteristic_values(pools: Sequence[jnp.ndarray], m: jnp.ndarray) -> list[jnp.ndarray]:
  """Characteristic values v_1..v_B given last-block masks M (SPEC.md 2.2-2.4).

  Block b < B is weighted by S_b, the count map N = sum_c M_c carried down
  s = 2^(B-b) times; computed as sum_ij N[i,j] * (s x s sum-pool of O_b)[i,j],
  which equals the literal S_b-weighted sum without materialising S_b.
  """
  last = pools[-1].astype(jnp.float32)
  _, h_last, w_last, _ = last.shape
  num_blocks = len(pools)
  v_last = _safe_divide(jnp.sum(m * last, axis=(1, 2)), jnp.sum(m, axis=(1, 2)))
  count = jnp.sum(m, axis=-1)  # N[i, j]: how many last-block channels are significant
  values = []
  for b, block in enumerate(pools[:-1]):
    s = 2 ** (num_blocks - 1 - b)
    p = _pooled_to_last(block.astype(jnp.float32), s, h_last, w_last)
    num = jnp.einsum("nhpwqc,nhw->nc", p, count)
    # sum S_b = sum_ij N[i,j] * (block-b positions in window (i,j)); that is
    # s^2 * sum N unless a "same"-padded block is smaller than s * H_B.
    rows = _window_sizes(block.shape[1], s, h_last)
    cols = _window_sizes(block.shape[2], s, w_last)
    den = jnp.einsum("nhw,h,w->n", count, rows, cols)
    values.append(_safe_divide(num, den[:, None]))
  values.append(v_last)
  return values


def conv_descriptor(pools: Sequence[jnp.ndarray], *, threshold: float = 0.5,
                    relative: bool = True, masks: str = "channel") -> jnp.ndarray:
  """The Conv descriptor d_Conv = [v_1, ..., v_B] (SPEC.md section 2): float32 [N, sum_b C_b].

  `pools` are the block outputs O_1..O_B, each [N, H_b, W_b, C_b], shallowest first, with
  H_{b+1} = floor(H_b / 2) (or ceil, for "same"-padded backbones); `threshold`, `relative`
  and `masks` are as in DescriptorConfig.
  """
  if not pools:
    raise ValueError("conv_descriptor needs at least one block")
  m = significance(pools[-1], threshold=threshold, relative=relative, masks=masks)
  return jnp.concatenate(characteristic_values(pools, m), axis=-1)


def mac(last: jnp.ndarray) -> jnp.ndarray:
  """Baseline: global max pooling of the last block (MAC), float32 [N, C]."""
  return jnp.max(last.astype(jnp.float32), axis=(1, 2))


def spoc(last: jnp.ndarray) -> jnp.ndarray:
  """Baseline: global average pooling of the last block (SPoC), float32 [N, C]."""
  return jnp.mean(last.astype(jnp.float32), axis=(1, 2))


GEM_P = 3.0  # Radenovic et al.'s initial (and untrained-network) exponent
GEM_EPS = 1e-6  # their clamp: x.clamp(min=eps) before the power


def gem(last: jnp.ndarray, *, p: float = GEM_P, eps: float = GEM_EPS) -> jnp.ndarray:
  """Baseline: generalised-mean (GeM) pooling of the last block, float32 [N, C].

  f_c = (mean_ij max(x_ijc, eps)^p)^(1/p): p = 1 is SPoC (for non-negative maps),
  p -> inf tends to MAC. Values below eps count as eps, as in the authors' code;
  VGG's pool5 and EfficientNet-Lite0's block 5 (ReLU6 head) are non-negative
  anyway, so the clamp only matters for a backbone whose last block can be
  negative, and there it is the definition, not a workaround.

  Computed as m * (mean_ij (x / m)^p)^(1/p) with m the per-channel maximum:
  algebraically the same, but x^p cannot overflow float32 for large
  activations or large p. `last` may be any float dtype; p > 0 and eps > 0.

  References:
    F. Radenovic, G. Tolias, O. Chum, "Fine-tuning CNN Image Retrieval with No
    Human Annotation", IEEE TPAMI 41(7), 2019: the generalized-mean pooling
    layer; their code clamps at eps = 1e-6.
  """
  x = jnp.maximum(last.astype(jnp.float32), eps)
  m = jnp.max(x, axis=(1, 2), keepdims=True)  # >= eps > 0
  return m[:, 0, 0] * jnp.mean((x / m) ** p, axis=(1, 2)) ** (1.0 / p)


def describe(blocks: Sequence[jnp.ndarray], fc: jnp.ndarray | None, *,
             kinds: Sequence[str] = KINDS,
             config: DescriptorConfig = DescriptorConfig()) -> dict[str, jnp.ndarray]:
  """Every requested kind (a subset of KINDS) from one forward pass: {kind: float32 [N, D]}.

  `blocks` are the backbone's block outputs, shallowest first; `fc` its FC part [N, D_fc]
  (VGG16: [f6, f7], 8192 values), or None for a network run without its FC layers (no-top
  weights).
  """
  unknown = [k for k in kinds if k not in KINDS]
  if unknown:
    raise ValueError(f"unknown descriptor kinds {unknown}; known: {KINDS}")
  if fc is None and any(k in FC_KINDS for k in kinds):
    raise ValueError(f"descriptor kinds {[k for k in kinds if k in FC_KINDS]} need the "
                     "network's FC layers, which this forward pass did not compute "
                     "(weights without FC layers)")
  out: dict[str, jnp.ndarray] = {}
  if fc is not None:
    out["fc"] = fc.astype(jnp.float32)
  if "conv" in kinds or "fc_conv" in kinds:
    out["conv"] = conv_descriptor(blocks, threshold=config.threshold, relative=config.relative,
                                  masks=config.masks)
    if "fc_conv" in kinds:
      out["fc_conv"] = jnp.concatenate([out["fc"], out["conv"]], axis=-1)
  for kind, pool in (("mac", mac), ("spoc", spoc), ("gem", gem)):
    if kind in kinds:
      out[kind] = pool(blocks[-1])
  return {k: out[k] for k in kinds}


def dimensions(block_channels: Sequence[int], fc_dim: int) -> Mapping[str, int]:
  """Descriptor sizes for a backbone: VGG16 gives fc 8192, conv 1472, fc_conv 9664."""
  conv, last = int(sum(block_channels)), int(block_channels[-1])
  return {"fc": fc_dim, "conv": conv, "fc_conv": fc_dim + conv, "mac": last, "spoc": last,
          "gem": last}
