"""Images of an index read wherever they are: moved folders, TFDS records; and the launchers
(evaluate, search --report) on a TFDS index made from food7 photos and on a moved folder index.

The TFDS dataset is a real one prepared here from 6 food7 photos (their JPEG bytes stored as
given), so an image read back by its TFDS id can be compared with the photo's own file.
"""
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cbir_jax import evaluation, extract, store
from cbir_jax import index_images as ii

REPO = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ("apam_balik", "karipap", "rojak")
COMMON = dict(model="vgg_tiny", weights="random", image_size=32, progress="none")


@pytest.fixture(scope="module")
def photos(shared_data) -> list[pathlib.Path]:
  """Two food7 photos of each of three classes."""
  return [p for c in CLASSES for p in sorted((shared_data / "food7" / c).glob("*.jpg"))[:2]]


def _prepare_tfds(data_dir: pathlib.Path, photos: list[pathlib.Path], file_format: str) -> str:
  import tensorflow_datasets as tfds

  # Not registered: readers find the dataset by its files, as they would a user's.
  with tfds.core.registered.skip_registration():
    class CbirFood7Photos(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=list(CLASSES))}))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        for p in photos:  # JPEG bytes are stored as given
          yield f"{p.parent.name}/{p.name}", {"image": p.read_bytes(),
                                              "label": CLASSES.index(p.parent.name)}

  CbirFood7Photos(data_dir=str(data_dir), file_format=file_format).download_and_prepare()
  return str(data_dir)


@pytest.fixture(scope="module")
def tfds_index(photos, tmp_path_factory):
  """(index dir, data_dir): the 6 photos as a prepared TFDS dataset, extracted."""
  base = tmp_path_factory.mktemp("tfds_index")
  data_dir = _prepare_tfds(base / "tfds", photos, "array_record")  # read by id (read_key)
  out = base / "index"
  extract.run(extract.ExtractConfig(output=str(out), tfds="cbir_food7_photos:train",
                                    data_dir=data_dir, kinds=("conv", "mac"), **COMMON))
  return str(out), data_dir


@pytest.fixture(scope="module")
def moved_index(photos, tmp_path_factory):
  """(index dir, old folder, new folder): a folder index whose folder was moved after."""
  base = tmp_path_factory.mktemp("moved_index")
  old = base / "photos"
  for p in photos:
    (old / p.parent.name).mkdir(parents=True, exist_ok=True)
    shutil.copy(p, old / p.parent.name / p.name)
  out = base / "index"
  extract.run(extract.ExtractConfig(output=str(out), images=str(old), kinds=("conv", "mac"),
                                    **COMMON))
  before = evaluation.evaluate(str(out), k=2)  # while the images are in place
  new = base / "elsewhere" / "photos_now"
  new.parent.mkdir()
  shutil.move(str(old), str(new))
  return str(out), str(old), str(new), before


# --- the module --------------------------------------------------------------------------------


def test_input_of_reads_both_manifest_forms():
  as_read = {"input": {"type": "tfds", "root": "/d", "spec": "food:train", "num_records": 3}}
  assert ii.input_of(as_read) == ii.IndexInput("tfds", "/d", "food:train")
  assert ii.input_of({"settings": {}}) == ii.IndexInput()

  class Typed:  # the typed manifest (store.load_manifest): an object with .input
    input = ii.IndexInput("folder", "/r", "")
  assert ii.input_of(Typed()) == ii.IndexInput("folder", "/r", "")


