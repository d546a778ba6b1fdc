"""cbir-search around the search itself: the default kind, the table, the paths it shows, what a
wrong --index says, and --weights when the weights moved.

The index is a real extraction of unlabelled PNGs (no class folders) with `vgg_tiny` weights
that have no FC layers (as VGG16's no-top weights), so it holds conv, mac, spoc and gem only.
"""
import dataclasses
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from cbir_jax import backbones, checkpoint, extract, query, search_command, serve, store
from cbir_jax import preprocessing as pp

SIZE = 32
NOTOP_KINDS = ("conv", "mac", "spoc", "gem")


def _save_weights(folder: pathlib.Path, seed: int, *, has_fc: bool) -> pathlib.Path:
  params = backbones.get("vgg_tiny").random_params(seed, SIZE)
  if not has_fc:
    params = {k: v for k, v in params.items() if not k.startswith("fc")}
  checkpoint.save(folder, params, checkpoint.WeightsInfo("vgg_tiny", pp.TORCHVISION,
                                                         has_fc=has_fc))
  return folder


@pytest.fixture(scope="module")
def notop(tmp_path_factory):
  """(index dir, image paths, weights dir): 6 unlabelled PNGs extracted with no-FC weights."""
  root = tmp_path_factory.mktemp("notop")
  rng = np.random.default_rng(11)
  paths = []
  for i in range(6):
    paths.append(root / "imgs" / f"img{i}.png")
    paths[-1].parent.mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(paths[-1])
  wdir = _save_weights(root / "weights", 0, has_fc=False)
  out = root / "index"
  extract.run(extract.ExtractConfig(output=str(out), images=str(root / "imgs"),
                                    model="vgg_tiny", weights=str(wdir), image_size=SIZE,
                                    batch_size=4, progress="none"), log=lambda m: None)
  return out, paths, wdir


def test_default_kind_is_one_the_index_has_and_says_which(notop):
  out, _, _ = notop
  assert store.load_manifest(out).settings.kinds == NOTOP_KINDS
  notes = []
  [got] = query.search_index(str(out), query_ids=[2], k=3, note=notes.append)
  assert got.kind == "conv"
  assert notes == ["kind conv (the index has no fc_conv; it has conv, mac, spoc, gem; --kind "
                   "picks another)"]
  [asked] = query.search_index(str(out), kind="conv", query_ids=[2], k=3)
  assert got.hits == asked.hits
  # A kind asked for and absent: one line naming the kinds there are.
  for kind in ("fc_conv", "fc"):
    with pytest.raises(store.StoreError) as e:
      query.search_index(str(out), kind=kind, query_ids=[2])
    assert str(e.value) == (f"{out}: kind {kind!r} was not extracted; the index has conv, mac, "
                            "spoc, gem (--kind=...)")


def test_default_kind_preference_order(notop, tmp_path):
  """choose_kind on the index's manifest with other kind sets: fc_conv, else conv, fc, gem,
  mac, spoc; a note whenever it is not fc_conv."""
  out, _, _ = notop
  manifest = json.loads((out / store.MANIFEST).read_text())
  base = ["fc", "conv", "fc_conv", "mac", "spoc", "gem"]
  cases = [(base, "fc_conv"), (["fc", "conv", "mac"], "conv"), (["mac", "fc"], "fc"),
           (["spoc", "mac", "gem"], "gem"), (["spoc", "mac"], "mac"), (["spoc"], "spoc")]
  for kinds, want in cases:
    manifest["settings"]["kinds"] = kinds
    (tmp_path / store.MANIFEST).write_text(json.dumps(manifest))
    kind, note = store.choose_kind(tmp_path, None)
    assert kind == want and (note is None) == (want == "fc_conv"), kinds
    assert store.choose_kind(tmp_path, kinds[-1]) == (kinds[-1], None)  # asked: no note


def test_unlabelled_rows_show_no_label_and_paths_are_absolute(notop, monkeypatch):
  out, paths, _ = notop
  # The query given relative to the working folder: shown absolute, as the stored paths.
  monkeypatch.chdir(paths[0].parent.parent)
  rel = os.path.join("imgs", paths[0].name)
  results = query.search_index(str(out), query_paths=[rel], query_ids=[3], k=3)
  image, row = results
  assert image.query.path == str(paths[0]) == image.hits[0].path  # the query itself, found
  table = query.format_results(results).splitlines()
  assert table[0].startswith(f"query (image, conv): {paths[0]}  [in the index: row")
  assert len(table) == 10 and table[5].startswith("query (row 3, conv): ")
  assert table[1] == "rank    distance  path" and table[6] == "rank    distance  path"
  # Every result line: rank, distance, an absolute path, nothing in brackets.
  for line in table[2:5] + table[7:10]:
    rank, distance, rest = line.split(maxsplit=2)
    assert os.path.isabs(rest.split("  ")[0]) and "[" not in rest, line
  assert table[2].endswith("  (the query itself)")
  got = query.results_json(results, index=str(out))
  assert {r["query"] for r in got["results"][:3]} == {str(paths[0])}
  assert all(r["label"] == "" for r in got["results"])


