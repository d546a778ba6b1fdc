"""Filesystem helpers shared by tests."""
from __future__ import annotations

import os


def rmtree_deep(top) -> None:
  """Removes a tree of any depth (shutil.rmtree, and so pytest's cleanup, recurse)."""
  stack, folders = [str(top)], []
  while stack:
    d = stack.pop()
    folders.append(d)
    for e in os.scandir(d):
      if e.is_dir(follow_symlinks=False):
        stack.append(e.path)
      else:
        os.unlink(e.path)
  for d in reversed(folders):
    os.rmdir(d)
