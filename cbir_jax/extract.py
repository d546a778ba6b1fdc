"""The bulk extraction job: images (folder or TFDS) -> descriptor shards on disk.

One jitted step on a "data" mesh over every device of every process;
parameters replicated. Each process reads its own contiguous range of
shards (a shard = a fixed range of input records), writes its own shards,
and runs the same number of equally shaped steps as every other process
(padding with empty batches), so nothing recompiles and no process waits
forever. Complete shards survive kills; a rerun continues (see store.py).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np

from cbir_jax import backbones, checkpoint, input_pipeline, store
from cbir_jax import descriptors as desc

OUTPUT_DTYPES = ("float32", "float16")
# Test-only: seconds to sleep per step, so kill/interrupt tests can land mid-job.
_STEP_DELAY_ENV = "CBIR_JAX_TEST_STEP_DELAY_S"


class ExtractError(RuntimeError):
  """The job cannot start or cannot go on; the message says why and what to do."""


class Interrupted(ExtractError):
  """SIGINT/SIGTERM: the job stopped after writing the shard in progress."""


@dataclasses.dataclass
class ExtractConfig:
  """Everything an extraction needs. Defaults reproduce the paper's settings on the default model.

  Attributes:
    output: output directory (created; a rerun continues it).
    images: folder of images (recursive), or None with `tfds`.
    tfds: "name:split" of a prepared TFDS dataset, read from `data_dir`.
    data_dir: TFDS data_dir.
    labels_csv: optional CSV (columns file, class_index[, class_name, ...]) giving
      labels by file name for a folder; other columns become metadata columns.
    model: backbone name.
    weights: weights directory; None = the shipped weights of `model`;
      "random" = random initialisation from `seed` (tests, demos).
    seed: seed of random weights.
    kinds: descriptor kinds to write.
    batch_size: images per device per step.
    dtype: compute dtype (float32, bfloat16, float16).
    output_dtype: dtype of the stored descriptors (float32 or float16).
    image_size: square network input size; None = the backbone's default.
    threshold, relative, masks: DescriptorConfig (SPEC.md section 4).
    shard_size: input records per shard (the unit of resumption).
    num_threads: parallel decodes per process (None = tf.data autotune).
    draft: JPEG reduced-scale decoding (faster, slightly different pixels).
    consolidate: concatenate the shards into one array per kind at the end.
    progress: "auto" (bar on a terminal, log lines otherwise), "bar", "log", "none".
    log_every_s: seconds between progress log lines.
    distributed: call jax.distributed.initialize() (auto-detects on managed clusters).
    coordinator_address, num_processes, process_id: explicit multi-process settings
      (any of them implies `distributed`).
  """
  output: str
  images: str | None = None
  tfds: str | None = None
  data_dir: str | None = None
  labels_csv: str | None = None
  model: str = backbones.DEFAULT_BACKBONE
  weights: str | None = None
  seed: int = 0
  kinds: tuple[str, ...] = desc.KINDS
  batch_size: int = 16
  dtype: str = "float32"
  output_dtype: str = "float32"
  image_size: int | None = None
  threshold: float = 0.5
  relative: bool = True
  masks: str = "channel"
  shard_size: int = 4096
  num_threads: int | None = None
  draft: bool = False
  consolidate: bool = True
  progress: str = "auto"
  log_every_s: float = 30.0
  distributed: bool = False
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def check(self) -> None:
    """Raises ExtractError for settings that cannot work, before anything is touched."""
    if (self.images is None) == (self.tfds is None):
      raise ExtractError("give exactly one input: --images=FOLDER or --tfds=NAME:SPLIT")
    if self.labels_csv and not self.images:
      raise ExtractError("--labels_csv applies to --images folders only")
    bad = [k for k in self.kinds if k not in desc.KINDS]
    if bad or not self.kinds:
      raise ExtractError(f"unknown descriptor kinds {bad}; known: {list(desc.KINDS)}")
    if self.output_dtype not in OUTPUT_DTYPES:
      raise ExtractError(f"output dtype must be one of {OUTPUT_DTYPES}, got "
                         f"{self.output_dtype!r}")
    for name in ("batch_size", "shard_size"):
      if getattr(self, name) < 1:
        raise ExtractError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.image_size is not None and self.image_size < 32:
      raise ExtractError(f"image_size must be >= 32 (five stride-2 blocks), got "
                         f"{self.image_size}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ExtractError(f"compute dtype must be float32, bfloat16 or float16, got "
                         f"{self.dtype!r}")
    if self.progress not in ("auto", "bar", "log", "none"):
      raise ExtractError(f"progress must be auto, bar, log or none, got {self.progress!r}")
    try:
      backbones.get(self.model)
      desc.DescriptorConfig(self.threshold, self.relative, self.masks)
    except ValueError as e:
      raise ExtractError(str(e)) from None


@dataclasses.dataclass
class Summary:
  """What one process did."""
  output: str
  process_index: int
  images: int = 0  # decoded and written
  failed: int = 0  # records that could not be decoded
  shards_written: int = 0
  shards_skipped: int = 0  # complete from an earlier run
  seconds: float = 0.0
  input_wait_s: float = 0.0  # blocked waiting for decoded batches
  device_s: float = 0.0  # blocked waiting for device results
  write_s: float = 0.0
  startup_s: float = 0.0  # listing, weights, checks: before the first step
  compile_s: float = 0.0  # the first step's call (tracing and compiling)
  compiles: int = -1  # compilations of the step (1 expected), -1 if unknown
  complete: bool = False  # the whole output (all processes) is finished

  @property
  def images_per_s(self) -> float:
    return (self.images + self.failed) / self.seconds if self.seconds > 0 else 0.0

  @property
  def steady_images_per_s(self) -> float:
    """Throughput after startup and compilation."""
    t = self.seconds - self.startup_s - self.compile_s
    return (self.images + self.failed) / t if t > 0 else 0.0

  def line(self) -> str:
    share = self.input_wait_s / self.seconds if self.seconds > 0 else 0.0
    return (f"extracted {self.images} images, {self.failed} failed, in {self.seconds:.1f} s "
            f"({self.images_per_s:.1f} images/s; {self.steady_images_per_s:.1f} after "
            f"{self.startup_s:.1f} s startup and {self.compile_s:.1f} s compiling); "
            f"waiting for input {self.input_wait_s:.1f} s "
            f"({100 * share:.0f}%), on device {self.device_s:.1f} s, writing {self.write_s:.1f} s;"
            f" shards written {self.shards_written}, skipped (already complete) "
            f"{self.shards_skipped}; output {self.output}")


# --- inputs --------------------------------------------------------------------------------


@dataclasses.dataclass
class _Source:
  num_records: int
  identity: dict[str, Any]  # compared on resume
  where: str  # recorded, not compared
  keys: list[str] | None = None  # folder records
  labels: np.ndarray | None = None
  label_names: list[str] | None = None
  extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  tfds: Any = None

  def batches(self, ranges: list[tuple[int, int]], *, batch_size: int, image_size: int,
              num_threads: int | None, draft: bool) -> Iterator[input_pipeline.Batch]:
    """Fixed-size batches over record ranges, each range padded to whole batches."""
    if self.tfds is not None:
      from cbir_jax import tfds_input
      return tfds_input.tfds_batches(self.tfds, ranges, image_size=image_size,
                                     batch_size=batch_size, num_threads=num_threads,
                                     draft=draft)
    parts = []
    for start, stop in ranges:
      parts.append(np.arange(start, stop))
      parts.append(np.full(-(stop - start) % batch_size, -1))
    positions = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if not len(positions):
      return iter(())
    return input_pipeline.positions_batches(self.keys, positions, image_size=image_size,
                                            batch_size=batch_size, num_threads=num_threads,
                                            draft=draft)


def _folder_source(root: str, labels_csv: str | None) -> _Source:
  root = os.path.abspath(root)  # stored paths stay valid from any working directory
  try:
    records = input_pipeline.folder_records(root)
  except FileNotFoundError as e:
    raise ExtractError(str(e)) from None
  if not records:
    raise ExtractError(f"no images found under {root} (extensions: "
                       f"{', '.join(sorted(input_pipeline.IMAGE_EXTENSIONS))})")
  keys = [r.key for r in records]
  labels = np.array([r.label for r in records], np.int64)
  names = [r.label_name for r in records]
  extra: dict[str, np.ndarray] = {}
  h = hashlib.sha256()
  rootp = pathlib.Path(root).resolve()
  for r in records:
    h.update(os.path.relpath(r.key, root).encode("utf-8", "surrogateescape") + b"\0")
  identity = {"type": "folder", "num_records": len(records), "files_sha256": h.hexdigest()}
  if labels_csv:
    labels, names, extra, digest = _labels_from_csv(labels_csv, keys, root)
    identity["labels_csv_sha256"] = digest
  return _Source(num_records=len(records), identity=identity, where=str(rootp), keys=keys,
                 labels=labels, label_names=names, extra=extra)


def _labels_from_csv(path: str, keys: list[str], root: str
                     ) -> tuple[np.ndarray, list[str], dict[str, np.ndarray], str]:
  """Labels by file name (or path relative to the folder) from a CSV with file, class_index."""
  try:
    text = pathlib.Path(path).read_text(encoding="utf-8")
  except OSError as e:
    raise ExtractError(f"cannot read --labels_csv {path}: {e}") from None
  except UnicodeDecodeError as e:
    raise ExtractError(f"--labels_csv {path} is not UTF-8 text ({e})") from None
  rows = list(csv.DictReader(text.splitlines()))
  if not rows or "file" not in rows[0] or "class_index" not in rows[0]:
    raise ExtractError(f"{path}: a labels CSV needs the columns file and class_index")
  by_name = {}
  for i, r in enumerate(rows):
    try:
      label = int(r["class_index"])
    except (TypeError, ValueError):
      raise ExtractError(f"{path}: line {i + 2}: class_index {r['class_index']!r} is not an "
                         "integer") from None
    if not -1 <= label < 2 ** 31:  # labels are stored as int64; -1 means unknown
      raise ExtractError(f"{path}: line {i + 2}: class_index {label} is out of range "
                         "(-1 for unknown, else 0 to 2**31 - 1)")
    by_name[r["file"]] = (label, r)
  other = [c for c in rows[0] if c not in ("file", "class_index", "class_name")]
  labels = np.full(len(keys), -1, np.int64)
  names = [""] * len(keys)
  extra = {c: [""] * len(keys) for c in other}
  for i, k in enumerate(keys):
    hit = by_name.get(os.path.relpath(k, root)) or by_name.get(os.path.basename(k))
    if hit:
      labels[i] = hit[0]
      names[i] = hit[1].get("class_name", "") or ""
      for c in other:
        extra[c][i] = hit[1].get(c, "") or ""
  return (labels, names, {c: np.array(v, dtype=str) for c, v in extra.items()},
          hashlib.sha256(text.encode()).hexdigest())


def _tfds_source(spec: str, data_dir: str | None) -> _Source:
  from cbir_jax import tfds_input
  try:
    src = tfds_input.open_tfds(spec, data_dir)
  except tfds_input.TfdsError as e:
    raise ExtractError(str(e)) from None
  return _Source(num_records=src.num_records, identity=src.identity(),
                 where=f"{src.data_dir}", tfds=src)


# --- model ---------------------------------------------------------------------------------


def random_params(backbone: backbones.Backbone, image_size: int, seed: int = 0) -> Any:
  """`--weights=random`: `backbone.random_params(seed, image_size)` (NumPy, no compile)."""
  return backbone.random_params(seed, image_size)


def _params(config: ExtractConfig, backbone: backbones.Backbone, image_size: int
            ) -> tuple[Any, dict[str, Any], Any]:
  """(params, weights record for the manifest, preprocessing)."""
  import jax

  if config.weights == "random":
    params = random_params(backbone, image_size, config.seed)
    info = {"dir": "", "source": "random", "seed": config.seed,
            "params_sha256": checkpoint.params_sha256(params), "source_sha256": ""}
    return params, info, backbone.preprocessing
  from cbir_jax import weights as weights_lib
  try:
    params, winfo = weights_lib.load(config.model, config.weights)
  except checkpoint.WeightsError as e:
    raise ExtractError(f"{e} (or pass --weights=random for random weights)") from None
  wdir = config.weights or str(weights_lib.default_weights_dir(config.model))
  info = {"dir": str(pathlib.Path(wdir).resolve()), "source": winfo.source,
          "source_file": winfo.source_file, "params_sha256": winfo.params_sha256
          or checkpoint.params_sha256(params), "source_sha256": winfo.source_sha256}
  return params, info, winfo.preprocessing


# --- the job -------------------------------------------------------------------------------


def _init_distributed(config: ExtractConfig) -> None:
  import jax

  explicit = (config.coordinator_address, config.num_processes, config.process_id)
  if not (config.distributed or any(v is not None for v in explicit)):
    return
  try:
    jax.distributed.initialize(coordinator_address=config.coordinator_address,
                               num_processes=config.num_processes,
                               process_id=config.process_id)
  except RuntimeError as e:
    if "already initialized" not in str(e).lower():
      raise ExtractError(f"jax.distributed.initialize failed: {e}") from e


def _allgather(values: list[int]) -> np.ndarray:
  """[process, len(values)] of every process' values (a collective: all must call it)."""
  import jax
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return np.asarray([values], np.int64)
  return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int64)))


