"""Webdataset shards and file lists as inputs, checked against the folder they were made from.

Shards are written here with plain `tarfile` in the img2dataset layout (key.jpg + key.json +
key.cls); the reference for every record is the photo's own file, read and decoded as the
folder input does.
"""
import io
import json
import os
import pathlib
import pickle
import tarfile

import numpy as np
import pytest

from cbir_jax import decode, file_list, input_pipeline
from cbir_jax import webdataset_input as wds

PER_CLASS = 5
SHARD_SIZE = 12  # records per shard: 35 photos -> shards of 12, 12, 11


@pytest.fixture(scope="module")
def photos(shared_data):
  """(path, class index, class name) of the first PER_CLASS photos of each food7 class."""
  root = shared_data / "food7"
  classes = sorted(p.name for p in root.iterdir() if p.is_dir())
  return [(str(p), ci, c) for ci, c in enumerate(classes)
          for p in sorted((root / c).glob("*.jpg"))[:PER_CLASS]]


def _add(tar, name, data, mtime=1_700_000_000):
  info = tarfile.TarInfo(name)
  info.size, info.mtime = len(data), mtime
  tar.addfile(info, io.BytesIO(data))


def write_shards(folder, photos, shard_size=SHARD_SIZE):
  """img2dataset layout: shard NNNNN.tar holds key.jpg, key.json, key.cls per photo."""
  folder.mkdir(parents=True, exist_ok=True)
  for s in range(0, len(photos), shard_size):
    with tarfile.open(folder / f"{s // shard_size:05d}.tar", "w", format=tarfile.GNU_FORMAT) as t:
      for k, (path, ci, c) in enumerate(photos[s:s + shard_size], start=s):
        key = f"{k:06d}"
        meta = {"key": key, "url": f"file://{path}", "caption": f"a photo of {c}",
                "width": 1 + k, "similarity": k / 7, "tags": ["list", "not a column"]}
        _add(t, f"{key}.jpg", pathlib.Path(path).read_bytes())
        _add(t, f"{key}.json", json.dumps(meta).encode())
        _add(t, f"{key}.cls", f"{ci}\n".encode())
  return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photos):
  return write_shards(tmp_path_factory.mktemp("wds") / "shards", photos)


def test_lists_every_photo_in_shard_then_member_order(shards, photos):
  lst = wds.list_webdataset(str(shards))
  assert [s.rel for s in lst.shards] == ["00000.tar", "00001.tar", "00002.tar"]
  assert lst.num_records == len(photos)
  assert lst.keys == [f"{k // SHARD_SIZE:05d}.tar/{k:06d}.jpg" for k in range(len(photos))]
  assert lst.labels.tolist() == [ci for _, ci, _ in photos]
  assert not lst.skipped and not lst.problems and lst.report_lines() == []
  # Listed by 2 processes: the same records, offsets and sidecars.
  par = wds.list_webdataset(str(shards), processes=2)
  assert par.keys == lst.keys and par.offsets.tolist() == lst.offsets.tolist()
  assert par.labels.tolist() == lst.labels.tolist() and list(par.columns) == list(lst.columns)
  # A glob over the same files lists the same records (root: the glob's fixed folder).
  again = wds.list_webdataset(str(shards / "*.tar"))
  assert again.keys == lst.keys and again.root == lst.root


def test_reads_back_the_same_bytes_as_the_folder(shards, photos):
  lst = wds.list_webdataset(str(shards))
  for i, (path, _, _) in enumerate(photos):
    assert lst.read(i) == pathlib.Path(path).read_bytes(), lst.keys[i]
  # Offsets alone suffice: a reader rebuilt from its pickle (as a worker process gets it).
  reader = pickle.loads(pickle.dumps(lst.reader))
  assert reader(lst.arg(7)) == (pathlib.Path(photos[7][0]).read_bytes(), photos[7][1])


def test_metadata_columns_from_json_scalars(shards, photos):
  lst = wds.list_webdataset(str(shards))
  cols = lst.columns
  n = len(photos)
  assert list(cols) == ["key", "url", "caption", "json_width", "similarity"]  # no list field
  assert cols["key"].tolist() == [f"{k:06d}" for k in range(n)]
  assert cols["caption"].tolist() == [f"a photo of {c}" for _, _, c in photos]
  assert cols["json_width"].dtype == np.int64
  assert cols["json_width"].tolist() == list(range(1, n + 1))
  assert cols["similarity"].dtype == np.float64
  np.testing.assert_allclose(cols["similarity"], np.arange(n) / 7, rtol=0, atol=0)


