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


def digest_of(obj: Any) -> str:
  """SHA-256 of an object's canonical JSON (sorted keys): equal settings give equal digests."""
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=list)
  return hashlib.sha256(text.encode()).hexdigest()


class _Record:
  """A record stored as JSON: `to_dict` gives its fields as plain JSON types (tuples as
  lists), `from_dict` takes the keys that are fields (one a file lacks takes the field's
  default: `resize` of the first format-4 manifests)."""

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass(frozen=True)
class WeightsRecord(_Record):
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


@dataclasses.dataclass(frozen=True)
class Settings(_Record):
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

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Settings":
    return dataclasses.replace(super().from_dict(d), kinds=tuple(d["kinds"]))

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
class InputRecord(_Record):
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

  def same_records(self, other: "InputRecord") -> bool:
    """Equal but for `skipped`."""
    return dataclasses.replace(self, skipped={}) == dataclasses.replace(other, skipped={})


@dataclasses.dataclass(frozen=True)
class ShardEntry(_Record):
  """One complete shard as the manifest lists it (its shard.json holds the same)."""
  index: int
  dir: str  # relative to the output directory
  start: int
  stop: int
  rows: int
  failures: int
  process: int
  files: Mapping[str, Mapping[str, Any]]  # name -> {"sha256", "bytes"}


@dataclasses.dataclass(frozen=True)
class FileEntry(_Record):
  """A file of the index: a part of a kind's rows, the metadata table, or the failure list."""
  file: str  # relative to the output directory
  rows: int  # rows (array, metadata) or failures listed
  sha256: str = ""
  bytes: int = -1  # -1: not recorded


@dataclasses.dataclass(frozen=True)
class UpdateReport(_Record):
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

  def line(self) -> str:
    moved = f"; input moved from {self.root_moved_from}" if self.root_moved_from else ""
    labels = "; labels changed" if self.labels_changed else ""
    return (f"update: {self.reused} records reused, {self.extracted} extracted "
            f"({self.added} added, {self.changed} changed), {self.removed} removed{moved}{labels}")


@dataclasses.dataclass(frozen=True)
class Manifest(_Record):
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
    # "backbone" and "num_records": plain keys for tools that only want the model or the size.
    return {**super().to_dict(), "format": FORMAT, "num_records": self.num_records,
            "backbone": self.settings.backbone}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Manifest":
    # No version: a dict built in memory; files always carry theirs.
    version = int(d.get("format_version", FORMAT_VERSION))
    if version < FORMAT_VERSION:
      raise OldFormat(f"format {version}, written by an earlier cbir_jax")

    def entry(e: Mapping[str, Any] | None) -> FileEntry | None:
      return FileEntry.from_dict(e) if e else None

    return super().from_dict({
        **d, "settings": Settings.from_dict(d["settings"]),
        "weights": WeightsRecord.from_dict(d["weights"]),
        "input": InputRecord.from_dict(d["input"]),
        "shards": tuple(ShardEntry.from_dict(e) for e in d.get("shards", ())),
        "parts": {k: tuple(map(entry, v)) for k, v in d.get("parts", {}).items()},
        "metadata": entry(d.get("metadata")), "failures_file": entry(d.get("failures_file")),
        "made": tuple(d.get("made", ())), "replaces": tuple(d.get("replaces", ())),
        "update": UpdateReport.from_dict(d["update"]) if d.get("update") else None})

  def replace(self, **changes: Any) -> "Manifest":
    return dataclasses.replace(self, **changes)


__all__ = ["FORMAT", "FORMAT_VERSION", "FileEntry", "InputRecord", "Manifest", "OldFormat",
           "Settings", "ShardEntry", "UpdateReport", "WeightsRecord", "diff_dicts", "digest_of"]
