"""TFDS input: ArrayRecord datasets read without TensorFlow, TFRecord ones through tf.data.

Datasets are real TFDS datasets prepared in the tests (3 shards, so slices cross shard
files). Their examples are PNG bytes, which TFDS stores as given, so an ArrayRecord dataset
is prepared without TensorFlow too. References come from TFDS's own decoding.
"""
import dataclasses
import io
import os
import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cbir_jax import backbones, extract, inference, input_pipeline, sharding, store, tfds_input
from cbir_jax import descriptors as desc

import tf_free

N = 23
SIZE = 32
COMMON = dict(model="vgg_tiny", weights="random", image_size=SIZE, progress="none")
COLOURS = ["red", "green", "blue"]


def _example(i: int) -> tuple[bytes, int]:
  """Example i: a (20 + i)-wide, 24-high PNG in the colour of its label, i % 3."""
  img = np.zeros((24, 20 + i, 3), np.uint8)
  img[..., i % 3] = 40 + 5 * i
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, "PNG")
  return buf.getvalue(), i % 3


class CbirTestShapes(tfds.core.GeneratorBasedBuilder):
  """N examples; TFDS shuffles their order once, when it prepares them."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=COLOURS)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(N):
      data, label = _example(i)
      yield i, {"image": data, "label": label}


def _prepare(data_dir: pathlib.Path, file_format: str) -> str:
  builder = CbirTestShapes(data_dir=str(data_dir), file_format=file_format)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=3))
  return str(data_dir)


@pytest.fixture(scope="module")
def array_record(tmp_path_factory) -> str:
  return _prepare(tmp_path_factory.mktemp("tfds_ar"), "array_record")


@pytest.fixture(scope="module")
def tfrecord(tmp_path_factory) -> str:
  pytest.importorskip("tensorflow", reason="preparing and reading TFRecord needs TensorFlow")
  return _prepare(tmp_path_factory.mktemp("tfds_tfr"), "tfrecord")


def _reference(data_dir: str, split: str = "train") -> list[tuple[int, int, np.ndarray]]:
  """(width, label, pixels) of each record in split order, decoded by TFDS itself."""
  ds = tfds.data_source("cbir_test_shapes", split=split, data_dir=data_dir, download=False)
  return [(ex["image"].shape[1], int(ex["label"]), ex["image"]) for ex in ds]


def test_source_keys_stamps_and_reads(array_record):
  src = tfds_input.open_tfds("cbir_test_shapes:train", array_record)
  assert (src.num_records, src.label_names, src.file_format) == (N, tuple(COLOURS),
                                                                 "array_record")
  shards = sorted(p.name for p in pathlib.Path(array_record).rglob("*.array_record-*"))
  assert len(shards) == 3
  # TFDS ids: the shard file's name and the record's index inside it, shard after shard.
  lengths = tfds.builder("cbir_test_shapes", data_dir=array_record).info.splits[
      "train"].shard_lengths
  expected = [f"{s}__{k}" for s, n in zip(shards, lengths) for k in range(n)]
  assert src.keys == expected and len(set(expected)) == N
  ref = _reference(array_record)
  for i, (width, label, pixels) in enumerate(ref):
    data, got_label = src.records(i)
    assert got_label == label
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
    assert src.read_key(src.keys[i]) == data == src.read(i)
    assert src.position(src.keys[i]) == i
  with pytest.raises(KeyError):
    src.position(f"{shards[0]}__999")
  with pytest.raises(IndexError):
    src.records(N)


def test_record_stamps_follow_the_shard_files(array_record, tmp_path):
  src = tfds_input.open_tfds("cbir_test_shapes:train", array_record)
  before = src.record_stamps()
  assert len(before) == N and len(set(before)) == 3  # one stamp per shard file
  first = src.files[0].path
  st = os.stat(first)
  try:
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    after = src.record_stamps()
    changed = [a != b for a, b in zip(before, after)]
    assert changed == [True] * src.files[0].take + [False] * (N - src.files[0].take)
  finally:
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_sliced_split_reads_the_slice(array_record):
  whole = tfds_input.open_tfds("cbir_test_shapes:train", array_record)
  part = tfds_input.open_tfds("cbir_test_shapes:train[7:19]", array_record)
  assert part.num_records == 12 and part.keys == whole.keys[7:19]
  assert [part.read(i) for i in range(12)] == [whole.read(i) for i in range(7, 19)]
  with pytest.raises(tfds_input.TfdsError, match="split"):
    tfds_input.open_tfds("cbir_test_shapes:trian", array_record)


@pytest.mark.parametrize("workers,threads", [(0, 1), (0, 3), (2, 1)])
def test_position_batches_in_threads_and_workers(array_record, workers, threads):
  """In this process' threads and in worker processes, which reopen the split themselves."""
  src = tfds_input.open_tfds("cbir_test_shapes:train", array_record)
  ref = _reference(array_record)
  # Three ranges, each padded to whole batches of 4 (-1: a padding row), as a job lays them.
  positions = [*range(0, 5), -1, -1, -1, *range(5, 12), -1, *range(20, 23), -1]
  with tfds_input.position_batches(src, np.array(positions), image_size=8, batch_size=4,
                                   num_threads=threads, num_workers=workers) as stream:
    assert (stream.num_workers, stream.num_threads) == (workers, threads)
    batches = list(stream)
  assert len(batches) == 2 + 2 + 1
  valid = np.concatenate([b.valid for b in batches])
  np.testing.assert_array_equal(valid, np.array(positions) >= 0)
  rows = [(int(b.index[j]), b.key[j], int(b.label[j]), int(b.width[j]), b.images[j])
          for b in batches for j in np.flatnonzero(b.valid)]
  assert [r[0] for r in rows] == [p for p in positions if p >= 0]
  for (i, key, label, width, img) in rows:
    assert key == src.keys[i] and label == ref[i][1] and width == ref[i][0]
    want = np.asarray(Image.fromarray(ref[i][2]).resize((8, 8), Image.BILINEAR))
    np.testing.assert_array_equal(img, want)
  for b in batches:  # padding rows: marked by valid alone, never read
    pad = ~b.valid
    assert not b.ok[pad].any() and (b.index[pad] == -1).all() and (b.label[pad] == -1).all()


