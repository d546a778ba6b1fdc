"""The main loop that never waits on the host (job/feed.py, job/steps.py), the persistent
compilation cache (job/jit_cache.py) and --resize in the job."""
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from cbir_jax import extract, store
from cbir_jax.job import feed, jit_cache

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(model="vgg_tiny", weights="random", image_size=32, progress="none")


def _photos(root: pathlib.Path, n: int) -> None:
  rng = np.random.default_rng(3)
  for i in range(n):
    h, w = rng.integers(20, 90, size=2)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(root / f"{i:03d}.jpg")


def test_device_timeline_busy_per_span_equals_a_sampled_count():
  t = feed.DeviceTimeline()
  # Steps dispatched at d, done at r; a step cannot start before the one before ended.
  for d, r in ((0.0, 1.0), (0.5, 1.5), (3.0, 3.2), (3.1, 4.0), (6.0, 5.9)):
    t.step(d, r)
  spans = [("a", 0.0, 0.75), ("b", 0.75, 3.1), ("a", 3.1, 3.5), ("c", 3.5, 7.0)]
  got = t.busy_in(spans)
  grid = np.arange(0, 7.0, 1e-4) + 5e-5  # midpoints: a literal count of busy instants
  busy = np.zeros_like(grid, bool)
  for s, e in t.busy:
    busy |= (grid >= s) & (grid < e)
  for name in ("a", "b", "c"):
    want = sum(np.count_nonzero(busy & (grid >= s) & (grid < e)) * 1e-4
               for n, s, e in spans if n == name)
    assert got.get(name, 0.0) == pytest.approx(want, abs=1e-3)
  assert t.busy == [(0.0, 1.0), (1.0, 1.5), (3.0, 3.2), (3.2, 4.0)]  # a step ending early: none


def test_feed_keeps_order_prepares_ahead_and_raises_where_the_loop_asks():
  prepared = []

  def stream():
    for i in range(5):
      yield i
    raise ValueError("bad batch 5")

  f = feed.Feed(stream(), 7, lambda b: prepared.append(b) or b * 10, ahead=2)
  assert [f.get() for _ in range(5)] == [(i, i * 10) for i in range(5)]
  with pytest.raises(ValueError, match="bad batch 5"):
    f.get()
  f.close()
  # Closing while the thread waits to hand over a batch: it stops, taking no more.
  f = feed.Feed(iter(range(100)), 100, lambda b: prepared.append(b) or b, ahead=2)
  deadline = time.time() + 30
  while len(prepared) < 5 + 2 and time.time() < deadline:
    time.sleep(0.01)
  time.sleep(0.2)
  f.close()
  assert len(prepared) == 5 + 2  # two prepared ahead (one queued, one in hand), no more


def test_get_returns_none_when_a_stop_is_asked_while_it_waits():
  """A stop must not wait for a batch that may never come (a read that hangs)."""
  never = threading.Event()

  def stream():
    never.wait(30)
    yield 0

  f = feed.Feed(stream(), 1, lambda b: b)
  asked = []
  threading.Timer(0.3, asked.append, args=[True]).start()
  t0 = time.monotonic()
  assert f.get(stop=lambda: bool(asked)) is None
  assert 0.3 <= time.monotonic() - t0 < 2
  never.set()
  f.close()


def test_step_delay_helper_slows_each_batch_of_a_started_process():
  """tests/step_delay.py (the slowed jobs of the kill tests) really slows the step loop."""
  import step_delay

  code = ("import time; from cbir_jax.job import feed; f = feed.Feed(iter(range(3)), 3, "
          "lambda b: b); t = time.monotonic(); [f.get() for _ in range(3)]; "
          "print(time.monotonic() - t); f.close()")
  took = {d: float(subprocess.run([sys.executable, "-c", code], env=step_delay.env(d),
                                  capture_output=True, text=True, check=True).stdout)
          for d in (0.4, 0)}
  assert took[0.4] >= 3 * 0.4 and took[0] < 0.4, took


