"""The records an extraction writes to disk, as typed dataclasses with to_dict / from_dict.

Read by the job (extract), the store (store.py) and the query side (search, evaluation) alike;
`Manifest.from_dict` also reads the first format (format_version 1) so old indexes keep loading.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping

FORMAT = "cbir_jax.descriptors"
FORMAT_VERSION = 2
WEIGHTS_KINDS = ("shipped", "directory", "random")


def digest_of(obj: Any) -> str:
  """SHA-256 of an object's canonical JSON (sorted keys): equal settings give equal digests."""
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=list)
  return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class WeightsRecord:
  """Which weights made an index: found again by name and digest, never by an absolute path.

  Attributes:
    kind: "shipped" (a model's folder in the shipped weights root, wherever that is now),
      "directory" (a folder the user gave; `dir` is where it was, a hint only) or "random"
      (initialised from `seed`).
    name: the shipped model folder, the directory's base name, or "random".
    params_sha256: digest of the parameter arrays (`checkpoint.params_sha256`).
    source, source_file, source_sha256: what the weights were ported from (weights.json).
    seed: the seed of random weights.
    dir: absolute path of a "directory" when the index was made.
    has_fc_head: whether the weights hold the FC layers (None: not recorded).
  """
  kind: str
  name: str
  params_sha256: str = ""
  source: str = ""
  source_file: str = ""
  source_sha256: str = ""
  seed: int | None = None
  dir: str = ""
  has_fc_head: bool | None = None

  def __post_init__(self) -> None:
    if self.kind not in WEIGHTS_KINDS:
      raise ValueError(f"weights kind must be one of {WEIGHTS_KINDS}, got {self.kind!r}")

  def identity(self) -> dict[str, str]:
    """What settings compare: the weights themselves, not where they were found."""
    return {"params_sha256": self.params_sha256, "source": self.source,
            "source_sha256": self.source_sha256}

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "WeightsRecord":
    kind = d.get("kind")
    if kind is None:  # format 1: {"dir", "source", ...}; random weights had no directory
      kind = "random" if d.get("source") == "random" and not d.get("dir") else "directory"
    seed = d.get("seed")
    return cls(kind=kind, name=d.get("name") or ("random" if kind == "random" else
                                                 str(d.get("dir", "")).rstrip("/")
                                                 .rsplit("/", 1)[-1]),
               params_sha256=d.get("params_sha256", ""), source=d.get("source", ""),
               source_file=d.get("source_file", ""), source_sha256=d.get("source_sha256", ""),
               seed=None if seed is None else int(seed), dir=d.get("dir", "") or "",
               has_fc_head=d.get("has_fc_head"))


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that changes a stored row's values or the shard layout; compared on every rerun.

  Settings that do not change results (threads, progress, devices) live in `RunInfo`.
  """
  backbone: str
  weights: Mapping[str, str]  # WeightsRecord.identity()
  preprocessing: Mapping[str, Any]
  descriptor: Mapping[str, Any]
  image_size: int
  kinds: tuple[str, ...]
  dtype: str
  output_dtype: str
  draft: bool
  shard_size: int
  package_version: str

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["kinds"] = list(self.kinds)
    return json.loads(json.dumps(d))  # plain JSON types, as stored

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Settings":
    return cls(backbone=d["backbone"], weights=dict(d.get("weights", {})),
               preprocessing=dict(d.get("preprocessing", {})),
               descriptor=dict(d.get("descriptor", {})), image_size=int(d["image_size"]),
               kinds=tuple(d["kinds"]), dtype=d.get("dtype", "float32"),
               output_dtype=d.get("output_dtype", "float32"), draft=bool(d.get("draft", False)),
               shard_size=int(d.get("shard_size", 0)),
               package_version=d.get("package_version", ""))

  def digest(self) -> str:
    return digest_of(self.to_dict())

  def diff(self, other: "Settings") -> list[str]:
    """Settings (dotted names) that differ, "name: X in the directory, Y now"."""
    return diff_dicts(self.to_dict(), other.to_dict())


def diff_dicts(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += diff_dicts(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: {a!r} in the directory, {b!r} now")
  return out


@dataclasses.dataclass(frozen=True)
class InputRecord:
  """The input as a whole; per-record identities are in `records_file` (see job/identity.py).

  Attributes:
    type: "folder" or "tfds".
    root: the folder (absolute) or the TFDS data_dir that record keys are relative to.
    spec: "name:split" for TFDS.
    num_records: records listed (decoded or failed).
    identity_sha256: digest over every record's key and stamp, and the labels.
    records_file: the identities, relative to the output directory.
    content_digest: whether stamps include a SHA-256 of each file's bytes.
    labels_sha256: digest of the labels CSV ("" without one).
  """
  type: str
  root: str
  num_records: int
  identity_sha256: str
  records_file: str = ""
  spec: str = ""
  content_digest: bool = False
  labels_sha256: str = ""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "InputRecord":
    return cls(type=d.get("type", ""), root=d.get("root", d.get("where", "")),
               num_records=int(d.get("num_records", 0)),
               identity_sha256=d.get("identity_sha256", ""),
               records_file=d.get("records_file", ""),
               spec=d.get("spec", f"{d['name']}:{d['split']}" if "name" in d else ""),
               content_digest=bool(d.get("content_digest", False)),
               labels_sha256=d.get("labels_sha256", d.get("labels_csv_sha256", "")))


@dataclasses.dataclass(frozen=True)
class ShardEntry:
  """One complete shard as the manifest lists it (its shard.json holds the same)."""
  index: int
  dir: str  # relative to the output directory
  start: int
  stop: int
  rows: int
  failures: int
  process: int
  files: Mapping[str, Mapping[str, Any]]  # name -> {"sha256", "bytes"}

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ShardEntry":
    return cls(index=int(d["index"]), dir=d["dir"], start=int(d["start"]), stop=int(d["stop"]),
               rows=int(d["rows"]), failures=int(d.get("failures", 0)),
               process=int(d.get("process", 0)), files=dict(d.get("files", {})))


@dataclasses.dataclass(frozen=True)
class ConsolidatedEntry:
  file: str  # relative to the output directory
  rows: int
  sha256: str = ""
  bytes: int = -1  # -1: not recorded (format 1)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ConsolidatedEntry":
    return cls(file=d["file"], rows=int(d["rows"]), sha256=d.get("sha256", ""),
               bytes=int(d.get("bytes", -1)))


@dataclasses.dataclass(frozen=True)
class UpdateReport:
  """What `--update` did to the previous generation."""
  from_generation: int
  reused: int  # rows and failures of unchanged records kept
  extracted: int  # records read again (added, changed, or not available before)
  added: int
  removed: int
  changed: int
  root_moved_from: str = ""  # the previous input root when the input moved as a whole
  labels_changed: bool = False
  examples: Mapping[str, list[str]] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "UpdateReport":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in fields})

  def line(self) -> str:
    moved = f"; input moved from {self.root_moved_from}" if self.root_moved_from else ""
    labels = "; labels changed" if self.labels_changed else ""
    return (f"update: {self.reused} records reused, {self.extracted} extracted "
            f"({self.added} added, {self.changed} changed), {self.removed} removed{moved}{labels}")


@dataclasses.dataclass(frozen=True)
class Manifest:
  """manifest.json: one generation of descriptors, its settings, input, shards and checks.

  `base` is the folder (relative to the output directory) that holds this
  generation's shards and arrays: "" for a first extraction, "gen-000001" and so
  on after `--update`s; every path listed below already includes it.
  """
  settings: Settings
  weights: WeightsRecord
  input: InputRecord
  num_shards: int
  dimensions: Mapping[str, int]
  status: str = "running"  # "running" | "complete"
  generation: int = 0
  base: str = ""
  shards: tuple[ShardEntry, ...] = ()
  rows: int = 0
  failures: int = 0
  process_count: int = 1
  consolidated: Mapping[str, ConsolidatedEntry] = dataclasses.field(default_factory=dict)
  verified: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  update: UpdateReport | None = None
  labels: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  run: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  format_version: int = FORMAT_VERSION

  @property
  def num_records(self) -> int:
    return self.input.num_records

  @property
  def complete(self) -> bool:
    return self.status == "complete"

  def path(self, *parts: str) -> str:
    """A path of this generation, relative to the output directory."""
    return "/".join(p for p in (self.base, *parts) if p)

  def to_dict(self) -> dict[str, Any]:
    s = self.settings.to_dict()
    d = {"format": FORMAT, "format_version": self.format_version, "status": self.status,
         "settings": s, "weights": self.weights.to_dict(), "input": self.input.to_dict(),
         "num_records": self.num_records, "num_shards": self.num_shards,
         "dimensions": dict(self.dimensions), "generation": self.generation, "base": self.base,
         "shards": [e.to_dict() for e in self.shards], "rows": self.rows,
         "failures": self.failures, "process_count": self.process_count,
         "consolidated": {k: c.to_dict() for k, c in self.consolidated.items()},
         "verified": dict(self.verified), "labels": dict(self.labels), "run": dict(self.run),
         "update": self.update.to_dict() if self.update else None,
         "backbone": s["backbone"]}  # as format 1 had it (settings.backbone is the same)
    return json.loads(json.dumps(d))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Manifest":
    version = int(d.get("format_version", 1))
    s = dict(d.get("settings", {}))
    for k in ("backbone", "preprocessing", "descriptor", "image_size", "kinds"):
      s.setdefault(k, d.get(k))  # format 1 kept some of these at the top only
    weights = WeightsRecord.from_dict(d.get("weights") or {})
    if version < 2:
      s["weights"] = weights.identity()
    inp = dict(d.get("input") or s.get("input") or {})
    inp.setdefault("num_records", d.get("num_records", 0))
    return cls(
        settings=Settings.from_dict(s), weights=weights, input=InputRecord.from_dict(inp),
        num_shards=int(d.get("num_shards", 0)), dimensions=dict(d.get("dimensions", {})),
        status=d.get("status", "running"), generation=int(d.get("generation", 0)),
        base=d.get("base", ""), shards=tuple(ShardEntry.from_dict(e) for e in d.get("shards", ())),
        rows=int(d.get("rows", 0)), failures=int(d.get("failures", 0)),
        process_count=int(d.get("process_count", 1)),
        consolidated={k: ConsolidatedEntry.from_dict(c)
                      for k, c in (d.get("consolidated") or {}).items()},
        verified=dict(d.get("verified") or {}),
        update=UpdateReport.from_dict(d["update"]) if d.get("update") else None,
        labels=dict(d.get("labels") or {}), run=dict(d.get("run") or {}),
        format_version=version)

  def replace(self, **changes: Any) -> "Manifest":
    return dataclasses.replace(self, **changes)


__all__ = ["FORMAT", "FORMAT_VERSION", "ConsolidatedEntry", "InputRecord", "Manifest",
           "Settings", "ShardEntry", "UpdateReport", "WeightsRecord", "diff_dicts", "digest_of"]
