"""The query service over real HTTP: the same results as launch/search.py --json, and refusals.

One launch/serve.py subprocess on a free localhost port serves a small index of the sample
photos; httpx talks to it. Its answers are compared with launch/search.py --json run as a
subprocess on the same queries, and with a literal NumPy ranking.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")

from serve_helpers import KIND, MAX_PIXELS, REPO, LauncherServer, make_index  # noqa: E402

MAX_UPLOAD = 150_000  # bytes; the sample photos are 30-130 kB


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """(server, index dir, image folder, a photo outside the index, search.py JSON per run)."""
  root = tmp_path_factory.mktemp("serve")
  index, images = make_index(root)
  outside = root / "outside.jpg"  # chelsea mirrored: not in the index, not its pixels
  from PIL import Image, ImageOps
  ImageOps.mirror(Image.open(images / "things" / "chelsea.jpg")).save(outside, quality=90)
  inside = images / "things" / "coffee.jpg"
  with ThreadPoolExecutor(1) as pool:  # the server and search.py start at once
    future = pool.submit(_search_json, index,
                         ["--query", f"{inside},{outside}", "--query_ids=0,3", "--k=4"])
    server = LauncherServer(f"--index={index}", f"--kind={KIND}", "--k=4", "--max_k=60",
                            f"--max_upload_bytes={MAX_UPLOAD}")
    expected = {"a": future.result()}
  # search.py's own code in this process (one JAX start less): k over the index, self left out.
  from cbir_jax import query, search_command
  printed = []
  search_command.run(query.SearchConfig(index=str(index), query=(str(outside),), query_ids=(3,),
                                        kind=KIND, k=50, exclude_self=True, json=True),
                     log=lambda m: None, out=printed.append)
  expected["b"] = json.loads(printed[0])
  yield server, index, images, outside, expected
  server.close()


def _search_json(index: pathlib.Path, args: list[str]) -> dict:
  out = subprocess.run([sys.executable, str(REPO / "launch" / "search.py"), f"--index={index}",
                        f"--kind={KIND}", "--json", *args], capture_output=True, text=True,
                       timeout=600, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout)


def _rows_of(expected: dict, query: str | None = None, query_row: int | None = None) -> list:
  return [r for r in expected["results"]
          if (r["query_row"] == query_row if query is None else r["query"] == query)]


def _client(server) -> httpx.Client:
  return httpx.Client(base_url=server.url, timeout=300)


def _no_query(rows: list) -> list:
  """Result rows without "query": an upload is named by its file name, a search by its path."""
  return [{k: v for k, v in r.items() if k != "query"} for r in rows]


def test_row_queries_equal_search_json(served):
  server, index, _, _, expected = served
  with _client(server) as c:
    for row in (0, 3):
      got = c.get("/api/search", params={"row": row, "k": 4}).json()
      assert got["results"] == _rows_of(expected["a"], query_row=row)
      assert got["index"] == str(index) and got["kind"] == KIND and got["notes"] == []
    # k over the index with the query left out: all 9 others, and search.py's note.
    got = c.get("/api/search", params={"row": 3, "k": 50, "exclude_self": "true"}).json()
  want = _rows_of(expected["b"], query_row=3)
  assert got["results"] == want and len(want) == 9 and 3 not in [r["row"] for r in want]
  assert got["notes"] == expected["b"]["notes"] and "showing all 9" in got["notes"][0]


def test_uploads_equal_search_json_and_a_literal_ranking(served):
  server, index, images, outside, expected = served
  inside = images / "things" / "coffee.jpg"
  with _client(server) as c:
    got_in = c.post("/api/search", params={"k": 4},
                    files={"image": ("coffee.jpg", inside.read_bytes(), "image/jpeg")}).json()
    got_out = c.post("/api/search", params={"k": 4},
                     files={"image": ("outside.jpg", outside.read_bytes(), "image/jpeg")}).json()
    raw = c.post("/api/search", params={"k": 50, "exclude_self": "1", "name": "x.png"},
                 content=outside.read_bytes(), headers={"content-type": "image/jpeg"}).json()
  # The photo that is in the index is found as itself (by its pixels here, by its file in
  # search.py), at distance ~0.
  want_in = _rows_of(expected["a"], query=str(inside))
  assert _no_query(got_in["results"]) == _no_query(want_in)
  assert got_in["results"][0]["self"] and got_in["results"][0]["query"] == "coffee.jpg"
  assert _no_query(got_out["results"]) == _no_query(_rows_of(expected["a"], query=str(outside)))
  assert _no_query(raw["results"]) == _no_query(_rows_of(expected["b"], query=str(outside)))
  # 9: k is clamped to the rows minus the query itself, as search.py does, even when the
  # image turns out not to be in the index.
  assert raw["results"][0]["query"] == "x.png" and len(raw["results"]) == 9
  # Literal reference: L1 / D in float64 over every row, ties to the lower row.
  from cbir_jax import query, store
  manifest, db, _ = store.open_index(index, KIND)
  q = query.describe_images(manifest, [str(outside)], KIND).astype(np.float64)
  d = np.abs(np.asarray(db, np.float64) - q).sum(1) / db.shape[1]
  order = np.lexsort((np.arange(len(d)), d))[:4]
  assert [r["row"] for r in got_out["results"]] == order.tolist()
  np.testing.assert_allclose([r["distance"] for r in got_out["results"]], d[order],
                             rtol=1e-5, atol=1e-7)  # float32 sums against float64


def test_concurrent_searches_equal_searches_one_at_a_time(served):
  """Searches arriving together share one l1_topk call: each gets what it gets alone."""
  server, _, images, outside, _ = served
  asks = [{"row": r, "k": k, "exclude_self": ex} for r, k, ex in
          [(0, 1, 0), (1, 9, 1), (2, 10, 0), (3, 4, 1), (4, 50, 0), (5, 3, 1), (6, 7, 0),
           (7, 2, 1), (8, 10, 1), (9, 5, 0)]]
  uploads = [(outside, 6, 1), (images / "textures" / "grass.jpg", 4, 1)]

  def ask(c, a):
    if isinstance(a, dict):
      return c.get("/api/search", params=a).json()
    path, k, ex = a
    return c.post("/api/search", params={"k": k, "exclude_self": ex},
                  files={"image": (path.name, path.read_bytes())}).json()

  work = asks + uploads
  with _client(server) as c:
    alone = [ask(c, a) for a in work]
  with ThreadPoolExecutor(len(work)) as pool:
    clients = [_client(server) for _ in work * 2]
    together = list(pool.map(ask, clients, work * 2))
    for c in clients:
      c.close()
  assert together == alone * 2
  assert [len(r["results"]) for r in alone[:10]] == [1, 9, 10, 4, 10, 3, 7, 2, 9, 5]


def test_path_queries_inside_the_folder(served):
  server, _, images, outside, expected = served
  inside = images / "things" / "coffee.jpg"
  with _client(server) as c:
    absolute = c.get("/api/search", params={"path": str(inside), "k": 4}).json()
    relative = c.get("/api/search", params={"path": "things/coffee.jpg", "k": 4}).json()
    url = c.get("/api/search", params={"path": f"file://{inside}", "k": 4}).json()
  assert absolute["results"] == _rows_of(expected["a"], query=str(inside))
  assert _no_query(relative["results"]) == _no_query(absolute["results"])
  assert url["results"] == absolute["results"]


def test_page_marks_histograms_and_thumbnails(served):
  from PIL import Image

  from cbir_jax import evaluation
  server, _, images, _, _ = served
  with _client(server) as c:
    got = c.get("/api/search", params={"row": 0, "k": 6, "view": "1"}).json()
    page = c.get("/")
    thumb = c.get(f"/thumb/{got['results'][1]['row']}")
    info = c.get("/api/info").json()
  assert page.status_code == 200 and 'id="file"' in page.text
  assert info["rows"] == 10 and info["kind"] == KIND
  v = got["view"]
  query_label = got["results"][0]["label"]
  for r, h in zip(got["results"], v["hits"]):
    assert h["row"] == r["row"]
    assert h["mark"] == ("self" if r["row"] == 0 else
                         "same" if r["label"] == query_label else "other")
  # Histograms: the report's, of the full-size images.
  rgb = np.asarray(Image.open(got["results"][1]["path"]).convert("RGB"))
  want = evaluation.color_histogram(rgb)
  np.testing.assert_allclose(v["hits"][1]["hist"], want, atol=5e-5)  # rounded to 4 places
  q = evaluation.color_histogram(np.asarray(Image.open(got["results"][0]["path"]).convert("RGB")))
  assert v["hits"][1]["hist_distance"] == pytest.approx(
      float(evaluation.histogram_distance(q, want)), abs=1e-9)
  assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
  small = Image.open(io.BytesIO(thumb.content))
  assert max(small.size) <= 192 and small.size[0] / small.size[1] == pytest.approx(
      rgb.shape[1] / rgb.shape[0], rel=0.02)


def _bomb_png() -> bytes:
  """A valid PNG of 1200 x 1000 = 1.2 Mpx (over the index's limit) in a few kB."""
  from PIL import Image
  buf = io.BytesIO()
  Image.new("L", (1200, 1000)).save(buf, format="PNG")
  assert 1200 * 1000 > MAX_PIXELS and len(buf.getvalue()) < MAX_UPLOAD
  return buf.getvalue()


def test_hostile_requests_get_4xx_with_one_line_and_the_service_keeps_serving(served, tmp_path):
  server, _, images, outside, _ = served
  link = images / "things" / "escape.png"  # a link inside the folder to an image outside
  os.symlink(outside, link)
  dir_link = images / "elsewhere"
  os.symlink(outside.parent, dir_link, target_is_directory=True)
  huge = os.urandom(MAX_UPLOAD + 70_000)
  (images / "things" / "huge.jpg").write_bytes(huge)  # a file of the folder over the limit

  def chunks():
    for i in range(0, len(huge), 16384):
      yield huge[i:i + 16384]

  cases = [  # (request arguments, status, words in the reason)
      (("GET", "/api/search", {"row": 0, "k": 0}), 400, "k must be"),
      (("GET", "/api/search", {"row": 0, "k": -2}), 400, "k must be"),
      (("GET", "/api/search", {"row": 0, "k": "ten"}), 400, "k must be"),
      (("GET", "/api/search", {"row": 0, "k": 10 ** 9}), 400, "k must be"),
      (("GET", "/api/search", {"row": 10}), 404, "not a row"),
      (("GET", "/api/search", {"row": "x"}), 400, "row must be"),
      (("GET", "/api/search", {}), 400, "give one query"),
      (("GET", "/api/search", {"row": 0, "exclude_self": "maybe"}), 400, "true or false"),
      (("GET", "/api/search", {"path": "../outside.jpg"}), 403, "outside"),
      (("GET", "/api/search", {"path": "things/../../outside.jpg"}), 403, "outside"),
      (("GET", "/api/search", {"path": str(outside)}), 403, "outside"),
      (("GET", "/api/search", {"path": "/etc/passwd"}), 403, "outside"),
      (("GET", "/api/search", {"path": "things/escape.png"}), 403, "outside"),
      (("GET", "/api/search", {"path": "elsewhere/outside.jpg"}), 403, "outside"),
      (("GET", "/api/search", {"path": f"file://{outside}"}), 403, "outside"),
      (("GET", "/api/search", {"path": "http://127.0.0.1/x.jpg"}), 400, "not URLs"),
      (("GET", "/api/search", {"path": "things/none.jpg"}), 404, "no file"),
      (("GET", "/api/search", {"path": "things/huge.jpg"}), 413, "exceeds"),
      (("GET", "/api/search", {"path": "things"}), 400, "Is a directory"),
      (("GET", "/api/search", {"path": "things/a\0b.jpg"}), 400, "NUL"),
      (("GET", "/api/search", {"path": "x" * 5000}), 400, "cannot read 'xxx"),
      (("GET", "/api/search", {"row": 0, "k": "9" * 4000}), 400, "k must be between"),
      (("GET", "/api/search", {"row": "9" * 4000}), 404, "not a row"),
      (("GET", "/thumb/10", {}), 404, "not a row"),
      (("GET", "/thumb/-1", {}), 404, "not a row"),
      (("GET", "/thumb/x", {}), 400, "row must be"),
      (("GET", "/thumb/..%2F..%2Fetc%2Fpasswd", {}), 404, "Not Found"),
      (("POST", "/api/search", {"files": {"image": ("x.jpg", b"not an image at all")}}), 415,
       "not an image"),
      (("POST", "/api/search", {"files": {"image": ("bomb.png", _bomb_png())}}), 415,
       "decompression-bomb"),
      (("POST", "/api/search", {"files": {"image": ("big.jpg", huge)}}), 413, "exceeds"),
      (("POST", "/api/search", {"files": {"image": ("big.jpg", huge[:MAX_UPLOAD + 1])}}), 413,
       "exceeds the limit of 150000"),
      (("POST", "/api/search", {"content": huge}), 413, "exceeds"),
      (("POST", "/api/search", {"content": chunks()}), 413,
       f"exceeds the limit of {MAX_UPLOAD} bytes"),  # no Content-Length
      (("POST", "/api/search", {"content": b""}), 400, "empty"),
      (("POST", "/api/search", {"files": {"other": ("x.jpg", b"1")}}), 400, '"image"'),
      (("POST", "/api/search?row=1", {"files": {"image": ("x.jpg", b"1")}}), 400, "one query"),
  ]
  with _client(server) as c:
    for (method, url, kw), status, words in cases:
      if method == "GET":
        resp = c.get(url, params=kw)
      else:
        resp = c.post(url, **kw)
      assert resp.status_code == status, (url, kw.keys(), resp.status_code, resp.text[:300])
      reason = resp.json()["error"]
      assert words in reason and "\n" not in reason and len(reason) < 200, (url, reason)
      ok = c.get("/api/search", params={"row": 1, "k": 2})
      assert ok.status_code == 200 and len(ok.json()["results"]) == 2
  assert server.proc.poll() is None
  assert not any("Traceback" in line for line in server.lines), server.lines[-40:]


def test_launcher_help_and_bad_settings(served):
  import dataclasses

  from cbir_jax import serve
  _, index, _, _, _ = served
  def start(*args):
    return subprocess.Popen([sys.executable, str(REPO / "launch" / "serve.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)

  helper, bad = start("--help"), start(f"--index={index}", "--k=0", "--port=0")
  out, _ = helper.communicate(timeout=300)
  _, err = bad.communicate(timeout=300)
  for f in dataclasses.fields(serve.ServeConfig):
    assert f"--{f.name}" in out, f.name
  assert "127.0.0.1" in out  # the default host: this machine only
  assert bad.returncode == 1 and "serve: error: --k must be between 1" in err


def test_inside_resolves_links_and_parents(tmp_path):
  from cbir_jax.serve import RequestError, inside
  root = tmp_path / "root"
  (root / "a").mkdir(parents=True)
  (root / "a" / "f.jpg").write_bytes(b"x")
  (tmp_path / "secret.jpg").write_bytes(b"y")
  os.symlink(tmp_path / "secret.jpg", root / "a" / "s.jpg")
  os.symlink(root / "a" / "f.jpg", root / "ok.jpg")  # a link that stays inside is fine
  assert inside("a/f.jpg", str(root)) == str((root / "a" / "f.jpg").resolve())
  assert inside("ok.jpg", str(root)) == str((root / "a" / "f.jpg").resolve())
  assert inside(str(root / "a" / "f.jpg"), str(root)).endswith("f.jpg")
  for bad in ("a/s.jpg", "../secret.jpg", "a/../../secret.jpg", str(tmp_path / "secret.jpg"),
              "/"):
    with pytest.raises(RequestError) as e:
      inside(bad, str(root))
    assert e.value.status == 403
  # A folder whose name starts like the root's is not inside it.
  (tmp_path / "root2").mkdir()
  with pytest.raises(RequestError):
    inside(str(tmp_path / "root2"), str(root))


def test_a_batch_of_searches_equals_each_search_alone():
  """Batcher._run: one l1_topk call for queries with different k and excluded rows gives each
  exactly its own call's results (and a literal float64 ranking's rows)."""
  from concurrent.futures import Future

  from cbir_jax import search
  from cbir_jax.serve import Batcher
  rng = np.random.default_rng(3)
  db = rng.random((300, 24), dtype=np.float32)
  db[7] = db[5]  # a tie: the lower row first
  asks = [(rng.random(24, dtype=np.float32), ex, k) for ex, k in
          [(-1, 1), (5, 299), (42, 17), (0, 8)]]
  asks.append((db[5].copy(), -1, 4))
  group = [(v, ex, k, Future()) for v, ex, k in asks]
  Batcher(db)._run(group)
  for v, ex, k, done in group:
    d, rows = done.result(timeout=0)
    alone = search.l1_topk(v[None], db, k, exclude=[ex])
    np.testing.assert_array_equal(d, alone.distances[0])
    np.testing.assert_array_equal(rows, alone.indices[0])
    ref = np.abs(db.astype(np.float64) - v).sum(1) / 24
    if ex >= 0:
      ref[ex] = np.inf
    assert rows.tolist() == np.lexsort((np.arange(300), ref))[:k].tolist()
