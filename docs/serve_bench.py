"""Queries per second of a running query service (launch/serve.py), from a loopback client.

A bounded loop: `--n` searches by row (rows spread over the index) with `--k` results, one
at a time, then the same number from `--clients` threads at once; an upload search for
scale. Prints the figures and the machine's load average (other work slows it).

  python launch/serve.py --index=/tmp/food7_index --port=8765 &
  python docs/serve_bench.py --url=http://127.0.0.1:8765 [--n=300] [--k=10] [--clients=4]
  python docs/serve_bench.py --index=/tmp/food7_index     # the Service alone, no HTTP

With --index, the same loops call `cbir_jax.serve.Service` in this process from threads
(what the HTTP layer adds is the difference), and print the mean batch of searches that ran
as one l1_topk call.
"""
from __future__ import annotations

import argparse
import os
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import httpx


def _loopback(url: str) -> str:
  host = urllib.parse.urlsplit(url).hostname
  if host not in ("127.0.0.1", "localhost", "::1"):
    raise SystemExit(f"measure a service on this machine only (loopback), not {host}")
  return url.rstrip("/")


def _rows(client: httpx.Client, rows: list[int], k: int) -> None:
  for row in rows:
    r = client.get("/api/search", params={"row": row, "k": k})
    r.raise_for_status()
    assert len(r.json()["results"]) == k


def in_process(index: str, n: int, k: int, clients: int) -> None:
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from cbir_jax import serve

  service = serve.Service(serve.ServeConfig(index=index, k=k))
  sizes: list[int] = []
  run = service._batcher._run  # counted, to report the batches

  def counted(group: list) -> None:
    sizes.append(len(group))
    run(group)

  service._batcher._run = counted
  queries = [serve.Query(k, row=(i * 7919) % service.rows) for i in range(n)]
  for q in queries[:10]:
    service.results(q)
  t = time.perf_counter()
  for q in queries:
    service.results(q)
  one = n / (time.perf_counter() - t)
  with ThreadPoolExecutor(clients) as pool:
    list(pool.map(service.results, queries[:clients]))  # this batch shape compiled
    sizes.clear()
    t = time.perf_counter()
    list(pool.map(service.results, queries))
    many = n / (time.perf_counter() - t)
  print(f"in process, {index}: {service.rows} rows, k={k}, {n} searches by row")
  print(f"one thread: {one:.1f} queries/s; {clients} threads: {many:.1f} queries/s "
        f"(mean batch {sum(sizes) / len(sizes):.1f})")
  print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--url", default="http://127.0.0.1:8000")
  ap.add_argument("--n", type=int, default=300)
  ap.add_argument("--k", type=int, default=10)
  ap.add_argument("--clients", type=int, default=4)
  ap.add_argument("--image", help="an image file to time uploads with (optional)")
  ap.add_argument("--index", help="measure cbir_jax.serve.Service on this index in-process")
  args = ap.parse_args()
  if args.index:
    return in_process(args.index, args.n, args.k, args.clients)
  url = _loopback(args.url)
  with httpx.Client(base_url=url, timeout=120) as c:
    info = c.get("/api/info").json()
    rows = [(i * 7919) % info["rows"] for i in range(args.n)]  # spread, repeatable
    _rows(c, rows[:10], args.k)  # warm: connections, first compiles of the search
    t = time.perf_counter()
    _rows(c, rows, args.k)
    one = args.n / (time.perf_counter() - t)
  parts = [rows[i::args.clients] for i in range(args.clients)]

  def worker(part: list[int]) -> None:
    with httpx.Client(base_url=url, timeout=120) as c:
      _rows(c, part, args.k)

  t = time.perf_counter()
  with ThreadPoolExecutor(args.clients) as pool:
    list(pool.map(worker, parts))
  many = args.n / (time.perf_counter() - t)
  print(f"index {info['index']}: {info['rows']} rows, {info['model']}, {info['kind']}; "
        f"k={args.k}, {args.n} searches by row")
  print(f"one client: {one:.1f} queries/s ({1000 / one:.1f} ms each); "
        f"{args.clients} clients: {many:.1f} queries/s")
  if args.image:
    data = open(args.image, "rb").read()
    with httpx.Client(base_url=url, timeout=120) as c:
      times = []
      for _ in range(11):
        t = time.perf_counter()
        c.post("/api/search", params={"k": args.k}, files={"image": ("q", data)}).raise_for_status()
        times.append(time.perf_counter() - t)
    print(f"upload search ({len(data)} bytes): median {1000 * sorted(times[1:])[5]:.0f} ms")
  print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
  main()
