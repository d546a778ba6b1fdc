"""The `cbir-search` command's body: a search, its table or JSON, and the report if asked.

Apart from `query` (searching) and `report` (drawing), which it joins, so that neither of
them imports the other.
"""
from __future__ import annotations

import json
from typing import Callable

from cbir_jax import index_images, query, report
from cbir_jax.names import shown


def run(config: query.SearchConfig, *, log: Callable[[str], None],
        out: Callable[[str], None] = print) -> list[query.QueryResult]:
  """`cbir-search`: the search, its table (or JSON) on `out`, and the report if asked.

  Notes (k clamped) go to `log`; the report's lines follow the table on `out`, or go to
  `log` and the JSON's "notes" with --json (so `out` holds nothing but the JSON).
  """
  notes: list[str] = []

  def note(msg: str) -> None:
    notes.append(msg)
    log(msg)

  results = query.search_index(
      config.index, kind=config.kind, k=config.k, query_paths=config.query,
      query_ids=config.query_ids, exclude_self=config.exclude_self,
      image_root=config.image_root, note=note, ann=config.ann, weights=config.weights)
  if not config.json:
    out(query.format_results(results))
  if config.report:
    _write_report(config, results, note if config.json else out)
  if config.json:
    out(json.dumps(query.results_json(results, index=config.index, notes=notes), indent=1))
  return results


def _write_report(config: query.SearchConfig, results: list[query.QueryResult],
                  say: Callable[[str], None]) -> None:
  images = index_images.IndexImages.of_index(config.index, image_root=config.image_root)
  written = report.write_index_report(config.report, config.index, results,
                                      k=max(len(r.hits) for r in results), images=images)
  say(f"report: {written['png']} {written['html']}")
  if written["missing"]:
    say(f"report: {len(written['missing'])} images not readable, drawn as grey boxes "
        f"(first: {shown(str(written['missing'][0]))})")


__all__ = ["run"]
