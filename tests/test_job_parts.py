"""Host-only parts of the job, without JAX: shard assembly, input identities, labels CSV,
manifest records, the phase clock.

References are literal: rows written by hand, expected shards built with plain loops.
"""
import json
import os
import pathlib
import time

import numpy as np
import pytest

from cbir_jax.job import identity as ident
from cbir_jax.job import labels as labels_lib
from cbir_jax.job import rows as rows_lib
from cbir_jax.job.control import Clock
from cbir_jax.job.errors import ExtractError
from cbir_jax import manifest as mf

KINDS = ("fc", "mac")
DIMS = {"fc": 3, "mac": 2}


class FakeSource:
  """Metadata by position: path "r<i>", label i % 3."""

  def rows_meta(self, positions, keys, labels):
    return {"path": [f"r{p}" for p in positions.tolist()],
            "label": np.asarray(positions) % 3,
            "label_name": [f"c{p % 3}" for p in positions.tolist()]}


COLUMNS = ("row", "path", "label", "label_name", "width", "height")


def _step(positions, batch, *, bad=(), nan=()):
  """A step of `batch` rows: values = position * 10 + column; -1 positions are padding."""
  pos = np.full(batch, -1)
  pos[:len(positions)] = positions
  valid = pos >= 0
  desc = {k: np.stack([np.arange(DIMS[k]) + 10.0 * p for p in pos]).astype(np.float32)
          for k in KINDS}
  for j in nan:
    desc["mac"][j, 0] = np.inf
  ok = valid.copy()
  ok[list(bad)] = False
  return rows_lib.StepRows(descriptors=desc, positions=pos, valid=valid, ok=ok,
                           error=["broken" if j in bad else "" for j in range(batch)],
                           width=np.full(batch, 7), height=np.full(batch, 5))


def _assembler(units, dtype="float32"):
  return rows_lib.ShardAssembler(units, kinds=KINDS, dims=DIMS, out_dtype=dtype,
                                 source=FakeSource(), columns=COLUMNS)


def test_assembler_shards_rows_failures_in_order():
  units = [rows_lib.Unit(0, np.arange(0, 5), "shards"), rows_lib.Unit(1, np.arange(5, 8), "shards")]
  a = _assembler(units)
  done = []
  # Steps of 4 rows spanning both shards, one undecodable row (3) and one non-finite (6).
  done += a.add(_step([0, 1, 2, 3], 4, bad=[3]))
  assert done == [] and a.remaining == 2
  done += a.add(_step([4, 5, 6, 7], 4, nan=[2]))
  assert [f.unit.index for f in done] == [0, 1] and all(f.complete for f in done)
  first, second = done
  np.testing.assert_array_equal(first.meta["row"], [0, 1, 2, 4])
  np.testing.assert_array_equal(first.arrays["fc"], [[0, 1, 2], [10, 11, 12], [20, 21, 22],
                                                     [40, 41, 42]])
  assert first.failures == [("r3", "broken", 3)]
  np.testing.assert_array_equal(second.meta["row"], [5, 7])
  assert second.failures[0][1].startswith("descriptor not finite") and second.failures[0][2] == 6
  np.testing.assert_array_equal(second.meta["label"], [5 % 3, 7 % 3])
  assert list(second.meta["path"]) == ["r5", "r7"] and second.meta["width"].dtype == np.int32
  assert (a.images, a.failed, a.remaining) == (6, 2, 0)


def test_assembler_padding_steps_and_wrong_record():
  a = _assembler([rows_lib.Unit(0, np.arange(3), "shards")])
  assert a.add(_step([], 4)) == []  # a padding step: nothing happens
  with pytest.raises(ExtractError, match="holds record 2, the plan expects 0"):
    a.add(_step([2, 1, 0], 4))