def test_compile_counter_counts_each_new_shape_on_its_thread_only():
  import jax
  import jax.numpy as jnp

  fn = jax.jit(lambda x: jnp.sin(x) * 3 + 1)
  x3, x4, x5, x6 = (jnp.ones(n) for n in (3, 4, 5, 6))  # made before: no compile of theirs
  c = jit_cache.CompileCounter()
  with c.watch():
    fn(x3)
    fn(x3)  # the same shape: no new executable
  assert c.count == 1
  fn(x5)  # outside `watch`: not counted
  other = threading.Thread(target=lambda: fn(x6))
  with c.watch():
    other.start()  # another thread's compile while this one watches: not counted
    other.join()
    fn(x4)  # a second shape (a second bucket): a second executable
  assert c.count == 2


def test_rows_in_order_bounded_and_errors_surface_and_stop_the_rest():
  seen, release = [], threading.Event()
  r = feed.Rows(in_flight=2)

  def slow(i):
    release.wait(30)
    seen.append(i)

  r.submit(slow, 0)
  r.submit(slow, 1)
  assert seen == []  # two outstanding: neither waited
  threading.Timer(0.2, release.set).start()
  r.submit(slow, 2)
  assert seen[:1] == [0]  # a third outstanding: waited for the first
  r.drain()
  assert seen == [0, 1, 2]

  def boom(i):
    raise RuntimeError(f"row {i}")

  r.submit(boom, 3)
  r.submit(seen.append, 4)  # after a failure, later rows are skipped, not written
  with pytest.raises(RuntimeError, match="row 3"):
    r.drain()
  r.drain()
  r.close()
  assert seen == [0, 1, 2]


def test_cache_dir_settings():
  assert jit_cache.cache_dir("none") is None and jit_cache.cache_dir("off") is None
  assert jit_cache.cache_dir("auto", {"XDG_CACHE_HOME": "/x"}) == "/x/cbir_jax/jax"
  assert jit_cache.cache_dir("auto", {jit_cache.ENV: "/y", "XDG_CACHE_HOME": "/x"}) == "/y"
  assert jit_cache.cache_dir("/z/c", {}) == "/z/c"
  home = os.path.expanduser("~")
  assert jit_cache.cache_dir("auto", {}) == os.path.join(home, ".cache", "cbir_jax", "jax")


def test_summary_phases_add_up_and_device_time_fits_in_them(tmp_path):
  (tmp_path / "in").mkdir()
  _photos(tmp_path / "in", 20)
  s = extract.run(extract.ExtractConfig(output=str(tmp_path / "o"), images=str(tmp_path / "in"),
                                        batch_size=1, shard_size=6, **TINY), log=lambda m: None)
  assert s.images == 20 and s.resize == "host" and s.buckets == {}
  assert sum(s.phases.values()) == pytest.approx(s.seconds, rel=1e-6)
  assert s.device_busy and s.device_busy_s > 0
  for name, busy in s.device_busy.items():
    assert 0 <= busy <= s.phases[name] + 1e-6
  assert "device busy" in s.details() and "busy/waited" in s.details()