def test_decodes_to_the_same_pixels_as_the_folder(shards, photos):
  lst = wds.list_webdataset(str(shards))
  # Every record, out of order, with a padding row, as a job's steps lay them out.
  positions = np.array([0, 5, -1, 13, *range(34, 20, -1), *range(1, 5), *range(6, 13),
                        *range(14, 21)], np.int64)
  assert sorted(positions[positions >= 0].tolist()) == list(range(len(photos)))
  with wds.position_batches(lst, positions, image_size=64, batch_size=4, num_workers=0,
                            num_threads=2) as stream:
    got = list(stream)
  folder_keys = [p for p, _, _ in photos]
  with input_pipeline.positions_batches(folder_keys, positions, image_size=64, batch_size=4,
                                        num_workers=0, num_threads=2) as stream:
    ref = list(stream)
  assert len(got) == len(ref) == 9
  for g, r in zip(got, ref):
    np.testing.assert_array_equal(g.images, r.images)
    np.testing.assert_array_equal(g.index, r.index)
    np.testing.assert_array_equal(g.width, r.width)
    np.testing.assert_array_equal(g.valid, r.valid)
    assert g.ok.tolist() == g.valid.tolist()  # every real row decoded
  paths = lst.paths
  assert got[0].key == [paths[0], paths[5], "", paths[13]]
  assert paths[5] == os.path.join(str(shards), "00000.tar", "000005.jpg")
  assert got[0].label.tolist() == [photos[0][1], photos[5][1], -1, photos[13][1]]
  # And record by record through safe_decode, against decode_image of the file itself.
  for i in (3, 29):
    img, w, h, err = decode.safe_decode(lambda i=i: lst.read(i), 48)
    ref_img, (rw, rh) = decode.decode_image(pathlib.Path(photos[i][0]).read_bytes(), 48)
    assert err == "" and (w, h) == (rw, rh)
    np.testing.assert_array_equal(img, ref_img)


def test_a_worker_process_reads_members_itself(shards, photos):
  lst = wds.list_webdataset(str(shards))
  positions = np.arange(6, dtype=np.int64)
  with wds.position_batches(lst, positions, image_size=32, batch_size=3, num_workers=1,
                            num_threads=1) as stream:
    assert stream.num_workers == 1
    got = np.concatenate([b.images for b in stream])
  ref, errors = input_pipeline.load_images([p for p, _, _ in photos[:6]], 32)
  assert errors == [""] * 6
  np.testing.assert_array_equal(got, ref)


# --- damaged inputs ---------------------------------------------------------------------------


def _copy_shards(src, dst):
  dst.mkdir()
  for p in sorted(src.glob("*.tar")):
    (dst / p.name).write_bytes(p.read_bytes())
    os.utime(dst / p.name, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns))
  return dst


@pytest.mark.parametrize("cut", ["in_member", "at_boundary", "in_header"])
def test_a_truncated_shard_is_a_one_line_error(shards, tmp_path, cut):
  d = _copy_shards(shards, tmp_path / "d")
  shard = d / "00001.tar"
  with tarfile.open(shard) as t:
    members = t.getmembers()
  m = members[4]  # 000013.jpg
  end = {"in_member": m.offset_data + m.size // 2, "at_boundary": members[6].offset,
         "in_header": members[6].offset + 100}[cut]
  shard.write_bytes(shard.read_bytes()[:end])
  with pytest.raises(wds.WebdatasetError) as e:
    wds.list_webdataset(str(d))
  msg = str(e.value)
  assert "\n" not in msg and str(shard) in msg and "not a whole tar" in msg


def test_compressed_or_non_tar_shards_are_refused(tmp_path, photos):
  import gzip
  d = tmp_path / "gz"
  d.mkdir()
  (d / "a.tar").write_bytes(gzip.compress(b"x" * 2000))
  with pytest.raises(wds.WebdatasetError, match="gzip-compressed"):
    wds.list_webdataset(str(d))
  (d / "a.tar").write_bytes(b"not a tar at all" * 100)
  with pytest.raises(wds.WebdatasetError, match="not a whole tar"):
    wds.list_webdataset(str(d))
  with pytest.raises(wds.WebdatasetError, match="no such folder or file"):
    wds.list_webdataset(str(tmp_path / "nothing"))
  with pytest.raises(wds.WebdatasetError, match="matches no file"):
    wds.list_webdataset(str(tmp_path / "nothing" / "*.tar"))


