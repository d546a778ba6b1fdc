"""simplejpeg into canvas slots (turbo_decode, canvas mode of the input stream) against Pillow's
canvas path (`canvas.decode_placed`: Pillow's draft decode): sizes, pixels (exactly equal),
what goes to Pillow and why, failure reasons, buffer reuse and the decoder tally."""
import io
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

from cbir_jax import canvas, gpu_decode, resize, turbo_decode
from cbir_jax import input_pipeline as ip

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "robustness"))
import robust_images as ri  # noqa: E402  # the hostile folder's files

SIZE = 224


def _pillow(data: bytes, size=SIZE, buckets=canvas.BUCKETS):
  """Reference: Pillow's canvas path, pixels as RGB [h, w, 3]."""
  placed, shown = canvas.decode_placed(data, size, buckets=buckets)
  px = placed.pixels
  return (np.repeat(px[..., None], 3, -1) if px.ndim == 2 else px), shown


def _turbo(data: bytes, size=SIZE, largest=max(canvas.BUCKETS)):
  p = turbo_decode.plan(data, (size, size) if isinstance(size, int) else size, largest=largest)
  assert not isinstance(p, str), p
  slot = np.random.default_rng(0).integers(0, 256, canvas.slot_bytes(largest), dtype=np.uint8)
  h, w = turbo_decode.decode_into(p, slot)
  return slot[:h * w * 3].reshape(h, w, 3), p.original


def _jpeg(img: Image.Image, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="JPEG", **kw)
  return buf.getvalue()