def test_labelled_and_unlabelled_rows_in_one_table():
  hits = (query.Hit("/a/cat/1.jpg", 0.1, "cat", 0), query.Hit("/a/2.jpg", 0.2, "", 1))
  table = query.format_results([query.QueryResult(query.Hit("/a/q.jpg"), hits, "conv")])
  assert table.splitlines()[1:] == ["rank    distance  path  [label]",
                                    "   1    0.100000  /a/cat/1.jpg  [cat]",
                                    "   2    0.200000  /a/2.jpg"]


def test_a_wrong_index_says_what_it_is(tmp_path):
  missing, a_file, empty = tmp_path / "nope", tmp_path / "file", tmp_path / "empty"
  a_file.write_text("x")
  empty.mkdir()
  said = {}
  for where in (missing, a_file, empty):
    with pytest.raises(store.StoreError) as e:
      query.search_index(str(where), query_ids=[0])
    said[where] = str(e.value)
    assert "\n" not in said[where] and f"cbir-extract --images=PHOTOS --output={where}" in \
        said[where]
  assert said[missing].startswith(f"{missing}: no such directory")
  assert said[a_file].startswith(f"{a_file}: not a directory")
  assert said[empty].startswith(f"{empty}: not a cbir_jax index (it has no manifest.json)")


def test_weights_flag_finds_moved_weights_and_refuses_others(notop, tmp_path):
  out, paths, wdir = notop
  # The index's weights moved: the query side cannot find them by the recorded folder.
  moved = tmp_path / "moved"
  shutil.copytree(wdir, moved)
  manifest = store.load_manifest(out)
  gone = dataclasses.replace(manifest, weights=dataclasses.replace(
      manifest.weights, dir=str(tmp_path / "was_here")))
  with pytest.raises(query.IndexMismatch, match="cannot load the weights.*--weights"):
    query.describe_images(gone, [str(paths[1])], "conv")
  # --weights: the same weights, elsewhere. The row the index stores for that image.
  _, db, _ = store.open_index(out, "conv")
  got = query.describe_images(gone, [str(paths[1])], "conv", weights_dir=str(moved))
  np.testing.assert_allclose(got[0], np.asarray(db[1], np.float32), rtol=1e-5, atol=1e-6)
  # The service takes the same flag and describes alike.
  describer = serve.Describer(gone, "conv", max_pixels=manifest.settings.max_pixels,
                              weights_dir=str(moved))
  pixels = describer.pixels(paths[1].read_bytes())
  np.testing.assert_allclose(describer(pixels[None])[0], got[0], rtol=1e-5, atol=1e-6)
  # Other weights: refused by the digest weights.json records, and by the arrays' own
  # digest when weights.json records none.
  other = _save_weights(tmp_path / "other", 1, has_fc=False)
  with pytest.raises(query.IndexMismatch, match=f"{other} holds other weights"):
    query.describe_images(manifest, [str(paths[1])], "conv", weights_dir=str(other))
  info = json.loads((other / checkpoint.INFO_FILE).read_text())
  info.pop("params_sha256")
  (other / checkpoint.INFO_FILE).write_text(json.dumps(info))
  with pytest.raises(query.IndexMismatch, match=f"{other} holds other weights"):
    query.describe_images(manifest, [str(paths[1])], "conv", weights_dir=str(other))
  with pytest.raises(query.IndexMismatch, match="no weights for model 'vgg_tiny'"):
    query.describe_images(manifest, [str(paths[1])], "conv", weights_dir=str(tmp_path))


def test_weights_flag_through_the_search_command(notop, tmp_path):
  """search_command.run (the command's body) with --weights: the table of the same search."""
  out, paths, wdir = notop
  moved = tmp_path / "w"
  shutil.copytree(wdir, moved)
  lines = []
  config = query.SearchConfig(index=str(out), query=(str(paths[4]),), k=2,
                              weights=str(moved))
  [r] = search_command.run(config, log=lambda m: None, out=lines.append)
  assert r.self_row == 4 and r.hits[0].row == 4 and r.hits[0].distance < 1e-6
  assert lines[0].startswith(f"query (image, conv): {paths[4]}")
  with pytest.raises(query.IndexMismatch, match="random weights"):
    random_index = tmp_path / "random"
    extract.run(extract.ExtractConfig(output=str(random_index), images=str(paths[0].parent),
                                      model="vgg_tiny", weights="random", image_size=SIZE,
                                      kinds=("conv",), progress="none"), log=lambda m: None)
    search_command.run(dataclasses.replace(config, index=str(random_index)), log=lambda m: None,
                       out=lambda m: None)
