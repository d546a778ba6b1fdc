"""gpu_decode on the real nvImageCodec library with its CPU-only backend (CI has no GPU).

References are Pillow's own decodes: `decode.safe_decode` for rows and reasons, and
`ImageOps.exif_transpose(...).convert("RGB")` for full-resolution pixels. Tolerance: nvImageCodec's
CPU backend is libjpeg-turbo with the same defaults as Pillow's (islow IDCT, fancy upsampling),
so pixels are expected identical; the tests allow 1 grey level (max) and 0.05 (mean) for a
differently built libjpeg-turbo. The GPU engines differ more (their upsampling); gpu_check's
decoder comparison measures that on a GPU host.
"""
import importlib
import io
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageOps

from cbir_jax import decode, gpu_decode, samples
from benchmarks import decoder_compare

SIZE = (96, 128)  # rows (height, width): not square, so a swapped axis shows
MAX_ABS, MAX_MEAN = 1, 0.05


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def _photo(name: str = "chelsea.jpg") -> Image.Image:
  with Image.open(samples.SAMPLE_IMAGES_DIR / name) as img:
    return img.convert("RGB")


def _with_orientation(img: Image.Image, orientation: int) -> bytes:
  exif = Image.Exif()
  exif[0x0112] = orientation
  return _encode(img, quality=90, exif=exif.tobytes())


