"""A free local port pair for tests that start a job's coordinator (it listens on P and P+1)."""
from __future__ import annotations

import socket


def free_port_pair() -> int:
  """A port P with P and P+1 free on 127.0.0.1 (tests/conftest.py puts this folder on sys.path)."""
  for _ in range(50):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    if port >= 65534:  # P+1 must be a port too
      continue
    try:
      with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", port))
        b.bind(("127.0.0.1", port + 1))
      return port
    except OSError:
      continue
  raise RuntimeError("no free port pair")