def test_assembler_stop_gives_the_finished_part_and_resumes_from_it():
  unit = rows_lib.Unit(3, np.arange(10, 20), "shards")
  a = _assembler([unit])
  a.add(_step([10, 11, 12, 13], 4))
  part = a.stop()
  assert part is not None and part.covered == 4 and not part.complete
  np.testing.assert_array_equal(part.meta["row"], [10, 11, 12, 13])
  # The rerun continues after the part; the finished unit holds only the new rows (the
  # writer joins them to the part on disk).
  again = _assembler([rows_lib.Unit(3, np.arange(10, 20), "shards", done=4)])
  got = again.add(_step(list(range(14, 18)), 4)) + again.add(_step([18, 19], 4))
  assert len(got) == 1 and got[0].complete and got[0].covered == 10
  np.testing.assert_array_equal(got[0].meta["row"], np.arange(14, 20))
  arrays, meta = rows_lib.concat([(part.arrays, part.meta), (got[0].arrays, got[0].meta)])
  np.testing.assert_array_equal(meta["row"], np.arange(10, 20))
  np.testing.assert_array_equal(arrays["mac"][:, 1], 10.0 * np.arange(10, 20) + 1)


def test_assembler_unit_fully_covered_by_its_part_completes_without_rows():
  a = _assembler([rows_lib.Unit(0, np.arange(4), "shards", done=4),
                  rows_lib.Unit(1, np.arange(4, 6), "shards")])
  got = a.add(_step([4, 5], 2))
  assert [(f.unit.index, f.covered, len(f.meta["row"])) for f in got] == [(0, 4, 0), (1, 2, 2)]


def test_assembler_float16_overflow_is_a_failure():
  a = _assembler([rows_lib.Unit(0, np.arange(2), "shards")], dtype="float16")
  step = _step([0, 1], 2)
  step.descriptors["fc"][1, 0] = 1e6  # beyond float16's 65504
  [f] = a.add(step)
  np.testing.assert_array_equal(f.meta["row"], [0])
  assert f.arrays["fc"].dtype == np.float16 and f.failures[0][2] == 1


# --- input identities ------------------------------------------------------------------------


def _ids(pairs):
  return ident.RecordIdentities([k for k, _ in pairs], [s for _, s in pairs])


def test_identity_compare_by_key_and_stamp():
  old = _ids([("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")])
  new = _ids([("a", "1"), ("c", "9"), ("d", "4"), ("e", "5")])
  d = ident.compare(old, new)
  assert d.kept_new.tolist() == [0, 2] and d.kept_old.tolist() == [0, 3]
  assert d.added.tolist() == [3] and d.changed.tolist() == [1] and d.removed.tolist() == [1]
  assert not d.same_records
  text = ident.describe(d, old, new)
  assert text == "1 added (e), 1 removed (b), 1 changed (c)"
  same = ident.compare(old, old)
  assert same.same_records and same.kept_new.tolist() == [0, 1, 2, 3]
  assert ident.compare(old, _ids([("b", "2"), ("a", "1"), ("c", "3"), ("d", "4")])).reordered


def test_folder_identities_and_stamps(tmp_path):
  (tmp_path / "x").mkdir()
  p = tmp_path / "x" / "a.jpg"
  p.write_bytes(b"12345")
  os.utime(p, ns=(1, 1_000_000_123))
  ids = ident.folder_identities(str(tmp_path), [str(p), str(tmp_path / "gone.jpg")])
  assert ids.keys == ["x/a.jpg", "gone.jpg"]
  assert ids.stamps == ["5:1000000123", "missing"]
  digest = ident.folder_identities(str(tmp_path), [str(p)], content_digest=True).stamps[0]
  import hashlib
  assert digest == f"5:1000000123:{hashlib.sha256(b'12345').hexdigest()}"
  ids.save(tmp_path / "r.npz")
  back = ident.RecordIdentities.load(tmp_path / "r.npz")
  assert back.digest() == ids.digest() and back.keys == ids.keys and back.stamps == ids.stamps
  odd = ident.RecordIdentities(["caf\udce9.jpg", "b\nc.jpg"], ["1:2", "3:4"])  # not UTF-8
  odd.save(tmp_path / "o.npz")
  assert ident.RecordIdentities.load(tmp_path / "o.npz") == odd
  ident.RecordIdentities([], []).save(tmp_path / "e.npz")
  assert len(ident.RecordIdentities.load(tmp_path / "e.npz")) == 0


