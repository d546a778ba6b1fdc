"""Input pipeline: colour modes, EXIF orientation, labels, order, padding, failures."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from cbir_jax import input_pipeline as ip


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
  licences = (samples.sample_images_dir() / "LICENSES.md").read_text()
  total = 0
  for f in files:
    assert f.name in licences
    total += f.stat().st_size
    img, _ = ip.decode_image(f.read_bytes(), 16)
    assert img.shape == (16, 16, 3)
  assert total < 3_000_000


def test_importing_the_package_does_not_import_tensorflow():
  import subprocess
  import sys
  code = ("import sys, cbir_jax; cbir_jax.load_descriptors; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
