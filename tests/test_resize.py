"""Device resize: Pillow-BILINEAR weights against a literal loop from Resample.c, pixels against
Pillow itself, closed forms, canvas placement, the input stream's canvas mode and the step."""
import io
import math
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from cbir_jax import backbones, canvas, inference, resize
from cbir_jax import input_pipeline as ip
from cbir_jax import preprocessing as pp

SAMPLES = pathlib.Path(__file__).resolve().parents[1] / "cbir_jax" / "sample_images"
# docs/resize.md: mean absolute difference <= 0.5 grey level, 99.9th percentile <= 2.
MEAN_TOL, P999_TOL = 0.5, 2

_resize = jax.jit(resize.resize_canvases, static_argnums=2)


def pillow_coeffs(in_size: int, out_size: int) -> np.ndarray:
  """Resample.c's precompute_coeffs + normalize_coeffs_8bpc for BILINEAR, literally, in float64:
  the 22-bit fixed-point coefficients as a dense [out, in] matrix."""
  k = np.zeros((out_size, in_size))
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = 1.0 * filterscale
  for xx in range(out_size):
    center = (xx + 0.5) * scale
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), in_size)
    w = [max(0.0, 1.0 - abs((x - center + 0.5) / filterscale)) for x in range(xmin, xmax)]
    ww = sum(w)
    for x, v in zip(range(xmin, xmax), w):
      k[xx, x] = v / ww if ww else 0.0
  return np.floor(0.5 + k * 2 ** 22)


def _canvas(img: np.ndarray, side: int, fill: int | None = 0) -> np.ndarray:
  """A flat canvas slot (canvas.py's layout): the image's rows back to back, then `fill`
  (None: random bytes, as a reused buffer holds)."""
  rng = np.random.default_rng(side)
  c = (rng.integers(0, 256, canvas.slot_bytes(side), dtype=np.uint8) if fill is None
       else np.full(canvas.slot_bytes(side), fill, np.uint8))
  canvas.put(c, img)
  return c


def _device(images: list[np.ndarray], out: tuple[int, int], side: int, fill: int | None = 0
            ) -> np.ndarray:
  canvases = np.stack([_canvas(a, side, fill) for a in images])
  sizes = np.array([a.shape[:2] for a in images], np.int32)
  return np.asarray(_resize(canvases, sizes, out))


def _pillow(a: np.ndarray, out: tuple[int, int]) -> np.ndarray:
  return np.asarray(Image.fromarray(a).resize(out[::-1], Image.BILINEAR))


@pytest.mark.parametrize("n,out", [(333, 224), (500, 224), (80, 224), (224, 224), (7, 1),
                                   (1, 224), (640, 160), (225, 224)])
def test_weights_match_resample_c(n, out):
  got = np.asarray(resize.bilinear_weights(n, out, n + 5)) * 2 ** 22
  ref = pillow_coeffs(n, out)
  assert np.all(got[:, n:] == 0)  # canvas padding gets no weight
  # The float32 division may land one 2^-22 step from float64's: <= 1 unit, at most a few.
  np.testing.assert_array_less(np.abs(got[:, :n] - ref), 1.5)


def test_constant_image_stays_constant_and_padding_is_ignored():
  # Closed form: rows of renormalised weights sum to 1, so a constant stays that constant
  # whatever the scale; canvas content outside the image (fill 255) must not leak in.
  sizes = [(375, 500), (500, 333), (17, 9), (1, 1), (224, 224), (300, 40)]
  images = [np.full((h, w, 3), (13, 128, 250), np.uint8) for h, w in sizes]
  got = _device(images, (224, 224), 512, fill=255)
  assert np.all(got == np.array([13, 128, 250], np.uint8))