# --- labels CSV ------------------------------------------------------------------------------


def _tree(root: pathlib.Path, names):
  keys = []
  for n in names:
    p = root / n
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    keys.append(str(p))
  return sorted(keys)


def test_labels_by_relative_path_and_unique_name(tmp_path):
  keys = _tree(tmp_path / "imgs", ["cats/1.jpg", "dogs/1.jpg", "dogs/2.jpg", "top.png"])
  csv = tmp_path / "l.csv"
  csv.write_text("file,class_index,class_name,group\ncats/1.jpg,0,cat,g\ndogs/1.jpg,1,dog,h\n"
                 "2.jpg,1,dog,h\nmissing.jpg,5,x,y\n")
  lab = labels_lib.labels_from_csv(str(csv), keys, str(tmp_path / "imgs"))
  assert lab.labels.tolist() == [0, 1, 1, -1]
  assert lab.names == ["cat", "dog", "dog", ""]
  assert lab.extra["group"].tolist() == ["g", "h", "h", ""]
  r = lab.report
  assert (r.labelled, r.unlabelled, r.unused_keys, r.case_mismatches) == (3, 1, 1, 0)
  assert any("1 files have no row" in ln and "top.png" in ln for ln in r.lines())
  assert any("1 CSV rows match no listed file" in ln for ln in r.lines())


def test_labels_ambiguous_name_and_case_and_duplicates(tmp_path):
  keys = _tree(tmp_path / "imgs", ["a/x.jpg", "b/x.jpg", "c/Y.JPEG"])
  csv = tmp_path / "l.csv"
  csv.write_text("file,class_index\nx.jpg,1\n")
  with pytest.raises(ExtractError, match=r"'x\.jpg' names 2 files.*a/x\.jpg, b/x\.jpg.*relative"):
    labels_lib.labels_from_csv(str(csv), keys, str(tmp_path / "imgs"))
  csv.write_text("file,class_index\ny.jpeg,1\n")
  lab = labels_lib.labels_from_csv(str(csv), keys, str(tmp_path / "imgs"))
  assert lab.labels.tolist() == [-1, -1, -1] and lab.report.case_mismatches == 1
  assert any("only in upper/lower case" in ln and "y.jpeg ~ c/Y.JPEG" in ln
             for ln in lab.report.lines())
  csv.write_text("file,class_index\nc/Y.JPEG,1\nc/Y.JPEG,2\n")
  with pytest.raises(ExtractError, match="line 3.*listed twice"):
    labels_lib.labels_from_csv(str(csv), keys, str(tmp_path / "imgs"))


def test_labels_csv_refusals_name_the_line(tmp_path):
  """The one labels CSV reader (extraction's --labels_csv and cbir-classify's)."""
  keys = _tree(tmp_path / "imgs", ["a.jpg"])
  csv = tmp_path / "l.csv"
  csv.write_text("file,label\na.jpg,1\n")
  with pytest.raises(ExtractError, match="columns file and class_index"):
    labels_lib.labels_from_csv(str(csv), keys, str(tmp_path / "imgs"))
  csv.write_text("file,class_index\na.jpg,one\n")
  with pytest.raises(ExtractError, match=r"l\.csv: line 2: class_index 'one' is not an integer"):
    labels_lib.labels_from_csv(str(csv), keys, str(tmp_path / "imgs"))


# --- manifest records ------------------------------------------------------------------------