def _with_size(data: bytes, width: int, height: int) -> bytes:
  """The JPEG with its SOF0 frame size rewritten: headers of any size for `draft`'s rule."""
  i = data.index(b"\xff\xc0")
  return data[:i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[i + 9:]


def test_draft_scale_is_pillows():
  base = _jpeg(Image.new("RGB", (8, 8)))
  sizes = [1, 2, 7, 223, 224, 447, 448, 449, 500, 895, 896, 1791, 1792, 3024, 4032, 9000]
  for w in sizes:
    for h in sizes:
      for req in [(224, 224), (160, 300), (1, 1), (500, 375)]:
        with Image.open(io.BytesIO(_with_size(base, w, h))) as img:
          assert img.size == (w, h)
          img.draft("RGB", req)
          s = turbo_decode.draft_scale((w, h), req)
          assert img.size == (-(-w // s), -(-h // s)), (w, h, req, s)


def test_every_imagenet_sample_photo_decodes_to_pillows_pixels(shared_data):
  paths = sorted((shared_data / "imagenet-sample" / "images").iterdir())
  assert len(paths) == 1000
  for p in paths:
    data = p.read_bytes()
    got, shown = _turbo(data)
    ref, ref_shown = _pillow(data)
    assert shown == ref_shown and got.shape == ref.shape, p.name
    assert np.array_equal(got, ref), p.name  # same libjpeg-turbo settings: bit-exact


@pytest.fixture(scope="module")
def phone_jpegs(shared_data, tmp_path_factory):
  from benchmarks import photos
  src = tuple(str(p) for p in sorted((shared_data / "imagenet-sample" / "images").iterdir())[:3])
  return photos.make(photos.PhotoSet(src, 3), tmp_path_factory.mktemp("phone"))


def test_phone_size_photos_every_variant(phone_jpegs):
  """4032x3024 at 1/8 (504x378), and the coding variants a camera or an editor writes."""
  img = Image.open(phone_jpegs[0])
  variants = {"camera": pathlib.Path(phone_jpegs[1]).read_bytes(),
              "progressive": _jpeg(img, quality=90, progressive=True),
              "4:4:4": _jpeg(img, quality=90, subsampling=0),
              "4:2:2": _jpeg(img, quality=90, subsampling=1),
              "grey": _jpeg(img.convert("L"), quality=90),
              "rgb-coded (Adobe)": _jpeg(img, quality=90, keep_rgb=True)}
  for name, data in variants.items():
    got, shown = _turbo(data)
    ref, ref_shown = _pillow(data)
    assert got.shape == ref.shape == (378, 504, 3) and shown == ref_shown == (4032, 3024), name
    assert np.array_equal(got, ref), name
  for size in [(300, 160), (700, 700)]:  # other targets: scales 8 and 4 (1008x756)
    got, _ = _turbo(variants["camera"], size)
    assert np.array_equal(got, _pillow(variants["camera"], size)[0])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_turned_as_pillow_turns_it(orientation):
  rng = np.random.default_rng(orientation)
  img = Image.fromarray(rng.integers(0, 256, (600, 900, 3), dtype=np.uint8))
  exif = Image.Exif()
  exif[0x0112] = orientation
  data = _jpeg(img, exif=exif)
  got, shown = _turbo(data)
  ref, ref_shown = _pillow(data)
  assert shown == ref_shown and got.shape == ref.shape and np.array_equal(got, ref)


def test_what_goes_to_pillow_and_why(tmp_path):
  rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8))
  png = io.BytesIO()
  rgb.save(png, format="PNG")
  mpo = io.BytesIO()
  rgb.save(mpo, format="MPO", save_all=True, append_images=[rgb])
  cases = {
      "png": (png.getvalue(), "not a JPEG"),
      "cmyk": (_jpeg(rgb.convert("CMYK")), "CMYK JPEG"),
      "mpo": (mpo.getvalue(), "MPO file"),
      "panorama": (_jpeg(Image.new("RGB", (3000, 100))), "larger than the largest canvas"),
      "bomb": (_with_size(_jpeg(rgb), 20000, 20000), "size over the pixel limit"),
      "huge bomb": (_with_size(_jpeg(rgb), 40000, 40000), "header unreadable"),  # Pillow raises
      "damaged header": (b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 20, "header unreadable"),
  }
  for name, (data, why) in cases.items():
    got = turbo_decode.plan(data, (SIZE, SIZE), largest=1024, max_pixels=2 ** 28)
    assert isinstance(got, str) and got.startswith(why), (name, got)


def _stream(keys, batch_size, **kw):
  return ip.image_batches(keys, image_size=SIZE, batch_size=batch_size, num_workers=0,
                          buckets=canvas.BUCKETS, **kw)


def test_stream_rows_equal_pillows_canvas_path_on_the_hostile_folder(tmp_path):
  """Every hostile file and a few good JPEGs: per row the same reason, size and pixels as
  Pillow's canvas path, decoded by simplejpeg where it can and tallied honestly."""
  folder = tmp_path / "in"
  folder.mkdir()
  cases = ri.image_cases()
  for c in cases:
    c.make(folder / c.filename)
  good = _jpeg(Image.fromarray(ri.rgb_pattern(375, 500)), quality=90)
  (folder / "good.jpg").write_bytes(good)
  (folder / "trailing.jpg").write_bytes(good + b"garbage after the image")
  (folder / "cut.jpg").write_bytes(good[:len(good) // 2])
  keys = sorted(str(p) for p in folder.iterdir())
  with _stream(keys, 8) as s:
    batches = list(s)
  rows = [(b, j) for b in batches for j in np.flatnonzero(b.valid)]
  assert len(rows) == len(keys)
  decoders = {}
  for (b, j), key in zip(rows, keys):
    data = pathlib.Path(key).read_bytes()
    try:
      ref, shown = _pillow(data)
      err = ""
    except ValueError as e:
      ref, shown, err = None, (0, 0), str(e)
    assert b.error[j] == err and (b.width[j], b.height[j]) == shown, key
    decoders[pathlib.Path(key).name] = b.decoders[j]
    if ref is not None:
      h, w = b.sizes[j]
      got = np.asarray(resize.unpack(b.images[j:j + 1], b.sizes[j:j + 1], b.bucket))[0]
      assert (h, w) == ref.shape[:2] and np.array_equal(got[:h, :w], ref), key
    else:
      assert b.sizes[j].tolist() == [0, 0] and not b.ok[j]
  assert decoders["good.jpg"] == decoders["trailing.jpg"] == turbo_decode.SIMPLEJPEG
  assert decoders["cut.jpg"] == gpu_decode.PILLOW  # simplejpeg refuses it; Pillow says why
  routes = {b.routes[j] for b, j in rows}
  assert "simplejpeg refused the data" in routes and "not a JPEG" in routes


def test_recycled_buffers_give_the_same_batches(shared_data):
  keys = [str(p) for p in sorted((shared_data / "imagenet-sample" / "images").iterdir())[:24]]
  with _stream(keys, 4) as s:
    fresh = [(b.images.copy(), b.sizes.copy()) for b in s]
  reused = []
  with _stream(keys, 4, prefetch=0) as s:
    for b in s:
      reused.append(np.asarray(resize.resize_canvases(b.images, b.sizes, (SIZE, SIZE))))
      b.recycle()  # the next batches are decoded into this buffer, without clearing it
      assert b.images is None
  for (imgs, sizes), got in zip(fresh, reused):
    np.testing.assert_array_equal(got, np.asarray(resize.resize_canvases(imgs, sizes,
                                                                         (SIZE, SIZE))))


def test_without_simplejpeg_pillow_decodes_every_row_the_same(shared_data, monkeypatch):
  """A host where simplejpeg is not installed (a GPU host running gpu_check from a checkout):
  the canvas path still works, every row by Pillow with the same pixels, and says why."""
  keys = [str(p) for p in sorted((shared_data / "imagenet-sample" / "images").iterdir())[:6]]
  with _stream(keys, 3) as s:
    fast = [(b.images.copy(), b.sizes.copy(), list(b.decoders)) for b in s]
  monkeypatch.setattr(turbo_decode, "simplejpeg", None)
  assert not turbo_decode.available()
  with _stream(keys, 3) as s:
    slow = [(b.images.copy(), b.sizes.copy(), list(b.decoders), list(b.routes)) for b in s]
  assert {d for _, _, ds in fast for d in ds} == {turbo_decode.SIMPLEJPEG}
  for (imgs, sizes, _), (imgs2, sizes2, decoders, routes) in zip(fast, slow):
    assert decoders == [gpu_decode.PILLOW] * 3 and routes == [turbo_decode.MISSING] * 3
    np.testing.assert_array_equal(sizes, sizes2)
    np.testing.assert_array_equal(resize.resize_canvases(imgs, sizes, (SIZE, SIZE)),
                                  resize.resize_canvases(imgs2, sizes2, (SIZE, SIZE)))
