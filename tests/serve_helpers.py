"""What the query-service tests share: a small labelled index of real photos, and a server."""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import threading

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = REPO / "cbir_jax" / "sample_images"
# Two classes of the shipped sample photos (their licences: sample_images/LICENSES.md).
CLASSES = {"things": ("astronaut", "camera", "chelsea", "coffee", "rocket"),
           "textures": ("brick", "grass", "gravel", "hubble_deep_field", "retina")}
MAX_PIXELS = 1_000_000  # the index's bomb limit: small, so a bomb test image stays small
KIND = "conv"


def make_index(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """(index dir, image folder): the ten sample photos in two class folders, extracted with the
  tiny test backbone (random weights, recorded by seed) at 32x32."""
  from cbir_jax import extract

  images = root / "photos"
  for label, names in CLASSES.items():
    (images / label).mkdir(parents=True)
    for name in names:
      shutil.copy(SAMPLES / f"{name}.jpg", images / label / f"{name}.jpg")
  out = root / "index"
  extract.run(extract.ExtractConfig(output=str(out), images=str(images), model="vgg_tiny",
                                    weights="random", image_size=32, batch_size=4,
                                    kinds=(KIND,), max_pixels=MAX_PIXELS, progress="none"),
              log=lambda m: None)
  return out, images


class LauncherServer:
  """launch/serve.py in a subprocess on a free port (--port=0; it prints the address)."""

  def __init__(self, *args: str, timeout: float = 300):
    self.proc = subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "serve.py"), "--port=0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    self.lines: list[str] = []
    found = threading.Event()
    self.url = ""

    def read() -> None:  # keeps the pipe drained for the server's whole life
      for line in self.proc.stdout:
        self.lines.append(line.rstrip())
        if "serving on http://" in line and not self.url:
          self.url = line.split("serving on ", 1)[1].strip().rstrip("/")
          found.set()
      found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout) or not self.url:
      self.close()
      raise RuntimeError("launch/serve.py did not start:\n" + "\n".join(self.lines[-30:]))

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(60)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