def _manifest():
  s = mf.Settings(backbone="vgg_tiny", weights={"params_sha256": "ab" * 32, "source": "x",
                                                 "source_sha256": ""},
                  preprocessing={"name": "p", "mean": (1.0, 2.0, 3.0)},
                  descriptor={"threshold": 0.5}, image_size=32, kinds=("fc", "mac"),
                  dtype="float32", output_dtype="float16", draft=False, shard_size=7,
                  package_version="0.1.0")
  return mf.Manifest(settings=s, weights=mf.WeightsRecord(kind="shipped", name="vgg_tiny",
                                                          params_sha256="ab" * 32),
                     input=mf.InputRecord(type="folder", root="/r", num_records=9,
                                          identity_sha256="cd" * 32, records_file="records.npz"),
                     num_shards=2, dimensions={"fc": 64, "mac": 16},
                     shards=(mf.ShardEntry(0, "shards/000000", 0, 7, 6, 1, 0,
                                           {"fc.npy": {"sha256": "e", "bytes": 3}}),),
                     parts={"fc": (mf.FileEntry("fc/part-000000.npy", 6, "f", 9),)},
                     made=("shards", "fc", "records.npz"), replaces=("gen-000001",),
                     update=mf.UpdateReport(0, 5, 4, 3, 2, 1, examples={"added": ["a"]}))


def test_manifest_round_trip_through_json():
  m = _manifest()
  back = mf.Manifest.from_dict(json.loads(json.dumps(m.to_dict())))
  assert back.to_dict() == m.to_dict()
  assert back.settings.digest() == m.settings.digest()
  assert back.settings.diff(m.settings) == []
  other = back.settings.__class__.from_dict({**back.settings.to_dict(), "image_size": 48})
  assert other.diff(m.settings) == ["image_size: 48 in the directory, 32 now"]


@pytest.mark.parametrize("version", [1, 2, 3])
def test_manifests_of_earlier_formats_are_refused_with_how_to_rebuild(tmp_path, version):
  from cbir_jax import store
  (tmp_path / "manifest.json").write_text(json.dumps(
      {"format": "cbir_jax.descriptors", "format_version": version, "status": "complete"}))
  with pytest.raises(mf.OldFormat):
    mf.Manifest.from_dict(json.loads((tmp_path / "manifest.json").read_text()))
  with pytest.raises(store.StoreError) as e:
    store.load_descriptors(tmp_path, "fc")
  msg = str(e.value)
  assert "\n" not in msg and f"format {version}" in msg and "rebuild it" in msg
  assert "--output" in msg


def test_clock_phases_add_up_to_the_total():
  c = Clock()
  for name in ("a", "b", "a", "c"):
    time.sleep(0.01)
    c.charge(name)
  assert set(c.seconds) == {"a", "b", "c"}
  assert abs(sum(c.seconds.values()) - c.total) < 1e-9 and min(c.seconds.values()) > 0


# --- worker index and count from flags or the scheduler's environment -------------------------

from cbir_jax.job import workers as wk  # noqa: E402