def test_folder_images_follow_image_root(tmp_path):
  old, new = tmp_path / "old", tmp_path / "new"
  (old / "cls").mkdir(parents=True)
  Image.fromarray(np.full((5, 7, 3), 9, np.uint8)).save(old / "cls" / "a.png")
  data = (old / "cls" / "a.png").read_bytes()
  stored = str(old / "cls" / "a.png")
  source = ii.IndexInput("folder", str(old))
  assert ii.IndexImages(source).read_bytes(stored) == data
  shutil.move(str(old), str(new))
  with pytest.raises(ii.ImageUnavailable, match=r"a\.png: No such file.*is not there any "
                     r"more.*--image_root") as e:
    ii.IndexImages(source).read_bytes(stored)
  assert "\n" not in str(e.value)
  moved = ii.IndexImages(source, image_root=str(new))
  assert moved.locate(stored) == str(new / "cls" / "a.png")
  assert moved.read_bytes(stored) == data
  assert moved.read_rgb(stored).shape == (5, 7, 3)
  with pytest.raises(ii.ImageUnavailable, match="not under the folder the index records"):
    moved.read_bytes("/somewhere/else/b.png")
  with pytest.raises(ValueError, match="is not a folder"):
    ii.IndexImages(source, image_root=str(tmp_path / "nope"))
  with pytest.raises(ValueError, match="does not record the folder"):
    ii.IndexImages(ii.IndexInput(), image_root=str(new))


def test_decode_rgb_modes_and_orientation():
  buf = io.BytesIO()
  Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, "L").save(buf, "PNG")
  rgb = ii.decode_rgb(buf.getvalue())
  assert rgb.shape == (3, 4, 3) and (rgb[..., 0] == rgb[..., 2]).all()
  np.testing.assert_array_equal(rgb[..., 1], np.arange(12).reshape(3, 4) * 20)
  img = Image.new("RGB", (8, 4), (200, 10, 10))
  exif = img.getexif()
  exif[0x0112] = 6  # shown rotated by 90 degrees
  buf = io.BytesIO()
  img.save(buf, "JPEG", exif=exif.tobytes())
  assert ii.decode_rgb(buf.getvalue()).shape == (8, 4, 3)  # as shown
  with pytest.raises(ValueError, match="not an image"):
    ii.decode_rgb(b"plain text")


def test_tfds_images_are_the_records_bytes(tfds_index, photos, tmp_path):
  out, data_dir = tfds_index
  _, meta = store.load_descriptors(out, "mac")
  images = ii.IndexImages.of_index(out)
  assert images.source == ii.IndexInput("tfds", data_dir, "cbir_food7_photos:train")
  keys = [str(k) for k in meta["path"]]
  images.prefetch(keys)
  by_bytes = {p.read_bytes(): p for p in photos}
  got = [by_bytes.get(images.read_bytes(k)) for k in keys]
  assert None not in got and len(set(got)) == len(photos)  # each record is one photo, once
  # The stored label of each row is the class folder of the photo its bytes came from.
  assert [CLASSES[v] for v in meta["label"]] == [p.parent.name for p in got]
  with pytest.raises(ii.ImageUnavailable, match="is not a record of TFDS"):
    images.read_bytes(keys[0].rsplit("__", 1)[0] + "__999")
  # Moved data_dir: --image_root points there; the old place gives a one-line reason.
  moved = tmp_path / "tfds_moved"
  shutil.copytree(data_dir, moved)
  assert ii.IndexImages.of_index(out, image_root=str(moved)).read_bytes(keys[0]) == \
      images.read_bytes(keys[0])
  gone = ii.IndexImages(ii.IndexInput("tfds", str(tmp_path / "nothing"),
                                      "cbir_food7_photos:train"))
  with pytest.raises(ii.ImageUnavailable, match="cannot open TFDS") as e:
    gone.read_bytes(keys[0])
  assert "\n" not in str(e.value)


def test_tfrecord_scan_reads_only_what_is_asked(photos, tmp_path):
  """TFDS datasets without random access (TFRecord): one pass over the split per prefetch."""
  pytest.importorskip("tensorflow")
  data_dir = _prepare_tfds(tmp_path / "tfr", photos, "tfrecord")
  images = ii.IndexImages(ii.IndexInput("tfds", data_dir, "cbir_food7_photos:train"))
  key = "cbir_food7_photos-train.tfrecord-00000-of-00001__2"
  data = images.read_bytes(key)
  assert data in {p.read_bytes() for p in photos}
  assert list(images._scanned) == [key]  # noqa: SLF001  (one record kept, not the split)
  with pytest.raises(ii.ImageUnavailable, match="not a record"):
    images.read_bytes("cbir_food7_photos-train.tfrecord-00000-of-00001__6")