def test_tfds_not_prepared_says_so(tmp_path):
  with pytest.raises(tfds_input.TfdsError, match="not prepared.*never downloads"):
    tfds_input.open_tfds("mnist:train", str(tmp_path))
  assert not any(tmp_path.rglob("*.tfrecord*")) and not any(tmp_path.rglob("*.array_record*"))
  with pytest.raises(extract.ExtractError, match="not prepared"):
    extract.run(extract.ExtractConfig(output=str(tmp_path / "o"), tfds="mnist:train",
                                      data_dir=str(tmp_path), **COMMON))


def test_tfds_prepared_dataset_in_shards(array_record, tmp_path):
  """The job over TFDS: shards become split slices, and every record lands once, in order."""
  out = tmp_path / "out"
  cfg = extract.ExtractConfig(output=str(out), tfds="cbir_test_shapes:train",
                              data_dir=array_record, batch_size=1, shard_size=5,
                              kinds=("mac",), **COMMON)
  summary = extract.run(cfg)
  assert summary.images == N and summary.shards_written == 5
  ref = _reference(array_record)
  widths = np.array([w for w, _, _ in ref])
  assert sorted(widths.tolist()) == list(range(20, 20 + N))
  _, meta = store.load_descriptors(out, "mac")
  np.testing.assert_array_equal(meta["row"], np.arange(N))
  np.testing.assert_array_equal(meta["width"], widths)  # every record once, in split order
  np.testing.assert_array_equal(meta["label"], (widths - 20) % 3)
  np.testing.assert_array_equal(meta["label_name"], [COLOURS[i] for i in (widths - 20) % 3])
  src = tfds_input.open_tfds("cbir_test_shapes:train", array_record)
  np.testing.assert_array_equal(meta["path"], src.keys)
  # A sliced split composes with the shard slices.
  out2 = tmp_path / "out2"
  extract.run(dataclasses.replace(cfg, output=str(out2), tfds="cbir_test_shapes:train[7:19]"))
  _, meta2 = store.load_descriptors(out2, "mac")
  np.testing.assert_array_equal(meta2["width"], widths[7:19])


def test_tfds_descriptors_equal_decoding_outside_the_job(array_record, tmp_path):
  """The job's descriptors of TFDS records = the same bytes decoded and described alone."""
  out = tmp_path / "out"
  summary = extract.run(extract.ExtractConfig(
      output=str(out), tfds="cbir_test_shapes:train", data_dir=array_record, batch_size=1,
      shard_size=16, kinds=("fc", "conv"), **COMMON))
  assert summary.images == N and summary.failed == 0
  got, meta = store.load_descriptors(out, "conv")
  src = tfds_input.open_tfds("cbir_test_shapes:train", array_record)
  bb = backbones.get("vgg_tiny")
  params = extract.random_params(bb, SIZE, 0)
  fn = inference.jit_describe(bb, mesh=sharding.data_mesh(jax.devices()[:1]),
                              preprocessing=bb.preprocessing, kinds=("conv",),
                              config=desc.DescriptorConfig())
  images = np.stack([input_pipeline.decode_image(src.read(i), SIZE)[0] for i in range(N)])
  np.testing.assert_allclose(got, np.asarray(fn(params, images)["conv"]), rtol=1e-5,
                             atol=1e-5)