@pytest.fixture(scope="module")
def nv():
  return gpu_decode.select_decoder("nvimgcodec-cpu").decoder


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
  """(name, item, expected decoder) in one batch: every route and every failure kind."""
  photo, coffee = _photo(), _photo("coffee.jpg")
  baseline = _encode(photo, quality=90)
  corrupt = bytearray(baseline)
  corrupt[len(corrupt) // 3:len(corrupt) // 3 + 400] = bytes(400)  # zeroed entropy data
  sos = baseline.find(b"\xff\xda")
  bad_scan = baseline[:sos + 5] + b"\x09" + baseline[sos + 6:]  # a component id with no frame
  missing = str(tmp_path_factory.mktemp("gpu_decode") / "missing.jpg")
  return [
      ("baseline", baseline, gpu_decode.NVIMGCODEC),
      ("png", _encode(coffee, "PNG"), gpu_decode.PILLOW),
      ("truncated", baseline[:len(baseline) // 2], gpu_decode.PILLOW),  # no end-of-image marker
      ("bad scan", bad_scan, gpu_decode.PILLOW),  # routed to nvImageCodec, which gives no image
      ("no scan", baseline[:sos] + b"\xff\xd9", gpu_decode.PILLOW),  # the same
      ("cmyk", _encode(photo.convert("CMYK"), quality=90), gpu_decode.PILLOW),
      ("rotated", _with_orientation(coffee, 6), gpu_decode.NVIMGCODEC),
      ("progressive", _encode(coffee, quality=85, progressive=True), gpu_decode.PILLOW),
      ("grey", _encode(photo.convert("L"), quality=90), gpu_decode.NVIMGCODEC),
      ("corrupt data", bytes(corrupt), gpu_decode.NVIMGCODEC),  # both decode it, with warnings
      ("corrupt header", baseline[:2] + b"\x00garbage" * 50, gpu_decode.PILLOW),
      ("not an image", b"hello, not an image", gpu_decode.PILLOW),
      ("empty", b"", gpu_decode.PILLOW),
      ("missing", missing, ""),
      ("sample file", str(samples.SAMPLE_IMAGES_DIR / "astronaut.jpg"), gpu_decode.NVIMGCODEC),
  ]


def _fetch(item):
  """What safe_decode takes for the item: reading the path, or returning the bytes."""
  return (lambda: decode.read_file(item)) if isinstance(item, str) else (lambda: item)


def _data(item):
  return open(item, "rb").read() if isinstance(item, str) else item


def test_jpeg_header_agrees_with_pillow():
  photo = _photo()
  for data, sof in [(_encode(photo), 0xC0), (_encode(photo, progressive=True), 0xC2)]:
    h = gpu_decode.jpeg_header(data)
    assert (h.sof, h.precision, h.width, h.height, h.components) == (sof, 8, *photo.size, 3)
  assert gpu_decode.jpeg_header(_encode(photo.convert("CMYK"))).components == 4
  assert gpu_decode.jpeg_header(_encode(photo, "PNG")) is None
  assert gpu_decode.jpeg_header(b"\xff\xd8\xff\xe0\x00") is None  # cut inside a segment


def test_route_sends_only_baseline_jpegs_to_nvimgcodec(batch):
  for name, item, expected in batch:
    if expected == "":  # unreadable: never routed
      continue
    r = gpu_decode.route(_data(item))
    assert r.decoder == (gpu_decode.NVIMGCODEC if expected == gpu_decode.NVIMGCODEC or
                         name in ("bad scan", "no scan") else gpu_decode.PILLOW), name
    assert (r.why == "") == (r.decoder == gpu_decode.NVIMGCODEC), name
  assert gpu_decode.route(_encode(_photo()), max_pixels=1000).decoder == gpu_decode.PILLOW
  assert gpu_decode.route(_with_orientation(_photo(), 8)).orientation == 8
  with_trailer = _encode(_photo()) + b"\x00\n"
  assert gpu_decode.route(with_trailer).decoder == gpu_decode.NVIMGCODEC  # padding is not a cut
  assert gpu_decode.route(with_trailer[:-4]).decoder == gpu_decode.PILLOW


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pillow_exif_transpose(orientation):
  import jax.numpy as jnp
  a = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  img = Image.fromarray(a)
  img.getexif()[0x0112] = orientation
  ref = np.asarray(ImageOps.exif_transpose(img))
  np.testing.assert_array_equal(gpu_decode.orient(a, orientation), ref)
  np.testing.assert_array_equal(np.asarray(gpu_decode.orient(jnp.asarray(a), orientation)), ref)


def test_rows_match_the_pillow_path_in_one_mixed_batch(nv, batch):
  """Same rows (within tolerance), sizes, failure reasons and order as safe_decode per item."""
  got = gpu_decode.decode_rows([item for _, item, _ in batch], SIZE, decoder=nv, draft=False)
  assert got.images.shape == (len(batch), *SIZE, 3)
  for i, (name, item, expected) in enumerate(batch):
    fetch = _fetch(item)
    ref, w, h, err = decode.safe_decode(fetch, SIZE, draft=False)
    assert got.errors[i] == err, name
    assert got.sizes[i] == (w, h), name
    d = np.abs(got.images[i].astype(int) - ref)
    assert d.max() <= MAX_ABS and d.mean() <= MAX_MEAN, (name, d.max(), d.mean())
    if expected is not None:
      assert got.decoders[i] == expected, name
  failed = {n for (n, _, _), e in zip(batch, got.errors) if e}
  assert failed == {"truncated", "bad scan", "no scan", "corrupt header", "not an image", "empty",
                    "missing"}


def test_full_resolution_batch_matches_pillow(nv, batch):
  got = gpu_decode.decode_batch([item for _, item, _ in batch], decoder=nv)
  for i, (name, item, _) in enumerate(batch):
    if name == "missing":
      assert got.images[i] is None and got.errors[i].startswith("cannot read file:")
      assert got.decoders[i] == ""
      continue
    data = _data(item)
    _, _, _, ref_err = decode.safe_decode(lambda d=data: d, 8, draft=False)
    assert got.errors[i] == ref_err, name
    if ref_err:
      assert got.images[i] is None and got.sizes[i] == (0, 0), name
      continue
    ref = decoder_compare.pillow_full(data)
    img = np.asarray(got.images[i])
    assert img.shape == ref.shape and got.sizes[i] == (ref.shape[1], ref.shape[0]), name
    d = np.abs(img.astype(int) - ref)
    assert d.max() <= MAX_ABS and d.mean() <= MAX_MEAN, (name, d.max(), d.mean())
  for name in ("bad scan", "no scan"):
    i = [n for n, _, _ in batch].index(name)
    assert got.decoders[i] == gpu_decode.PILLOW and got.routes[i] == "nvimgcodec gave no image"


def test_every_orientation_through_nvimgcodec_matches_pillow(nv):
  photo = _photo("coffee.jpg")
  datas = [_with_orientation(photo, o) for o in range(1, 9)]
  got = gpu_decode.decode_batch(datas, decoder=nv)
  assert got.decoders == [gpu_decode.NVIMGCODEC] * 8
  for o, data, img in zip(range(1, 9), datas, got.images):
    ref = decoder_compare.pillow_full(data)
    assert img.shape == ref.shape, o
    assert np.abs(img.astype(int) - ref).max() <= MAX_ABS, o


def test_without_a_decoder_rows_are_the_pillow_path_exactly(batch):
  items = [item for _, item, _ in batch]
  got = gpu_decode.decode_rows(items, SIZE, decoder=None, draft=True)
  assert set(got.decoders) <= {gpu_decode.PILLOW, ""}
  for i, (name, item, _) in enumerate(batch):
    fetch = _fetch(item)
    ref, w, h, err = decode.safe_decode(fetch, SIZE, draft=True)
    assert (got.errors[i], got.sizes[i]) == (err, (w, h)), name
    np.testing.assert_array_equal(got.images[i], ref, err_msg=name)


def test_select_decoder_says_which_decoder_runs(monkeypatch):
  assert gpu_decode.select_decoder("pillow").decoder is None
  auto = gpu_decode.select_decoder("auto")  # CI and this machine: no GPU
  assert auto.decoder is None and "no GPU" in auto.description
  cpu = gpu_decode.select_decoder("nvimgcodec-cpu")
  assert cpu.decoder.device is None and "CPU-only" in cpu.description
  with pytest.raises(RuntimeError, match="GPU"):
    gpu_decode.select_decoder("nvimgcodec")
  with pytest.raises(ValueError, match="decoder must be one of"):
    gpu_decode.select_decoder("turbo")
  # A GPU JAX sees but nvImageCodec cannot use (here: no CUDA driver at all): auto says so.
  monkeypatch.setattr(gpu_decode, "_gpu_device", lambda: "cuda:0")
  auto = gpu_decode.select_decoder("auto")
  assert auto.decoder is None and "cannot start on cuda:0" in auto.description
  with pytest.raises(RuntimeError):
    gpu_decode.select_decoder("nvimgcodec")
  monkeypatch.setattr(gpu_decode, "_import_nvimgcodec", lambda: None)
  assert "not installed" in gpu_decode.select_decoder("auto").description
  with pytest.raises(ImportError, match="gpu-decode"):
    gpu_decode.select_decoder("nvimgcodec")


def test_decoder_compare_prints_figures(capsys):
  datas = [_encode(_photo(n), quality=90) for n in ("chelsea.jpg", "coffee.jpg", "rocket.jpg")]
  result = decoder_compare.compare(datas, image_size=64, batch=2, diff_images=3)
  decoder_compare.report(result)
  assert [r["images"] for r in result["rows"]] == [3, 3, 3, 3]
  assert all(r["images_per_s"] > 0 and r["host_cpu_s_per_image"] >= 0 for r in result["rows"])
  assert result["rows"][2]["routed"] == {gpu_decode.NVIMGCODEC: 3}
  assert result["full_resolution_difference"]["max_abs"] <= MAX_ABS
  assert result["rows_difference_vs_pillow_no_draft"]["max_abs"] <= MAX_ABS
  assert "images/s" in capsys.readouterr().out
  # nvImageCodec's CPU decoders refuse a region past the image; a GPU host reports its own.
  assert result["padded_decode"] == "not supported (no image)"


def test_device_images_come_as_jax_arrays_with_the_same_pixels(nv):
  """The GPU path's conversion (DLPack, or a counted host copy where DLPack cannot share),
  run here on a CPU device: nvImageCodec's host buffers do not export to JAX without CUDA."""
  import jax
  dec = gpu_decode.NvDecoder()
  dec.device = jax.devices("cpu")[0]  # what a GPU decoder holds; takes the device branch
  data = _with_orientation(_photo("rocket.jpg"), 6)
  got = gpu_decode.decode_batch([data], decoder=dec)
  assert isinstance(got.images[0], jax.Array) and dec.host_copies <= 1
  np.testing.assert_array_equal(np.asarray(got.images[0]),
                                gpu_decode.decode_batch([data], decoder=nv).images[0])


def test_use_wheels_makes_a_carried_wheel_importable(tmp_path):
  with zipfile.ZipFile(tmp_path / "cbir_fake-1.0-py3-none-any.whl", "w") as z:
    z.writestr("nvidia/cbir_fake_codec/__init__.py", "VALUE = 42\n")
  (tmp_path / "empty").mkdir()
  assert decoder_compare.use_wheels(tmp_path / "empty") is None
  import nvidia  # the namespace package, imported before the wheel arrives (as JAX does)
  site = decoder_compare.use_wheels(tmp_path)
  try:
    assert importlib.import_module("nvidia.cbir_fake_codec").VALUE == 42
    assert decoder_compare.use_wheels(tmp_path) == site  # second call: already unpacked
  finally:
    while site in sys.path:
      sys.path.remove(site)
    while str(tmp_path / "site" / "nvidia") in nvidia.__path__:
      nvidia.__path__.remove(str(tmp_path / "site" / "nvidia"))
    sys.modules.pop("nvidia.cbir_fake_codec", None)


def test_pillow_hook_and_device_canvases(nv, batch):
  """The job's canvas path: a host decode for Pillow items, nvImageCodec's images as they are,
  then canvases; each flat slot starts with its item's pixels, row after row."""
  from cbir_jax import gpu_canvas
  items = [item for _, item, _ in batch]
  hook = lambda data: decode.decode_image(data, SIZE, draft=True)  # noqa: E731
  got = gpu_decode.decode_batch(items, decoder=nv, pillow=hook)
  canvases, sizes, factors = gpu_canvas.assemble(got.images, (320, 640))
  assert canvases.shape[0] == len(batch) and factors == [1] * len(batch)
  for i, (name, item, _) in enumerate(batch):
    if got.errors[i]:
      assert tuple(sizes[i]) == (0, 0) and not np.asarray(canvases[i]).any(), name
      continue
    data = _data(item)
    ref = (decoder_compare.pillow_full(data) if got.decoders[i] == gpu_decode.NVIMGCODEC
           else decode.decode_image(data, SIZE, draft=True)[0])
    h, w = sizes[i]
    assert (h, w) == ref.shape[:2], name
    placed = np.asarray(canvases[i, :h * w * 3]).reshape(h, w, 3)  # canvas.py's flat layout
    d = np.abs(placed.astype(int) - ref)
    assert d.max() <= MAX_ABS, name


def test_a_failing_decoder_sends_the_batch_to_pillow(nv, batch, monkeypatch):
  def broken(datas):
    raise RuntimeError("CUDA Runtime failure (simulated)")
  monkeypatch.setattr(nv, "decode", broken)
  items = [item for _, item, _ in batch]
  got = gpu_decode.decode_rows(items, SIZE, decoder=nv, draft=False)
  want = gpu_decode.decode_rows(items, SIZE, decoder=None, draft=False)
  assert got.errors == want.errors and set(got.decoders) <= {gpu_decode.PILLOW, ""}
  np.testing.assert_array_equal(got.images, want.images)


def test_tally_counts_decoders_and_reasons(nv, batch):
  items = [item for _, item, _ in batch]
  sel = gpu_decode.select_decoder("nvimgcodec-cpu")
  tally = gpu_decode.DecoderTally(sel.description)
  rows = gpu_decode.decode_rows(items, SIZE, decoder=nv)
  full = gpu_decode.decode_batch(items, decoder=nv)
  assert rows.decoders == full.decoders and rows.routes == full.routes
  tally.add(rows.decoders, rows.routes)
  expected = {gpu_decode.NVIMGCODEC: sum(e == gpu_decode.NVIMGCODEC for _, _, e in batch),
              gpu_decode.PILLOW: sum(e == gpu_decode.PILLOW for _, _, e in batch)}
  assert tally.counts == expected
  assert sum(tally.pillow_routes.values()) == expected[gpu_decode.PILLOW]
  assert tally.pillow_routes["nvimgcodec gave no image"] == 2  # bad scan, no scan
  assert tally.pillow_routes["progressive JPEG"] == 1
  assert tally.to_dict() == {"description": sel.description, "counts": expected,
                             "pillow_routes": tally.pillow_routes}