def test_odd_keys_and_members_are_skipped_and_counted(tmp_path, photos):
  jpg = [pathlib.Path(p).read_bytes() for p, _, _ in photos[:4]]
  d = tmp_path / "odd"
  d.mkdir()
  with tarfile.open(d / "00000.tar", "w") as t:
    _add(t, "a.jpg", jpg[0])
    _add(t, "a.cls", b"3")
    _add(t, "b.json", b'{"caption": "image missing"}')  # no image
    _add(t, "c.jpg", jpg[1])
    _add(t, "c.png", jpg[2])  # two images for one key
    link = tarfile.TarInfo("d.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
    t.addfile(link)
    folder = tarfile.TarInfo("sub")
    folder.type = tarfile.DIRTYPE
    t.addfile(folder)
    _add(t, "sub/e.jpeg", jpg[3])
    _add(t, "sub/e.seg.npy", b"\0" * 8)
    _add(t, "sub/e.json", b"{broken")
    _add(t, "f.jpg", b"this is not a jpeg")  # a corrupt member: kept, fails at decode
    _add(t, "a.jpg", jpg[2])  # appended again (tar -r): this copy is the one extracted
  lst = wds.list_webdataset(str(d))
  assert lst.read(0) == jpg[2]
  assert lst.keys == ["00000.tar/a.jpg", "00000.tar/sub/e.jpeg", "00000.tar/f.jpg"]
  assert lst.labels.tolist() == [3, -1, -1]
  assert dict(lst.skipped) == {"key without an image": 1, "key with several images": 1,
                               "link or special member": 1, "other member .seg.npy": 1}
  assert dict(lst.problems) == {"unreadable .json (no metadata, no json label)": 1}
  assert lst.examples["key with several images"] == ["00000.tar/c"]
  assert len(lst.report_lines()) == 5
  assert lst.read(1) == jpg[3]
  with wds.position_batches(lst, np.arange(3), image_size=32, batch_size=3,
                            num_workers=0, num_threads=1) as stream:
    (b,) = list(stream)
  assert b.ok.tolist() == [True, True, False] and b.valid.all()
  assert "not an image" in b.error[2]


def test_labels_from_json_names_and_a_mix_is_refused(tmp_path, photos):
  jpg = pathlib.Path(photos[0][0]).read_bytes()
  d = tmp_path / "names"
  d.mkdir()
  with tarfile.open(d / "00000.tar", "w") as t:
    for key, label in (("a", "satay"), ("b", "rojak"), ("c", None), ("d", "satay")):
      _add(t, f"{key}.jpg", jpg)
      _add(t, f"{key}.json", json.dumps({} if label is None else {"label": label}).encode())
  lst = wds.list_webdataset(str(d))
  assert lst.labels.tolist() == [1, 0, -1, 1]  # names numbered in sorted order
  assert lst.label_names == ["satay", "rojak", "", "satay"]
  assert "label" not in lst.columns
  with tarfile.open(d / "00001.tar", "w") as t:
    for key, cls, doc in (("f", b"99999999999999999999", {"n": 2**70, "x": 1}),
                          ("g", b"", {"label": True, "n": 1, "x": 2.5})):
      _add(t, f"{key}.jpg", jpg)
      _add(t, f"{key}.cls", cls)
      _add(t, f"{key}.json", json.dumps(doc).encode())
  lst = wds.list_webdataset(str(d))
  assert lst.labels.tolist() == [1, 0, -1, 1, -1, -1]
  assert lst.problems == {"unreadable .cls (label -1)": 2,
                          "json 'label' neither a class index nor a name (label -1)": 1}
  # A field some records lack, or an integer too large for int64, makes its column text.
  assert lst.columns["n"].tolist() == ["", "", "", "", str(2**70), "1"]
  assert lst.columns["x"].tolist() == ["", "", "", "", "1", "2.5"]
  with tarfile.open(d / "00002.tar", "w") as t:
    _add(t, "e.jpg", jpg)
    _add(t, "e.cls", b"4")
  with pytest.raises(wds.WebdatasetError, match="mix integers and class names"):
    wds.list_webdataset(str(d))


# --- identity -----------------------------------------------------------------------------------


def test_identity_changes_when_a_member_is_replaced_or_added(shards, tmp_path, photos):
  d = _copy_shards(shards, tmp_path / "d")
  before = wds.list_webdataset(str(d))
  keys0, stamps0 = before.keys, before.stamps()
  assert len(set(keys0)) == len(keys0)
  # Relisting an unchanged input gives the same identities.
  again = wds.list_webdataset(str(d))
  assert (again.keys, again.stamps()) == (keys0, stamps0)
  # Rewrite shard 1 with record 13's image replaced by another photo.
  swapped = list(photos)
  swapped[13] = photos[0]
  tmp = write_shards(tmp_path / "swap", swapped)
  (d / "00001.tar").write_bytes((tmp / "00001.tar").read_bytes())
  os.utime(d / "00001.tar", ns=(1, 2))  # a new mtime, whatever the clock's resolution
  after = wds.list_webdataset(str(d))
  assert after.keys == keys0
  changed = {k for k, a, b in zip(keys0, stamps0, after.stamps()) if a != b}
  assert changed == {k for k in keys0 if k.startswith("00001.tar/")}  # the whole shard
  assert after.read(13) == pathlib.Path(photos[0][0]).read_bytes()
  # The old listing's reader refuses the replaced shard instead of reading other bytes.
  with pytest.raises(OSError, match="changed since it was listed"):
    before.read(13)
  with wds.position_batches(before, np.array([0, 13]), image_size=32, batch_size=2,
                            num_workers=0, num_threads=1) as stream:
    (b,) = list(stream)
  assert b.ok.tolist() == [True, False] and "changed since it was listed" in b.error[1]
  # A new shard adds records at the end; the other stamps stay.
  write_shards(tmp_path / "more", photos[:3])
  (d / "00003.tar").write_bytes((tmp_path / "more" / "00000.tar").read_bytes())
  grown = wds.list_webdataset(str(d))
  assert grown.keys[:len(keys0)] == keys0 and len(grown.keys) == len(keys0) + 3
  assert grown.stamps()[:len(keys0)] == after.stamps()
  assert grown.keys[-1] == "00003.tar/000002.jpg"


def test_content_digest_is_the_members_sha256(shards):
  import hashlib
  lst = wds.list_webdataset(str(shards))
  stamps = lst.stamps(content_digest=True)
  for i in (0, 17):
    assert stamps[i].rsplit(":", 1)[1] == hashlib.sha256(lst.read(i)).hexdigest()
    shard = lst.shards[lst.shard_index[i]]
    assert stamps[i].startswith(f"{lst.sizes[i]}:{shard.size}:{shard.mtime_ns}:")


def test_split_name_follows_the_webdataset_convention():
  assert wds.split_name("000123.jpg") == ("000123", "jpg")
  assert wds.split_name("a.b/000123.seg.png") == ("a.b/000123", "seg.png")
  assert wds.split_name("noext") == ("noext", "")


# --- file lists -------------------------------------------------------------------------------


def test_file_list_rules(tmp_path, photos):
  (tmp_path / "imgs" / "x").mkdir(parents=True)
  a = tmp_path / "imgs" / "x" / "a.jpg"
  a.write_bytes(pathlib.Path(photos[0][0]).read_bytes())
  outside = photos[8][0]  # absolute, outside the list's folder
  lst = tmp_path / "list.txt"
  lst.write_bytes(b"# header comment\n\nimgs/x/a.jpg\r\n  " + outside.encode()
                  + b"  \nimgs/missing.jpg\n   # indented comment\n")
  fl = file_list.read_file_list(str(lst))
  assert fl.paths == [str(a), outside, str(tmp_path / "imgs" / "missing.jpg")]
  assert fl.lines == [3, 4, 5] and fl.root == str(tmp_path)
  assert fl.labels.tolist() == [-1, -1, -1] and fl.missing == [2]
  assert "1 of 3 listed files do not exist (line 5:" in fl.missing_line()
  labelled = file_list.read_file_list(str(lst), parent_labels=True)
  # parent folders: x, <class of photo 8>, imgs -> numbered in sorted name order
  names = ["x", photos[8][2], "imgs"]
  assert labelled.label_names == names
  assert labelled.labels.tolist() == [sorted(names).index(n) for n in names]
  # The rows read like a folder's files: the missing one is a failure row, the others decode.
  with input_pipeline.positions_batches(fl.paths, np.arange(3), image_size=32, batch_size=3,
                                        num_workers=0, num_threads=1) as stream:
    (b,) = list(stream)
  assert b.ok.tolist() == [True, True, False] and "cannot read file" in b.error[2]


def test_file_list_names_that_are_not_utf8_match_the_folder_walk(tmp_path, photos):
  raw = b"caf\xe9.jpg"  # Latin-1, not UTF-8
  (tmp_path / os.fsdecode(raw)).write_bytes(pathlib.Path(photos[0][0]).read_bytes())
  (tmp_path / "list.txt").write_bytes(raw + b"\n")
  fl = file_list.read_file_list(str(tmp_path / "list.txt"))
  walked = input_pipeline.list_folder(tmp_path).records
  assert fl.paths == [r.key for r in walked] and fl.missing == []


def test_file_list_refuses_duplicates_with_line_numbers_and_empty_lists(tmp_path):
  lst = tmp_path / "list.txt"
  lst.write_text("a.jpg\nb.jpg\n./a.jpg\nsub/../b.jpg\n")
  with pytest.raises(file_list.FileListError) as e:
    file_list.read_file_list(str(lst))
  msg = str(e.value)
  assert "2 paths listed twice" in msg and "(lines 1 and 3)" in msg and "(lines 2 and 4)" in msg
  lst.write_text("# nothing\n\n")
  with pytest.raises(file_list.FileListError, match="names no file"):
    file_list.read_file_list(str(lst))
  with pytest.raises(file_list.FileListError, match="cannot read --file_list"):
    file_list.read_file_list(str(tmp_path / "absent.txt"))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_offsets_hold_under_every_tar_format_and_long_names(tmp_path, photos, fmt):
  """Long and non-ASCII names need extended headers (GNU longname, PAX) before the member."""
  d = tmp_path / "fmt"
  d.mkdir()
  deep = "x" * 60 + "/" + "y" * 50  # > 100 characters: ustar's prefix field, or a long name
  names = [f"{deep}/{k:03d}.jpg" for k in range(3)]
  if fmt == tarfile.PAX_FORMAT:
    names[1] = "ünïcödé/" + "z" * 120 + ".JPEG"
  with tarfile.open(d / "a.tar", "w", format=fmt) as t:
    for k, name in enumerate(names):
      _add(t, name, pathlib.Path(photos[k][0]).read_bytes())
  lst = wds.list_webdataset(str(d / "a.tar"))
  assert lst.keys == [f"a.tar/{n}" for n in names]
  assert [lst.read(i) for i in range(3)] == [pathlib.Path(p).read_bytes() for p, _, _ in photos[:3]]


def test_a_rows_stored_path_reads_its_image_back(shards, photos, tmp_path):
  lst = wds.list_webdataset(str(shards))
  for i in (0, 12, 34):
    assert wds.read_path(lst.paths[i]) == pathlib.Path(photos[i][0]).read_bytes()
  with pytest.raises(OSError, match="has no image member '000001.json'"):
    wds.read_path(str(shards / "00000.tar" / "000001.json"))
  with pytest.raises(OSError, match="no shard file on its path"):
    wds.read_path(str(tmp_path / "nowhere.tar" / "000001.jpg"))


def test_the_listing_cache_is_reused_only_while_a_shard_stays(shards, tmp_path, monkeypatch):
  from cbir_jax import tar_shards
  d = _copy_shards(shards, tmp_path / "d")
  cache = str(tmp_path / "cache")
  fresh = wds.list_webdataset(str(d), processes=0)
  listed = []
  real = tar_shards.list_shard
  monkeypatch.setattr(tar_shards, "list_shard",
                      lambda shard, ext: listed.append(shard.rel) or real(shard, ext))
  first = wds.list_webdataset(str(d), processes=0, cache_dir=cache)
  assert listed == ["00000.tar", "00001.tar", "00002.tar"]
  again = wds.list_webdataset(str(d), processes=0, cache_dir=cache)
  assert listed == ["00000.tar", "00001.tar", "00002.tar"]  # all three from the cache
  for lst in (first, again):
    assert lst.keys == fresh.keys and lst.stamps() == fresh.stamps()
    assert lst.offsets.tolist() == fresh.offsets.tolist()
    assert lst.labels.tolist() == fresh.labels.tolist()
    assert {k: v.tolist() for k, v in lst.columns.items()} == \
        {k: v.tolist() for k, v in fresh.columns.items()}
  # A touched shard is listed again; a damaged cache file is a miss, not an error.
  os.utime(d / "00001.tar", ns=(1, 2))
  for f in pathlib.Path(cache).glob("*.json"):
    if json.loads(f.read_text())["id"]["rel"] == "00000.tar":
      f.write_text("{not json")
  wds.list_webdataset(str(d), processes=0, cache_dir=cache)
  assert listed[3:] == ["00000.tar", "00001.tar"]
  assert sorted(p.name for p in pathlib.Path(cache).iterdir() if p.suffix != ".json") == []
