"""The records an extraction writes to disk, as typed dataclasses with to_dict / from_dict.

Read by the job (extract), the store (store.py) and the query side (search, evaluation) alike.
Only format 4 is read: an index of an earlier cbir_jax gets one line saying how to rebuild it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping

FORMAT = "cbir_jax.descriptors"
FORMAT_VERSION = 4  # 4: the shards are the index (parts per kind), one metadata table


class OldFormat(ValueError):
  """A manifest of format 1-3 (descriptors/ copies, aliases): rebuilt, not read."""
WEIGHTS_KINDS = ("shipped", "directory", "random")
_PILLOW_MAX_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS, the limit formats 1-2 used


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
  max_pixels: int = 0
  # Where images were resized ("host": Pillow, "device": in the step): the pixels differ
  # slightly, so a rerun with the other one is a changed setting.
  resize: str = "host"

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
               package_version=d.get("package_version", ""),
               # Before it was a setting (formats 1-2) the limit was Pillow's default.
               max_pixels=int(d.get("max_pixels", _PILLOW_MAX_PIXELS)),
               resize=d.get("resize", "host"))  # before the device resize: the host

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
    skipped: files of the folder not read, by lower-case extension (not part of the
      identity: other files coming and going change no row).
  """
  type: str
  root: str
  num_records: int
  identity_sha256: str
  records_file: str = ""
  spec: str = ""
  content_digest: bool = False
  labels_sha256: str = ""
  skipped: Mapping[str, int] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  def same_records(self, other: "InputRecord") -> bool:
    """Equal but for `skipped`."""
    return dataclasses.replace(self, skipped={}) == dataclasses.replace(other, skipped={})

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "InputRecord":
    return cls(type=d.get("type", ""), root=d.get("root", d.get("where", "")),
               num_records=int(d.get("num_records", 0)),
               identity_sha256=d.get("identity_sha256", ""),
               records_file=d.get("records_file", ""),
               spec=d.get("spec", f"{d['name']}:{d['split']}" if "name" in d else ""),
               content_digest=bool(d.get("content_digest", False)),
               labels_sha256=d.get("labels_sha256", d.get("labels_csv_sha256", "")),
               skipped={str(k): int(v) for k, v in (d.get("skipped") or {}).items()})


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
class FileEntry:
  """A file of the index: a part of a kind's rows, the metadata table, or the failure list."""
  file: str  # relative to the output directory
  rows: int  # rows (array, metadata) or failures listed
  sha256: str = ""
  bytes: int = -1  # -1: not recorded (format 1)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "FileEntry":
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

  `base` is the folder (relative to the output directory) that holds this generation's
  files: "" for a first extraction, "gen-000001" and so on after `--update`s; every path
  listed below already includes it.

  The shards are the index: `parts[kind]` lists, in row order, one memory-mappable .npy per
  shard (`<base>/<kind>/part-NNNNNN.npy`, a hard link of the shard's file: no copy), with
  rows, SHA-256 and size; `metadata` is the one metadata table (one row per descriptor row)
  and `failures_file` the one failure list. `made` lists every top-level name this
  generation created, so reruns and updates remove only what the tool made.
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
  workers: int = 1
  parts: Mapping[str, tuple[FileEntry, ...]] = dataclasses.field(default_factory=dict)
  metadata: FileEntry | None = None
  failures_file: FileEntry | None = None
  made: tuple[str, ...] = ()
  replaces: tuple[str, ...] = ()  # the previous generation's `made` (removed after the switch)
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
         "failures": self.failures, "workers": self.workers,
         "parts": {k: [e.to_dict() for e in v] for k, v in self.parts.items()},
         "metadata": self.metadata.to_dict() if self.metadata else None,
         "failures_file": self.failures_file.to_dict() if self.failures_file else None,
         "made": list(self.made), "replaces": list(self.replaces), "verified": dict(self.verified),
         "labels": dict(self.labels), "run": dict(self.run),
         "update": self.update.to_dict() if self.update else None,
         "backbone": s["backbone"]}  # a plain key for tools that only want the model
    return json.loads(json.dumps(d))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Manifest":
    # No version: a dict built in memory (store.prepare); files always carry theirs.
    version = int(d.get("format_version", FORMAT_VERSION))
    if version < FORMAT_VERSION:
      raise OldFormat(f"format {version}, written by an earlier cbir_jax")
    s = dict(d["settings"])
    return cls(
        settings=Settings.from_dict(s), weights=WeightsRecord.from_dict(d.get("weights") or {}),
        input=InputRecord.from_dict(d.get("input") or {}),
        num_shards=int(d.get("num_shards", 0)), dimensions=dict(d.get("dimensions", {})),
        status=d.get("status", "running"), generation=int(d.get("generation", 0)),
        base=d.get("base", ""), shards=tuple(ShardEntry.from_dict(e) for e in d.get("shards", ())),
        rows=int(d.get("rows", 0)), failures=int(d.get("failures", 0)),
        workers=int(d.get("workers", 1)),
        parts={k: tuple(FileEntry.from_dict(e) for e in v)
               for k, v in (d.get("parts") or {}).items()},
        metadata=FileEntry.from_dict(d["metadata"]) if d.get("metadata") else None,
        failures_file=(FileEntry.from_dict(d["failures_file"])
                       if d.get("failures_file") else None),
        made=tuple(d.get("made") or ()), replaces=tuple(d.get("replaces") or ()), verified=dict(d.get("verified") or {}),
        update=UpdateReport.from_dict(d["update"]) if d.get("update") else None,
        labels=dict(d.get("labels") or {}), run=dict(d.get("run") or {}),
        format_version=version)

  def replace(self, **changes: Any) -> "Manifest":
    return dataclasses.replace(self, **changes)


__all__ = ["FORMAT", "FORMAT_VERSION", "FileEntry", "InputRecord", "Manifest", "OldFormat",
           "Settings", "ShardEntry", "UpdateReport", "WeightsRecord", "diff_dicts", "digest_of"]
