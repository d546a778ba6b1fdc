"""The summary line itself: it must report failures, not just print a count.

Runs a small fake suite with this directory's conftest.py in a separate pytest
process, where one case is handled, one is refused badly, one is never
checked, one is recorded as handled by a test that then fails, and rows are
reported lost and duplicated.
"""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent

FAKE_SUITE = '''
def test_good(hostile):
  hostile.check("handled case", True, "refused politely")

def test_bad(hostile):
  hostile.declare("never checked case")
  hostile.check("badly handled case", False, "crashed")

def test_recorded_then_failed(hostile):
  hostile.check("handled, but its test failed", True)
  hostile.rows(lost=2, duplicated=1)
  assert False

def test_shared_case_one(hostile):
  hostile.check("case checked twice", True)

def test_shared_case_two(hostile):
  hostile.check("case checked twice", False, "second layer failed")
'''


def test_summary_line_counts_failures(tmp_path):
  for name in ("conftest.py", "robust_common.py"):
    shutil.copy(HERE / name, tmp_path / name)
  (tmp_path / "test_fake.py").write_text(FAKE_SUITE)
  r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                      f"--rootdir={tmp_path}", str(tmp_path)],
                     capture_output=True, text=True, cwd=tmp_path, timeout=120)
  assert r.returncode != 0  # the fake suite has failing tests
  lines = r.stdout.splitlines()
  assert ("robustness: 5 hostile cases tried, 1 handled, 2 rows lost, 1 duplicated"
          in lines), r.stdout
  not_handled = [ln for ln in lines if ln.startswith("  NOT handled:")]
  assert len(not_handled) == 4, r.stdout
  assert any("never checked case" in ln and "never checked" in ln for ln in not_handled)
  assert any("badly handled case" in ln and "crashed" in ln for ln in not_handled)
  assert any("handled, but its test failed" in ln and "test failed" in ln
             for ln in not_handled)
  assert any("case checked twice" in ln and "second layer failed" in ln for ln in not_handled)
