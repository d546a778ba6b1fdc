"""The job on webdataset tar shards and file lists, against the same photos as a folder.

food7 photos (5 per class) are copied into a class-folder layout and written as
img2dataset-style shards (key.jpg + key.json with the class name + key.txt) by plain
`tarfile`; the same pixels must give the same rows whatever the input, and resume and
`--update` must follow the folder rules. `vgg_tiny` with random weights on 32x32 inputs.
"""
import io
import json
import pathlib
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cbir_jax import extract, index_images, store
from cbir_jax.descriptors import KINDS

SIZE = 32
PER_CLASS = 5
COMMON = dict(model="vgg_tiny", weights="random", image_size=SIZE, progress="none",
              batch_size=2, shard_size=8)
QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def photos(shared_data, tmp_path_factory):
  """A class-folder copy of PER_CLASS food7 photos per class: (root, [(path, class)])."""
  src = shared_data / "food7"
  root = tmp_path_factory.mktemp("food7") / "images"
  out = []
  for c in sorted(p.name for p in src.iterdir() if p.is_dir()):
    for p in sorted((src / c).glob("*.jpg"))[:PER_CLASS]:
      (root / c).mkdir(parents=True, exist_ok=True)
      shutil.copyfile(p, root / c / p.name)
      out.append((str(root / c / p.name), c))
  return root, out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size, info.mtime = len(data), 1_700_000_000
  tar.addfile(info, io.BytesIO(data))


def _json_fields(k: int, c: str) -> dict:
  """Record k's json: text, a float, an int, a bool, and two fields that must stay text (an
  int or a string; a bool or null)."""
  return {"key": f"{k:06d}", "label": c, "score": k / 4, "n": 3 * k - 7, "even": k % 2 == 0,
          "mixed": k if k % 3 else "x", "maybe": None if k % 4 == 1 else k % 2 == 0}