def test_identity_size_is_exact_and_zero_size_is_black():
  a = np.random.default_rng(0).integers(0, 256, (224, 160, 3), dtype=np.uint8)
  got = _device([a, np.zeros((0, 0, 3), np.uint8)], (224, 160), 320, fill=99)
  np.testing.assert_array_equal(got[0], a)
  assert not got[1].any()  # size 0 x 0 (padding, failure): black, not NaN garbage


def test_unpack_places_each_image_top_left():
  rng = np.random.default_rng(3)
  images = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(20, 31, 3), (32, 7, 3), (1, 32, 3)]]
  flat = np.stack([_canvas(a, 32, fill=None) for a in images])
  got = np.asarray(resize.unpack(flat, np.array([a.shape[:2] for a in images], np.int32), 32))
  for g, a in zip(got, images):
    np.testing.assert_array_equal(g[:a.shape[0], :a.shape[1]], a)


@pytest.mark.parametrize("out", [(224, 224), (160, 300)])
def test_bytes_outside_the_image_never_reach_the_output(out):
  # A reused buffer holds other images' bytes past each image (no clearing): the result must
  # be bitwise the one from zero-filled slots, for either pass order and for 0 x 0 rows.
  rng = np.random.default_rng(4)
  images = [rng.integers(0, 256, s, dtype=np.uint8)
            for s in [(375, 500, 3), (500, 333, 3), (17, 9, 3), (640, 20, 3), (0, 0, 3)]]
  zeros, garbage = _device(images, out, 640, fill=0), _device(images, out, 640, fill=None)
  np.testing.assert_array_equal(garbage, zeros)
  assert not garbage[-1].any()


@pytest.mark.parametrize("h,w,out", [
    (375, 500, (224, 224)), (500, 333, (224, 224)), (100, 80, (224, 224)), (31, 600, (224, 224)),
    (640, 640, (224, 224)), (600, 200, (224, 224)), (500, 333, (160, 300)), (300, 500, (300, 160)),
    (500, 600, (160, 300))])
def test_random_images_against_pillow(h, w, out):
  a = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
  d = np.abs(_device([a], out, 640)[0].astype(int) - _pillow(a, out))
  # Float32 sums against Pillow's 32-bit integer ones: at most one level, rarely (ties). The
  # other pass order than Pillow's would put ~20% of values one level off.
  assert d.max() <= 1 and (d > 0).mean() < 0.03


def test_photos_against_pillow_within_tolerance():
  """The done-when tolerance on real photos (the samples shipped with the package)."""
  diffs = []
  for p in sorted(SAMPLES.glob("*.jpg"))[:6]:
    with Image.open(p) as img:
      img.draft("RGB", (224, 224))
      a = np.asarray(img.convert("RGB"))
    a = a[:640, :640]  # within the largest bucket
    diffs.append(np.abs(_device([a], (224, 224), 640)[0].astype(int)
                        - _pillow(np.ascontiguousarray(a), (224, 224))).ravel())
  d = np.concatenate(diffs)
  assert d.mean() <= MEAN_TOL and np.percentile(d, 99.9) <= P999_TOL


def test_box_factor_and_bucket_choice():
  assert canvas.box_factor(500, 375, 640) == 1
  assert canvas.box_factor(641, 10, 640) == 2
  assert canvas.box_factor(5000, 4000, 640) == math.ceil(5000 / 640)
  assert canvas.bucket_for(np.array([[300, 200], [0, 0]]), (320, 640)) == 320
  assert canvas.bucket_for(np.array([[321, 200]]), (320, 640)) == 640
  with pytest.raises(ValueError, match="exceeds the largest canvas"):
    canvas.bucket_for(np.array([[700, 10]]), (320, 640))


def _jpeg(w: int, h: int, seed: int = 0) -> bytes:
  a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def test_decode_placed_reduces_oversized_images_by_pillow_reduce():
  buf = io.BytesIO()
  a = np.random.default_rng(1).integers(0, 256, (900, 1300, 3), dtype=np.uint8)
  Image.fromarray(a).save(buf, format="PNG")  # PNG: no draft, so it lands at full size
  placed, (w, h) = canvas.decode_placed(buf.getvalue(), 224, buckets=(320, 640))
  assert (w, h) == (1300, 900) and placed.reduced == 3
  np.testing.assert_array_equal(placed.pixels, np.asarray(Image.fromarray(a).reduce(3)))


