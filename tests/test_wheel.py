"""The package as users install it: a wheel built from this checkout, in a fresh venv.

The venv gets the wheel alone (no checkout on sys.path, no editable finder); its
dependencies come from the test environment's site-packages through a .pth line, so the
test needs no package index and checks what the wheel itself carries: code, shipped weights,
sample photos, class names and the `cbir-*` console scripts.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import sysconfig

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(cmd, **kw):
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
  assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
  return r


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> pathlib.Path:
  tmp = tmp_path_factory.mktemp("wheel")
  # pip run outside the checkout and without PYTHONPATH: the checkout's cbir_jax.egg-info
  # would otherwise count as an installed cbir-jax, and the wheel would not be installed.
  env = _env(tmp)
  _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "-w", str(tmp / "dist"), str(REPO)], cwd=tmp, env=env)
  [wheel] = (tmp / "dist").glob("cbir_jax-*.whl")
  venv = tmp / "venv"
  _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=env)
  _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
        "--no-deps", str(wheel)], cwd=tmp, env=env)
  site = _run([str(venv / "bin" / "python"), "-c",
               "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp,
              env=env).stdout.strip()
  # Dependencies (jax, flax, ...) from the environment running the tests; a plain path line,
  # so that .pth files there (the checkout's editable install) are not run.
  (pathlib.Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  return venv


def _env(tmp: pathlib.Path) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "CBIR_JAX_WEIGHTS_DIR", "CBIR_JAX_TEST_BACKBONES")}
  env["HOME"] = str(tmp)
  return env


def test_wheel_installs_commands_weights_and_samples(wheel_venv, tmp_path):
  py = str(wheel_venv / "bin" / "python")
  env = _env(tmp_path)
  where = _run([py, "-c", "import cbir_jax, cbir_jax.weights as w, cbir_jax.samples as s; "
                "print(cbir_jax.__file__); print(w.default_weights_dir('efficientnet_lite0')); "
                "print(s.SAMPLE_IMAGES_DIR)"], cwd=tmp_path, env=env).stdout.split()
  assert all(p.startswith(str(wheel_venv)) for p in where), where  # nothing from the checkout
  images = pathlib.Path(where[2])
  assert (images / "chelsea.jpg").is_file()
  out = tmp_path / "index"
  _run([str(wheel_venv / "bin" / "cbir-extract"), f"--images={images}", f"--output={out}"],
       cwd=tmp_path, env=env)
  res = _run([str(wheel_venv / "bin" / "cbir-search"), f"--index={out}",
              f"--query={images / 'chelsea.jpg'}", "--k=3", "--json"], cwd=tmp_path, env=env)
  doc = json.loads(res.stdout)
  [first, *_] = [r for r in doc["results"] if r["rank"] == 1]
  # The query is in the index: its own row comes first, at distance 0.
  assert pathlib.Path(first["path"]).name == "chelsea.jpg" and first["distance"] < 1e-5
  # The same through `python -m cbir_jax`.
  res = _run([py, "-m", "cbir_jax", "search", f"--index={out}", "--query_ids=0", "--k=2",
              "--json"], cwd=tmp_path, env=env)
  assert json.loads(res.stdout)["results"][0]["row"] == 0
