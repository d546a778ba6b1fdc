"""Runs launch/extract.py as if this host's copy of the input folder differed (test-only).

  python other_view.py --hide=a/img_0007.png -- [launch/extract.py flags]
  python other_view.py --restamp=a/img_0007.png -- [launch/extract.py flags]

--hide leaves a file out of the listing (this host's copy lacks it); --restamp gives one
file another size and modification time (this host's copy of it differs). Everything else
is the real job, so two processes on one machine meet, compare and refuse as on two hosts
that mount different copies at the same path.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import runpy
import sys

LAUNCHER = pathlib.Path(__file__).resolve().parents[2] / "launch" / "extract.py"


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--hide", default="")
  p.add_argument("--restamp", default="")
  args, rest = p.parse_known_args()
  rest = [a for a in rest if a != "--"]

  from cbir_jax import input_pipeline
  from cbir_jax.job import identity

  listing, stamp = input_pipeline.list_folder, identity.file_stamp

  def list_folder(root):
    found = listing(root)
    return dataclasses.replace(found, records=[
        r for r in found.records
        if pathlib.PurePath(os.path.relpath(r.key, root)).as_posix() != args.hide])

  def file_stamp(path, content_digest=False):
    s = stamp(path, content_digest)
    if args.restamp and path.endswith(args.restamp):
      size, mtime = s.split(":")[:2]
      s = f"{int(size) + 1}:{int(mtime) + 3_600_000_000_000}"
    return s

  input_pipeline.list_folder, identity.file_stamp = list_folder, file_stamp
  sys.argv = [str(LAUNCHER), *rest]
  runpy.run_path(str(LAUNCHER), run_name="__main__")


if __name__ == "__main__":
  main()