def test_decode_placed_keeps_grey_single_channel_and_canvas_replicates_it():
  buf = io.BytesIO()
  Image.new("L", (30, 20), 77).save(buf, format="PNG")
  placed, _ = canvas.decode_placed(buf.getvalue(), 224)
  assert placed.pixels.shape == (20, 30)
  canvases, sizes = canvas.assemble([placed.pixels, None], (32, 64))
  assert canvases.shape == (2, 32 * 32 * 3) and sizes.tolist() == [[20, 30], [0, 0]]
  assert np.all(canvases[0, :20 * 30 * 3] == 77)  # stored contiguously, R = G = B
  unpacked = np.asarray(resize.unpack(canvases, sizes, 32))
  assert np.all(unpacked[0, :20, :30] == 77)


def test_stream_canvas_mode_rows_match_host_mode(tmp_path):
  # Same rows, order, failure reasons and original sizes as the host path; canvases hold
  # the drafted pixels; the batch's bucket is the smallest that fits it.
  files = {"a.jpg": _jpeg(500, 375, 1), "b.jpg": _jpeg(200, 120, 2), "c.jpg": b"not an image",
           "d.jpg": _jpeg(4032, 3024, 3), "e.jpg": _jpeg(100, 300, 4)}
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
  keys = [str(tmp_path / n) for n in sorted(files)]
  host = list(ip.image_batches(keys, image_size=224, batch_size=2, num_workers=0))
  dev = list(ip.image_batches(keys, image_size=224, batch_size=2, num_workers=0,
                              buckets=(320, 640)))
  assert len(host) == len(dev) == 3
  for h, d in zip(host, dev):
    for f in ("index", "width", "height", "ok", "valid"):
      np.testing.assert_array_equal(getattr(h, f), getattr(d, f))
    assert h.error == d.error
    assert d.sizes.shape == (2, 2) and d.images.shape[1:] == (d.bucket * d.bucket * 3,)
  assert [d.bucket for d in dev] == [640, 640, 320]  # 500 wide; 504 (4032 drafted); 300 tall
  assert dev[1].sizes[0].tolist() == [0, 0] and dev[1].error[0] and not dev[1].ok[0]
  assert dev[1].sizes[1].tolist() == [378, 504]  # 4032x3024 at the 1/8 DCT scale
  assert dev[2].sizes.tolist() == [[300, 100], [0, 0]]  # padding row: 0 x 0
  # Device resize of the canvases against the host path's pixels: the done-when tolerance.
  for h, d in zip(host, dev):
    got = np.asarray(_resize(d.images, d.sizes, (224, 224)))
    diff = np.abs(got.astype(int) - h.images)[h.ok]
    assert diff.mean() <= MEAN_TOL and diff.max() <= P999_TOL


def test_canvas_step_equals_step_on_device_resized_images():
  b = backbones.get("vgg_tiny")
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.05).astype(np.float32),
                        b.param_shapes())
  kw = dict(preprocessing=pp.TORCHVISION, kinds=("fc", "conv"))
  imgs = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(50, 40, 3), (64, 64, 3)]]
  canvases = np.stack([_canvas(a, 64, fill=200) for a in imgs])
  sizes = np.array([a.shape[:2] for a in imgs], np.int32)
  got = jax.jit(inference.describe_canvas_fn(b, image_size=32, **kw))(params, canvases, sizes)
  resized = _device(imgs, (32, 32), 64, fill=200)
  ref = jax.jit(inference.describe_fn(b, **kw))(params, resized)
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_resolve_per_platform():
  assert resize.resolve("auto", "cpu") == "host" and resize.resolve("auto", "gpu") == "device"
  assert resize.resolve("device", "cpu") == "device"
  with pytest.raises(ValueError, match="resize must be one of"):
    resize.resolve("gpu", "cpu")


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kw)
  return buf.getvalue()