def _job(out: pathlib.Path, images: pathlib.Path, cache: pathlib.Path) -> dict:
  env = dict(os.environ, PYTHONPATH=str(REPO), CBIR_JAX_COMPILATION_CACHE=str(cache))
  cmd = [sys.executable, str(REPO / "launch" / "extract.py"), f"--output={out}",
         f"--images={images}", "--model=vgg_tiny", "--weights=random", "--image_size=32",
         "--batch_size=2", "--progress=none"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads((out / "manifest.json").read_text())["run"]["compilation_cache"]


def test_a_rerun_in_another_process_compiles_nothing(tmp_path):
  """The second process loads every compilation the job makes from the persistent cache."""
  (tmp_path / "in").mkdir()
  _photos(tmp_path / "in", 6)
  first = _job(tmp_path / "o1", tmp_path / "in", tmp_path / "cache")
  assert first["used"] and first["misses"] >= 1  # compiled, then stored
  assert any((tmp_path / "cache").iterdir())
  second = _job(tmp_path / "o2", tmp_path / "in", tmp_path / "cache")
  assert second["misses"] == 0 and second["hits"] >= 1, second
  np.testing.assert_array_equal(store.load_descriptors(tmp_path / "o1", "mac")[0],
                                store.load_descriptors(tmp_path / "o2", "mac")[0])


@pytest.fixture(scope="module")
def real_photos(shared_data, tmp_path_factory):
  """Eight imagenet-sample photos and one bad file (links: the data stays read-only)."""
  root = tmp_path_factory.mktemp("real")
  src = sorted((shared_data / "imagenet-sample" / "images").rglob("*.JPEG"))[:8]
  for p in src:
    (root / p.name).symlink_to(p)
  (root / "zz_broken.jpg").write_bytes(src[0].read_bytes()[:300])
  return root


def _run(out, images, **kw) -> extract.Summary:
  cfg = dict(TINY, image_size=64, batch_size=1, shard_size=4, kinds=("mac", "gem", "fc_conv"))
  cfg.update(kw)
  return extract.run(extract.ExtractConfig(output=str(out), images=str(images), **cfg),
                     log=lambda m: None)


def test_device_resize_matches_host_resize_and_repeats_bitwise(real_photos, tmp_path):
  host = _run(tmp_path / "host", real_photos, resize="host")
  dev = _run(tmp_path / "dev", real_photos, resize="device")
  again = _run(tmp_path / "again", real_photos, resize="device")
  assert (host.images, host.failed) == (dev.images, dev.failed) == (8, 1)
  assert host.resize == "host" and dev.resize == "device" and sum(dev.buckets.values()) == 3
  assert host.compiles == dev.compiles == 1  # one input shape each
  m = store.load_manifest(tmp_path / "dev")
  assert m.settings.resize == "device" and store.load_manifest(tmp_path / "host").settings.resize == "host"
  assert m.run["resize"]["mode"] == "device" and sum(m.run["resize"]["buckets"].values()) == 3
  assert dict(store.read_failures(tmp_path / "dev")) == dict(store.read_failures(tmp_path / "host"))
  for kind in ("mac", "gem", "fc_conv"):
    (a, meta_a), (b, meta_b), (c, _) = (store.load_descriptors(tmp_path / n, kind)
                                        for n in ("host", "dev", "again"))
    a, b, c = np.asarray(a), np.asarray(b), np.asarray(c)
    np.testing.assert_array_equal(meta_a["path"], meta_b["path"])
    np.testing.assert_array_equal(b, c)  # the same job twice: bitwise
    # Device vs host pixels differ by rounding (~0.1% of values one level): rows of unit norm
    # within 0.02 per component and cosine >= 0.999 (measured: 0.005-0.01 and >= 0.99999).
    assert np.max(np.abs(a - b)) <= 0.02, (kind, np.max(np.abs(a - b)))
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.999, (kind, cos.min())
  # Another resize on the same output is a changed setting, refused like any other.
  with pytest.raises(extract.ExtractError, match="resize"):
    _run(tmp_path / "dev", real_photos, resize="host")


def test_a_second_bucket_is_a_second_compile(tmp_path):
  """The summary's compile count: one executable per bucket the steps used, no more."""
  (tmp_path / "in").mkdir()
  for name, side in (("a0", 100), ("a1", 120), ("b0", 500), ("b1", 450)):
    Image.new("RGB", (side, side - 20), (side % 256, 40, 90)).save(tmp_path / "in" / f"{name}.png")
  # Shards of 2: the small pair is one step (bucket 320), the large pair another (640).
  dev = _run(tmp_path / "dev", tmp_path / "in", resize="device", shard_size=2)
  assert dev.buckets == {320: 1, 640: 1} and dev.compiles == 2, (dev.buckets, dev.compiles)
  small = tmp_path / "small"
  small.mkdir()
  for p in sorted((tmp_path / "in").glob("a*.png")):
    (small / p.name).symlink_to(p)
  s = _run(tmp_path / "s", small, resize="device", shard_size=2)  # a fresh count per job
  assert s.buckets == {320: 1} and s.compiles == 1


@pytest.fixture(scope="module")
def mixed_photos(real_photos, tmp_path_factory):
  """Real JPEGs plus what must go to Pillow: a PNG, a CMYK JPEG, a corrupt JPEG, a text file."""
  root = tmp_path_factory.mktemp("mixed")
  for p in sorted(real_photos.iterdir()):
    if p.name != "zz_broken.jpg":
      (root / p.name).symlink_to(p.resolve())
  first = Image.open(sorted(real_photos.iterdir())[0])
  first.convert("RGB").save(root / "b_png.png")
  first.convert("CMYK").save(root / "c_cmyk.jpg", quality=90)
  data = bytearray((sorted(real_photos.iterdir())[1]).read_bytes())
  data[len(data) // 3:len(data) // 3 + 4000] = bytes(4000)  # entropy data zeroed
  (root / "d_corrupt.jpg").write_bytes(bytes(data[:len(data) // 2]))
  (root / "e_text.jpg").write_text("not an image")
  return root


@pytest.mark.parametrize("resize", ["host", "device"])
def test_nvimgcodec_cpu_decoder_gives_pillows_rows_and_failures(mixed_photos, tmp_path, resize):
  """nvImageCodec's CPU backend in the job: Pillow's failures, rows, order and widths.

  nvImageCodec decodes at full size, so the rows are compared with Pillow's full-size decode
  (--nodraft); against the default draft decode they differ as draft does (measured cosine
  >= 0.989 at this 64-pixel input, where draft decodes at 1/4 or 1/8 scale)."""
  runs = {}
  for name, kw in (("pil", dict(decoder="pillow", draft=False)),
                   ("nv", dict(decoder="nvimgcodec-cpu", draft=False)),
                   ("draft", dict(decoder="pillow"))):
    runs[name] = _run(tmp_path / name, mixed_photos, resize=resize, **kw)
  pil, nv = runs["pil"], runs["nv"]
  assert (pil.images, pil.failed) == (nv.images, nv.failed) == (10, 2)
  reasons = dict(store.read_failures(tmp_path / "pil"))
  assert dict(store.read_failures(tmp_path / "nv")) == reasons
  # Canvases (device resize) take JPEGs through simplejpeg: the 8 good ones; the PNG, the CMYK
  # JPEG, the corrupt one (simplejpeg refuses it, Pillow says why) and the text file: Pillow.
  assert pil.decoder["counts"] == ({"pillow": 12} if resize == "host" else
                                   {"simplejpeg": 8, "pillow": 4}), pil.decoder
  if resize == "device":
    assert pil.decoder["pillow_routes"] == {
        "not a JPEG": 2, "CMYK JPEG": 1, "simplejpeg refused the data": 1}, pil.decoder
  # The 8 baseline JPEGs on nvImageCodec; the PNG, CMYK JPEG and the two bad files on Pillow.
  assert nv.decoder["description"].startswith("nvimgcodec")
  assert nv.decoder["counts"] == {"nvimgcodec": 8, "pillow": 4}, nv.decoder
  assert store.load_manifest(tmp_path / "nv").run["decoder"] == nv.decoder
  for kind in ("mac", "gem", "fc_conv"):
    (a, meta_a), (b, meta_b), (c, _) = (store.load_descriptors(tmp_path / n, kind)
                                        for n in ("pil", "nv", "draft"))
    a, b, c = np.asarray(a), np.asarray(b), np.asarray(c)
    for col in ("path", "width", "height"):
      np.testing.assert_array_equal(meta_a[col], meta_b[col])
    # Stated tolerance: within 1e-3 of the row's largest value (measured here: bitwise equal).
    scale = np.max(np.abs(a), axis=1, keepdims=True)
    assert np.max(np.abs(a - b) / scale) <= 1e-3, kind
    assert _cos(a, c).min() >= 0.98, kind


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_decoder_selection_on_this_cpu_machine():
  from cbir_jax.job import decoding

  auto = decoding.select("auto", "folder")
  assert auto.decoder is None and auto.description == "pillow (host): no GPU"
  assert decoding.select("pillow", "tfds").decoder is None
  with pytest.raises(extract.ExtractError, match="folders only"):
    decoding.select("nvimgcodec-cpu", "tfds")
  with pytest.raises(extract.ExtractError, match="--decoder=nvimgcodec"):
    decoding.select("nvimgcodec", "folder")  # no GPU here: an error, not a silent fallback
