"""A query service: one extraction output kept loaded and searched over HTTP, with a web page.

`Service` holds the index, the weights it was made with and their compiled step, and answers
the searches of launch/search.py (by row, by image bytes, by a file inside the index's image
folder) with the same results; `app` puts it behind Starlette, `run` serves it with uvicorn.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
import queue
import socket
import threading
from concurrent.futures import Future
from typing import Any, Callable

import numpy as np

from cbir_jax import decode, evaluation, index_images, search, store
from cbir_jax.choices import Kind
from cbir_jax.index_images import ImageUnavailable
from cbir_jax.query import Describer, Hit, OpenIndex, QueryResult, clamp_k, results_json, wanted

_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_static")
_THUMB = 192  # longest side of a result thumbnail, in pixels
_CACHED_ROWS = 2048  # rows whose thumbnail and histogram are kept
_MAX_BATCH = 64  # searches that arrived together, run as one l1_topk call


@dataclasses.dataclass
class ServeConfig:
  """One query service (launch/serve.py).

  Attributes:
    index: extraction output directory (launch/extract.py --output), kept loaded.
    kind: descriptor kind searched; unset: fc_conv when the index has it, else the first it
      has of conv, fc, gem, mac, spoc (an index of weights without FC layers: conv).
    k: results per query when a request does not say.
    max_k: the largest k a request may ask for (larger: 400).
    host: address to listen on; the default answers this machine only.
    port: port to listen on; 0 picks a free one (the address is printed).
    image_root: where the index's image folder is now, if it moved since the extraction.
    max_upload_bytes: the largest request body (an uploaded image) accepted (larger: 413).
    max_pixels: images declaring more pixels are refused (bombs); 0 = the index's own
      setting (what the extraction job refused).
    weights: the folder of the weights the index was made with, when they moved since the
      extraction: used only if they are the same weights (the params_sha256 the index
      records).
  """
  index: str
  kind: Kind | None = None
  k: int = 10
  max_k: int = 200
  host: str = "127.0.0.1"
  port: int = 8000
  image_root: str | None = None
  max_upload_bytes: int = 20 * 2 ** 20
  max_pixels: int = 0
  weights: str | None = None


class RequestError(ValueError):
  """A request the service refuses: an HTTP status and a one-line reason."""

  def __init__(self, status: int, reason: str):
    super().__init__(reason)
    self.status = status


def _shown(value: Any, limit: int = 80) -> str:
  """A request's value as a refusal quotes it: repr, shortened in the middle."""
  text = repr(value)
  return text if len(text) <= limit else text[:limit // 2 - 2] + "..." + text[-(limit // 2 - 2):]


def _integer(value: Any, reason: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise RequestError(400, f"{reason}, got {_shown(value)}") from None


# --- batching searches that arrive together -------------------------------------------------------


class Batcher:
  """Runs the searches waiting at one time as one `search.l1_topk` call, on one thread.

  A call reads the whole database and pads the queries to a tile, so its cost hardly grows
  with the number of queries: requests that arrive while one runs share the next. Each query's
  results do not depend on the others in its call (per-row L1 sums; larger k extends the same
  order, ties to the lower row), so they equal a call of its own.
  """

  def __init__(self, database: Any, max_batch: int = _MAX_BATCH):
    self._database, self._max = database, max_batch
    self._rows = int(database.shape[0])
    self._queue: queue.Queue = queue.Queue()
    threading.Thread(target=self._loop, name="cbir-serve-search", daemon=True).start()

  def topk(self, vector: np.ndarray, exclude: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, rows) of the `count` nearest rows to `vector` [D], `exclude` left out."""
    done: Future = Future()
    self._queue.put((np.asarray(vector, np.float32), int(exclude), int(count), done))
    return done.result()

  def _loop(self) -> None:
    while True:
      items = [self._queue.get()]
      while len(items) < self._max:
        try:
          items.append(self._queue.get_nowait())
        except queue.Empty:
          break
      # l1_topk takes one k, at most N - 1 once any query excludes a row: a search of the
      # whole index (no row excluded) goes with its like.
      whole = [i for i in items if i[2] >= self._rows]
      for group in ([i for i in items if i[2] < self._rows], whole):
        if group:
          self._run(group)

  def _run(self, group: list[tuple[np.ndarray, int, int, Future]]) -> None:
    # l1_topk compiles per number of queries and per k: both are rounded up to a power of
    # two (more queries: copies of the first; a longer top-k list: the same order, cut), so
    # a handful of compiled shapes serve every mix of requests.
    size = 1 << (len(group) - 1).bit_length()
    want = max(g[2] for g in group)
    limit = self._rows if want >= self._rows else self._rows - 1
    k = min(1 << (want - 1).bit_length(), limit)
    vectors = np.stack([g[0] for g in group] + [group[0][0]] * (size - len(group)))
    exclude = np.asarray([g[1] for g in group] + [-1] * (size - len(group)))
    try:
      top = search.l1_topk(vectors, self._database, k, exclude=exclude)
    except Exception as e:  # reaches the requests, never ends the thread
      for g in group:
        g[3].set_exception(e)
      return
    for a, (_, _, count, done) in enumerate(group):
      done.set_result((top.distances[a, :count], top.indices[a, :count]))


# --- the service ---------------------------------------------------------------------------------


def inside(path: str, root: str) -> str:
  """The real path of `path` (relative paths are taken under `root`) if it lies inside the
  real folder `root`, links resolved; RequestError 403 otherwise (traversal, links out)."""
  if "\0" in path:
    raise RequestError(400, "a path cannot contain a NUL byte")
  real_root = os.path.realpath(root)
  real = os.path.realpath(os.path.join(real_root, path))
  if os.path.commonpath([real, real_root]) != real_root:
    raise RequestError(403, f"{_shown(path)} is outside the index's image folder")
  return real


@dataclasses.dataclass(frozen=True)
class Query:
  """One search request, checked: exactly one of row / data (an image's bytes)."""
  k: int
  exclude_self: bool = False
  row: int = -1
  data: bytes = b""
  name: str = ""  # what the results call an image query (upload name or path)
  path_row: int = -1  # the row whose stored file is the query file, -1 if none


class Service:
  """An index, its weights and its images, loaded once and searched by many requests.

  Thread-safe: requests are answered on a thread pool.
  """

  def __init__(self, config: ServeConfig):
    kind, self.kind_note = store.choose_kind(config.index, config.kind)
    self.config = config = dataclasses.replace(config, kind=kind)
    self.index = index = OpenIndex.open(config.index, kind, config.image_root)
    self.describe = Describer(index.manifest, kind, weights_dir=config.weights,
                              max_pixels=config.max_pixels or index.manifest.settings.max_pixels)
    self.rows = int(index.database.shape[0])
    self._batcher = Batcher(index.database)
    # Thread-safe; two requests for a row not yet cached may both read it (same result).
    self._picture = functools.lru_cache(maxsize=_CACHED_ROWS)(self._read_picture)
    # Compiled before the first request: the query step, and a search with the default k.
    size = decode._size(index.manifest.settings.image_size)
    warm = self.describe(np.zeros((1, *size, 3), np.uint8))
    self._batcher.topk(warm[0], -1, min(config.k, self.rows))

  def info(self) -> dict[str, Any]:
    return {"index": self.config.index, "kind": self.config.kind, "rows": self.rows,
            "model": self.index.manifest.settings.backbone, "k": self.config.k,
            "max_k": self.config.max_k, "max_upload_bytes": self.config.max_upload_bytes,
            "images": self.index.images.describe(), "path_queries": self._folder() is not None}

  # -- requests to queries --

  def check_k(self, k: Any) -> int:
    value = self.config.k if k is None else _integer(k, "k must be a positive integer")
    if value < 1 or value > self.config.max_k:
      raise RequestError(400, f"k must be between 1 and {self.config.max_k}, got {_shown(value)}")
    return value

  def check_row(self, row: Any) -> int:
    value = _integer(row, "row must be an integer")
    if not 0 <= value < self.rows:
      raise RequestError(404, f"row {_shown(value)} is not a row of the index (0..{self.rows - 1})")
    return value

  def _folder(self) -> str | None:
    images = self.index.images
    return images.root if images.source.type == index_images.FOLDER and images.root else None

  def path_query(self, path: str, k: int, exclude_self: bool) -> Query:
    """A query by a file inside the index's image folder (relative to it, absolute, or a
    file:// URL); nothing outside it is read."""
    folder = self._folder()
    if folder is None:
      raise RequestError(400, "this index records no image folder: query by row or upload")
    if path.startswith("file://"):
      path = path[len("file://"):]
    elif "://" in path:
      raise RequestError(400, "only files inside the index's image folder are read, not URLs")
    real = inside(path, folder)
    try:
      self.check_size(os.stat(real).st_size)  # before reading: a huge file is not read
      data = decode.read_file(real)
    except FileNotFoundError:
      raise RequestError(404, f"no file {_shown(path)} in the index's image folder") from None
    except OSError as e:
      raise RequestError(400, f"cannot read {_shown(path)}: {e.strerror or type(e).__name__}"
                         ) from None
    self.check_size(len(data))  # it may have grown since
    return Query(k, exclude_self, data=data, name=path,
                 path_row=self.index.row_of(os.path.join(folder, path)))

  def check_size(self, size: int) -> None:
    if size > self.config.max_upload_bytes:
      raise RequestError(413, f"image of {size} bytes exceeds the limit of "
                         f"{self.config.max_upload_bytes} bytes")

  # -- searching --

  def search(self, q: Query) -> tuple[QueryResult, list[str]]:
    """The result of one query as query.search_index gives it, and its notes (k clamped)."""
    notes: list[str] = []
    try:
      k = clamp_k(q.k, self.rows, exclude_self=q.exclude_self, note=notes.append)
    except ValueError as e:
      raise RequestError(400, str(e)) from None
    if q.row >= 0:
      vector, own = np.asarray(self.index.database[q.row], np.float32), q.row
    else:
      try:
        pixels = self.describe.pixels(q.data)
      except ValueError as e:
        raise RequestError(415, f"not a usable image: {e}") from None
      vector, own = self.describe(pixels[None])[0], q.path_row
    d, rows = self._batcher.topk(vector, own if q.exclude_self else -1,
                                 wanted(k, self.rows, q.exclude_self, [own]))
    query = self.index.hit(q.row) if q.row >= 0 else Hit(path=q.name)
    return self.index.result(vector, d, rows, query=query, own=own, kind=self.config.kind, k=k,
                             exclude_self=q.exclude_self, read=lambda: q.data), notes

  def results(self, q: Query, *, view: bool = False) -> dict[str, Any]:
    """launch/search.py --json's dict for one query; with `view`, what the page draws too."""
    result, notes = self.search(q)
    out = results_json([result], index=self.config.index, notes=notes)
    if view:
      out["view"] = self.view(result, q)
    return out

  # -- what the page shows: thumbnails, class marks, colour histograms --

  def _read_picture(self, row: int) -> tuple[bytes, np.ndarray | None, str]:
    """(JPEG thumbnail, colour histogram, error) of a row's image, read once (cached)."""
    from PIL import Image, ImageOps

    try:
      rgb = self.index.images.read_rgb(str(self.index.meta["path"][row]))
    except ImageUnavailable as e:
      return b"", None, str(e)
    small = ImageOps.contain(Image.fromarray(rgb), (_THUMB, _THUMB), Image.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=85)
    return buf.getvalue(), evaluation.color_histogram(rgb), ""

  def thumbnail(self, row: int) -> bytes:
    jpeg, _, error = self._picture(self.check_row(row))
    if error:
      raise RequestError(404, error)
    return jpeg

  def view(self, result: QueryResult, q: Query) -> dict[str, Any]:
    """Per hit its class mark (report.MARKS) and colour-histogram distance to the query,
    and every histogram (the report's figures, for the page to draw)."""
    from cbir_jax import report

    if q.row >= 0:
      q_hist = self._picture(q.row)[1]
    else:
      try:
        q_hist = evaluation.color_histogram(index_images.decode_rgb(q.data))
      except ValueError:
        q_hist = None
    hits = []
    for h in result.hits:
      hist = self._picture(h.row)[1]
      dist = (None if hist is None or q_hist is None else
              float(evaluation.histogram_distance(q_hist, hist)))
      hits.append({"row": h.row, "mark": report.mark(result.query, h, self_row=result.self_row),
                   "hist_distance": dist, "hist": _rounded(hist)})
    return {"query_hist": _rounded(q_hist), "query_label": result.query.label,
            "self_row": result.self_row if result.self_row >= 0 else None,
            "self_match": result.self_match, "hits": hits,
            "colours": {m: "#%02x%02x%02x" % c for m, c in report.MARKS.items()}}


def _rounded(hist: np.ndarray | None) -> list[float] | None:
  return None if hist is None else [round(float(v), 4) for v in hist]


# --- HTTP ----------------------------------------------------------------------------------------

_MULTIPART_SLACK = 64 * 1024  # multipart framing around the image: boundaries, part headers
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _flag(value: str | None, name: str) -> bool:
  v = (value or "").strip().lower()
  if v in _TRUE or v in _FALSE:
    return v in _TRUE
  raise RequestError(400, f"{name} must be true or false, got {_shown(value)}")


def _limited(receive: Callable, limit: int, shown: int) -> Callable:
  """`receive` that refuses a request body past `limit` bytes (413) as it arrives, so a huge
  upload without Content-Length is not read into memory either; `shown` is the limit the
  reason names (the image's, without the multipart framing)."""
  seen = 0

  async def wrapped() -> dict[str, Any]:
    nonlocal seen
    message = await receive()
    if message.get("type") == "http.request":
      seen += len(message.get("body", b""))
      if seen > limit:
        raise RequestError(413, f"request body exceeds the limit of {shown} bytes")
    return message

  return wrapped


async def _upload(request: Any, limit: int) -> tuple[bytes, str]:
  """(bytes, name) of the image a POST carries: a multipart form's "image" field, or the
  raw body (any other content type)."""
  from starlette.requests import Request

  length = request.headers.get("content-length")
  if length is not None and length.isdigit() and int(length) > limit + _MULTIPART_SLACK:
    raise RequestError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")
  request = Request(request.scope, _limited(request.receive, limit + _MULTIPART_SLACK, limit))
  if request.headers.get("content-type", "").startswith("multipart/form-data"):
    async with request.form(max_files=1, max_fields=8) as form:
      part = form.get("image")
      if part is None or isinstance(part, str):
        raise RequestError(400, 'the form has no file field "image"')
      return await part.read(), part.filename or "upload"
  return await request.body(), request.query_params.get("name") or "upload"


def app(service: Service) -> Any:
  """The Starlette application: the page, the search API and row thumbnails.

  GET /api/search?row=N | ?path=P, POST /api/search (an image), with k=, exclude_self= and
  view= (the page's marks and histograms); GET /thumb/N; GET /api/info; GET / (the page).
  Refusals are {"error": one line} with a 4xx status.
  """
  from starlette.applications import Starlette
  from starlette.concurrency import run_in_threadpool
  from starlette.exceptions import HTTPException
  from starlette.responses import FileResponse, JSONResponse, Response
  from starlette.routing import Route

  async def refused(request: Any, exc: Exception) -> Any:
    status = getattr(exc, "status", None) or getattr(exc, "status_code", 400)
    reason = str(getattr(exc, "detail", "") or exc).splitlines()[0]
    return JSONResponse({"error": reason}, status_code=status)

  async def search_endpoint(request: Any) -> Any:
    params = request.query_params
    k = service.check_k(params.get("k"))
    exclude_self = _flag(params.get("exclude_self"), "exclude_self")
    view = _flag(params.get("view"), "view")
    if request.method == "POST":
      if "row" in params or "path" in params:
        raise RequestError(400, "give one query: an uploaded image, row= or path=")
      data, name = await _upload(request, service.config.max_upload_bytes)
      service.check_size(len(data))
      if not data:
        raise RequestError(400, "the upload is empty")
      q = Query(k, exclude_self, data=data, name=name)
    elif ("row" in params) == ("path" in params):
      raise RequestError(400, "give one query: row= or path= (or POST an image)")
    elif "row" in params:
      q = Query(k, exclude_self, row=service.check_row(params["row"]))
    else:
      q = await run_in_threadpool(service.path_query, params["path"], k, exclude_self)
    return JSONResponse(await run_in_threadpool(service.results, q, view=view))

  async def thumb(request: Any) -> Any:
    jpeg = await run_in_threadpool(service.thumbnail, request.path_params["row"])
    return Response(jpeg, media_type="image/jpeg",
                    headers={"Cache-Control": "max-age=3600"})

  async def info(request: Any) -> Any:
    return JSONResponse(service.info())

  async def page(request: Any) -> Any:
    return FileResponse(os.path.join(_STATIC, "index.html"), media_type="text/html")

  async def failed(request: Any, exc: Exception) -> Any:  # a bug: still one line (logged too)
    return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

  return Starlette(routes=[Route("/", page), Route("/api/info", info),
                           Route("/api/search", search_endpoint, methods=["GET", "POST"]),
                           Route("/thumb/{row}", thumb)],
                   exception_handlers={RequestError: refused, HTTPException: refused,
                                       Exception: failed})


def bind(host: str, port: int) -> socket.socket:
  """A listening socket on host:port (port 0: a free one), IPv4 or IPv6."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  try:  # SO_REUSEADDR set, the socket closed if it cannot bind
    return socket.create_server((host, port), family=family, backlog=128)
  except OSError as e:
    raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def run(config: ServeConfig, *, log: Callable[[str], None]) -> None:
  """launch/serve.py: loads the index and its weights, then serves until interrupted."""
  import uvicorn

  if not 1 <= config.k <= config.max_k:
    raise ValueError(f"--k must be between 1 and --max_k={config.max_k}, got {config.k}")
  if config.max_upload_bytes < 1 or not 0 <= config.port < 65536 or config.max_pixels < 0:
    raise ValueError("--max_upload_bytes must be positive, --port 0..65535, --max_pixels >= 0")
  service = Service(config)
  if service.kind_note:
    log(service.kind_note)
  sock = bind(config.host, config.port)
  host, port = sock.getsockname()[:2]
  shown = f"[{host}]" if ":" in host else host
  log(f"{service.rows} rows of {config.index} ({service.config.kind}); images: "
      f"{service.index.images.describe()}")
  log(f"serving on http://{shown}:{port}/")
  server = uvicorn.Server(uvicorn.Config(app(service), log_level="warning", access_log=False))
  server.run(sockets=[sock])


__all__ = ["Describer", "Query", "RequestError", "ServeConfig", "Service", "app", "bind", "inside",
           "run"]
