"""One query against a 100k-row index: read once (the default) vs verified on every load.

Until the job engine recorded its checksums when a job finished, every search hashed
the whole index and scanned it for NaN before reading it a third time; that is what
`load_descriptors(..., verify=True)` still does on request. This script makes a
100,000 x 1472 conv index from a real 10-image one (the bundled photos, tiled, with
random non-negative descriptors and a manifest rewritten to match), then times one
query by row, alternating the two ways in one process (warm page cache for both).

  python docs/search_read_once.py [--rows=100000] [--repeats=3]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cbir_jax import query, search, store  # noqa: E402


def _sha(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def make_index(out: pathlib.Path, rows: int) -> None:
  """A real extraction of the bundled photos, grown to `rows` rows."""
  subprocess.run([sys.executable, str(REPO / "launch/extract.py"),
                  f"--images={REPO / 'cbir_jax/sample_images'}", f"--output={out}",
                  "--kinds=conv"], check=True, capture_output=True)
  d = out / "descriptors"
  small = np.load(d / "conv.npy")
  rng = np.random.default_rng(0)
  np.save(d / "conv.npy", rng.random((rows, small.shape[1]), dtype=np.float32))
  with np.load(d / "meta.npz", allow_pickle=False) as z:
    meta = {c: z[c] for c in z.files}
  reps = -(-rows // len(meta["row"]))
  meta = {c: np.tile(v, reps)[:rows] for c, v in meta.items()}
  meta["row"] = np.arange(rows, dtype=meta["row"].dtype)
  np.savez(d / "meta.npz", **meta)
  m = json.loads((out / "manifest.json").read_text())
  m["rows"] = rows
  for entry, name in ((m["consolidated"]["conv"], "conv.npy"), (m["metadata"], "meta.npz")):
    entry.update(rows=rows, bytes=(d / name).stat().st_size, sha256=_sha(d / name))
  (out / "manifest.json").write_text(json.dumps(m, indent=1))


def one_query(index: pathlib.Path, verify: bool) -> float:
  t = time.perf_counter()
  if verify:  # what every search did before: hash + NaN scan, then the search reads it
    _, db, _ = store.open_index(index, "conv", verify=True)
    search.l1_topk(np.asarray(db[:1], np.float32), db, 5)
  else:
    query.search_index(str(index), kind="conv", k=5, query_ids=[0])
  return time.perf_counter() - t


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, default=100_000)
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    index = pathlib.Path(tmp) / "index"
    make_index(index, a.rows)
    one_query(index, False)  # compiles the search once; warms the page cache
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(a.repeats):
      for verify in (True, False):
        times[verify].append(one_query(index, verify))
    for verify in (True, False):
      label = "verified on every load (before)" if verify else "read once (default)"
      print(f"{label:34s} " + " ".join(f"{t:.2f}" for t in times[verify])
            + f" s; median {np.median(times[verify]):.2f} s")
    print(f"ratio of medians: {np.median(times[True]) / np.median(times[False]):.2f}x"
          f" ({a.rows} x {np.load(index / 'descriptors/conv.npy', mmap_mode='r').shape[1]})")


if __name__ == "__main__":
  main()
