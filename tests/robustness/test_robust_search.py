"""Hostile search and evaluation inputs: indexes that do not match their manifest, bad queries.

Each damaged index is checked at the library (`load_descriptors`, `l1_topk`):
an error that names the problem; and, for one case of each sort, through the
launchers (launch/search.py, launch/evaluate.py, run as subprocesses): a
non-zero exit with a one-line message, not a traceback.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
import shutil
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest

from cbir_jax import search, store
from cbir_jax import query as query_lib


REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def indexes(baseline):
  """The suite's finished extraction (300 rows, shards of 20) as written: parts per kind
  (the shards' files), one metadata table, one failure list."""
  return {"index": baseline[0]}


def _rows(index: pathlib.Path) -> int:
  return int(json.loads((index / store.MANIFEST).read_text())["rows"])


def _sha(p: pathlib.Path) -> str:
  return hashlib.sha256(p.read_bytes()).hexdigest()


def _edit_manifest(d: pathlib.Path, fn: Callable[[dict], None]) -> None:
  m = json.loads((d / store.MANIFEST).read_text())
  fn(m)
  (d / store.MANIFEST).write_text(json.dumps(m))


def _rehash(d: pathlib.Path, rel: str) -> None:
  """Makes the manifest's checksum of `rel` match the file again (a consistent forgery)."""
  digest = _sha(d / rel)

  def fix(m):
    for parts in m.get("parts", {}).values():
      for c in parts:
        if c["file"] == rel:
          c["sha256"] = digest
    for s in m["shards"]:
      name = rel.removeprefix(s["dir"] + "/")
      if name in s.get("files", {}):
        s["files"][name]["sha256"] = digest
  _edit_manifest(d, fix)


def _set_npy(path: pathlib.Path, fn: Callable[[np.ndarray], np.ndarray]) -> None:
  a = np.load(path)
  np.save(path, fn(a.copy()))


# --- the damages -----------------------------------------------------------------------------


def missing_part(d):
  (d / "fc_conv" / "part-000001.npy").unlink()


def wrong_row_count(d):
  _edit_manifest(d, lambda m: m["parts"]["fc_conv"][1].update(
      rows=m["parts"]["fc_conv"][1]["rows"] + 1))


def meta_missing(d):
  (d / "metadata.parquet").unlink()


def meta_changed(d):
  from cbir_jax import index
  cols = index.read_metadata(d / "metadata.parquet")
  cols["label"] = 1 - cols["label"]  # a valid table with other labels: only the checksum tells
  with open(d / "metadata.parquet", "wb") as f:
    index.write_metadata(f, cols)


def meta_rows(d):
  _edit_manifest(d, lambda m: m["metadata"].update(rows=m["metadata"]["rows"] + 1))


def part_changed(d):
  _set_npy(d / "fc_conv" / "part-000000.npy",
           lambda a: (a.__setitem__((3, 0), a[3, 0] + 1), a)[1])


def nan_part(d):
  _set_npy(d / "fc_conv" / "part-000000.npy", lambda a: (a.__setitem__((5, 2), np.nan), a)[1])
  _rehash(d, "fc_conv/part-000000.npy")


def nan_later_part(d):
  _set_npy(d / "fc_conv" / "part-000002.npy", lambda a: (a.__setitem__((1, 0), np.nan), a)[1])
  _rehash(d, "fc_conv/part-000002.npy")


def short_part(d):
  _set_npy(d / "fc_conv" / "part-000002.npy", lambda a: a[:-1])
  _rehash(d, "fc_conv/part-000002.npy")


def truncated_manifest(d):
  text = (d / store.MANIFEST).read_text()
  (d / store.MANIFEST).write_text(text[: len(text) // 2])


def unfinished(d):
  _edit_manifest(d, lambda m: m.update(status="running"))


@dataclasses.dataclass
class Damage:
  name: str
  index: str  # which fixture index to copy
  apply: Callable[[pathlib.Path], None]
  pattern: str  # the error must match this (library and launchers)
  search: bool = False  # also run launch/search.py on it
  evaluate: bool = False  # also run launch/evaluate.py on it


DAMAGES = [
    Damage("index: manifest lists a shard that is missing", "index", missing_part,
           r"part-000001.*missing", search=True),
    Damage("index: manifest row count differs from the shard", "index", wrong_row_count,
           r"part-000001.*rows.*manifest says"),
    Damage("index: row metadata file (descriptors/meta.npz) missing", "index",
           meta_missing, r"metadata\.parquet.*missing", search=True),
    Damage("index: row metadata changed (labels), same columns", "index",
           meta_changed, r"metadata\.parquet.*(SHA-256|bytes)"),
    Damage("index: manifest row count differs from the row metadata", "index",
           meta_rows, r"rows"),
    # Checksums are recorded as the shards are written; loading checks them again only
    # when asked (verify=True), so the launchers (which do not ask yet) are not run on this.
    Damage("index: descriptor file does not match its checksum", "index",
           part_changed, r"part-000000\.npy.*SHA-256"),
    Damage("index: NaN in a descriptor file (checksum forged to match)", "index",
           nan_part, r"row 5.*NaN|NaN.*row 5", search=True, evaluate=True),
    Damage("index: NaN in a later part of the descriptors", "index", nan_later_part,
           r"row 41.*NaN"),
    Damage("index: shard descriptor file one row short (checksum forged)", "index", short_part,
           r"part-000002\.npy.*rows.*manifest says"),
    Damage("index: truncated manifest.json", "index", truncated_manifest,
           r"manifest", search=True),
    Damage("index: extraction not finished", "index", unfinished, r"not finished",
           evaluate=True),
]


def _launch(script: str, index: pathlib.Path, *args: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(REPO / "launch" / script), f"--index={index}",
                           *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _one_line_error(proc: subprocess.Popen, prefix: str, pattern: str) -> tuple[bool, str]:
  """(exit != 0, last line `prefix: error: ...` matching `pattern`, no traceback), last line."""
  _, err = proc.communicate(timeout=300)
  lines = [ln for ln in err.splitlines() if ln.strip()]
  last = lines[-1] if lines else ""
  ok = (proc.returncode not in (0, None) and "Traceback" not in err
        and last.startswith(f"{prefix}: error:") and bool(re.search(pattern, last, re.I)))
  return ok, (last if lines else f"exit {proc.returncode}, no message")


def test_damaged_indexes(indexes, tmp_path, hostile):
  """Every damage: a library error naming it, and one-line launcher errors (run in parallel)."""
  procs = []
  lib = {}
  for i, dmg in enumerate(DAMAGES):
    d = tmp_path / f"case{i}"
    shutil.copytree(indexes[dmg.index], d)
    dmg.apply(d)
    try:
      store.load_descriptors(d, "fc_conv", verify=True)
      lib[dmg.name] = (False, "loaded without error")
    except store.StoreError as e:
      lib[dmg.name] = (bool(re.search(dmg.pattern, str(e), re.S)), str(e))
    if dmg.search:
      procs.append((dmg, "search", _launch("search.py", d, "--query_ids=0", "--k=3")))
    if dmg.evaluate:
      procs.append((dmg, "evaluate", _launch("evaluate.py", d, "--kinds=fc_conv",
                                             "--num_queries=4", "--k=3")))
  results = {d.name: [lib[d.name]] for d in DAMAGES}
  for dmg, prefix, proc in procs:
    results[dmg.name].append(_one_line_error(proc, prefix, dmg.pattern))
  failed = []
  for name, checks in results.items():
    ok = all(c[0] for c in checks)
    hostile.check(name, ok, " | ".join(c[1][:160] for c in checks))
    if not ok:
      failed.append((name, checks))
  assert not failed, failed


def test_k_larger_than_n(indexes, hostile):
  d = indexes["index"]
  n = _rows(d)
  db, _ = store.load_descriptors(d, "fc_conv")
  q = np.asarray(db[:2], np.float32)
  checks = []
  for k in (n + 1, 10 ** 6):
    try:
      search.l1_topk(q, db, k)
      checks.append((False, f"k={k} accepted"))
    except ValueError as e:
      checks.append((bool(re.search(rf"k must .*\b{n}\b", str(e))), str(e)))
  # The search launcher shows the whole index instead, and says so in one line.
  searching = _launch("search.py", d, "--query_ids=0", f"--k={n + 1}", "--exclude_self")
  evaluating = _launch("evaluate.py", d, "--kinds=fc_conv", "--num_queries=4", f"--k={n}")
  rc, out, err = _finished(searching)
  ranks = re.findall(r"^ +(\d+) +\d+\.\d{6}  ", out, re.M)
  checks.append((rc == 0 and err.splitlines() == [
      f"search: k={n + 1} is more than the index has ({n} rows, minus the query itself): "
      f"showing all {n - 1}"] and ranks == [str(i) for i in range(1, n)],
      err.strip() or f"exit {rc}"))
  checks.append(_one_line_error(evaluating, "evaluate", rf"k must .*\b{n - 1}\b"))
  ok = all(c[0] for c in checks)
  hostile.check("k larger than N", ok, " | ".join(c[1][:120] for c in checks))
  assert ok, checks


def test_query_of_wrong_dimension(indexes, hostile):
  db, _ = store.load_descriptors(indexes["index"], "fc_conv")
  dim = db.shape[1]
  checks = []
  for fn in (lambda q: search.l1_topk(q, db, 3), lambda q: search.l1_distances(q, db)):
    for bad_dim in (dim - 1, dim + 7):
      try:
        fn(np.zeros((2, bad_dim), np.float32))
        checks.append((False, f"dimension {bad_dim} accepted"))
      except ValueError as e:
        checks.append((bool(re.search(rf"{bad_dim}.*{dim}", str(e))), str(e)))
  try:
    search.l1_topk(np.zeros(dim, np.float32), db, 3)  # a single query without its batch axis
    checks.append((False, "1-D query accepted"))
  except ValueError as e:
    checks.append(("[Q, D]" in str(e), str(e)))
  ok = all(c[0] for c in checks)
  hostile.check("query of the wrong dimension", ok, checks[0][1][:160])
  assert ok, checks


def test_nan_in_queries_and_unverified_database(indexes, hostile):
  """NaN that got past the loader (verify=False) or arrives in a query: still an error."""
  db = np.array(store.load_descriptors(indexes["index"], "fc_conv")[0])
  q = db[:2].copy()
  checks = []
  bad_db = db.copy()
  bad_db[7, 3] = np.nan
  for what, call, pattern in (
      ("database", lambda: search.l1_topk(q, bad_db, 3), r"NaN.*row 7"),
      ("database (all distances)", lambda: search.l1_distances(q, bad_db), r"NaN.*row 7"),
      ("query", lambda: search.l1_topk(np.where(np.arange(q.shape[1]) == 4, np.nan, q), db, 3),
       r"NaN")):
    try:
      call()
      checks.append((False, f"{what}: accepted"))
    except ValueError as e:
      checks.append((bool(re.search(pattern, str(e))), f"{what}: {e}"))
  ok = all(c[0] for c in checks)
  hostile.check("NaN in the database given to the search directly, or in a query", ok,
                " | ".join(c[1][:120] for c in checks))
  assert ok, checks


def test_query_image_on_random_weights_index(many_images, tmp_path):
  """Regression (not a hostile case): an index made with --weights=random must describe
  query images with the job's own random weights, so a database image finds itself."""
  from cbir_jax import extract

  from robust_common import job_config

  folder, paths = many_images
  out = tmp_path / "out"
  sub = tmp_path / "imgs"
  sub.mkdir()
  for p in paths[:10]:
    shutil.copy(p, sub / pathlib.Path(p).name)
  extract.run(job_config(sub, out, "random"), log=lambda m: None)
  query = str(sub / pathlib.Path(paths[3]).name)
  [result] = query_lib.search_index(str(out), query_paths=[query], k=2)
  assert result.hits[0].path == query
  assert result.hits[0].distance < 1e-5


def test_bad_queries_through_launchers(indexes, tmp_path, hostile):
  """Queries that cannot be used, through the launchers (run in parallel): one-line errors."""
  d = indexes["index"]
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"GIF89a but not really")
  missing = tmp_path / "missing.png"
  moved = tmp_path / "weights_moved"
  shutil.copytree(d, moved)
  _edit_manifest(moved, lambda m: m["weights"].update(dir=str(tmp_path / "gone")))
  good_query = str(_any_image(d))
  runs = [
      ("query image that cannot be decoded, or does not exist", "search",
       _launch("search.py", d, f"--query={bad}", f"--query={missing}"),
       r"bad\.jpg: not an image.*missing\.png: cannot read file"),
      ("query id outside the index", "search", _launch("search.py", d, "--query_ids=100000"),
       r"100000.*not rows"),
      ("weights recorded in the index are gone (query image)", "search",
       _launch("search.py", moved, f"--query={good_query}"), r"weights the index was made with"),
      ("evaluation on a label column the index does not have", "evaluate",
       _launch("evaluate.py", d, "--label_column=nope", "--kinds=fc", "--num_queries=3"),
       r"no metadata column 'nope'"),
  ]
  failed = []
  for name, prefix, proc, pattern in runs:
    ok, last = _one_line_error(proc, prefix, pattern)
    hostile.check(name, ok, last[:200])
    if not ok:
      failed.append((name, last))
  assert not failed, failed


def _any_image(index: pathlib.Path) -> pathlib.Path:
  _, meta = store.load_descriptors(index, "fc")
  return pathlib.Path(str(meta["path"][0]))


def _finished(proc: subprocess.Popen) -> tuple[int, str, str]:
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def test_images_gone_or_moved_after_extraction(many_images, tiny_weights, tmp_path, hostile):
  """The index's image folder deleted, moved, partly emptied, or a wrong --image_root:
  evaluation keeps P@k and mAP and says why the histogram column is missing; the report
  draws what it cannot read as grey boxes; a bad --image_root is a one-line error."""
  from cbir_jax import extract

  from robust_common import job_config

  cases = {"gone": "images deleted after extraction (evaluate, search --report)",
           "partial": "one image of the index deleted after extraction (evaluate)",
           "root": "--image_root that is not a folder (evaluate, search --report)"}
  hostile.declare(*cases.values())
  src = tmp_path / "imgs"
  shutil.copytree(many_images[0], src)
  for folder in src.iterdir():  # keep 12 images: 6 per class
    for p in sorted(folder.glob("*.png"))[6:]:
      p.unlink()
  out = tmp_path / "out"
  extract.run(job_config(src, out, tiny_weights), log=lambda m: None)
  moved = tmp_path / "moved"
  shutil.move(str(src), str(moved))
  first = sorted(moved.rglob("*.png"))[0]
  partial = tmp_path / "partial"
  shutil.copytree(moved, partial)
  (partial / first.relative_to(moved)).unlink()
  nowhere = tmp_path / "nowhere"
  ev = ("--kinds=fc_conv", "--k=3")
  runs = {
      "gone": [_launch("evaluate.py", out, *ev),
               _launch("search.py", out, "--query_ids=0", "--k=3", "--exclude_self",
                       f"--report={tmp_path / 'r'}")],
      "partial": [_launch("evaluate.py", out, *ev, f"--image_root={partial}")],
      "root": [_launch("evaluate.py", out, *ev, f"--image_root={nowhere}"),
               _launch("search.py", out, "--query_ids=0", f"--report={tmp_path / 'r2'}",
                       f"--image_root={nowhere}")]}
  checks = {}
  (rc_e, table, _), (rc_s, searched, _) = map(_finished, runs["gone"])
  # P@1, P@3, P@5, P@10 and mAP still there; the histogram column "-".
  p_at_k = re.search(r"^fc_conv\s+\d+(\s+[\d.]+){5}\s+-$", table, re.M)
  checks["gone"] = (rc_e == 0 and rc_s == 0 and bool(p_at_k) and bool(re.search(
      r"hist dist@3: not computed: 12 of 12 images cannot be read.*--image_root", table))
      and "report: 4 images not readable, drawn as grey boxes" in searched,
      (table.splitlines()[-2] if table else "") + " | " + searched[-120:])
  rc, table, err = _finished(runs["partial"][0])
  checks["partial"] = (rc == 0 and bool(re.search(
      rf"not computed: cannot read image .*{re.escape(first.name)}", table)),
      table.splitlines()[-2] if table else err[-200:])
  lines = [_one_line_error(p, name, rf"--image_root {re.escape(str(nowhere))} is not a folder")
           for p, name in zip(runs["root"], ("evaluate", "search"))]
  checks["root"] = (all(ok for ok, _ in lines), " | ".join(last for _, last in lines))
  for key, (ok, how) in checks.items():
    hostile.check(cases[key], ok, how[:240])
  assert all(ok for ok, _ in checks.values()), checks


def test_query_image_that_is_in_the_index(indexes, tmp_path, hostile):
  """--exclude_self with query images that are rows of the index: the stored file itself, a
  byte copy elsewhere, and the same pixels in another format; each finds its row and leaves
  it out (the JSON says which), and the others still get k results."""
  from PIL import Image

  d = indexes["index"]
  _, meta = store.load_descriptors(d, "fc")
  stored = [str(p) for p in meta["path"][[3, 40, 77]]]
  copy = tmp_path / "copy.png"
  shutil.copy(stored[1], copy)
  other = tmp_path / "other_format.bmp"
  Image.open(stored[2]).save(other)
  proc = _launch("search.py", d, f"--query={stored[0]},{copy},{other}", "--k=5",
                 "--exclude_self", "--json")
  rc, out, err = _finished(proc)
  try:
    rows = json.loads(out)["results"]
  except ValueError:
    rows = []
  by_query = [[r for r in rows if r["query"] == q] for q in (stored[0], str(copy), str(other))]
  ok = (rc == 0 and all(len(r) == 5 for r in by_query)
        and [r[0]["self_row"] for r in by_query] == [3, 40, 77]
        and not any(r["row"] == r["self_row"] for r in rows))
  hostile.check("query image that is itself in the index (same file, a copy, other format), "
                "with --exclude_self", ok, err[-200:] or out[:200])
  assert ok, (rc, err[-2000:], [[(r["self_row"], r["row"]) for r in q] for q in by_query])


def test_damaged_or_stale_approximate_index(indexes, tmp_path, hostile):
  """search --ann on an approximate index that no longer fits: one line saying to rebuild."""
  pytest.importorskip("faiss", reason="faiss is in the test extra")
  from cbir_jax import ann

  def fresh(name):
    d = tmp_path / name
    shutil.copytree(indexes["index"], d)
    ann.build(ann.IndexConfig(index=str(d), kind="mac", nlist=4, pca=0), log=lambda m: None)
    return d, ann.ann_dir(d, "mac")

  def stale(d, where):  # a file of the output rewritten, as an --update does
    def bump(node):  # the first checksum the manifest records, in whatever layout
      if isinstance(node, dict) and isinstance(node.get("sha256"), str):
        node["sha256"] = "0" * 64
        return True
      kids = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
      return any(bump(v) for v in kids)
    _edit_manifest(d, lambda m: None if bump(m) else pytest.fail("no checksum in manifest"))

  def truncated(d, where):
    data = (where / ann.INDEX_FILE).read_bytes()
    (where / ann.INDEX_FILE).write_bytes(data[:len(data) // 3])

  def record_garbage(d, where):
    (where / ann.RECORD_FILE).write_text("[]")

  def not_built(d, where):
    shutil.rmtree(where)

  cases = [("approximate index stale (output changed since the build)", stale, "stale"),
           ("approximate index file truncated", truncated, r"index\.faiss"),
           ("approximate index record not an AnnRecord", record_garbage, r"ann\.json"),
           ("--ann without an approximate index", not_built, "no approximate index")]
  runs = []
  for j, (name, damage, pattern) in enumerate(cases):
    d, where = fresh(f"case{j}")
    damage(d, where)
    runs.append((name, _launch("search.py", d, "--kind=mac", "--query_ids=0", "--ann"),
                 f"{pattern}.*launch/index\\.py --index="))
  failed = []
  for name, proc, pattern in runs:
    ok, last = _one_line_error(proc, "search", pattern)
    hostile.check(name, ok, last[:200])
    if not ok:
      failed.append((name, last))
  assert not failed, failed
