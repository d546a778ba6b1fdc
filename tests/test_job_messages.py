"""What the job says and leaves behind on a plain run: one short summary line (details on a
second line), documentation files not reported as skipped, an output inside the input and
an empty folder refused in one short line, no failure list when nothing failed.

`vgg_tiny` with random weights on 32x32 inputs, on the package's sample photos.
"""
import pathlib
import shutil

import pytest

from cbir_jax import extract, input_pipeline, samples, store

COMMON = dict(model="vgg_tiny", weights="random", image_size=32, progress="none",
              batch_size=2, kinds=("conv", "mac"))


@pytest.fixture
def sample_copy(tmp_path) -> pathlib.Path:
  """The shipped sample folder (10 photos and its LICENSES.md), copied."""
  root = tmp_path / "samples"
  shutil.copytree(samples.SAMPLE_IMAGES_DIR, root)
  return root


def test_plain_run_says_one_short_line_and_writes_no_failure_list(sample_copy, tmp_path,
                                                                   capsys):
  assert (sample_copy / "LICENSES.md").is_file()
  n = len(input_pipeline.list_folder(sample_copy).records)
  out = tmp_path / "out"
  rc = extract.main(extract.ExtractConfig(output=str(out), images=str(sample_copy), **COMMON))
  assert rc == 0
  got = capsys.readouterr()
  line = got.out.strip().splitlines()[-1]
  assert line.startswith(f"extracted {n} images, 0 failed, in ") and f"output {out}" in line
  assert "skipped" not in line  # LICENSES.md is the collection's documentation
  assert "waiting for input" not in line and len(line) < 120 + len(str(out))
  assert "details:" in got.err and "waiting for input" in got.err  # the tuning figures
  assert not (out / "failures.json").exists()  # nothing failed: no failure list
  assert store.read_failures(out) == [] and store.read_manifest(out)["failures"] == 0
  assert store.load_manifest(out).input.skipped == {}


def test_documentation_files_are_not_skipped_files(tmp_path):
  root = tmp_path / "imgs"
  shutil.copytree(samples.SAMPLE_IMAGES_DIR, root)
  for name in ("README", "readme.txt", "LICENSE-photos", "COPYING", "notes.md", "captions.txt",
               "x.heic"):
    (root / name).write_text("not an image")
  listing = input_pipeline.list_folder(root)
  assert sorted(listing.skipped.items()) == [(".heic", 1), (".txt", 1)]  # captions.txt, x.heic
  assert [pathlib.Path(d).name for d in listing.documents] == sorted(
      ["COPYING", "LICENSE-photos", "LICENSES.md", "README", "notes.md", "readme.txt"])


def test_failure_list_written_when_something_failed(sample_copy, tmp_path):
  (sample_copy / "broken.jpg").write_bytes(b"not a jpeg")
  out = tmp_path / "out"
  s = extract.run(extract.ExtractConfig(output=str(out), images=str(sample_copy), **COMMON),
                  log=lambda m: None)
  assert s.failed == 1 and (out / "failures.json").is_file()
  assert [pathlib.Path(p).name for p, _ in store.read_failures(out)] == ["broken.jpg"]


def test_output_inside_images_is_refused(sample_copy):
  out = sample_copy / "index"
  with pytest.raises(extract.ExtractError, match=r"^--output .* is inside --images .*"
                     r"write it outside the folder$"):
    extract.run(extract.ExtractConfig(output=str(out), images=str(sample_copy), **COMMON),
                log=lambda m: None)
  assert not out.exists()
  with pytest.raises(extract.ExtractError, match="inside --images"):  # the folder itself
    extract.run(extract.ExtractConfig(output=str(sample_copy), images=str(sample_copy),
                                      **COMMON), log=lambda m: None)


@pytest.mark.parametrize("files", [(), ("LICENSE",), ("a.txt", "b.heic")])
def test_empty_folder_says_so_in_a_short_line(tmp_path, files):
  root = tmp_path / "empty"
  root.mkdir()
  for f in files:
    (root / f).write_text("x")
  with pytest.raises(extract.ExtractError) as e:
    extract.run(extract.ExtractConfig(output=str(tmp_path / "out"), images=str(root),
                                      **COMMON), log=lambda m: None)
  msg = str(e.value)
  assert msg.startswith(f"no images found under {root} (") and "\n" not in msg
  assert len(msg) < 150 + len(str(root)) and ".jpg" in msg and ".png" in msg
  want = {(): "no files", ("LICENSE",): "only 1 documentation file",
          ("a.txt", "b.heic"): "skipped 2 files"}[files]
  assert want in msg
