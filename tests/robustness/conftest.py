"""Robustness suite bookkeeping: each hostile case registers itself; the run ends with one line.

A hostile case is one bad input or event (a truncated JPEG, a SIGKILL, a
pickle payload). Tests check cases (`hostile.check(name, ok, how)`), several
tests may check the same case at different layers (the decoder, the job), and
a case counts as handled only when every check of it was recorded as handled
*and* every test that checked it passed. Kill-and-resume tests report the rows
they lost and duplicated (`hostile.rows(lost=, duplicated=)`). The run ends
with one line computed from all that, e.g.

  robustness: 41 hostile cases tried, 41 handled, 0 rows lost, 0 duplicated

Set ROBUSTNESS_REPORT=file.json to also get every case and what the product did.
"""
from __future__ import annotations

import dataclasses
import json
import os

import pytest


@dataclasses.dataclass
class Check:
  test: str  # pytest node id
  recorded: bool = False
  ok: bool = False
  how: str = ""  # what the product did, in a few words


@dataclasses.dataclass
class Ledger:
  cases: dict[str, list[Check]] = dataclasses.field(default_factory=dict)
  passed_tests: set[str] = dataclasses.field(default_factory=set)
  rows_lost: int = 0
  rows_duplicated: int = 0

  def handled(self, name: str) -> bool:
    checks = self.cases[name]
    return bool(checks) and all(c.recorded and c.ok and c.test in self.passed_tests
                                for c in checks)

  def summary(self) -> str:
    n_ok = sum(self.handled(n) for n in self.cases)
    return (f"robustness: {len(self.cases)} hostile cases tried, {n_ok} handled, "
            f"{self.rows_lost} rows lost, {self.rows_duplicated} duplicated")


LEDGER = Ledger()


class Recorder:
  """The `hostile` fixture: what one test tells the ledger."""

  def __init__(self, nodeid: str):
    self.nodeid = nodeid

  def _check(self, name: str) -> Check:
    checks = LEDGER.cases.setdefault(name, [])
    for c in checks:
      if c.test == self.nodeid:
        return c
    checks.append(Check(test=self.nodeid))
    return checks[-1]

  def declare(self, *names: str) -> None:
    """Registers cases up front: one the test never resolves counts as not handled."""
    for name in names:
      self._check(name)

  def check(self, name: str, ok: bool, how: str = "") -> bool:
    """Records whether the product handled case `name` in this test; returns `ok`."""
    c = self._check(name)
    c.recorded, c.ok, c.how = True, bool(ok), how
    return bool(ok)

  def rows(self, *, lost: int, duplicated: int) -> None:
    LEDGER.rows_lost += int(lost)
    LEDGER.rows_duplicated += int(duplicated)


@pytest.fixture
def hostile(request) -> Recorder:
  return Recorder(request.node.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
  report = yield
  if report.when == "call" and report.passed:
    LEDGER.passed_tests.add(item.nodeid)
  elif report.failed:  # a failing setup, call or teardown
    LEDGER.passed_tests.discard(item.nodeid)
  return report


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  if not LEDGER.cases:
    return
  terminalreporter.write_line(LEDGER.summary())
  for name, checks in LEDGER.cases.items():
    if not LEDGER.handled(name):
      why = "; ".join(
          f"{c.test}: " + ("never checked" if not c.recorded else
                           "test failed" if c.ok else (c.how or "not handled"))
          for c in checks if not (c.recorded and c.ok and c.test in LEDGER.passed_tests))
      terminalreporter.write_line(f"  NOT handled: {name!r}: {why}")
  path = os.environ.get("ROBUSTNESS_REPORT")
  if path:
    with open(path, "w") as f:
      json.dump({"summary": LEDGER.summary(),
                 "cases": [{"name": n, "handled": LEDGER.handled(n),
                            "checks": [dataclasses.asdict(c) for c in checks]}
                           for n, checks in LEDGER.cases.items()]},
                f, indent=1, ensure_ascii=False)


# --- shared inputs (helpers in robust_common.py) ----------------------------------------------

from robust_common import (NUM_IMAGES, job_config, make_tiny_weights,  # noqa: E402
                           write_small_images)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
  return make_tiny_weights(tmp_path_factory.mktemp("weights") / "vgg_tiny")


@pytest.fixture(scope="session")
def many_images(tmp_path_factory):
  """NUM_IMAGES small PNGs in two class folders: (folder, sorted paths)."""
  folder = tmp_path_factory.mktemp("many") / "imgs"
  return folder, write_small_images(folder, NUM_IMAGES)


@pytest.fixture(scope="session")
def baseline(many_images, tiny_weights, tmp_path_factory):
  """An uninterrupted in-process run over `many_images`: (output dir, {kind: array}, metadata).

  Read-only for tests: copy it before damaging it.
  """
  import numpy as np

  from cbir_jax import extract, store
  from cbir_jax.descriptors import KINDS

  out = tmp_path_factory.mktemp("baseline") / "out"
  # Tests copy this output and remove shards to stage unfinished jobs.
  extract.run(job_config(many_images[0], out, tiny_weights),
              log=lambda m: None)
  loaded = {k: store.load_descriptors(out, k) for k in KINDS}
  arrays = {k: np.array(v[0]) for k, v in loaded.items()}
  return out, arrays, loaded["fc"][1]


@pytest.fixture(scope="session")
def imagenet_sample(request):
  """imagenet-sample's photo folder (read-only): ../shared/data, or $CBIR_JAX_SHARED_DATA
  (for a worktree whose parent has no shared/ beside it)."""
  import pathlib

  env = os.environ.get("CBIR_JAX_SHARED_DATA")
  root = pathlib.Path(env) if env else request.getfixturevalue("shared_data")
  return root / "imagenet-sample" / "images"
