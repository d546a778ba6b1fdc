"""Inputs shared by the robustness tests: tiny weights, small image folders, job settings.

A plain module (not conftest.py) so that test modules can import it by a name
no other test directory uses.
"""
from __future__ import annotations

TINY_MODEL = "vgg_tiny"  # test-only backbone (cbir_jax.backbones): the job's structure, tiny cost
TINY_SIZE = 32


def make_tiny_weights(directory, seed: int = 0):
  """A vgg_tiny weights directory written by the product's own `checkpoint.save`.

  He-normal kernels from NumPy: `--weights=random` would spend most of a short
  job compiling Flax's initialisers.
  """
  import jax
  import numpy as np

  from cbir_jax import backbones, checkpoint
  from cbir_jax import preprocessing as pp

  rng = np.random.default_rng(seed)

  def make(path, s):
    if jax.tree_util.keystr(path).endswith("['bias']"):
      return (0.01 * rng.standard_normal(s.shape)).astype(np.float32)
    fan_in = int(np.prod(s.shape[:-1]))
    return (rng.standard_normal(s.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(make, backbones.get(TINY_MODEL).param_shapes(TINY_SIZE))
  checkpoint.save(directory, params, checkpoint.WeightsInfo(model=TINY_MODEL,
                                                            preprocessing=pp.TORCHVISION))
  return directory


def write_small_images(folder, n: int, seed: int = 0, classes=("a", "b")) -> list:
  """n small PNGs (40x40, smooth random colours) in one subfolder per class, sorted paths."""
  import numpy as np
  from PIL import Image

  rng = np.random.default_rng(seed)
  paths = []
  for i in range(n):
    d = folder / classes[i % len(classes)]
    d.mkdir(parents=True, exist_ok=True)
    a = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    p = d / f"img_{i:04d}.png"
    Image.fromarray(a).resize((40, 40), Image.BILINEAR).save(p)
    paths.append(str(p))
  return sorted(paths)


def job_config(images, output, weights, **overrides):
  from cbir_jax import extract

  kw = dict(output=str(output), images=str(images), model=TINY_MODEL, weights=str(weights),
            image_size=TINY_SIZE, shard_size=20, batch_size=2, num_threads=2, progress="none")
  kw.update(overrides)
  return extract.ExtractConfig(**kw)


def job_command(images, output, weights, *extra: str) -> list[str]:
  """launch/extract.py with the settings of `job_config` (keep the two in step)."""
  import pathlib
  import sys

  repo = pathlib.Path(__file__).resolve().parents[2]
  return [sys.executable, str(repo / "launch" / "extract.py"), f"--images={images}",
          f"--output={output}", f"--model={TINY_MODEL}", f"--weights={weights}",
          f"--image_size={TINY_SIZE}", "--shard_size=20", "--batch_size=2", "--num_threads=2",
          "--draft", "--progress=log", "--log_every_s=2", *extra]  # --draft: the config default


NUM_IMAGES = 300  # the kill-and-resume collection: 15 shards of 20
