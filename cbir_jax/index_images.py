"""The images behind an index's rows, read from where they are now: files or TFDS records.

Evaluation's colour histograms and the picture report read images only through here, so a
TFDS index, or a folder index whose folder moved (`image_root`), works like files left in place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import threading
from typing import Any, Iterable, Mapping

import numpy as np

from cbir_jax import decode

FOLDER, TFDS, WEBDATASET, FILE_LIST = "folder", "tfds", "webdataset", "file_list"


class ImageUnavailable(ValueError):
  """An index's image cannot be read; the message is one line that says why."""


@dataclasses.dataclass(frozen=True)
class IndexInput:
  """Where an index's images came from, as its manifest records it."""
  type: str = ""  # FOLDER, TFDS, WEBDATASET, FILE_LIST; "": not said (paths read as stored)
  root: str = ""  # the folder the stored paths are under, or the TFDS data_dir
  spec: str = ""  # "name:split" of a TFDS input


def input_of(manifest: Any) -> IndexInput:
  """The manifest's input record (the typed `Manifest`, or the dict `store.read_manifest`
  returns): the one place evaluation and reports read it."""
  if not isinstance(manifest, Mapping):
    return IndexInput(type=manifest.input.type, root=manifest.input.root,
                      spec=manifest.input.spec)
  inp = manifest.get("input") or {}
  return IndexInput(type=inp.get("type", ""), root=inp.get("root", ""), spec=inp.get("spec", ""))


def decode_rgb(data: bytes) -> np.ndarray:
  """Encoded image bytes to uint8 RGB [H, W, 3] at full size, as shown (EXIF orientation
  applied; colour modes, bomb limit and ValueError reasons as extraction's)."""
  return decode.decode_full(data)[0]


