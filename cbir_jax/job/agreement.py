"""What the processes of a job compare before anything is written, and how a difference is named.

Settings are compared one by one under the flag that sets them (`threshold`, `model`, ...);
the input as a whole and, when it differs, down to the first record that differs.
"""
from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any, Callable, Sequence

from cbir_jax.job import identity as ident
from cbir_jax.manifest import Manifest

BLOCK = 1024  # records per digest when looking for the first record that differs
# Manifest settings named after the flag that sets them.
_FLAG_NAMES = {"backbone": "model", "package_version": "cbir_jax version"}
# Settings outside the manifest that must still be equal everywhere: they decide the steps
# (batch_size) or what the job does with the output directory.
_CONFIG_FIELDS = ("batch_size", "update", "consolidate", "content_digest")

Gather = Callable[[str, str], list[str]]  # (name, this process' value) -> every process' value


def _text(v: Any) -> str:
  return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def fields(config: Any, target: Manifest, source: Any) -> tuple[dict[str, str], dict[str, str]]:
  """(fields, shown): every setting, the weights and the input, by name; how some are shown."""
  out, shown = {}, {}
  for k, v in target.settings.to_dict().items():
    if k == "descriptor":  # threshold, relative, masks
      out.update({name: _text(x) for name, x in v.items()})
    elif k == "weights":
      out["weights"] = _text(v)
      shown["weights"] = f"parameters sha256 {v.get('params_sha256', '')[:12]}"
    else:
      out[_FLAG_NAMES.get(k, k)] = _text(v)
  for k in _CONFIG_FIELDS:
    out[k] = _text(getattr(config, k))
  noun = "files" if source.type == "folder" else "records"
  out["input"] = source.identities.digest()
  shown["input"] = f"{source.num_records} {noun}"
  if source.type == "folder":
    out["images"] = source.root
  else:
    out["tfds"], out["data_dir"] = source.spec, source.root
  out["labels_csv"] = source.labels_sha256
  shown["labels_csv"] = f"sha256 {source.labels_sha256[:12]}" if source.labels_sha256 else "none"
  return out, shown


# --- the first record that differs -----------------------------------------------------------


def _block_digests(records: ident.RecordIdentities) -> list[str]:
  out = []
  for lo in range(0, len(records), BLOCK):
    h = hashlib.sha256()
    for k, s in zip(records.keys[lo:lo + BLOCK], records.stamps[lo:lo + BLOCK]):
      h.update(f"{k}\0{s}\n".encode("utf-8", "surrogateescape"))
    out.append(h.hexdigest()[:16])
  return out


def _first_mismatch(lists: Sequence[Sequence[Any]]) -> int | None:
  """The first index where the lists do not all hold the same item (a list that ended
  counts as holding None); None if they are equal."""
  for i in range(max(len(x) for x in lists)):
    if len({json.dumps(x[i] if i < len(x) else None) for x in lists}) > 1:
      return i
  return None


def first_difference(gather: Gather, records: ident.RecordIdentities, noun: str) -> str:
  """Where the processes' inputs first differ, e.g. "file 57 (in sorted order) is a/x.png on
  process 0, a/y.png on process 1". Every process calls it (two gathers); '' if none differs.

  Block digests first, then the records of the first differing block: a million records
  cost a few hundred kilobytes, not the whole list.
  """
  blocks = [json.loads(v) for v in gather("input blocks", json.dumps(_block_digests(records)))]
  b = _first_mismatch(blocks)  # the same on every process: all skip the next gather, or none
  if b is None:
    return ""
  lo = b * BLOCK
  mine = list(zip(records.keys[lo:lo + BLOCK], records.stamps[lo:lo + BLOCK]))
  rows = [[tuple(r) for r in json.loads(v)] for v in gather("input block", json.dumps(mine))]
  j = _first_mismatch(rows)
  if j is None:
    return ""
  return describe_record(lo + j, [r[j] if j < len(r) else None for r in rows], noun)


def describe_stamp(stamp: str) -> str:
  """"1234:1700000000123456789[:sha]" -> "1234 bytes, modified 2023-11-14 22:13:20.123 UTC"."""
  parts = stamp.split(":")
  if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
    return stamp
  when = datetime.datetime.fromtimestamp(int(parts[1]) / 1e9, datetime.timezone.utc)
  text = f"{parts[0]} bytes, modified {when:%Y-%m-%d %H:%M:%S}.{when.microsecond // 1000:03d} UTC"
  return text + (f", sha256 {parts[2][:12]}" if len(parts) > 2 else "")


def describe_record(position: int, values: Sequence[tuple[str, str] | None], noun: str) -> str:
  """One record position as each process sees it ((key, stamp), or None past its end)."""
  from cbir_jax.distributed import name_processes

  groups: dict[Any, list[int]] = {}
  for p, v in enumerate(values):
    groups.setdefault(v, []).append(p)
  keys = {v[0] for v in groups if v is not None}
  if len(keys) == 1 and None not in groups:  # the same name, another size or time
    key = keys.pop()
    return f"{key} differs: " + "; ".join(f"{describe_stamp(v[1])} on {name_processes(ps)}"
                                          for v, ps in groups.items())
  what = "; ".join(f"{v[0] if v is not None else 'none (fewer ' + noun + ')'} on "
                   f"{name_processes(ps)}" for v, ps in groups.items())
  return f"{noun[:-1]} {position + 1} (in sorted order) is {what}"


__all__ = ["BLOCK", "describe_record", "describe_stamp", "fields", "first_difference"]