def write_shard(path: pathlib.Path, items, start: int) -> None:
  """One shard in the img2dataset layout: key.jpg, key.json (label = class name), key.txt."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
    for k, (p, c) in enumerate(items, start=start):
      key = f"{k:06d}"
      _add(t, f"{key}.jpg", pathlib.Path(p).read_bytes())
      _add(t, f"{key}.json", json.dumps(_json_fields(k, c)).encode())
      _add(t, f"{key}.txt", f"a photo of {c}".encode())


def write_shards(folder: pathlib.Path, items, per_shard: int = 12, first: int = 0) -> None:
  for s in range(0, len(items), per_shard):
    write_shard(folder / f"{first + s // per_shard:05d}.tar", items[s:s + per_shard], s)


def load_all(out) -> tuple[dict, dict]:
  arrays = {}
  for kind in KINDS:
    a, meta = store.load_descriptors(out, kind)
    arrays[kind] = np.asarray(a)
  return arrays, meta


@pytest.fixture(scope="module")
def folder_run(photos, tmp_path_factory):
  root, _ = photos
  out = tmp_path_factory.mktemp("folder") / "out"
  extract.run(extract.ExtractConfig(output=str(out), images=str(root), **COMMON), **QUIET)
  return load_all(out)


@pytest.fixture(scope="module")
def wds_run(photos, tmp_path_factory):
  """The photos as 3 shards of 12, 12, 11 and their extraction: (shards, out, summary)."""
  _, items = photos
  base = tmp_path_factory.mktemp("wds")
  write_shards(base / "shards", items)
  s = extract.run(extract.ExtractConfig(output=str(base / "out"),
                                        webdataset=str(base / "shards"), **COMMON), **QUIET)
  return base / "shards", base / "out", s


def test_webdataset_gives_the_folder_rows(photos, folder_run, wds_run):
  _, items = photos
  shards, out, s = wds_run
  assert s.complete and s.images == len(items) and s.failed == 0
  got, meta = load_all(out)
  want, fmeta = folder_run
  for kind in KINDS:  # same pixels, same decode engine: the very same bytes
    np.testing.assert_array_equal(got[kind], want[kind], err_msg=kind)
  for c in ("label", "label_name", "width", "height"):
    np.testing.assert_array_equal(meta[c], fmeta[c], err_msg=c)
  keys = [f"{k:06d}" for k in range(len(items))]
  assert meta["path"].tolist() == [str(shards / f"{k // 12:05d}.tar" / f"{key}.jpg")
                                   for k, key in enumerate(keys)]
  assert meta["key"].tolist() == keys and meta["txt"].tolist() == [
      f"a photo of {c}" for _, c in items]
  # Numeric json fields keep their numbers (job/rows.py, meta_columns.py).
  assert meta["score"].dtype == np.float64
  np.testing.assert_array_equal(meta["score"], np.arange(len(items)) / 4)
  m = store.read_manifest(out)
  assert m["input"]["type"] == "webdataset" and m["input"]["spec"] == str(shards)
  # A row's image read back (result pages, evaluation): the member's own bytes.
  images = index_images.IndexImages.of_index(out)
  assert images.read_bytes(meta["path"][13]) == pathlib.Path(items[13][0]).read_bytes()
  # The rerun is up to date; the shard listings came from the output's cache.
  assert list((out / store.WEBDATASET_CACHE).glob("*.json"))
  again = extract.run(extract.ExtractConfig(output=str(out), webdataset=str(shards), **COMMON),
                      **QUIET)
  assert again.complete and again.images == 0


def test_webdataset_resumes_after_a_stop_and_equals_a_clean_run(photos, folder_run, tmp_path,
                                                                 monkeypatch):
  _, items = photos
  write_shards(tmp_path / "shards", items)
  cfg = extract.ExtractConfig(output=str(tmp_path / "out"), webdataset=str(tmp_path / "shards"),
                              **COMMON)
  real_save, calls = np.save, []

  def failing_save(path, a, *args, **kwargs):
    calls.append(path)
    if len(calls) > 2 * len(KINDS):  # the third job shard: the disk is full
      raise OSError(28, "No space left on device")
    return real_save(path, a, *args, **kwargs)

  monkeypatch.setattr(np, "save", failing_save)
  with pytest.raises(extract.ExtractError, match="No space left"):
    extract.run(cfg, **QUIET)
  monkeypatch.setattr(np, "save", real_save)
  assert sorted(store.complete_shards(tmp_path / "out")) == [0, 1]
  s = extract.run(cfg, **QUIET)
  assert s.complete and s.shards_skipped == 2 and s.images == len(items) - 16
  got, _ = load_all(tmp_path / "out")
  for kind in KINDS:
    np.testing.assert_array_equal(got[kind], folder_run[0][kind], err_msg=kind)


def test_webdataset_update_after_adding_a_shard_equals_a_clean_run(photos, tmp_path):
  """Also the failure rules: a member that does not decode is a failure named
  <shard>/<member>, as a folder's file is, and --update keeps it under that name."""
  _, items = photos
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"\xff\xd8 not really a jpeg")
  first, rest = items[:5] + [(str(broken), items[5][1])] + items[5:24], items[24:]
  shards = tmp_path / "shards"
  write_shards(shards, first)
  out = tmp_path / "out"
  s = extract.run(extract.ExtractConfig(output=str(out), webdataset=str(shards), **COMMON),
                  **QUIET)
  assert s.images == 24 and s.failed == 1
  failures = store.read_failures(out)
  assert [p for p, _ in failures] == [str(shards / "00000.tar" / "000005.jpg")]
  assert failures[0][1]  # the decoder's reason
  write_shard(shards / "00003.tar", rest, 25)
  with pytest.raises(extract.ExtractError, match="--update"):
    extract.run(extract.ExtractConfig(output=str(out), webdataset=str(shards), **COMMON),
                **QUIET)
  s = extract.run(extract.ExtractConfig(output=str(out), webdataset=str(shards), update=True,
                                        **COMMON), **QUIET)
  assert s.complete and s.reused == len(first) and s.images == len(rest)
  clean = tmp_path / "clean"
  extract.run(extract.ExtractConfig(output=str(clean), webdataset=str(shards), **COMMON),
              **QUIET)
  assert store.read_failures(out) == store.read_failures(clean) == failures
  got, meta = load_all(out)
  want, wmeta = load_all(clean)
  for kind in KINDS:
    np.testing.assert_array_equal(got[kind], want[kind], err_msg=kind)
  assert list(meta) == list(wmeta)
  for c in wmeta:
    np.testing.assert_array_equal(meta[c], wmeta[c], err_msg=c)


def test_file_list_extracts_in_its_order(photos, folder_run, tmp_path):
  """Rows in the list's order; a listed file that is missing is a failure row."""
  root, items = photos
  order = np.random.default_rng(3).permutation(len(items))
  listed = [pathlib.Path(items[i][0]).relative_to(root).as_posix() for i in order]
  listed.insert(4, "gone/missing.jpg")
  lst = root / "list.txt"
  lst.write_text("# photos, shuffled\n" + "\n".join(listed) + "\n")
  out = tmp_path / "out"
  lines = []
  try:
    s = extract.run(extract.ExtractConfig(output=str(out), file_list=str(lst), **COMMON),
                    log=lines.append)
  finally:
    lst.unlink()
  assert s.complete and s.images == len(items) and s.failed == 1
  assert any(f"1 of {len(items) + 1} listed files do not exist" in line for line in lines)
  assert [p for p, _ in store.read_failures(out)] == [str(root / "gone" / "missing.jpg")]
  got, meta = load_all(out)
  assert meta["path"].tolist() == [items[i][0] for i in order]
  assert meta["row"].tolist() == [r for r in range(len(items) + 1) if r != 4]
  assert (meta["label"] == -1).all()  # a list's folders are not classes
  for kind in KINDS:
    np.testing.assert_array_equal(got[kind], folder_run[0][kind][order], err_msg=kind)


