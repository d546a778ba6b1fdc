"""Near-duplicate groups against an all-pairs literal reference, and cbir-dedup on a real index."""
from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest

from cbir_jax import dedup


def _reference_groups(x, threshold, digests=None):
  """All pairs, literally: L1/D in float64, linked below threshold or by equal digest; components."""
  n = len(x)
  adj = {i: set() for i in range(n)}
  for a, b in itertools.combinations(range(n), 2):
    if np.abs(x[a].astype(np.float64) - x[b]).mean() < threshold or (
        digests is not None and digests[a] and digests[a] == digests[b]):
      adj[a].add(b), adj[b].add(a)
  seen, groups = set(), []
  for i in range(n):
    if i in seen:
      continue
    comp, todo = set(), [i]
    while todo:
      j = todo.pop()
      if j not in comp:
        comp.add(j)
        todo += adj[j]
    seen |= comp
    if len(comp) > 1:
      groups.append(tuple(sorted(comp)))
  return groups


def _planted(rng, n=300, dim=48, groups=12):
  """Random rows with `groups` planted clusters of 2..4 rows (small noise) and one chain."""
  x = rng.uniform(0, 1, (n, dim)).astype(np.float32)
  members = rng.choice(n, size=(groups, 4), replace=False)
  for g, rows in enumerate(members):
    size = 2 + g % 3
    for r in rows[1:size]:
      x[r] = x[rows[0]] + rng.normal(0, 0.005, dim).astype(np.float32)
  # A chain a-b-c where a and c are farther apart than the threshold: single linkage joins them.
  a, b, c = rng.choice(np.setdiff1d(np.arange(n), members), 3, replace=False)
  x[b] = x[a] + 0.018
  x[c] = x[b] + 0.018
  return x, (a, b, c)


def test_groups_equal_the_all_pairs_reference():
  x, chain = _planted(np.random.default_rng(0))
  threshold = 0.02
  got = [g.rows for g in dedup.find_groups(x, threshold=threshold, k=8)]
  assert got == _reference_groups(x, threshold)
  assert len(got) == 13  # the 12 planted clusters and the chain
  a, _, c = chain
  assert tuple(sorted(chain)) in got and np.abs(x[a] - x[c]).mean() > threshold


def test_equal_digests_link_rows_and_mark_exact_groups():
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 1, (20, 8)).astype(np.float32)
  digests = [""] * 20
  digests[3] = digests[11] = "abc"  # the same bytes, different descriptors (e.g. another crop)
  x[15] = x[16]
  groups = dedup.find_groups(x, threshold=1e-6, k=4, digests=digests)
  assert [g.rows for g in groups] == _reference_groups(x, 1e-6, digests) == [(3, 11), (15, 16)]
  assert [g.exact for g in groups] == [True, False]


def test_link_groups_is_connected_components():
  assert dedup.link_groups(6, [(0, 4), (4, 2), (5, 1)]) == [(0, 2, 4), (1, 5)]
  assert dedup.link_groups(3, []) == []


def test_dedup_command_on_an_index_with_copies(tmp_path):
  from PIL import Image

  from cbir_jax import extract

  rng = np.random.default_rng(3)
  imgs = tmp_path / "imgs"
  imgs.mkdir()
  for i in range(8):
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(imgs / f"i{i}.png")
  shutil.copy(imgs / "i2.png", imgs / "copy_of_2.png")  # exact copy
  Image.open(imgs / "i5.png").save(imgs / "i5_as.bmp")  # same pixels, other bytes
  out = tmp_path / "index"
  extract.run(extract.ExtractConfig(output=str(out), images=str(imgs), model="vgg_tiny",
                                    weights="random", image_size=32, batch_size=4,
                                    kinds=("conv",), progress="none"), log=lambda m: None)
  groups = dedup.run(dedup.DedupConfig(index=str(out), kind="conv", report=str(tmp_path / "rep"),
                                       json=str(tmp_path / "g.json")), log=lambda m: None)
  doc = json.loads((tmp_path / "g.json").read_text())
  names = [sorted(p.rsplit("/", 1)[-1] for p in g["paths"]) for g in doc["groups"]]
  assert sorted(names) == [["copy_of_2.png", "i2.png"], ["i5.png", "i5_as.bmp"]]
  assert sorted(g.exact for g in groups) == [False, True]
  page = (tmp_path / "rep" / "groups.html").read_text()
  assert page.count("<section>") == 2 and all(
      (tmp_path / "rep" / "thumbs" / f"{r}.jpg").is_file() for g in groups for r in g.rows)
