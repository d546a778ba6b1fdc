r"""Tables of docs/results.md made from `launch/evaluate.py --json` files of the same queries.

  python docs/compare.py paired food7_vgg.json spoc:conv gem:conv      # conv - spoc, ...
  python docs/compare.py dtype food7_vgg.json food7_vgg_bf16.json       # float32 vs bfloat16
  python docs/compare.py shares out/vgg_food7_f32 [--balance_from=out/vgg_imnet_f32]
  python docs/compare.py sweep out/vgg_food7_f32 --last_shares=0.2,0.5,0.8,1
Differences are per query (paired), with their standard error over the queries.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from cbir_jax import balance, evaluation


_PER_QUERY = ("per_query_hist_distance", "per_query_precision", "per_query_ap")


def _load(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def _pm(d: evaluation.PairedDifference, digits: int) -> str:
  return f"{d.mean:+.{digits}f} +- {d.se:.{digits}f}"


def paired(report: dict[str, Any], pairs: list[str], without_label: str = "") -> str:
  """Markdown rows: per pair a:b, b - a in hist dist@k, P@k and AP (over the queries whose
  label is not `without_label`, when given)."""
  k = report["k"]
  keep = np.array([q["label"] != without_label for q in report["queries"]])
  lines = [f"| b - a | hist dist@{k} | P@{k} | AP | queries where b is closer / farther in "
           "colour |", "|---|---:|---:|---:|---:|"]
  for pair in pairs:
    a, b = (report["results"][name] for name in pair.split(":"))
    a, b = ({f: np.array(r[f], dtype=object)[keep].tolist() for f in _PER_QUERY} for r in (a, b))
    cols = [_pm(evaluation.paired_difference(a[f], b[f]), digits)
            for f, digits in zip(_PER_QUERY, (4, 3, 3))]
    hist = np.array(b["per_query_hist_distance"]) - np.array(a["per_query_hist_distance"])
    cols.append(f"{np.mean(hist < 0):.0%} / {np.mean(hist > 0):.0%}")
    first, second = pair.split(":")
    lines.append(f"| {second} - {first} | " + " | ".join(cols) + " |")
  return "\n".join(lines)


def dtype(a: dict[str, Any], b: dict[str, Any]) -> str:
  """Markdown rows: per kind, P@k / mAP / hist dist@k in each run and the top-k agreement."""
  if [q["path"] for q in a["queries"]] != [q["path"] for q in b["queries"]]:
    raise SystemExit("the two evaluations have different queries (or rows in another order)")
  k = a["k"]
  lines = [f"| kind | P@{k} a / b | mAP a / b | hist dist@{k} a / b | top-{k} set unchanged "
           f"| top-{k} overlap | first result unchanged | hist dist@{k} b - a |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for kind, ra in a["results"].items():
    if kind == evaluation.RANDOM or kind not in b["results"]:
      continue
    rb = b["results"][kind]
    same = evaluation.topk_agreement(ra["top_k"], rb["top_k"])
    overlap = evaluation.topk_overlap(ra["top_k"], rb["top_k"])
    first = evaluation.topk_agreement(np.array(ra["top_k"])[:, :1], np.array(rb["top_k"])[:, :1])
    hist = evaluation.paired_difference(ra["per_query_hist_distance"],
                                        rb["per_query_hist_distance"])
    lines.append(
        f"| {kind} | {ra['precision_at_k']:.3f} / {rb['precision_at_k']:.3f} | "
        f"{ra['map']:.3f} / {rb['map']:.3f} | {ra['hist_distance']:.4f} / "
        f"{rb['hist_distance']:.4f} | {same.mean():.1%} ({same.sum()}/{len(same)}) | "
        f"{overlap.mean():.3f} | {first.mean():.1%} | {_pm(hist, 4)} |")
  return "\n".join(lines)


def shares(index: str, balance_from: str = "", seed: int = 1) -> str:
  """Markdown rows: each block's share of Conv's mean L1 before and after balancing.

  The scales are learned (balance.block_scales: seed 0) from `balance_from` or `index`; the
  shares are measured on another sample of `index`'s pairs (`seed`), so "after" shows how
  equal they are on pairs the scales were not fitted to.
  """
  import cbir_jax
  from cbir_jax import backbones, store

  name = store.read_manifest(index)["backbone"]
  dims = backbones.get(name).block_channels
  x, _ = cbir_jax.load_descriptors(index, "conv")
  source = balance_from or index
  scales = balance.index_scales(index, balance_from or None, conv=x)
  pairs = balance.sample_pairs(len(x), balance.DEFAULT_NUM_PAIRS, seed)
  before = balance.block_l1(x, dims, pairs)
  after = balance.block_l1(balance.apply(x, scales), dims, pairs)

  def pct(m: np.ndarray) -> str:
    return " / ".join(f"{v / m.sum():.0%}" for v in m)

  return "\n".join([
      "| index | scales from | blocks | mean L1 before | shares before | scales | shares after "
      "| mean L1 after |", "|---|---|---|---:|---|---|---|---:|",
      f"| {index} | {source} | {'+'.join(map(str, dims))} | {before.sum():.4g} | {pct(before)} "
      f"| {' / '.join(f'{v:.3g}' for v in scales.scales)} | {pct(after)} | {after.sum():.4g} |"])


def sweep(index: str, last_shares: list[float], label_column: str = "label", k: int = 5) -> str:
  """Markdown rows: the protocol on Conv scaled so that the last block has share w of the mean
  L1 and the other blocks (1 - w) / (B - 1) each; w = 1 / B is balanced Conv."""
  import cbir_jax
  from cbir_jax import backbones, store
  from cbir_jax.index_images import IndexImages, input_of

  manifest = store.read_manifest(index)
  dims = backbones.get(manifest["backbone"]).block_channels
  x, meta = cbir_jax.load_descriptors(index, "conv")
  arrays = {}
  for w in last_shares:
    shares = [(1 - w) / (len(dims) - 1)] * (len(dims) - 1) + [w]
    arrays[f"{w:.0%}"] = balance.apply(x, balance.block_scales(x, dims, shares=shares))
  labels, _ = evaluation.labels_from_metadata(meta, label_column)
  ev = evaluation.evaluate_arrays(
      arrays, labels, [str(p) for p in meta["path"]], k=k, random_baseline=False,
      queries=evaluation.select_queries(labels, None, 0), images=IndexImages(input_of(manifest)))
  cutoffs = [c for c in evaluation.PRECISION_CUTOFFS if c in ev.cutoffs]  # 10 < N only
  lines = [f"| last block's share of Conv's L1 | hist dist@{k} | "
           + " | ".join(f"P@{c}" for c in cutoffs) + " | mAP |",
           "|---:|---:|" + "---:|" * (len(cutoffs) + 1)]
  for r in ev.results:
    lines.append(f"| {r.kind} | {r.hist_distance:.4f} | " + " | ".join(
        f"{r.precision[c]:.3f}" for c in cutoffs) + f" | {r.mean_ap:.3f} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="what", required=True)
  p = sub.add_parser("paired", help="b - a per query for kinds a:b of one evaluation")
  p.add_argument("json")
  p.add_argument("pairs", nargs="+", help="a:b, e.g. conv:spoc")
  p.add_argument("--without_label", default="", help="leave out queries of this label")
  d = sub.add_parser("dtype", help="the same kinds in two evaluations (e.g. two dtypes)")
  d.add_argument("a")
  d.add_argument("b")
  sh = sub.add_parser("shares", help="blocks' shares of Conv's L1, before and after balancing")
  sh.add_argument("index")
  sh.add_argument("--balance_from", default="", help="learn the scales from this index")
  sw = sub.add_parser("sweep", help="Conv with the last block at given shares of the L1")
  sw.add_argument("index")
  sw.add_argument("--last_shares", required=True, help="comma-separated, e.g. 0.2,0.5,1")
  sw.add_argument("--label_column", default="label")
  args = parser.parse_args()
  if args.what == "paired":
    print(paired(_load(args.json), args.pairs, args.without_label))
  elif args.what == "sweep":
    print(sweep(args.index, [float(v) for v in args.last_shares.split(",")], args.label_column))
  elif args.what == "shares":
    print(shares(args.index, args.balance_from))
  else:
    print(dtype(_load(args.a), _load(args.b)))


if __name__ == "__main__":
  main()