def _json_docs(shards: pathlib.Path) -> list[dict]:
  """Every record's json as written, in key order, read back from the tars by tarfile."""
  docs = []
  for f in sorted(shards.glob("*.tar")):
    with tarfile.open(f) as t:
      docs += [json.loads(t.extractfile(n).read()) for n in sorted(t.getnames())
               if n.endswith(".json")]
  return docs


def test_parquet_metadata_equals_load_descriptors(photos, wds_run):
  """The metadata table is plain parquet: pyarrow (or pandas) reads every row's path/label."""
  _, items = photos
  shards, out, _ = wds_run
  _, meta = store.load_descriptors(out, "conv")
  m = store.read_manifest(out)
  table = pq.read_table(out / m["metadata"]["file"]).to_pydict()
  assert table["path"] == meta["path"].tolist() and len(table["path"]) == len(items)
  assert table["label"] == meta["label"].tolist() == [
      sorted({c for _, c in items}).index(c) for _, c in items]
  assert table["label_name"] == [c for _, c in items]
  assert set(meta) == set(table)
  # Each json field as pyarrow reads it: numbers and bools in their own types when every
  # record has one, text otherwise; the values are the json's own, read from the tars.
  docs = _json_docs(shards)
  schema = pq.read_schema(out / m["metadata"]["file"])
  types = {"score": pa.float64(), "n": pa.int64(), "even": pa.bool_(), "key": pa.string(),
           "mixed": pa.string(), "maybe": pa.string()}
  assert {c: schema.field(c).type for c in types} == types
  for c in ("score", "n", "even", "key"):
    assert table[c] == [d[c] for d in docs], c
    assert meta[c].tolist() == table[c], c
  assert table["mixed"] == [str(d["mixed"]) for d in docs]
  assert table["maybe"] == ["" if d["maybe"] is None else json.dumps(d["maybe"]) for d in docs]
  # The NumPy-only way (README): the shards' meta.npz, in the manifest's order.
  parts = [np.load(out / s["dir"] / "meta.npz", allow_pickle=False) for s in m["shards"]]
  assert len(parts) == 5  # 35 rows in shards of 8
  for c in meta:
    np.testing.assert_array_equal(np.concatenate([z[c] for z in parts]), meta[c], err_msg=c)


TFDS_N = 7


def _tfds_example(i: int) -> dict:
  from PIL import Image
  img = np.zeros((20, 16 + i, 3), np.uint8)
  img[..., i % 3] = 30 * i
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, "PNG")
  return {"image": buf.getvalue(), "label": i % 2, "file_name": f"img_{i:02d}.png",
          "score": i / 8, "width": 100 + i, "boxes": np.zeros((2,), np.float32)}


def _tfds_builder(data_dir: str):
  import tensorflow_datasets as tfds

  class CbirTestFeatures(tfds.core.GeneratorBasedBuilder):
    """Image, label and scalar/text/vector features (the vector is not a column)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=["a", "b"]),
          "file_name": tfds.features.Text(), "score": tfds.features.Scalar(np.float32),
          "width": tfds.features.Scalar(np.int64),
          "boxes": tfds.features.Tensor(shape=(2,), dtype=np.float32)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(TFDS_N):
        yield i, _tfds_example(i)

  return CbirTestFeatures(data_dir=data_dir, file_format="array_record")


def test_tfds_scalar_and_text_features_become_columns(tmp_path):
  """A TFDS dataset's scalar and text features are metadata columns, as TFDS decodes them."""
  import tensorflow_datasets as tfds

  _tfds_builder(str(tmp_path / "tfds")).download_and_prepare()
  out = tmp_path / "out"
  extract.run(extract.ExtractConfig(output=str(out), tfds="cbir_test_features:train",
                                    data_dir=str(tmp_path / "tfds"), **COMMON), **QUIET)
  _, meta = store.load_descriptors(out, "conv")
  ref = tfds.data_source("cbir_test_features", split="train", data_dir=str(tmp_path / "tfds"),
                         download=False)
  want = [ref[i] for i in range(len(ref))]  # TFDS's own decoding, in split order
  assert meta["file_name"].tolist() == [ex["file_name"].decode() for ex in want]
  # Numeric features keep their type (float32 -> float64, int64) in the table.
  assert meta["score"].dtype == np.float64 and meta["tfds_width"].dtype == np.int64
  np.testing.assert_array_equal(meta["score"], [ex["score"] for ex in want])
  # "width" is the decoded width; the feature of that name is kept as tfds_width.
  assert meta["tfds_width"].tolist() == [int(ex["width"]) for ex in want]
  assert meta["width"].tolist() == [ex["image"].shape[1] for ex in want]
  assert "boxes" not in meta  # not a scalar
  assert meta["label"].tolist() == [int(ex["label"]) for ex in want]
