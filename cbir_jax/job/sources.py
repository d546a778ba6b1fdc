"""The job's input: a folder, a TFDS split, webdataset tar shards or a file list, listed with
per-record identities and labels (docs/inputs.md).

A `Source` hands out fixed-size batches for any list of record positions (-1 = padding),
so a job can read whole shards, the rest of a stopped shard, or only an update's records.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Iterator

import numpy as np

from cbir_jax import input_pipeline
from cbir_jax.job import identity as ident
from cbir_jax.job.errors import ExtractError, reworded
from cbir_jax.job.labels import LabelsReport, labels_from_csv
from cbir_jax.manifest import InputRecord, digest_of


@dataclasses.dataclass
class Source:
  """Records of one input, in order."""
  type: str  # "folder", "tfds", "webdataset" or "file_list"
  # The folder (absolute), TFDS data_dir, the shards' root or the list's folder; identity
  # keys are relative to it.
  root: str
  keys: list[str]  # what each row's "path" holds: the file's path, or the TFDS id
  identities: ident.RecordIdentities  # per-record keys and stamps (compared on reruns)
  spec: str = ""
  # Metadata known from the listing; None for TFDS, whose labels come with the data.
  labels: np.ndarray | None = None
  label_names: list[str] | None = None
  extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  labels_sha256: str = ""
  labels_report: LabelsReport | None = None
  content_digest: bool = False
  tfds: Any = None
  webdataset: Any = None  # webdataset_input.WebdatasetListing
  notes: list[str] = dataclasses.field(default_factory=list)  # listing's log lines
  # Files of a folder not read (not images), by extension.
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  @property
  def num_records(self) -> int:
    return len(self.keys)

  def input_record(self, records_file: str) -> InputRecord:
    # The empty fourth element keeps recorded digests valid (it held a spec for inputs whose
    # keys could not be listed, which no input is any more).
    digest = digest_of([self.identities.digest(), self.labels_sha256, self.type, ""])
    return InputRecord(type=self.type, root=self.root, num_records=self.num_records,
                       identity_sha256=digest, records_file=records_file,
                       spec=self.spec, content_digest=self.content_digest,
                       labels_sha256=self.labels_sha256,
                       skipped=dict(sorted(self.skipped.items())))

  def skipped_line(self) -> str:
    """"skipped 3 files: .txt 2, .heic 1", or "" when every file was read."""
    if self.webdataset is not None:  # reasons, not extensions
      total = sum(self.skipped.values())
      return f"skipped {total} in the shards (see the log)" if total else ""
    return input_pipeline.format_skipped(self.skipped)

  def rows_meta(self, positions: np.ndarray, keys: list[str] | None,
                labels: np.ndarray | None) -> dict[str, Any]:
    """Metadata of the records at `positions` (rows.RowSource); checks TFDS ids against the plan.

    Raises:
      ExtractError: a TFDS record read back under another id than listed.
    """
    listed = [self.keys[p] for p in positions.tolist()]
    if keys is not None and list(keys) != listed:
      bad = next(i for i, (a, b) in enumerate(zip(keys, listed)) if a != b)
      raise ExtractError(f"record {int(positions[bad])} of {self.spec} was read as {keys[bad]!r}"
                         f" but listed as {listed[bad]!r}: the dataset changed while the job "
                         "ran; nothing of it was written, rerun the command")
    meta: dict[str, Any] = {"path": list(keys) if keys is not None else listed}
    if self.labels is not None:
      meta["label"] = self.labels[positions]
      meta["label_name"] = [self.label_names[p] for p in positions.tolist()]
    else:  # TFDS: the rows' own labels, named by its ClassLabel
      lab = np.full(len(positions), -1, np.int64) if labels is None else np.asarray(labels)
      names = self.tfds.label_names if self.tfds is not None else ()
      meta["label"] = lab
      meta["label_name"] = [names[v] if 0 <= v < len(names) else "" for v in lab.tolist()]
    for c, col in self.extra.items():
      meta[c] = col[positions]
    if self.tfds is not None:  # scalar and text features, read by position
      with reworded(OSError):
        meta.update(self.tfds.metadata_columns(positions))
    return meta

  @property
  def columns(self) -> tuple[str, ...]:
    """Metadata columns of every row."""
    tfds = [c for c, _ in self.tfds.metadata] if self.tfds is not None else []
    return ("row", "path", "label", "label_name", "width", "height", *self.extra, *tfds)

  def batches(self, positions: np.ndarray, *, batch_size: int, image_size: int,
              num_threads: int | None, draft: bool, max_pixels: int = input_pipeline.MAX_PIXELS,
              num_workers: int | None = None, buckets: tuple[int, ...] | None = None
              ) -> Iterator[input_pipeline.Batch]:
    """Fixed-size batches of the records at `positions` (-1: a padding row); with `buckets`,
    canvases for the device resize."""
    if not len(positions):
      return iter(())
    opts = dict(image_size=image_size, batch_size=batch_size, num_threads=num_threads,
                num_workers=num_workers, draft=draft, max_pixels=max_pixels, buckets=buckets)
    if self.tfds is not None:
      from cbir_jax import tfds_input
      return tfds_input.position_batches(self.tfds, positions, **opts)
    if self.webdataset is not None:
      from cbir_jax import webdataset_input
      return webdataset_input.position_batches(self.webdataset, positions, **opts)
    return input_pipeline.positions_batches(self.keys, positions, **opts)


def folder_source(root: str, labels_csv: str | None, *, content_digest: bool = False) -> Source:
  """Every image under `root`, sorted, with identities and (folder or CSV) labels."""
  root = os.path.abspath(root)  # stored paths stay valid from any working directory
  with reworded(FileNotFoundError):
    listing = input_pipeline.list_folder(root)
  records = listing.records
  if not records:
    other = input_pipeline.format_skipped(listing.skipped) or (
        f"only {len(listing.documents)} documentation file"
        f"{'s' if len(listing.documents) > 1 else ''}" if listing.documents else "no files")
    raise ExtractError(f"no images found under {root} ({other}); images are .jpg, .png, "
                       ".webp, .tif, ... (what Pillow reads)")
  keys = [r.key for r in records]
  src = Source(type="folder", root=root, keys=keys,
               identities=ident.folder_identities(root, keys, content_digest=content_digest),
               labels=np.array([r.label for r in records], np.int64),
               label_names=[r.label_name for r in records], content_digest=content_digest,
               skipped=listing.skipped)
  return _with_labels(src, labels_csv)


def _with_labels(src: Source, labels_csv: str | None) -> Source:
  """`src` with its labels and extra columns from `labels_csv`, if given (keys under its root)."""
  if labels_csv:
    lab = labels_from_csv(labels_csv, src.keys, src.root)
    src.labels, src.label_names, src.extra = lab.labels, lab.names, lab.extra
    src.labels_sha256, src.labels_report = lab.sha256, lab.report
  return src


def tfds_source(spec: str, data_dir: str | None) -> Source:
  """A prepared TFDS split; records keyed by TFDS id and stamped by their record file."""
  from cbir_jax import tfds_input
  with reworded(tfds_input.TfdsError):
    src = tfds_input.open_tfds(spec, data_dir)
  keys = list(src.keys)
  return Source(type="tfds", root=os.path.abspath(src.data_dir), spec=spec, keys=keys,
                identities=ident.RecordIdentities(keys, list(src.record_stamps())), tfds=src)


def webdataset_source(spec: str, *, content_digest: bool, cache_dir: str) -> Source:
  """Records of webdataset tar shards; identity keys relative to the shards' root.

  `cache_dir` keeps each shard's listing, so other workers and reruns list only new shards.
  """
  from cbir_jax import webdataset_input as wds
  with reworded(wds.WebdatasetError, OSError):
    try:
      lst = wds.list_webdataset(spec, cache_dir=cache_dir)
    except OSError:  # the cache cannot be written (a read-only output): list without it
      lst = wds.list_webdataset(spec)
  if not lst.num_records:
    raise ExtractError(f"no images found in --webdataset {spec}: "
                       + ("; ".join(lst.report_lines()) or "the shards are empty"))
  return Source(type="webdataset", root=lst.root, spec=spec, keys=lst.paths,
                identities=ident.RecordIdentities(lst.keys, lst.stamps(content_digest)),
                labels=lst.labels, label_names=lst.label_names, extra=lst.columns,
                content_digest=content_digest, skipped=lst.skipped, webdataset=lst,
                notes=lst.report_lines())


def file_list_source(list_file: str, labels_csv: str | None, *,
                     content_digest: bool = False) -> Source:
  """The files a list names, in its order; identity keys relative to the list's folder."""
  from cbir_jax import file_list
  with reworded(file_list.FileListError, OSError):
    fl = file_list.read_file_list(list_file)
  src = Source(type="file_list", root=fl.root, spec=fl.list_file, keys=fl.paths,
               identities=ident.folder_identities(fl.root, fl.paths,
                                                  content_digest=content_digest),
               labels=fl.labels, label_names=fl.label_names, content_digest=content_digest,
               notes=[fl.missing_line()] if fl.missing else [])
  return _with_labels(src, labels_csv)


# Inputs whose paths, labels and metadata columns come from the listing (not the data).
LISTED_TYPES = ("folder", "webdataset", "file_list")

__all__ = ["LISTED_TYPES", "Source", "file_list_source", "folder_source",
           "tfds_source", "webdataset_source"]