# --- the launchers on these indexes ------------------------------------------------------------


def _launch(script: str, *args: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(REPO / "launch" / script), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _done(proc: subprocess.Popen) -> str:
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return out


def _rows_of(table: str) -> dict[str, list[str]]:
  return {ln.split()[0]: ln.split()[1:] for ln in table.splitlines()
          if ln.split() and ln.split()[0] in ("conv", "mac", evaluation.RANDOM)}


def test_launchers_on_a_tfds_index(tfds_index, photos, tmp_path):
  out, _ = tfds_index
  ev = _launch("evaluate.py", f"--index={out}", "--k=2", f"--json={tmp_path / 'e.json'}")
  rep = tmp_path / "report"
  se = _launch("search.py", f"--index={out}", "--query_ids=0,3", "--kind=mac", "--k=3",
               "--exclude_self", f"--report={rep}")
  table, searched = _done(ev), _done(se)
  result = json.loads((tmp_path / "e.json").read_text())
  assert result["notes"] == {"undefined": "", "histograms": ""}
  # The histogram column, recomputed from the photos' own files (the records hold their bytes).
  images = ii.IndexImages.of_index(out)
  by_bytes = {p.read_bytes(): str(p) for p in photos}
  _, meta = store.load_descriptors(out, "mac")
  keys = [str(k) for k in meta["path"]]
  images.prefetch(keys)
  hist = {k: evaluation.image_histograms([by_bytes[images.read_bytes(k)]])[0] for k in keys}
  r = result["results"]["mac"]
  for q, top, hd in zip(result["queries"], r["top_k"], r["per_query_hist_distance"]):
    expect = np.mean([evaluation.histogram_distance(hist[q["path"]], hist[keys[t]])
                      for t in top])
    assert hd == pytest.approx(expect, rel=1e-5)
  assert float(_rows_of(table)["mac"][-1]) == pytest.approx(r["hist_distance"], abs=6e-5)
  assert "report:" in searched and "not readable" not in searched
  page = (rep / "results.html").read_text()
  assert page.count('class="hit ') == 6 and "image not readable" not in page


def test_launchers_on_a_moved_folder_index(moved_index, tmp_path):
  out, old, new, before = moved_index
  lost = _launch("evaluate.py", f"--index={out}", "--k=2")
  found = _launch("evaluate.py", f"--index={out}", "--k=2", f"--image_root={new}",
                  f"--json={tmp_path / 'e.json'}")
  rep = tmp_path / "report"
  se = _launch("search.py", f"--index={out}", "--query_ids=1", "--kind=conv", "--k=4",
               f"--report={rep}", f"--image_root={new}")
  lost_table, found_table, searched = _done(lost), _done(found), _done(se)
  # Without --image_root: P@k and mAP as before, the histogram column missing, and why.
  for kind, row in _rows_of(lost_table).items():
    assert row[-1] == "-"
    assert row[:-1] == _rows_of(found_table)[kind][:-1]
  assert re.search(r"hist dist@2: not computed: 6 of 6 images cannot be read \(first: cannot "
                   rf"read image {re.escape(old)}/.*--image_root", lost_table)
  # With it: the same numbers as before the move.
  after = json.loads((tmp_path / "e.json").read_text())
  for kind in ("conv", "mac", evaluation.RANDOM):
    for key in ("hist_distance", "map", "precision"):
      assert after["results"][kind][key] == pytest.approx(before["results"][kind][key])
  assert "not readable" not in searched
  assert "image not readable" not in (rep / "results.html").read_text()