class IndexImages:
  """Reads the image of an index row from the row's stored path (a file path or a TFDS id).

  Thread-safe: histograms are computed on a thread pool.
  """

  def __init__(self, source: IndexInput = IndexInput(), *, image_root: str | None = None):
    """`source` is the index's input (`input_of(manifest)`); `image_root` where its folder
    (or TFDS data_dir) is now, if it moved."""
    if image_root is not None:
      if source.type not in (FOLDER, TFDS, WEBDATASET, FILE_LIST) or not source.root:
        raise ValueError("the index does not record the folder it was made from, so "
                         "--image_root cannot place its paths")
      if not os.path.isdir(image_root):
        raise ValueError(f"--image_root {image_root} is not a folder")
      image_root = os.path.abspath(image_root)
    self.source = source
    self.image_root = image_root
    self._lock = threading.Lock()
    self._tfds: Any = None
    self._tfds_error = ""
    self._scanned: dict[str, bytes] = {}

  @classmethod
  def of_index(cls, index_dir: str | os.PathLike, *, image_root: str | None = None
               ) -> "IndexImages":
    from cbir_jax import store

    return cls(input_of(store.read_manifest(index_dir)), image_root=image_root)

  @property
  def root(self) -> str:
    """The folder (or TFDS data_dir) read now."""
    return self.image_root or self.source.root

  def describe(self) -> str:
    """One line: where the images are read from."""
    moved = f" (recorded: {self.source.root})" if self.image_root else ""
    return (f"TFDS {self.source.spec} in {self.root}" if self.source.type == TFDS
            else f"files under {self.root}" if self.root else "files at their stored paths") + moved

  def locate(self, stored: str) -> str:
    """The file a stored path names now (`image_root` applied); a TFDS id as it is."""
    if self.source.type == TFDS or self.image_root is None:
      return stored
    try:
      rel = pathlib.PurePath(stored).relative_to(self.source.root)
    except ValueError:
      raise ImageUnavailable(f"{stored} is not under the folder the index records "
                             f"({self.source.root}), so --image_root cannot place it") from None
    return os.path.join(self.image_root, rel)

  def read_bytes(self, stored: str) -> bytes:
    """The encoded image of a row. Raises ImageUnavailable (one line) if it cannot be read."""
    if self.source.type == TFDS:
      return self._read_tfds(stored)
    path = self.locate(stored)
    try:
      if self.source.type == WEBDATASET:  # "<shard>.tar/<member>": read by offset
        from cbir_jax import webdataset_input
        return webdataset_input.read_path(path)
      return decode.read_file(path)
    except OSError as e:
      raise ImageUnavailable(f"cannot read image {path}: {e.strerror or e}{self._hint(path)}"
                             ) from None

  def read_rgb(self, stored: str) -> np.ndarray:
    """The row's image decoded at full size to uint8 RGB [H, W, 3] (`decode_rgb`)."""
    data = self.read_bytes(stored)
    try:
      return decode_rgb(data)
    except ValueError as e:
      raise ImageUnavailable(f"cannot decode image {self.locate(stored)}: {e}") from None

  def prefetch(self, stored: Iterable[str]) -> None:
    """Reads ahead what `read_bytes` would read one by one too slowly.

    Only TFDS datasets without random access (TFRecord) need it: one pass over the split
    keeps the wanted records. A no-op otherwise.
    """
    if self.source.type != TFDS:
      return
    src = self._open_tfds()
    if src.data is not None:  # ArrayRecord: read by id
      return
    with self._lock:  # one scan at a time
      wanted = {k for k in stored if k not in self._scanned}  # ids of no record: never read
      if wanted:
        self._scanned.update(_scan_tfrecord(src, wanted))

  def _hint(self, path: str) -> str:
    root = self.root
    if not root or os.path.isdir(root):
      return ""
    if self.image_root:
      return f" (--image_root {root} is gone)"
    return (f" (the index was made from {root}, which is not there any more: if it moved, "
            "pass --image_root=<its new place>)")

  def _open_tfds(self) -> Any:
    from cbir_jax import tfds_input

    with self._lock:
      if self._tfds is None and not self._tfds_error:
        try:
          self._tfds = tfds_input.open_tfds(self.source.spec, self.root)
        except (tfds_input.TfdsError, OSError) as e:
          self._tfds_error = f"cannot open TFDS {self.source.spec} in {self.root}: {e}"
      if self._tfds_error:
        raise ImageUnavailable(self._tfds_error.splitlines()[0])
      return self._tfds

  def _read_tfds(self, key: str) -> bytes:
    src = self._open_tfds()
    self.prefetch([key])  # TFRecord: the record comes from a scan (none if scanned already)
    try:
      return self._scanned[key] if src.data is None else src.read_key(key)
    except KeyError:
      raise ImageUnavailable(f"{key} is not a record of TFDS {self.source.spec} in "
                             f"{self.root}") from None
    except (OSError, ValueError) as e:
      raise ImageUnavailable(f"cannot read {key} from TFDS {self.source.spec}: {e}") from None


def _scan_tfrecord(src: Any, wanted: set[str]) -> dict[str, bytes]:
  """The encoded images of the `wanted` TFDS ids, in one pass (tf.data) over the records
  from the first of them to the last."""
  from cbir_jax import tfds_tfrecord

  at = {}
  for key in wanted:
    with contextlib.suppress(KeyError):  # not a record of the split: not found
      at[src.position(key)] = key
  if not at:
    return {}
  try:
    rows = tfds_tfrecord.rows_at(src, range(min(at), max(at) + 1))
    return {at[row.index]: row.arg[0] for row in rows if row.index in at}
  except ImportError:
    raise ImageUnavailable(f"TFDS {src.name} is prepared as TFRecord, which needs TensorFlow "
                           "to read (the `tfrecord` extra)") from None
  except Exception as e:  # tf.data and TFDS raise many types (damaged or unreadable files)
    first = (str(e).strip().splitlines() or [""])[0]
    raise ImageUnavailable(f"cannot read TFDS {src.name}:{src.split}: {type(e).__name__}: "
                           f"{first}") from None


__all__ = ["FOLDER", "TFDS", "ImageUnavailable", "IndexInput", "IndexImages", "decode_rgb",
           "input_of"]