def test_array_record_runs_without_tensorflow(array_record, tmp_path):
  """Open, read and extract an ArrayRecord dataset where TensorFlow cannot be imported."""
  r = tf_free.run_python(f"""
      import sys
      import numpy as np
      from cbir_jax import extract, input_pipeline, store, tfds_input
      src = tfds_input.open_tfds("cbir_test_shapes:train[2:9]", {array_record!r})
      rows = sum(int(b.ok.sum()) for b in tfds_input.position_batches(
          src, np.arange(src.num_records), image_size=16, batch_size=4))
      # Worker processes read the records themselves; they import no TensorFlow either
      # (they run without this process' blocker, so they would find it).
      sys.path.insert(0, "tests")
      import worker_probe
      with input_pipeline.encoded_batches(
          worker_probe.ModulesAfter(src.records), src.keys, np.arange(src.num_records),
          image_size=16, batch_size=4, num_workers=2, num_threads=1) as s:
        found = [worker_probe.imported_heavy(v % 16) for b in s for v in b.label[b.valid]]
      assert len(found) == 7 and not any(found), found
      s = extract.run(extract.ExtractConfig(
          output={str(tmp_path / 'out')!r}, tfds="cbir_test_shapes:train",
          data_dir={array_record!r}, model="vgg_tiny", weights="random", image_size=32,
          progress="none", kinds=("mac",)))
      _, meta = store.load_descriptors({str(tmp_path / 'out')!r}, "mac")
      assert "tensorflow" not in sys.modules, "tensorflow imported"
      print("OK", rows, s.images, len(meta["path"]))
  """, block_tensorflow=True)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split()[-4:] == ["OK", "7", str(N), str(N)]


def test_tfrecord_dataset_reads_through_tf_data(tfrecord, array_record):
  """TensorFlow installed: a TFRecord dataset gives the same rows as its ArrayRecord twin."""
  tfr = tfds_input.open_tfds("cbir_test_shapes:train[3:20]", tfrecord)
  ar = tfds_input.open_tfds("cbir_test_shapes:train[3:20]", array_record)
  assert tfr.file_format == "tfrecord" and tfr.num_records == ar.num_records == 17
  # Keys computed from the file layout = the ids tf.data reads with the records.
  assert tfr.keys == [k.replace(".array_record-", ".tfrecord-") for k in ar.keys]
  with pytest.raises(tfds_input.TfdsError, match="no random access.*array_record"):
    tfr.read(0)
  # Two runs of records (tf.data reads each as one sub-split), each padded to whole batches.
  positions = np.array([*range(0, 6), -1, -1, *range(6, 17), -1])
  want = list(tfds_input.position_batches(ar, positions, image_size=8, batch_size=4,
                                          num_threads=2))
  got = list(tfds_input.position_batches(tfr, positions, image_size=8, batch_size=4,
                                         num_threads=2))
  # tf.data reads in this process; the records' bytes travel to worker processes with their rows.
  got_p = list(tfds_input.position_batches(tfr, positions, image_size=8, batch_size=4,
                                           num_threads=1, num_workers=2))
  assert len(got) == len(got_p) == len(want) == 2 + 3
  for g, gp, w in zip(got, got_p, want):
    for f in ("images", "index", "valid", "label", "width", "ok"):
      np.testing.assert_array_equal(getattr(gp, f), getattr(g, f))
    assert gp.key == g.key and gp.error == g.error
    np.testing.assert_array_equal(g.images, w.images)
    np.testing.assert_array_equal(g.index, w.index)
    np.testing.assert_array_equal(g.valid, w.valid)
    np.testing.assert_array_equal(g.label, w.label)
    assert g.key == [k.replace(".array_record-", ".tfrecord-") for k in w.key]


def test_tfrecord_without_tensorflow_says_how_to_fix(tfrecord):
  r = tf_free.run_python(f"""
      from cbir_jax import tfds_input
      try:
        tfds_input.open_tfds("cbir_test_shapes:train", {tfrecord!r})
      except tfds_input.TfdsError as e:
        print("REFUSED", e)
  """, block_tensorflow=True)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "REFUSED" in r.stdout, r.stdout
  assert "--file_format=array_record" in r.stdout and "tfrecord" in r.stdout
