"""Input pipeline: colour modes, EXIF orientation, draft decoding, listing, order, padding,
failures, threads, and no TensorFlow anywhere on the way."""
import collections
import io
import os
import pathlib
import struct
import sys
import tempfile
import threading
import zlib

import numpy as np
import pytest
from PIL import Image, features

from cbir_jax import decode_workers
from cbir_jax import input_pipeline as ip

import tf_free
from fs_helpers import rmtree_deep  # noqa: E402


def _png(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


@pytest.mark.parametrize("mode,make,expected", [
    ("L", lambda: Image.new("L", (8, 6), 77), (77, 77, 77)),
    ("P", lambda: _palette((10, 200, 30)), (10, 200, 30)),
    ("RGBA", lambda: Image.new("RGBA", (8, 6), (40, 90, 250, 128)), (40, 90, 250)),
    ("LA", lambda: Image.new("LA", (8, 6), (120, 50)), (120, 120, 120)),
    # Closed form for pure inks: cyan -> (0, 255, 255), magenta+yellow -> red, K -> black.
    ("CMYK-cyan", lambda: Image.new("CMYK", (8, 6), (255, 0, 0, 0)), (0, 255, 255)),
    ("CMYK-red", lambda: Image.new("CMYK", (8, 6), (0, 255, 255, 0)), (255, 0, 0)),
    ("CMYK-black", lambda: Image.new("CMYK", (8, 6), (0, 0, 0, 255)), (0, 0, 0)),
    # 16-bit: 65535 -> 255, 32768 -> round(32768 / 65535 * 255) = 128, 1000 -> 4.
    ("I;16-max", lambda: _i16(65535), (255, 255, 255)),
    ("I;16-mid", lambda: _i16(32768), (128, 128, 128)),
    ("I;16-low", lambda: _i16(1000), (4, 4, 4)),
])
def test_modes_become_rgb(mode, make, expected):
  img = make()
  fmt = "TIFF" if img.mode == "CMYK" else "PNG"
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  out, (w, h) = ip.decode_image(buf.getvalue(), (6, 8))
  assert out.dtype == np.uint8 and out.shape == (6, 8, 3)
  assert (w, h) == (8, 6)
  np.testing.assert_array_equal(out, np.broadcast_to(np.array(expected, np.uint8), out.shape))


def _palette(rgb):
  img = Image.new("P", (8, 6), 3)
  pal = [0] * 768
  pal[9:12] = rgb
  img.putpalette(pal)
  return img


def _i16(value):
  a = np.full((6, 8), value, np.uint16)
  img = Image.fromarray(a)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  back = Image.open(io.BytesIO(buf.getvalue()))
  assert back.mode.startswith("I"), back.mode  # really a 16-bit PNG
  return back


def test_exif_orientation_applied():
  # 40x20, left half red, right half blue; orientation 6 = display rotated 90 deg clockwise,
  # so the displayed image is 20x40 with red on top.
  a = np.zeros((20, 40, 3), np.uint8)
  a[:, :20] = (255, 0, 0)
  a[:, 20:] = (0, 0, 255)
  exif = Image.Exif()
  exif[0x0112] = 6
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
  out, (w, h) = ip.decode_image(buf.getvalue(), (40, 20))
  assert (w, h) == (20, 40)
  top, bottom = out[:16].reshape(-1, 3).mean(0), out[24:].reshape(-1, 3).mean(0)
  assert top[0] > 200 and top[2] < 50, top
  assert bottom[2] > 200 and bottom[0] < 50, bottom


def test_bad_bytes_are_value_errors_with_reasons():
  with pytest.raises(ValueError, match="empty"):
    ip.decode_image(b"", 8)
  with pytest.raises(ValueError, match="identify"):
    ip.decode_image(b"hello, not an image", 8)
  good = _png(Image.new("RGB", (64, 64), (1, 2, 3)))
  with pytest.raises(ValueError):
    ip.decode_image(good[: len(good) // 2], 8)


def _tree(root):
  files = ["b/2.png", "b/1.png", "a/x.jpg", "a/sub/deep.png", "top.png", "a/notes.txt"]
  for f in files:
    p = root / f
    p.parent.mkdir(parents=True, exist_ok=True)
    if f.endswith(".txt"):
      p.write_text("not listed")
    else:
      Image.new("RGB", (10, 7), (len(f) * 9 % 255, 5, 5)).save(p)
  return root


def test_folder_records_sorted_with_subfolder_labels(tmp_path):
  root = _tree(tmp_path)
  recs = ip.folder_records(root)
  keys = [os.path.relpath(r.key, root) for r in recs]
  assert keys == sorted(["b/2.png", "b/1.png", "a/x.jpg", "a/sub/deep.png", "top.png"])
  by_key = {os.path.relpath(r.key, root): (r.label, r.label_name) for r in recs}
  assert by_key["a/x.jpg"] == (0, "a") and by_key["a/sub/deep.png"] == (0, "a")
  assert by_key["b/1.png"] == (1, "b") and by_key["top.png"] == (-1, "")
  with pytest.raises(FileNotFoundError):
    ip.folder_records(tmp_path / "missing")


def test_batches_pad_the_last_batch_and_report_failures(tmp_path):
  paths = []
  for i in range(5):
    p = tmp_path / f"{i}.png"
    Image.new("RGB", (12, 9), (i * 40, 0, 0)).save(p)
    paths.append(str(p))
  (tmp_path / "2.png").write_bytes(b"broken")
  batches = list(ip.image_batches(paths, image_size=8, batch_size=2, num_threads=2))
  assert len(batches) == 3
  for b in batches:  # one shape for every step: no recompiles downstream
    assert b.images.shape == (2, 8, 8, 3)
  last = batches[-1]
  np.testing.assert_array_equal(last.valid, [True, False])
  np.testing.assert_array_equal(last.index, [4, -1])
  assert not last.ok[1] and not last.images[1].any()
  index = np.concatenate([b.index for b in batches])
  ok = np.concatenate([b.ok for b in batches])
  np.testing.assert_array_equal(index[:5], np.arange(5))
  np.testing.assert_array_equal(ok[:5], [True, True, False, True, True])
  assert batches[1].error[0] and batches[1].error[1] == ""
  # Pixel values survive the parallel path: red channel is i * 40.
  reds = np.concatenate([b.images[:, 0, 0, 0] for b in batches])[:5]
  np.testing.assert_array_equal(reds[[0, 1, 3, 4]], [0, 40, 120, 160])
  widths = np.concatenate([b.width for b in batches])[:5]
  np.testing.assert_array_equal(widths, [12, 12, 0, 12, 12])


def test_positions_batches_padding_rows_are_not_read(tmp_path):
  p = tmp_path / "a.png"
  Image.new("RGB", (5, 5), (9, 9, 9)).save(p)
  reads = []

  def read(k):
    reads.append(k)
    return p.read_bytes()

  out = list(ip.positions_batches([str(p)], np.array([0, -1, -1, 0]), image_size=4,
                                  batch_size=2, read=read, num_threads=1))
  np.testing.assert_array_equal(np.concatenate([b.valid for b in out]), [1, 0, 0, 1])
  assert len(reads) == 2
  assert not any(out[0].error) and not any(out[1].error)


def test_load_images(tmp_path):
  p = tmp_path / "a.png"
  Image.new("RGB", (20, 10), (200, 100, 50)).save(p)
  imgs, errors = ip.load_images([str(p), str(tmp_path / "missing.png")], 6)
  assert imgs.shape == (2, 6, 6, 3) and errors[0] == "" and "cannot read" in errors[1]
  np.testing.assert_array_equal(imgs[0, 3, 3], [200, 100, 50])


def test_sample_images_ship_with_licences():
  from cbir_jax import samples
  files = samples.sample_images()
  assert len(files) >= 8
  licences = (samples.SAMPLE_IMAGES_DIR / "LICENSES.md").read_text()
  total = 0
  for f in files:
    assert f.name in licences
    total += f.stat().st_size
    img, _ = ip.decode_image(f.read_bytes(), 16)
    assert img.shape == (16, 16, 3)
  assert total < 3_000_000


def _jpeg(a: np.ndarray, quality: int = 90, **kw) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="JPEG", quality=quality, **kw)
  return buf.getvalue()


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
  """A smooth colour field with mild noise: photo-like, so JPEG keeps it well."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([xx * 255 / w, yy * 255 / h, 128 + 100 * np.sin(xx / 37 + yy / 53)], -1)
  return np.clip(base + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)


def _full_decode(data: bytes, size: tuple[int, int]) -> np.ndarray:
  """The reference: plain Pillow at full resolution, then the bilinear resize (h, w)."""
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(size[::-1],
                                                                       Image.BILINEAR))


def test_pillow_draft_picks_the_smallest_scale_at_least_the_request():
  """What `draft=True` relies on: Pillow's DCT scale is the largest of 1, 2, 4, 8 that
  keeps both sides >= the request (checked against a literal loop)."""
  for (w, h), req in (((4032, 3024), (224, 224)), ((1000, 700), (224, 224)),
                      ((500, 375), (224, 224)), ((900, 460), (224, 224)),
                      ((640, 480), (300, 100))):
    img = Image.open(io.BytesIO(_jpeg(np.zeros((h, w, 3), np.uint8))))
    img.draft("RGB", req)
    scale = max(s for s in (1, 2, 4, 8) if -(-w // s) >= req[0] and -(-h // s) >= req[1])
    assert img.size == (-(-w // scale), -(-h // scale)), ((w, h), req, img.size)


def test_draft_equals_full_decode_near_the_target_size():
  size = (224, 224)
  for shape in ((300, 400), (224, 224), (447, 600)):  # no side >= 2x the target: scale 1
    data = _jpeg(_photo(*shape))
    full, fsize = ip.decode_image(data, size, draft=False)
    draft, dsize = ip.decode_image(data, size, draft=True)
    np.testing.assert_array_equal(draft, full)
    np.testing.assert_array_equal(full, _full_decode(data, size))
    assert fsize == dsize == shape[::-1]


@pytest.mark.parametrize("shape,size", [((3024, 4032), (224, 224)), ((1200, 1600), (224, 224)),
                                        ((1500, 900), (160, 96))])
def test_draft_is_close_to_full_decode_on_large_photos(shape, size):
  """DCT-scaled decoding then the same resize: mean abs difference < 3 levels (of 255), 99% of
  values within 16. (A decode just above the output size, the last case, differs most; on
  the 50 phone-size photos of the benchmark the mean is 0.5, at most 1.2.)"""
  data = _jpeg(_photo(*shape))
  draft, (w, h) = ip.decode_image(data, size)  # draft is the default
  assert (w, h) == shape[::-1]  # the original size, not the reduced one decoded
  full = _full_decode(data, size)
  diff = np.abs(draft.astype(int) - full.astype(int))
  assert diff.mean() < 3 and np.percentile(diff, 99) <= 16, (diff.mean(), diff.max())
  np.testing.assert_array_equal(ip.decode_image(data, size, draft=False)[0], full)


def test_draft_on_an_exif_rotated_photo_asks_for_the_stored_orientation():
  """Orientation 6 swaps the sides: a 160x96 output of a 900x1500 stored photo needs a
  >= 96x160 decode of the stored image, not >= 160x96 (that would undershoot one side)."""
  a = _photo(900, 1500)
  exif = Image.Exif()
  exif[0x0112] = 6
  data = _jpeg(a, exif=exif.tobytes())
  out, (w, h) = ip.decode_image(data, (160, 96))
  assert (w, h) == (900, 1500)
  ref = np.asarray(Image.fromarray(np.rot90(a, -1).copy()).resize((96, 160), Image.BILINEAR))
  assert np.abs(out.astype(int) - ref.astype(int)).mean() < 3


def test_grey_images_resize_then_replicate_exactly():
  a = _photo(90, 70)[..., 0]
  buf = io.BytesIO()
  Image.fromarray(a, "L").save(buf, "PNG")
  out, _ = ip.decode_image(buf.getvalue(), (31, 17))
  ref = np.asarray(Image.fromarray(a, "L").convert("RGB").resize((17, 31), Image.BILINEAR))
  np.testing.assert_array_equal(out, ref)


def test_a_96_megapixel_camera_jpeg_decodes_with_defaults():
  a = np.full((8000, 12000, 3), 90, np.uint8)
  a[:4000, :6000] = (200, 40, 40)  # top-left quadrant red: survives any scale
  data = _jpeg(a, quality=30)
  img, (w, h) = ip.decode_image(data, 64)
  assert (w, h) == (12000, 8000)
  assert img[8, 8, 0] > 180 and img[8, 8, 1] < 70 and abs(int(img[56, 56, 0]) - 90) < 8
  with pytest.raises(ValueError, match="limit of 50000000 pixels"):
    ip.decode_image(data, 64, max_pixels=50_000_000)  # the limit is a parameter


def test_bomb_header_refused_by_default():
  """A PNG whose header claims 100000x100000 pixels (10 Gpx), with a few bytes of data."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
  png = (b"\x89PNG\r\n\x1a\n"
         + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
         + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
  with pytest.raises(ValueError, match=r"bomb refused \(limit 268435456 pixels\)"):
    ip.decode_image(png, 32)


@pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning")
def test_image_extensions_are_what_pillow_reads_here(tmp_path):
  exts = ip.IMAGE_EXTENSIONS
  assert {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".tif", ".tiff",
          ".bmp"} <= exts
  assert (".avif" in exts) == bool(features.check("avif"))
  assert not {".txt", ".pdf", ".heic", ".h5", ".mpg", ""} & exts
  # Every extension Pillow can also write here round-trips: listed, then decoded.
  ext_fmt = Image.registered_extensions()
  written = []
  for ext in sorted(exts):
    fmt = ext_fmt[ext]
    if fmt not in Image.SAVE or fmt in ("PDF",):
      continue
    p = tmp_path / f"x{ext}"
    try:
      Image.new("RGB", (16, 16), (30, 160, 90)).save(p, format=fmt)
    except (OSError, ValueError, KeyError):  # a writer that needs another mode or size
      continue
    written.append(p)
  assert len(written) >= 20
  listed = {r.key for r in ip.folder_records(tmp_path)}
  assert listed == {str(p) for p in written}
  imgs, errors = ip.load_images([str(p) for p in written], 8)
  assert errors == [""] * len(written), [(p.name, e) for p, e in zip(written, errors) if e]


def test_list_folder_counts_what_it_skips(tmp_path):
  for f in ("a/1.png", "a/2.JFIF", "b/3.jpe", "notes.txt", "a/more.TXT", "b/raw.heic",
            "README", "a/.hidden"):
    p = tmp_path / f
    p.parent.mkdir(parents=True, exist_ok=True)
    if f.lower().endswith((".png", ".jfif", ".jpe")):
      Image.new("RGB", (5, 5)).save(p, format="PNG" if f.endswith(".png") else "JPEG")
    else:
      p.write_text("x")
  listing = ip.list_folder(tmp_path)
  assert [os.path.relpath(r.key, tmp_path) for r in listing.records] == [
      "a/1.png", "a/2.JFIF", "b/3.jpe"]
  # README is the collection's documentation: listed apart, not a skipped file.
  assert listing.skipped == collections.Counter({".txt": 2, ".heic": 1, "": 1})
  assert listing.documents == [str(tmp_path / "README")]
  assert ip.folder_records(tmp_path) == listing.records
  assert ip.format_skipped(listing.skipped) == (
      "skipped 4 files: .txt 2, (no extension) 1, .heic 1")
  assert ip.format_skipped(collections.Counter({".txt": 2, ".heic": 1})) == (
      "skipped 3 files: .txt 2, .heic 1")
  assert ip.format_skipped(collections.Counter()) == ""


def test_batch_padding_is_marked_by_valid_alone():
  b = ip.Batch.padding(3, (4, 5))
  assert b.images.shape == (3, 4, 5, 3) and not b.images.any()
  assert not b.valid.any() and not b.ok.any() and (b.index == -1).all()
  assert b.error == ["", "", ""] and b.key is None and b.label is None
  k = ip.Batch.padding(2, 4, keyed=True)
  assert k.key == ["", ""] and (k.label == -1).all()


def _mixed_folder(root: pathlib.Path, n: int) -> list[str]:
  paths = []
  for i in range(n):
    p = root / f"{i:03d}.{'jpg' if i % 3 else 'png'}"
    a = _photo(40 + 7 * (i % 5), 60 + 11 * (i % 4), seed=i)
    Image.fromarray(a).save(p)
    paths.append(str(p))
  (root / "005.png").write_bytes(b"broken")  # failures keep their place too
  return paths


def test_threads_change_no_row(tmp_path):
  paths = _mixed_folder(tmp_path, 37)
  positions = np.r_[np.arange(20), [-1, -1, -1], np.arange(20, 37), [-1]]
  runs = {}
  for threads in (1, 2, 5):
    with ip.positions_batches(paths, positions, image_size=24, batch_size=8,
                              num_threads=threads, prefetch=1) as s:
      runs[threads] = list(s)
  ref = runs[1]
  want = np.r_[positions, np.full(-len(positions) % 8, -1)]  # the last batch padded
  np.testing.assert_array_equal(np.concatenate([b.index for b in ref]), want)
  np.testing.assert_array_equal(np.concatenate([b.valid for b in ref]), want >= 0)
  for threads in (2, 5):
    assert len(runs[threads]) == len(ref)
    for a, b in zip(ref, runs[threads]):
      for f in ("images", "index", "width", "height", "ok", "valid"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
      assert a.error == b.error
  # Each row is its file decoded alone (a literal loop over the same function).
  rows = [(b.images[j], b.error[j]) for b in ref for j in np.flatnonzero(b.valid)]
  for p, (img, err) in zip(paths, rows):
    try:
      want, want_err = ip.decode_image(ip.read_file(p), 24), ""
    except ValueError as e:
      want, want_err = None, str(e)
    assert err == want_err
    if want is not None:
      np.testing.assert_array_equal(img, want[0])


def test_default_threads_are_this_process_cores(tmp_path):
  paths = _mixed_folder(tmp_path, 3)
  with ip.image_batches(paths, image_size=8, batch_size=2) as s:
    assert s.num_threads == len(os.sched_getaffinity(0))
    assert sum(int(b.valid.sum()) for b in s) == 3


def _decode_threads() -> set[threading.Thread]:
  return {t for t in threading.enumerate() if t.name.startswith("cbir-decode")}


def test_stopping_early_leaves_no_thread(tmp_path):
  paths = _mixed_folder(tmp_path, 40)
  reads = []

  def read(k):
    reads.append(k)
    return ip.read_file(k)

  others = _decode_threads()  # streams other tests left to the garbage collector
  with ip.image_batches(paths, image_size=16, batch_size=4, num_threads=3, read=read,
                        prefetch=2) as s:
    first = next(s)
    assert first.valid.all() and _decode_threads() - others
  assert not _decode_threads() - others  # closed: in-flight decodes done, the rest cancelled
  assert len(reads) <= 4 * 4  # bounded read-ahead: the batch returned + prefetch + one
  with pytest.raises(StopIteration):
    next(s)
  # An exception in the consumer closes it too; so does running to the end.
  with pytest.raises(RuntimeError):
    with ip.image_batches(paths, image_size=16, batch_size=4, num_threads=2) as s:
      next(s)
      raise RuntimeError("job interrupted")
  assert not _decode_threads() - others
  s = ip.image_batches(paths[:5], image_size=16, batch_size=4, num_threads=2)
  assert sum(int(b.valid.sum()) for b in s) == 5
  assert not _decode_threads() - others


def test_launchers_never_import_tensorflow(tmp_path):
  """extract, search and evaluate, run as the user runs them, with TensorFlow installed:
  it is never imported. And a folder extraction runs where TensorFlow cannot be imported."""
  root = tmp_path / "imgs"
  for i in range(6):
    p = root / ("cats", "dogs")[i % 2] / f"{i}.jpg"
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_photo(40, 50, seed=i)).save(p)
  out = tmp_path / "out"
  query = str(root / "cats" / "0.jpg")
  runs = [("launch/extract.py", [f"--images={root}", f"--output={out}", "--model=vgg_tiny",
                                 "--weights=random", "--image_size=32", "--progress=none"]),
          ("launch/search.py", [f"--index={out}", f"--query={query}", "--k=2"]),
          ("launch/evaluate.py", [f"--index={out}", "--num_queries=4", "--k=2"])]
  for script, args in runs:
    r = tf_free.run_python(f"""
        import runpy, sys
        import cbir_jax
        sys.argv = [{script!r}] + {args!r}
        try:
          runpy.run_path({script!r}, run_name="__main__")
        except SystemExit as e:
          assert not e.code, e.code
        assert "tensorflow" not in sys.modules, "tensorflow imported"
        print("NO_TENSORFLOW")
    """, block_tensorflow=False)
    assert r.returncode == 0 and "NO_TENSORFLOW" in r.stdout, (script, r.stderr[-3000:])
  r = tf_free.run_python(f"""
      from cbir_jax import extract, store
      extract.run(extract.ExtractConfig(images={str(root)!r}, output={str(tmp_path / 'o2')!r},
                                        model="vgg_tiny", weights="random", image_size=32,
                                        progress="none", kinds=("mac",)))
      print("ROWS", len(store.load_descriptors({str(tmp_path / 'o2')!r}, "mac")[0]))
  """, block_tensorflow=True)
  assert r.returncode == 0 and "ROWS 6" in r.stdout, r.stderr[-3000:]


# --- worker processes ----------------------------------------------------------------------
# Each stream with processes starts fresh interpreters (~0.5 s each, in parallel), so the
# tests below share one folder and compare several settings per stream.


@pytest.fixture(scope="module")
def hard_folder(tmp_path_factory, shared_data) -> list[str]:
  """Real photos (imagenet-sample), the robustness suite's hostile files and a broken one."""
  import robustness.robust_images as ri

  photos = sorted((shared_data / "imagenet-sample" / "images").glob("*.JPEG"))[:24]
  assert len(photos) == 24
  root = tmp_path_factory.mktemp("hard")
  for c in ri.image_cases():
    c.make(root / c.filename)
  (root / "zz_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  return [str(p) for p in photos] + [r.key for r in ip.folder_records(root)]


def _rows(batches) -> list[tuple]:
  return [(int(b.index[j]), bool(b.valid[j]), bool(b.ok[j]), int(b.width[j]),
           int(b.height[j]), b.error[j], b.images[j]) for b in batches for j in range(len(b.index))]


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning",
                            "ignore::PIL.Image.DecompressionBombWarning")
def test_processes_and_threads_give_identical_batches(hard_folder):
  keys = hard_folder
  n = len(keys)
  positions = np.r_[np.arange(10), [-1, -1], np.arange(10, n), [-1]]
  size, batch = 20, 7
  runs = {}
  for workers, threads in ((0, 1), (0, 3), (1, 2), (2, 1), (3, 2)):
    with ip.positions_batches(keys, positions, image_size=size, batch_size=batch,
                              num_workers=workers, num_threads=threads) as s:
      assert (s.num_workers, s.num_threads) == (workers, threads)
      runs[workers, threads] = list(s)
  # The reference: each file decoded alone, by a literal loop.
  want = []
  for p in np.r_[positions, np.full(-len(positions) % batch, -1)]:
    if p < 0:
      want.append((-1, False, False, 0, 0, "", np.zeros((size, size, 3), np.uint8)))
      continue
    try:
      img, (w, h) = ip.decode_image(ip.read_file(keys[p]), size)
      want.append((int(p), True, True, w, h, "", img))
    except (OSError, ValueError) as e:
      reason = str(e) if isinstance(e, ValueError) else f"cannot read file: {e}"
      want.append((int(p), True, False, 0, 0, reason, np.zeros((size, size, 3), np.uint8)))
  assert sum(not w[2] for w in want if w[1]) >= 10  # hostile files that fail are in there
  for setting, batches in runs.items():
    assert all(b.images.shape == (batch, size, size, 3) for b in batches), setting
    got = _rows(batches)
    assert len(got) == len(want), setting
    for g, w in zip(got, want):
      assert g[:6] == w[:6], (setting, g[:6], w[:6])
      np.testing.assert_array_equal(g[6], w[6], err_msg=str((setting, g[0])))


def _workers_alive(pids) -> list[int]:
  import multiprocessing
  multiprocessing.active_children()  # reaps the finished ones
  alive = []
  for pid in pids:
    try:
      os.kill(pid, 0)
      alive.append(pid)
    except ProcessLookupError:
      pass
  return alive


def _worker_pids(stream) -> list[int]:
  """The pids of a stream's decode worker processes."""
  return [p.pid for p in stream._engine._workers._procs]


def _segments_left() -> list[str]:
  """Decode worker memory this process still maps (memfds named cbir-decode, one each)."""
  with open("/proc/self/maps") as f:
    return [line.split()[0] for line in f if "memfd:cbir-decode" in line]


def test_workers_import_no_jax_and_run_elsewhere(hard_folder):
  import jax

  import worker_probe

  assert jax.devices()  # JAX has started in this process, threads and all
  data = [(pathlib.Path(k).read_bytes(), -1) for k in hard_folder[:6]]
  rows = [ip.Row(i, d) for i, d in enumerate(data)]
  with ip.BatchStream(rows, read=worker_probe.ModulesAfter(worker_probe.carried), image_size=8,
                      batch_size=3, num_workers=2, num_threads=1, keyed=True) as s:
    labels = np.concatenate([b.label for b in s])
  pids, masks = labels // 16, labels % 16
  assert len(set(pids.tolist())) == 2 and os.getpid() not in pids  # two other processes
  assert not any(masks), [worker_probe.imported_heavy(m) for m in masks]


def test_stopping_early_or_failing_leaves_no_worker(hard_folder, tmp_path):
  import worker_probe

  photos = hard_folder[:24]
  marks = tmp_path / "marks"
  marks.mkdir()
  s = ip.image_batches(photos, image_size=16, batch_size=4, num_workers=2, num_threads=1,
                       read=worker_probe.Marking(str(marks)), prefetch=2)
  with s:
    pids = _worker_pids(s)
    first = next(s)
    assert first.valid.all() and len(_workers_alive(pids)) == 2
    assert len(_segments_left()) == 2
  assert not _workers_alive(pids)  # closed: processes ended, shared memory gone
  assert not _segments_left()
  # Bounded read-ahead: the batch returned and at most three more (prefetch 2 + 1).
  assert 4 <= len(list(marks.iterdir())) <= 4 * 4
  with pytest.raises(StopIteration):
    next(s)
  # An exception in the consumer closes the stream.
  with pytest.raises(KeyError):
    with ip.image_batches(photos, image_size=16, batch_size=4, num_workers=2) as s:
      pids = _worker_pids(s)
      next(s)
      raise KeyError("job interrupted")
  assert not _workers_alive(pids)
  # A stream left to the garbage collector ends its workers too.
  s = ip.image_batches(photos, image_size=16, batch_size=4, num_workers=1)
  pids = _worker_pids(s)
  next(s)
  assert len(_segments_left()) == 1
  del s
  import gc
  gc.collect()
  assert not _workers_alive(pids) and not _segments_left()


def test_a_failing_or_killed_worker_raises_and_leaves_none(hard_folder, tmp_path):
  import signal

  import worker_probe

  boom = tmp_path / "boom.jpg"
  boom.write_bytes(pathlib.Path(hard_folder[0]).read_bytes())
  keys = hard_folder[:12] + [str(boom)] + hard_folder[12:20]
  s = ip.image_batches(keys, image_size=16, batch_size=4, num_workers=2, num_threads=2,
                       read=worker_probe.failing)
  pids = _worker_pids(s)
  with pytest.raises(RuntimeError, match=r"(?s)decode worker \d .*failed.*reader bug on .*boom"):
    for _ in s:
      pass
  assert not _workers_alive(pids)
  with pytest.raises(StopIteration):
    next(s)
  # A worker killed from outside (the OOM killer): the next batch raises, the rest end.
  s = ip.image_batches(hard_folder * 4, image_size=16, batch_size=4, num_workers=2)
  pids = _worker_pids(s)
  next(s)
  os.kill(pids[1], signal.SIGKILL)
  with pytest.raises(decode_workers.WorkerError,
                     match=r"^decode worker 1 \(pid \d+\) is gone, killed by SIGKILL: out of mem"
                     ) as e:
    for _ in s:
      pass
  assert "\n" not in str(e.value) and "rerun" in str(e.value)
  assert not _workers_alive(pids)


def test_decode_parallelism_rule():
  # Threads alone up to 4 cores; above, ceil(cores / 4) processes sharing the cores.
  for cores, want in ((1, (0, 1)), (2, (0, 2)), (4, (0, 4)), (5, (2, 3)), (8, (2, 4)),
                      (16, (4, 4)), (18, (5, 4)), (64, (16, 4))):
    assert ip.decode_parallelism(cores=cores) == want, cores
  assert ip.decode_parallelism(0, cores=16) == (0, 16)
  assert ip.decode_parallelism(3, cores=16) == (3, 6)
  assert ip.decode_parallelism(3, 2, cores=16) == (3, 2)  # threads per process
  # num_threads alone is the decodes at once, split by the same rule.
  assert ip.decode_parallelism(None, 2, cores=16) == (0, 2)
  assert ip.decode_parallelism(None, 16, cores=2) == (4, 4)
  with pytest.raises(ValueError):
    ip.decode_parallelism(-1, cores=4)


def test_processes_give_way_to_threads_where_they_cannot_run(tmp_path, monkeypatch, caplog):
  paths = _mixed_folder(tmp_path, 5)
  monkeypatch.setattr(ip, "default_threads", lambda: 16)  # a host where the rule picks 4 x 4
  closure = lambda k: ip.read_file(k)  # noqa: E731  (does not pickle)
  with ip.image_batches(paths, image_size=8, batch_size=2, read=closure) as s:
    assert (s.num_workers, s.num_threads) == (0, 16)
    assert sum(int(b.valid.sum()) for b in s) == 5
  with pytest.raises(TypeError, match="cannot be sent to decode worker processes"):
    ip.image_batches(paths, image_size=8, batch_size=2, read=closure, num_workers=1)
  monkeypatch.setattr(ip.decode_workers, "shm_room", lambda: 1 << 20)  # a 1 MB /dev/shm
  with caplog.at_level("WARNING"):
    s = ip.image_batches(paths, image_size=224, batch_size=8, num_workers=2, num_threads=1)
  assert (s.num_workers, s.num_threads) == (0, 2)  # as many decodes at once, as threads
  assert "decode processes need" in caplog.text and "--shm-size" in caplog.text
  s.close()


def test_a_script_without_a_main_guard_is_told_what_to_do(tmp_path, hard_folder):
  """Spawned workers re-run the main script; without the guard each would start the job
  again, so Python stops them, and the job says why."""
  import subprocess
  import textwrap

  script = tmp_path / "unguarded.py"
  script.write_text(textwrap.dedent(f"""
      from cbir_jax import input_pipeline as ip
      for b in ip.image_batches({hard_folder[:4]!r}, image_size=8, batch_size=2,
                                num_workers=1):
        pass
      print("DONE")
  """))
  env = dict(os.environ, PYTHONPATH=str(tf_free.REPO), JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                     timeout=300, cwd=str(tmp_path))
  assert r.returncode != 0 and "DONE" not in r.stdout
  assert 'outside `if __name__ == "__main__":`' in r.stderr, r.stderr[-3000:]


# --- listing: links and depth --------------------------------------------------------------


def _png_file(p: pathlib.Path) -> str:
  p.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", (4, 4), (9, 9, 9)).save(p)
  return str(p)


def _walk_reference(root: pathlib.Path) -> list[str]:
  """Images under root by os.walk following links, with a literal loop guard (the spec)."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    rel = pathlib.Path(dirpath).relative_to(root)
    real_chain = {os.path.realpath(root / pathlib.Path(*rel.parts[:i]))
                  for i in range(len(rel.parts) + 1)}
    dirnames[:] = [d for d in dirnames if os.path.realpath(os.path.join(dirpath, d))
                   not in real_chain]
    out += [os.path.join(dirpath, f) for f in filenames
            if os.path.splitext(f)[1].lower() in ip.IMAGE_EXTENSIONS]
  return sorted(out)


def test_a_class_folder_that_is_a_directory_link_is_listed(tmp_path, caplog):
  elsewhere = tmp_path / "elsewhere"
  root = tmp_path / "imgs"
  want = [_png_file(root / "a" / f"{i}.png") for i in range(2)]
  for i in range(3):
    _png_file(elsewhere / "cats" / f"{i}.png")
  _png_file(elsewhere / "cats" / "nested" / "deep.jpg")
  _png_file(elsewhere / "dogs" / "d.png")
  os.symlink(elsewhere / "cats", root / "c_link")  # a class folder kept on another disk
  os.symlink("../../dogs", elsewhere / "cats" / "nested" / "dogs")  # a sibling: followed
  os.symlink("..", elsewhere / "cats" / "nested" / "up")  # back to c_link: a loop
  os.symlink("..", root / "a" / "back")  # back to root: a loop
  with caplog.at_level("WARNING"):
    listing = ip.list_folder(root)
  keys = [r.key for r in listing.records]
  assert keys == _walk_reference(root)
  assert len(keys) == 2 + 3 + 1 + 1
  assert keys[:2] == want and str(root / "c_link" / "nested" / "dogs" / "d.png") in keys
  labels = {r.label_name: r.label for r in listing.records}
  assert labels == {"a": 0, "c_link": 1}
  assert listing.loops == [str(root / "a" / "back"), str(root / "c_link" / "nested" / "up")]
  assert listing.skipped == collections.Counter({ip.LINK_LOOP: 2})
  assert ip.format_skipped(listing.skipped) == "2 directory links not followed (a loop)"
  assert "2 directory links not followed" in caplog.text and "a/back" in caplog.text
  both = collections.Counter({".txt": 2, ip.LINK_LOOP: 3})
  assert ip.format_skipped(both) == (
      "skipped 2 files: .txt 2; 3 directory links not followed (a loop)")


def test_a_tree_without_links_lists_as_os_walk_did(tmp_path):
  """Identity of existing inputs: the same keys, in the same order, as the old walk."""
  root = _tree(tmp_path)
  (root / "a" / "notes.txt").write_text("x")
  old = []
  for dirpath, dirnames, filenames in os.walk(root):
    old += [os.path.join(dirpath, f) for f in filenames
            if os.path.splitext(f)[1].lower() in ip.IMAGE_EXTENSIONS]
  assert [r.key for r in ip.folder_records(root)] == sorted(old)
  assert [r.key for r in ip.folder_records(str(root) + "/")] == sorted(old)


def test_a_tree_1200_folders_deep_lists():
  # Outside pytest's tmp_path: its cleanup (shutil.rmtree) recurses and fails on this tree.
  deep = pathlib.Path(tempfile.mkdtemp(prefix="cbir-deep-"))
  try:
    parts = ["d"] * 1200
    for i in range(1, len(parts) + 1):  # one at a time: os.makedirs recurses too
      os.mkdir(deep.joinpath(*parts[:i]))
    leaf = _png_file(deep.joinpath(*parts, "x.png"))
    top = _png_file(deep / "top.png")
    listing = ip.list_folder(deep)
  finally:
    rmtree_deep(deep)
  assert [r.key for r in listing.records] == [leaf, top]
  assert listing.records[0].label_name == "d" and not listing.skipped

