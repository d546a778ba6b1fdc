"""Balanced Conv: the Conv descriptor with each block scaled to an equal share of the L1 distance.

Beyond the paper (issue 19 item 4). On VGG16 the early blocks' characteristic values are far
larger than the last block's, so blocks 2-3 make ~70% of Conv's L1 and the semantic block 5
only 3-4% (docs/results.md). Scaling block b by s_b = T / (B * m_b), where m_b is the block's
mean L1 distance over sampled row pairs and T = sum_b m_b, gives every block the share T / B
on that sample and keeps the total mean distance T, so `fc_conv_balanced` = [fc, balanced conv]
weighs FC against Conv as the paper's unweighted L1 does.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

# Kinds derived from stored rows (no re-extraction): name -> the stored kinds it needs.
DERIVED_KINDS: dict[str, tuple[str, ...]] = {
    "conv_balanced": ("conv",),
    "fc_conv_balanced": ("fc", "conv"),
}
DEFAULT_NUM_PAIRS = 20000
DEFAULT_SEED = 0


@dataclasses.dataclass(frozen=True)
class BlockScales:
  """Per-block scales of Conv and how they were learned (recorded with every result)."""
  block_dims: tuple[int, ...]  # channels of each block, shallowest first (sum: Conv's length)
  scales: tuple[float, ...]  # s_b, one per block
  block_l1: tuple[float, ...]  # m_b: the block's mean L1 over the sampled pairs, unscaled
  num_pairs: int  # pairs of distinct rows sampled
  seed: int  # seed of the pair sample
  source: str = ""  # where the rows came from (an index directory); "" when not said

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def block_edges(block_dims: Sequence[int]) -> np.ndarray:
  """Column where each block starts, plus the end: [0, C_1, C_1 + C_2, ..., sum C_b]."""
  dims = np.asarray(block_dims, np.int64)
  if dims.ndim != 1 or len(dims) == 0 or (dims <= 0).any():
    raise ValueError(f"block_dims must be positive channel counts, got {list(block_dims)}")
  return np.concatenate([[0], np.cumsum(dims)])


def sample_pairs(n: int, num_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`num_pairs` ordered pairs (i, j) of distinct rows of n, drawn uniformly (seeded).

  j is drawn from the n - 1 rows other than i (j' in [0, n - 2], shifted past i), so no
  draw is wasted and the count is exact.
  """
  if n < 2:
    raise ValueError(f"need at least 2 rows to sample pairs, got {n}")
  if num_pairs < 1:
    raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
  rng = np.random.default_rng(seed)
  i = rng.integers(0, n, num_pairs)
  j = rng.integers(0, n - 1, num_pairs)
  return i, j + (j >= i)


def block_l1(x: Any, block_dims: Sequence[int], pairs: tuple[np.ndarray, np.ndarray],
             *, chunk: int = 4096) -> np.ndarray:
  """m_b: each block's mean L1 distance over the given row pairs, float64 [B].

  Reads only the sampled rows, `chunk` pairs at a time (x may be memory-mapped).
  """
  edges = block_edges(block_dims)
  if x.ndim != 2 or x.shape[1] != edges[-1]:
    raise ValueError(f"rows of {x.shape[1:]} values, but the blocks {list(block_dims)} make "
                     f"{edges[-1]}")
  i, j = pairs
  total = np.zeros(len(edges) - 1)
  for start in range(0, len(i), chunk):
    d = np.abs(np.asarray(x[i[start:start + chunk]], np.float64)
               - np.asarray(x[j[start:start + chunk]], np.float64))
    total += np.add.reduceat(d, edges[:-1], axis=1).sum(axis=0)
  return total / len(i)