class _StopFlag:
  """SIGINT/SIGTERM handling: first signal asks to stop after the current shard."""

  def __init__(self, log: Callable[[str], None]):
    self.requested = False
    self._log = log
    self._old: dict[int, Any] = {}

  def _handle(self, signum, frame):
    if self.requested:  # a second Ctrl-C: stop now (complete shards are still safe)
      raise KeyboardInterrupt
    self.requested = True
    self._log(f"{signal.Signals(signum).name} received: stopping after the shard in progress "
              "is written (send it again to stop at once)")

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGINT, signal.SIGTERM):
        self._old[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


class _Progress:
  """A tqdm bar on a terminal, else a log line every `every` seconds."""

  def __init__(self, total: int, mode: str, every: float, log: Callable[[str], None]):
    self.total, self.done, self.every, self.log = total, 0, every, log
    self.t0 = self.last = time.perf_counter()
    self.bar = None
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
      try:
        from tqdm import tqdm
        self.bar = tqdm(total=total, unit="img", dynamic_ncols=True, smoothing=0.1)
      except ImportError:
        pass
    self.quiet = mode == "none"

  def update(self, n: int) -> None:
    self.done += n
    if self.bar is not None:
      self.bar.update(n)
      return
    now = time.perf_counter()
    if not self.quiet and now - self.last >= self.every:
      self.last = now
      rate = self.done / max(now - self.t0, 1e-9)
      eta = (self.total - self.done) / rate if rate > 0 else float("inf")
      self.log(f"{self.done}/{self.total} images, {rate:.1f} images/s, "
               f"ETA {eta / 60:.1f} min")

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _log(msg: str) -> None:
  print(f"[extract] {msg}", file=sys.stderr, flush=True)


def _empty_batch(batch_size: int, image_size: int) -> input_pipeline.Batch:
  z = np.zeros(batch_size, np.int32)
  return input_pipeline.Batch(images=np.zeros((batch_size, image_size, image_size, 3), np.uint8),
                              index=np.full(batch_size, -1, np.int64), width=z, height=z,
                              ok=np.zeros(batch_size, bool), valid=np.zeros(batch_size, bool),
                              error=[""] * batch_size)


@dataclasses.dataclass
class _ShardRows:
  """Rows of the shard being assembled."""
  index: int
  start: int
  stop: int
  steps_left: int
  arrays: dict[str, list[np.ndarray]]
  meta: dict[str, list]
  failures: list[tuple[str, str]]


def run(config: ExtractConfig, *, log: Callable[[str], None] = _log) -> Summary:
  """Runs (or continues) an extraction; returns this process' summary.

  Args:
    config: the job.
    log: where progress and messages go (stderr by default).

  Raises:
    ExtractError: bad settings, unreadable input, a directory of other settings,
      a locked directory, a write error (disk full), or `Interrupted`.
  """
  config.check()
  _init_distributed(config)
  import jax

  from cbir_jax import inference, sharding

  t_start = time.perf_counter()
  pid, nproc = jax.process_index(), jax.process_count()
  backbone = backbones.get(config.model)
  image_size = config.image_size or backbone.image_size
  kinds = tuple(config.kinds)
  dcfg = desc.DescriptorConfig(config.threshold, config.relative, config.masks)
  out = pathlib.Path(config.output)
  summary = Summary(output=str(out), process_index=pid)

  # Setup errors are gathered before anyone starts stepping, so every process
  # stops together instead of waiting for a partner that already gave up.
  error, lock_file, local_steps = "", None, 0
  try:
    source = (_folder_source(config.images, config.labels_csv) if config.images
              else _tfds_source(config.tfds, config.data_dir))
    params, winfo, prep = _params(config, backbone, image_size)
    dims = desc.dimensions(backbone.block_channels, backbone.fc_dim)
    num_shards = math.ceil(source.num_records / config.shard_size)
    settings = {
        "backbone": config.model, "weights": {k: winfo[k] for k in
                                              ("source", "params_sha256", "source_sha256")},
        "preprocessing": prep.to_dict(), "descriptor": dcfg.to_dict(),
        "image_size": image_size, "kinds": list(kinds), "dtype": config.dtype,
        "output_dtype": config.output_dtype, "draft": config.draft,
        "shard_size": config.shard_size, "input": source.identity,
        "package_version": _version()}
    head = {"settings": settings, "backbone": config.model, "weights": winfo,
            "preprocessing": prep.to_dict(), "descriptor": dcfg.to_dict(),
            "image_size": image_size, "kinds": list(kinds), "output_dtype": config.output_dtype,
            "package_version": _version(), "input": dict(source.identity, where=source.where),
            "num_records": source.num_records, "num_shards": num_shards,
            "dimensions": {k: int(dims[k]) for k in kinds}}
    try:
      out.mkdir(parents=True, exist_ok=True)
      lock_file = store.lock(out, pid)
      store.prepare(out, head)
    except OSError as e:
      raise ExtractError(f"cannot prepare output directory {out}: {e}") from e
    per = math.ceil(num_shards / nproc)
    mine = list(range(pid * per, min((pid + 1) * per, num_shards)))
    done = store.complete_shards(out)
    pending = [k for k in mine if k not in done]
    store.remove_partial(out, pending)
    B = sharding.local_batch_size(config.batch_size, sharding.data_mesh())
    ranges = [(k * config.shard_size, min((k + 1) * config.shard_size, source.num_records))
              for k in pending]
    steps = [math.ceil((b - a) / B) for a, b in ranges]
    local_steps = sum(steps)
    summary.shards_skipped = len(mine) - len(pending)
  except (ExtractError, store.StoreError) as e:
    error = str(e)
  except (OSError, ValueError) as e:  # e.g. an unreadable output directory
    error = f"{type(e).__name__}: {e}"
  gathered = _allgather([0 if error else 1, local_steps])
  if error or not gathered[:, 0].all():
    if lock_file:
      lock_file.close()
    if error:
      raise ExtractError(error)
    bad = [int(i) for i in np.flatnonzero(gathered[:, 0] == 0)]
    raise ExtractError(f"process(es) {bad} could not start; see their messages")
  global_steps = int(gathered[:, 1].max())
  if config.shard_size < B:
    log(f"warning: --shard_size={config.shard_size} is smaller than this process' batch of {B} "
        "images (batch_size x local devices): most of every step is padding")
  total_local = sum(b - a for a, b in ranges)
  if summary.shards_skipped:
    log(f"process {pid}: {summary.shards_skipped} shard(s) already complete, "
        f"{len(pending)} to go")

  try:
    mesh = sharding.data_mesh()
    fn = inference.jit_describe(backbone, mesh=mesh, preprocessing=prep, kinds=kinds,
                                config=dcfg, dtype=inference.compute_dtype(config.dtype))
    params = sharding.replicate(params, mesh)
    out_dtype = np.dtype(config.output_dtype)
    batches = source.batches(ranges, batch_size=B, image_size=image_size,
                             num_threads=config.num_threads, draft=config.draft)
    shard_queue = [(k, a, b, s) for k, (a, b), s in zip(pending, ranges, steps)]
    current: list[_ShardRows | None] = [None]
    progress = _Progress(total_local, config.progress, config.log_every_s, log)

    def next_shard() -> _ShardRows:
      k, a, b, s = shard_queue.pop(0)
      return _ShardRows(k, a, b, s, {kd: [] for kd in kinds},
                        {c: [] for c in store.META_COLUMNS} |
                        {c: [] for c in source.extra}, [])

    def consume(batch: input_pipeline.Batch, result: dict[str, Any]) -> bool:
      """Adds a step's rows to its shard; writes the shard when complete. True: stop now."""
      t = time.perf_counter()
      rows = {kd: sharding.host_local(result[kd]) for kd in kinds}
      summary.device_s += time.perf_counter() - t
      if not batch.valid.any():
        return False  # a padding step (this process has no records left)
      sh = current[0] = current[0] or next_shard()
      with np.errstate(over="ignore"):  # overflow is checked just below
        rows = {kd: r.astype(out_dtype) for kd, r in rows.items()}
      # A row that is not finite (overflow in a low-precision dtype) is a failure, not
      # a row that would poison every distance computed against it.
      finite = np.logical_and.reduce([np.isfinite(r).all(axis=1) for r in rows.values()])
      ok = batch.ok & finite
      for kd in kinds:
        sh.arrays[kd].append(rows[kd][ok])
      for j in np.flatnonzero(batch.valid):
        i = int(batch.index[j])
        key = batch.key[j] if batch.key is not None else source.keys[i]
        if not ok[j]:
          reason = batch.error[j] if not batch.ok[j] else (
              f"descriptor not finite (NaN or overflow; compute dtype {config.dtype}, "
              f"output dtype {config.output_dtype})")
          sh.failures.append((key, reason or "unknown error"))
          continue
        label = int(batch.label[j]) if batch.label is not None else int(source.labels[i])
        name = (source.tfds and _tfds_label_name(source.tfds, label)) or (
            source.label_names[i] if source.label_names is not None else "")
        for c, v in (("row", i), ("path", key), ("label", label), ("label_name", name),
                     ("width", int(batch.width[j])), ("height", int(batch.height[j]))):
          sh.meta[c].append(v)
        for c, col in source.extra.items():
          sh.meta[c].append(col[i])
      n_valid = int(batch.valid.sum())
      summary.images += int(ok.sum())
      summary.failed += n_valid - int(ok.sum())
      progress.update(n_valid)
      sh.steps_left -= 1
      if sh.steps_left:
        return False
      t = time.perf_counter()
      arrays = {kd: (np.concatenate(v) if v else np.zeros((0, dims[kd]), out_dtype))
                for kd, v in sh.arrays.items()}
      meta = _meta_arrays(sh.meta)
      store.write_shard(out, sh.index, start=sh.start, stop=sh.stop, arrays=arrays, meta=meta,
                        failures=sh.failures, process_index=pid)
      summary.write_s += time.perf_counter() - t
      summary.shards_written += 1
      current[0] = None
      return stop.requested

    delay = float(os.environ.get(_STEP_DELAY_ENV, "0") or 0)
    with _StopFlag(log) as stop:
      prev = None
      for step in range(global_steps):
        t = time.perf_counter()
        batch = next(batches) if step < local_steps else _empty_batch(B, image_size)
        summary.input_wait_s += time.perf_counter() - t
        if delay:
          time.sleep(delay)
        if step == 0:
          summary.startup_s = time.perf_counter() - t_start - summary.input_wait_s
          t = time.perf_counter()
        result = fn(params, sharding.shard_batch(batch.images, mesh))
        if step == 0:
          summary.compile_s = time.perf_counter() - t
        # Results of the previous step are read while this one runs on the devices.
        if prev is not None and consume(*prev):
          break
        prev = (batch, result)
      else:
        if prev is not None:
          consume(*prev)
        prev = None
      progress.close()
      if stop.requested and len(shard_queue) + (current[0] is not None) > 0:
        raise Interrupted(
            f"interrupted: process {pid} stopped after writing {summary.shards_written} "
            f"shard(s); complete shards are kept in {out}. Rerun the same command to continue.")
    try:
      summary.compiles = int(fn._cache_size())  # pylint: disable=protected-access
    except Exception:  # private API: absent in some jax versions
      pass
    store.write_failures(out, mine, pid)
    if nproc > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("cbir_jax.extract: all shards written")
    if pid == 0:
      store.finalize(out, num_shards=num_shards, process_count=nproc,
                     consolidate=config.consolidate)
    summary.complete = True
  except store.StoreError as e:
    raise ExtractError(str(e)) from e
  except OSError as e:
    raise ExtractError(f"error writing {out}: {e}; complete shards are kept, rerun the same "
                       "command to continue") from e
  finally:
    summary.seconds = time.perf_counter() - t_start
    if lock_file:
      lock_file.close()
  return summary


def _tfds_label_name(src: Any, label: int) -> str:
  return src.label_names[label] if 0 <= label < len(src.label_names) else ""


def _meta_arrays(cols: dict[str, list]) -> dict[str, np.ndarray]:
  types = {"row": np.int64, "label": np.int64, "width": np.int32, "height": np.int32}
  out = {}
  for c, v in cols.items():
    if c in types:
      out[c] = np.asarray(v, types[c]).reshape(-1)
    else:  # fixed-width unicode: loads without pickle
      out[c] = np.asarray(v, dtype=str) if v else np.zeros(0, "<U1")
  return out


def _version() -> str:
  from cbir_jax import __version__
  return __version__


__all__ = ["ExtractConfig", "ExtractError", "Interrupted", "Summary", "random_params", "run"]