def test_every_colour_mode_and_exif_rotation_match_the_host_path(tmp_path):
  """The canvas path converts modes and turns EXIF-rotated photos exactly as the host path:
  same rows, sizes and reasons, and device-resized pixels within one level of Pillow's."""
  rng = np.random.default_rng(5)
  rgb = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
  exif = Image.Exif()
  exif[0x0112] = 6  # shown rotated by 90 degrees: 50 wide, 70 high
  i16 = Image.fromarray(rng.integers(0, 65535, (40, 30), dtype=np.uint16))
  files = {
      "grey.jpg": _encoded(rgb.convert("L"), "JPEG"),
      "palette.png": _encoded(rgb.convert("P"), "PNG"),
      "rgba.png": _encoded(rgb.convert("RGBA"), "PNG"),
      "la.png": _encoded(rgb.convert("LA"), "PNG"),
      "cmyk.jpg": _encoded(rgb.convert("CMYK"), "JPEG"),
      "i16.png": _encoded(i16, "PNG"),
      "rotated.jpg": _encoded(rgb, "JPEG", exif=exif),
      "empty.jpg": b"",
      "truncated.jpg": _encoded(rgb, "JPEG")[:300],
  }
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
  keys = [str(tmp_path / n) for n in sorted(files)]
  kw = dict(image_size=24, batch_size=len(keys), num_workers=0)
  (host,) = ip.image_batches(keys, **kw)
  (dev,) = ip.image_batches(keys, buckets=(80,), **kw)
  assert host.error == dev.error and sum(bool(e) for e in dev.error) == 2
  for f in ("width", "height", "ok"):
    np.testing.assert_array_equal(getattr(host, f), getattr(dev, f))
  rot = sorted(files).index("rotated.jpg")
  # Stored 70x50, drafted to 35x25 (1/2 is still >= 24), shown turned: 25 wide, 35 high.
  assert dev.sizes[rot].tolist() == [35, 25] and (dev.width[rot], dev.height[rot]) == (50, 70)
  got = np.asarray(_resize(dev.images, dev.sizes, (24, 24)))
  diff = np.abs(got.astype(int) - host.images)
  assert diff[dev.ok].max() <= 1 and not got[~dev.ok].any()


def test_sizes_are_data_one_compile_per_bucket():
  traces = []

  def fn(canvases, sizes):
    traces.append(canvases.shape)  # runs once per trace, i.e. per compile
    return resize.resize_canvases(canvases, sizes, (16, 16))

  step = jax.jit(fn)
  rng = np.random.default_rng(0)
  for side, sizes in [(32, [[32, 20], [7, 9]]), (32, [[1, 1], [0, 0]]), (64, [[50, 64], [3, 60]]),
                      (32, [[16, 16], [31, 2]])]:
    c = rng.integers(0, 256, (2, side * side * 3), dtype=np.uint8)
    step(c, np.array(sizes, np.int32))
  assert traces == [(2, 32 * 32 * 3), (2, 64 * 64 * 3)]


def test_resize_bench_pixels_and_pass_order_on_a_small_grid():
  from benchmarks import resize_bench

  paths = [str(p) for p in sorted(SAMPLES.glob("*.jpg"))[:4]]
  px = resize_bench.pixels(paths, batch=2)
  assert px["values"] == 4 * 224 * 224 * 3 and sum(px["batches_per_bucket"].values()) == 2
  assert px["mean_abs"] <= MEAN_TOL and px["p99_9"] <= P999_TOL
  order = resize_bench.pass_order(step=230, outs=((224, 224),))
  assert order["shapes"] == 25 and order["rule_agrees"] == 25