def scales_from_l1(m: np.ndarray, shares: Sequence[float] | None = None) -> np.ndarray:
  """s_b = w_b * T / m_b, T = sum m_b: block b gets the share w_b of the same total T.

  `m` holds m_b, each block's mean L1 distance; `shares` the target shares w_b (default:
  equal, w_b = 1 / B, i.e. s_b = T / (B m_b)). A block that never differs (m_b = 0) cannot
  be scaled to any share; it keeps s_b = 1 (it adds 0 either way) and the other blocks'
  shares are renormalised to sum to 1. All blocks zero gives all ones.
  """
  m = np.asarray(m, np.float64)
  w = np.ones_like(m) if shares is None else np.asarray(shares, np.float64)
  if w.shape != m.shape or (w < 0).any() or not w.sum() > 0:
    raise ValueError(f"shares must be {len(m)} non-negative numbers, not all 0, got "
                     f"{w.ravel().tolist()}")
  live = m > 0
  if not (live & (w > 0)).any():
    return np.ones_like(m)
  w = np.where(live, w, 0.0) / np.where(live, w, 0.0).sum()
  return np.where(live, w * m.sum() / np.where(live, m, 1.0), 1.0)


def block_scales(x: Any, block_dims: Sequence[int], *, num_pairs: int = DEFAULT_NUM_PAIRS,
                 seed: int = DEFAULT_SEED, source: str = "",
                 shares: Sequence[float] | None = None) -> BlockScales:
  """Learns the per-block scales of balanced Conv from Conv rows; `apply(x, scales)` gives
  the balanced rows.

  Args:
    x: Conv descriptors [N, sum(block_dims)] (e.g. `load_descriptors(index, "conv")[0]`).
    block_dims: channels per block, shallowest first (`Backbone.block_channels`).
    num_pairs, seed: the sample of distinct-row pairs (the same rows give the same scales).
    source: recorded with the scales (e.g. the index directory).
    shares: target share of each block in the mean L1 (default: equal); e.g. more weight
      on the last block trades colour closeness for class agreement (docs/results.md).
  """
  m = block_l1(x, block_dims, sample_pairs(x.shape[0], num_pairs, seed))
  return BlockScales(block_dims=tuple(int(d) for d in block_dims),
                     scales=tuple(float(s) for s in scales_from_l1(m, shares)),
                     block_l1=tuple(float(v) for v in m), num_pairs=int(num_pairs),
                     seed=int(seed), source=source)


def apply(x: Any, scales: BlockScales) -> np.ndarray:
  """Balanced Conv rows: block b of every row times s_b, float32 [N, D].

  Works on any set of rows (a database tile or queries), so the search side can scale
  queries and database alike.
  """
  edges = block_edges(scales.block_dims)
  x = np.asarray(x)
  if x.shape[-1] != edges[-1]:
    raise ValueError(f"rows of {x.shape[-1]} values, but the scales are for blocks "
                     f"{list(scales.block_dims)} ({edges[-1]} values)")
  per_column = np.repeat(np.asarray(scales.scales, np.float32), scales.block_dims)
  return (x.astype(np.float32) * per_column).astype(np.float32)


def index_scales(index_dir: str, balance_from: str | None = None, *,
                 conv: Any = None) -> BlockScales:
  """The block scales for the index `index_dir`: learned (defaults) from its own conv rows
  (`conv`, when the caller has them loaded already), or from `balance_from`'s, an index of
  the same backbone (scales carry over within one backbone).
  """
  from cbir_jax import backbones, store  # I/O and the registry only here: the maths stay light

  name = store.read_manifest(index_dir).get("backbone")
  if balance_from:
    other = store.read_manifest(balance_from).get("backbone")
    if other != name:
      raise ValueError(f"balance_from {balance_from} was extracted with {other!r}, the index "
                       f"with {name!r}: block scales only carry over within one backbone")
  source = balance_from or index_dir
  if conv is None or balance_from:
    conv, _ = store.load_descriptors(source, "conv")
  return block_scales(conv, backbones.get(name).block_channels,
                      source=os.path.abspath(source))


def derive(kind: str, stored: dict[str, Any], scales: BlockScales) -> np.ndarray:
  """A derived kind from the stored arrays it needs (see DERIVED_KINDS)."""
  if kind == "conv_balanced":
    return apply(stored["conv"], scales)
  if kind == "fc_conv_balanced":
    fc = np.asarray(stored["fc"], np.float32)
    return np.concatenate([fc, apply(stored["conv"], scales)], axis=1)
  raise ValueError(f"unknown derived kind {kind!r}; known: {list(DERIVED_KINDS)}")


__all__ = ["BlockScales", "DERIVED_KINDS", "apply", "block_edges", "block_l1", "block_scales",
           "derive", "index_scales", "sample_pairs", "scales_from_l1"]
