"""The service's page in a real headless Chromium (Playwright): upload a photo, see k results.

Needs Playwright for Python and a Chromium (Debian's `chromium`, or $CHROMIUM). Locally the
test skips when either is missing; in CI (CI=true) it fails, so a lost browser is noticed.
"""
from __future__ import annotations

import os
import shutil
import threading

import pytest

from serve_helpers import KIND, make_index

K = 3


@pytest.fixture(scope="module")
def chromium() -> str:
  """The Chromium to drive, or a skip (a failure in CI) saying what is missing; checked
  before the index is built."""
  found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which(
      "chromium-browser") or ""
  try:
    import playwright.sync_api  # noqa: F401
    missing = "" if os.path.isfile(found) else (
        f"no Chromium (apt-get install chromium, or set $CHROMIUM){': ' + found if found else ''}")
  except ImportError:
    missing = "Playwright for Python is not installed (pip install playwright)"
  if missing:
    if os.environ.get("CI"):
      pytest.fail(f"browser test cannot run in CI: {missing}")
    pytest.skip(missing)
  return found


@pytest.fixture(scope="module")
def server(chromium, tmp_path_factory):
  """The service on a free localhost port, served by uvicorn on a thread of this process."""
  import uvicorn

  from cbir_jax import serve

  index, images = make_index(tmp_path_factory.mktemp("serve_browser"))
  service = serve.Service(serve.ServeConfig(index=str(index), kind=KIND, k=K))
  sock = serve.bind("127.0.0.1", 0)
  uv = uvicorn.Server(uvicorn.Config(serve.app(service), log_level="warning"))
  thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{sock.getsockname()[1]}", images
  uv.should_exit = True
  thread.join(60)


def test_page_uploads_a_photo_and_shows_k_results(chromium, server, tmp_path):
  import httpx
  from playwright.sync_api import sync_playwright

  url, images = server
  photo = images / "things" / "rocket.jpg"
  with httpx.Client(base_url=url, timeout=300) as c:
    want = c.post("/api/search", params={"k": K},
                  files={"image": ("rocket.jpg", photo.read_bytes())}).json()["results"]
  junk = tmp_path / "notes.txt"
  junk.write_text("not an image")
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=chromium, headless=True,
                                args=["--no-sandbox"])  # CI runs as root
    try:
      page = browser.new_page(viewport={"width": 1100, "height": 800})
      page.set_default_timeout(120_000)
      page.goto(url + "/")
      page.wait_for_function("document.getElementById('info').textContent.includes('rows')")
      assert page.input_value("#k") == str(K)
      page.set_input_files("#file", str(photo))
      page.click("#upload")
      page.wait_for_function(f"document.querySelectorAll('.cell.hit').length == {K}")
      # Every thumbnail loaded, in the API's order, framed in its class mark's colour.
      page.wait_for_function("[...document.querySelectorAll('.cell img')]"
                             ".every(i => i.complete && i.naturalWidth > 0)")
      rows = page.eval_on_selector_all(".cell.hit", "cs => cs.map(c => +c.dataset.row)")
      assert rows == [r["row"] for r in want]
      marks = page.eval_on_selector_all(".cell.hit", "cs => cs.map(c => c.className)")
      assert "mark-self" in marks[0]  # the photo is in the index: itself first
      assert all(("mark-same" in m) == (r["label"] == "things") for m, r in
                 zip(marks[1:], want[1:]))
      assert page.locator(".cell.hit svg polyline").count() == 3 * K  # R, G, B per result
      assert page.inner_text("#status").startswith(f"{K} results")
      if os.environ.get("SERVE_SCREENSHOT"):
        page.screenshot(path=os.environ["SERVE_SCREENSHOT"], full_page=True)
      # A file that is not an image: the reason on the page, and the page still searches.
      page.set_input_files("#file", str(junk))
      page.click("#upload")
      page.wait_for_function("document.getElementById('status').className == 'error'")
      assert page.inner_text("#status").startswith("415: not a usable image")
      page.fill("#row", "2")
      page.click("#by-row")
      page.wait_for_function("document.querySelector('.cell.hit') && "
                             "document.querySelector('.cell.hit').dataset.row == '2'")
      assert page.locator(".cell.hit").count() == K
    finally:
      browser.close()
