"""--update on a TFDS split: records keyed by TFDS id and stamped by their record file.

A prepared (not mocked) dataset is read through other slices and after its record file was
rewritten; each time --update must equal a clean run over the split as it is now.
"""
from __future__ import annotations

import dataclasses
import pathlib
import shutil

import numpy as np
import pytest

from cbir_jax import extract, store

from robust_common import job_config
from test_robust_inputs import compare

N = 23


def _builder_class():
  import tensorflow_datasets as tfds

  class CbirUpdateShapes(tfds.core.GeneratorBasedBuilder):
    """Example i: a 24 x (20 + i) image of one colour; SHADE sets the brightness."""
    VERSION = tfds.core.Version("1.0.0")
    SHADE = 40

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=["red", "green", "blue"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(N):
        img = np.zeros((24, 20 + i, 3), np.uint8)
        img[..., i % 3] = self.SHADE + 5 * i
        yield i, {"image": img, "label": i % 3}

  return CbirUpdateShapes


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """(data_dir, builder class): the dataset prepared once with SHADE 40."""
  cls = _builder_class()
  data_dir = tmp_path_factory.mktemp("tfds")
  cls(data_dir=str(data_dir)).download_and_prepare()
  return data_dir, cls


def _run(spec, data_dir, out, weights, **kw) -> extract.Summary:
  config = dataclasses.replace(job_config(".", out, weights, **kw), images=None, tfds=spec,
                               data_dir=str(data_dir))
  return extract.run(config, log=lambda m: None)


def test_tfds_update_slices_and_rewritten_records(prepared, tiny_weights, tmp_path, hostile):
  name = "TFDS split changed (other slice; record file rewritten) and --update"
  hostile.declare(name)
  src, cls = prepared
  data_dir = tmp_path / "tfds"
  shutil.copytree(src, data_dir)  # copy2: times kept, so stamps are unchanged
  ds = cls.name
  out = tmp_path / "out"
  _run(f"{ds}:train[:15]", data_dir, out, tiny_weights)
  # 1. Another slice: records 0-4 removed, 15-19 added.
  with pytest.raises(extract.ExtractError, match=r"5 added.*5 removed.*--update"):
    _run(f"{ds}:train[5:20]", data_dir, out, tiny_weights)
  moved = _run(f"{ds}:train[5:20]", data_dir, out, tiny_weights, update=True)
  clean = tmp_path / "clean1"
  _run(f"{ds}:train[5:20]", data_dir, clean, tiny_weights)
  first = compare(out, clean)
  # 2. The record file rewritten with other pixels (prepared again elsewhere, copied over).
  cls.SHADE = 90
  try:
    other = tmp_path / "tfds_other"
    cls(data_dir=str(other)).download_and_prepare()
  finally:
    cls.SHADE = 40
  version = next(data_dir.glob(f"{ds}/*"))
  for f in next(other.glob(f"{ds}/*")).glob(f"{ds}-train.*"):
    shutil.copy(f, version / f.name)
  rewritten = _run(f"{ds}:train[5:20]", data_dir, out, tiny_weights, update=True)
  clean2 = tmp_path / "clean2"
  _run(f"{ds}:train[5:20]", data_dir, clean2, tiny_weights)
  second = compare(out, clean2)
  changed = not np.array_equal(store.load_descriptors(clean, "mac")[0],
                               store.load_descriptors(clean2, "mac")[0])
  u = store.read_manifest(out)["update"]
  for lost, dup, _, _ in (first, second):
    hostile.rows(lost=lost, duplicated=dup)
  ok = (moved.images == 5 and first[:3] == (0, 0, []) and rewritten.images == 15 and changed
        and second[:3] == (0, 0, []) and u["changed"] == 15)
  exact = "bitwise" if first[3] == second[3] == 0 else f"within {max(first[3], second[3]):.1g}"
  hostile.check(name, ok, f"slice moved: read 5, kept 10; file rewritten: read 15; {exact} "
                "equal to clean runs")
  assert ok, (moved, rewritten, first, second, u)