@pytest.mark.parametrize("flags, env, want", [
    ((None, None), {}, (0, 1, "single")),
    ((2, 5), {"SLURM_PROCID": "1", "SLURM_NTASKS": "3"}, (2, 5, "--worker/--workers")),
    ((None, None), {"CBIR_JAX_WORKER": "3", "CBIR_JAX_WORKERS": "4"},
     (3, 4, "$CBIR_JAX_WORKER/$CBIR_JAX_WORKERS")),
    ((None, None), {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5",
                    "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
     (2, 4, "SLURM array job")),
    ((None, None), {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"},
     (0, 2, "SLURM array job")),
    ((None, None), {"SLURM_PROCID": "5", "SLURM_NTASKS": "8"}, (5, 8, "SLURM tasks")),
    ((None, 6), {"JOB_COMPLETION_INDEX": "4"}, (4, 6, "Kubernetes Indexed Job")),
    ((None, None), {"JOB_COMPLETION_INDEX": "1", "CBIR_JAX_WORKERS": "3"},
     (1, 3, "Kubernetes Indexed Job")),
])
def test_worker_spec_from_flags_and_environments(flags, env, want):
  spec = wk.resolve(*flags, env)
  assert (spec.index, spec.count, spec.source) == want


@pytest.mark.parametrize("flags, env, match", [
    ((1, None), {}, "together"),
    ((None, 3), {}, "together"),
    ((3, 3), {}, r"in \[0, 3\)"),
    ((None, None), {"JOB_COMPLETION_INDEX": "2"}, "--workers=COMPLETIONS"),
    ((None, None), {"CBIR_JAX_WORKER": "1"}, r"\$CBIR_JAX_WORKERS is not"),
    ((None, None), {"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "not an integer"),
    ((None, None), {"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "2"},
     "SLURM array job"),
    ((0, 0), {}, ">= 1"),
])
def test_worker_spec_refusals_say_where_the_values_came_from(flags, env, match):
  with pytest.raises(wk.WorkerSpecError, match=match):
    wk.resolve(*flags, env)


@pytest.mark.parametrize("num_shards", [0, 1, 5, 7, 12])
@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_shard_ranges_cover_every_shard_once_in_order(num_shards, count):
  got = [k for i in range(count) for k in wk.shard_range(num_shards, wk.WorkerSpec(i, count))]
  assert got == list(range(num_shards))


def _stored_type(values):
  """The column rule written out on Python values: the type every value has, else text."""
  def is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
  if all(isinstance(v, (bool, np.bool_)) for v in values):
    return "bool"
  if all(is_int(v) for v in values):
    return "int64"
  if all(is_int(v) or isinstance(v, (float, np.floating)) for v in values):
    return "float64"
  return "text"


@pytest.mark.parametrize("seed", range(6))
def test_extra_columns_keep_their_type_however_rows_are_split(seed):
  """An extra column split into steps and shards at random, each typed on its own, joins to
  the type of all its values (bool, int64, float64, else text) with the values unchanged."""
  from cbir_jax import meta_columns

  rng = np.random.default_rng(seed)
  pools = {"bool": [True, False, np.bool_(True)], "int": [3, -7, 2 ** 40, np.int32(5)],
           "float": [0.25, -1.5, np.float32(0.5), float("nan")], "text": ["a", "", "7"],
           "none": [None]}
  for mix in (["bool"], ["int"], ["float"], ["int", "float"], ["text"], ["bool", "int"],
              ["int", "none"], ["float", "text"]):
    values = [pools[mix[i % len(mix)]][rng.integers(len(pools[mix[i % len(mix)]]))]
              for i in range(int(rng.integers(len(mix), 12)))]
    rng.shuffle(values)
    cuts = sorted(rng.choice(np.arange(len(values) + 1), 3))
    parts = [values[a:b] for a, b in zip([0, *cuts], [*cuts, len(values)])]
    # Steps hand over lists (Python values); shards are typed arrays, some empty.
    got = meta_columns.join([meta_columns.column(p) for p in parts])
    want = _stored_type(values)
    assert len(got) == len(values)
    if want == "text":
      assert got.dtype.kind == "U", (mix, got.dtype)
      assert got.tolist() == ["" if v is None else str(v) for v in values]
    else:
      assert got.dtype == np.dtype(want), (mix, got.dtype)
      np.testing.assert_array_equal(got, np.asarray(values, dtype=want))


def test_assembler_keeps_numeric_extra_columns():
  """Rows through the shard assembler: a numeric extra column stays numeric in meta."""
  class Source(FakeSource):
    def rows_meta(self, positions, keys, labels):
      return dict(super().rows_meta(positions, keys, labels),
                  score=[p / 4 for p in positions.tolist()],
                  flag=[p % 2 == 0 for p in positions.tolist()])

  a = rows_lib.ShardAssembler([rows_lib.Unit(0, np.arange(6), "shards")], kinds=KINDS,
                              dims=DIMS, out_dtype="float32", source=Source(),
                              columns=(*COLUMNS, "score", "flag"))
  done = a.add(_step([0, 1, 2, 3], 4, bad=[1])) + a.add(_step([4, 5], 4))
  [shard] = done
  assert shard.meta["score"].dtype == np.float64 and shard.meta["flag"].dtype == bool
  np.testing.assert_array_equal(shard.meta["score"], [0, 0.5, 0.75, 1.0, 1.25])
  np.testing.assert_array_equal(shard.meta["flag"], [True, True, False, True, False])
