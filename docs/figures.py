r"""The figures of docs/results.md like the paper's Figs. 3-10: a query, one row per kind.

  python docs/figures.py --index=out/vgg_food7_f32 --name=food7_vgg16 --out=docs/img
Draws --num_queries rows of the index with numpy default_rng(--seed) (not picked for the
effect) and writes <name>_q<row>.png per query: cbir_jax.report's PNG, in 256 colours.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
from PIL import Image

from cbir_jax import report, store


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--index", required=True, help="extraction output directory")
  parser.add_argument("--name", required=True, help="file name prefix, e.g. food7_vgg16")
  parser.add_argument("--out", required=True, help="folder of the PNGs")
  parser.add_argument("--title", default="", help="title prefix (default: --name)")
  parser.add_argument("--kinds", default="", help="comma-separated (default: every kind)")
  parser.add_argument("--num_queries", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--k", type=int, default=5)
  parser.add_argument("--thumb", type=int, default=128, help="thumbnail box, pixels")
  args = parser.parse_args()
  manifest = store.read_manifest(args.index)
  kinds = args.kinds.split(",") if args.kinds else list(manifest["settings"]["kinds"])
  _, meta = store.load_descriptors(args.index, kinds[0])
  rows = np.random.default_rng(args.seed).choice(len(meta["path"]), args.num_queries,
                                                 replace=False)
  os.makedirs(args.out, exist_ok=True)
  for row in rows.tolist():
    with tempfile.TemporaryDirectory() as tmp:
      title = f"{args.title or args.name}: row {row}, top {args.k} per descriptor kind"
      written = report.write_kinds_report(tmp, args.index, row, kinds=kinds, k=args.k,
                                          thumb=args.thumb, title=title)
      png = os.path.join(args.out, f"{args.name}_q{row}.png")
      with Image.open(written["png"]) as sheet:  # 256 colours: a tenth of the size
        sheet.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(png, optimize=True)
    print(f"{png} ({os.path.getsize(png) // 1024} KiB)")


if __name__ == "__main__":
  main()
