"""The launchers: flags generated from config dataclasses, and quiet output by default.

The quiet checks run each launcher as a user would (a fresh environment: no TensorFlow or
XLA settings from tests/conftest.py) and require every line it prints to be cbir_jax's own.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
from typing import Annotated

import numpy as np
import pytest
from absl import flags

from cbir_jax import backbones, choices, classify, cli, evaluation, extract, store
from cbir_jax.choices import Kind, OneOf

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = REPO / "cbir_jax" / "sample_images"
LAUNCHERS = ("extract", "search", "index", "serve", "dedup", "evaluate", "classify",
             "port_weights", "benchmark", "gpu_check")


@dataclasses.dataclass
class _Toy:
  """A config with every kind of field.

  Attributes:
    path: where it goes
      (continued on a second line).
    count, scale: two fields,
      one entry.
    on: a switch.
    kind: a descriptor kind.
    sizes: some sizes.
    kinds: some kinds.
    maybe: an optional number.
    colour: a colour.
  """
  path: str
  count: int = 3
  scale: float = 0.5
  on: bool = True
  kind: Kind = "fc"
  sizes: tuple[int, ...] = (1, 2)
  kinds: tuple[Kind, ...] = ("mac",)
  maybe: int | None = None
  colour: Annotated[str, OneOf(("red", "blue"), "colour")] | None = None


def _parse(*argv: str, **define: object) -> tuple[cli.ConfigFlags, flags.FlagValues]:
  fv = flags.FlagValues()
  made = cli.define(_Toy, flag_values=fv, **define)
  fv(["prog", *argv])
  return made, fv


def test_field_docs_reads_grouped_and_continued_entries():
  docs = cli.field_docs(_Toy)
  assert docs["path"] == "where it goes (continued on a second line)."
  assert docs["count"] == docs["scale"] == "two fields, one entry."
  assert docs["colour"] == "a colour." and set(docs) == {f.name for f in dataclasses.fields(_Toy)}


def test_flags_round_trip_to_the_dataclass():
  made, fv = _parse("--path=/x", "--count=7", "--scale=2.5", "--noon", "--kind=gem",
                    "--sizes=4,5,6", "--kinds=fc,conv", "--maybe=9", "--colour=blue")
  assert made.config() == _Toy(path="/x", count=7, scale=2.5, on=False, kind="gem",
                               sizes=(4, 5, 6), kinds=("fc", "conv"), maybe=9, colour="blue")
  assert fv["kind"].help.startswith("<fc|conv|fc_conv|mac|spoc|gem>: a descriptor kind")
  assert "from fc, conv, fc_conv, mac, spoc, gem" in fv["kinds"].help
  # Defaults are the dataclass's, with the same types (tuples back as tuples).
  made, _ = _parse("--path=/y")
  assert made.config() == _Toy(path="/y")
  made, _ = _parse("--path=/y", defaults={"count": 11})
  assert made.config().count == 11 and made.config(count=1).count == 1


@pytest.mark.parametrize("argv, error", [
    ((), r"--path must have a value"),
    (("--path=a", "--kind=bogus"), r"--kind.*one of"),
    (("--path=a", "--kinds=fc,bogus"), r"unknown descriptor kinds \['bogus'\]"),
    (("--path=a", "--sizes=1,x"), r"comma-separated list of int"),
    (("--path=a", "--colour=green"), r"--colour.*one of"),
])
def test_bad_flags_are_refused_while_parsing(argv, error):
  fv = flags.FlagValues()
  cli.define(_Toy, flag_values=fv)
  with pytest.raises(flags.Error, match=error):
    fv(["prog", *argv])
    fv.validate_all_flags()


def test_checks_and_flags_share_the_allowed_values():
  from cbir_jax import inference

  assert set(choices.COMPUTE_DTYPES) == set(inference.DTYPES)
  # A config check refuses what the flag refuses, with the same list.
  with pytest.raises(extract.ExtractError, match=r"compute dtype must be one of "
                     r"\('float32', 'bfloat16', 'float16'\), got 'int8'"):
    extract.ExtractConfig(output="x", images="y", dtype="int8").check()
  with pytest.raises(ValueError, match=r"unknown descriptor kinds \['x'\]"):
    choices.check(evaluation.EvaluateConfig(index="i", kinds=("fc", "x")))
  # Test-only backbones: usable from Python, offered by --model only with the variable set.
  choices.check(classify.ClassifyConfig(images="i", model="vgg_tiny"))
  assert "vgg_tiny" in backbones.names(include_hidden=True)
  assert "vgg_tiny" not in backbones.names(include_hidden=False)
  assert set(backbones.names(include_hidden=False)) == {"vgg16", "efficientnet_lite0"}


# --- the launchers themselves ------------------------------------------------------------------


def _user_env(**extra: str) -> dict[str, str]:
  """The environment of a user's shell: none of the settings tests/conftest.py adds."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS",
                      "CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS", backbones.TEST_BACKBONES_ENV)}
  env["PYTHONPATH"] = str(REPO)
  env.update(extra)
  return env


def _start(script: str, *args: str, **env: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(REPO / "launch" / f"{script}.py"), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=_user_env(**env), cwd=REPO)


def _finish(proc: subprocess.Popen, timeout: int = 600, status: int = 0) -> tuple[str, str]:
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == status, (out[-2000:], err[-3000:])
  return out, err


def _flags_of(help_text: str) -> set[str]:
  return set(re.findall(r"^  --(?:\[no\])?(\w+):", help_text, re.M))


def test_every_launcher_offers_its_config_fields_and_only_real_backbones():
  from benchmarks import BenchmarkConfig
  from cbir_jax import ann, dedup, porting, query, serve
  from benchmarks.gpu_check import GpuCheckConfig

  configs = {"extract": extract.ExtractConfig, "search": query.SearchConfig,
             "index": ann.IndexConfig, "serve": serve.ServeConfig, "dedup": dedup.DedupConfig,
             "evaluate": evaluation.EvaluateConfig, "classify": classify.ClassifyConfig,
             "port_weights": porting.PortConfig, "benchmark": BenchmarkConfig,
             "gpu_check": GpuCheckConfig}
  procs = {name: _start(name, "--help") for name in LAUNCHERS}
  helps = {name: _finish(proc, 300, status=1)[0] for name, proc in procs.items()}  # absl: 1
  for name, text in helps.items():
    fields = {f.name for f in dataclasses.fields(configs[name])}
    assert fields <= _flags_of(text), (name, fields - _flags_of(text))
    assert "_tiny" not in text, name  # the test-only backbones are not offered
  offered = {name: re.findall(r"--(?:model|e2e_backbone|scaling_backbone): <([^>]*)>", text)
             for name, text in helps.items()}
  assert {name: len(m) for name, m in offered.items() if m} == {
      "extract": 1, "classify": 1, "port_weights": 1, "benchmark": 2, "gpu_check": 1}
  assert all(set(m.split("|")) == {"efficientnet_lite0", "vgg16"}
             for models in offered.values() for m in models), offered
  # --images names the photos wherever a launcher reads a photo folder; --data_dir is only
  # extract's TFDS data_dir.
  assert all("images" in _flags_of(helps[n]) for n in ("extract", "classify", "benchmark"))
  assert [n for n in LAUNCHERS if "data_dir" in _flags_of(helps[n])] == ["extract"]
  port = _start("port_weights", "--input=x.pth", "--output=y")
  _, err = port.communicate(timeout=300)
  assert port.returncode != 0 and "--model must have a value other than None" in err
  tiny = _start("extract", "--images=x", "--output=y", "--model=vgg_tiny")
  _, err = tiny.communicate(timeout=300)
  assert tiny.returncode != 0 and "efficientnet_lite0|vgg16" in err


def _labels_csv(path: pathlib.Path) -> pathlib.Path:
  files = sorted(p.name for p in SAMPLES.glob("*.jpg"))
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["file", "class_index", "class_name"])
    w.writerows((name, i % 3, f"c{i % 3}") for i, name in enumerate(files))
  return path


_CLASSIFY_LINE = re.compile(r"^[^\t]+\.jpg\t(?:[^,\t]+ [01]\.\d\d, ){4}[^,\t]+ [01]\.\d\d$")
# A result line: rank, distance, path, its label in brackets (none when unlabelled).
_RESULT_LINE = re.compile(r"^ +\d+ +\d+\.\d{6}  \S.*?(  \[[^\]]+\])?(  \(the query itself\))?$")


def _search_lines_ok(out: str) -> list[str]:
  """Lines of a search table that are not the table's own."""
  return [ln for ln in out.splitlines()
          if not (ln.startswith("query (")
                  or ln in ("rank    distance  path", "rank    distance  path  [label]")
                  or _RESULT_LINE.match(ln))]


@pytest.mark.slow
def test_launchers_print_only_their_own_lines(tmp_path):
  """extract (the README's command), classify, search (table and JSON) and evaluate, run as a
  user runs them: every stdout and stderr line is cbir_jax's."""
  out, tiny = tmp_path / "samples", tmp_path / "tiny"
  runs = [_start("extract", f"--images={SAMPLES.relative_to(REPO)}", f"--output={out}"),
          _start("extract", f"--images={SAMPLES}", f"--output={tiny}", "--model=vgg_tiny",
                 "--weights=random", "--image_size=64",
                 f"--labels_csv={_labels_csv(tmp_path / 'labels.csv')}",
                 **{backbones.TEST_BACKBONES_ENV: "1"}),
          _start("classify", f"--images={SAMPLES}")]
  (x_out, x_err), (t_out, t_err), (c_out, c_err) = [_finish(p) for p in runs]
  for text in (x_out, t_out):
    assert [ln for ln in text.splitlines() if not ln.startswith("extracted ")] == []
  for text in (x_err, t_err):
    assert [ln for ln in text.splitlines() if not ln.startswith(("[extract] ", "extract: "))] \
        == []
  assert len(c_out.splitlines()) == 10 and all(_CLASSIFY_LINE.match(ln)
                                               for ln in c_out.splitlines()), c_out
  assert c_err == ""
  query = str(SAMPLES / "chelsea.jpg")
  runs = [_start("search", f"--index={out}", f"--query={query}", "--k=3"),
          _start("search", f"--index={out}", f"--query={query}", "--k=30", "--json"),
          _start("evaluate", f"--index={tiny}", "--k=2")]
  (s_out, s_err), (j_out, j_err), (e_out, e_err) = [_finish(p) for p in runs]
  assert _search_lines_ok(s_out) == [] and s_err == ""
  json.loads(j_out)  # nothing but the JSON on stdout; the note on stderr
  assert j_err.splitlines() == ["search: k=30 is more than the index has (10 rows): showing "
                                "all 10"]
  assert e_out.strip() == evaluation.format_table(evaluation.evaluate(str(tiny), k=2))
  assert e_err == ""
  # -v gives the libraries' logs back (orbax's INFO lines while loading the weights).
  verbose = _start("search", f"--index={out}", f"--query={query}", "--k=1", "-v", "0")
  v_out, v_err = _finish(verbose)
  assert _search_lines_ok(v_out) == [] and "orbax" in v_err


def _small_images(folder: pathlib.Path, n: int) -> list[str]:
  """n random 40x30 PNGs in two class folders; their paths, sorted."""
  from PIL import Image

  rng = np.random.default_rng(0)
  paths = []
  for i in range(n):
    p = folder / f"class{i % 2}" / f"img{i:02d}.png"
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(p)
    paths.append(str(p))
  return sorted(paths)


def _table_rows(table: str) -> list[tuple[str, int, float, str, str, bool]]:
  """(query, rank, distance, path, label, self) of every result line of a search table."""
  rows, query = [], ""
  for line in table.splitlines():
    if line.startswith("query ("):
      query = line.split("): ", 1)[1].split("  [", 1)[0]
    elif (m := re.match(r"^ +(\d+) +(\d+\.\d{6})  (.*?)(?:  \[([^\]]+)\])?"
                        r"(  \(the query itself\))?$", line)):
      rows.append((query, int(m[1]), float(m[2]), m[3], m[4] or "", bool(m[5])))
  return rows


def test_search_json_matches_the_table(tmp_path):
  """The same search printed as a table and as JSON: the same rows, ranks, distances,
  paths, labels; JSON rows name the database row that the path has in the index."""
  paths = _small_images(tmp_path / "imgs", 12)
  out = tmp_path / "index"
  extract.run(extract.ExtractConfig(output=str(out), images=str(tmp_path / "imgs"),
                                    model="vgg_tiny", weights="random", image_size=32,
                                    batch_size=4, progress="none"), log=lambda m: None)
  args = (f"--index={out}", f"--query={paths[2]}", "--query_ids=5,7", "--k=4",
          "--exclude_self", "--kind=conv")
  table, as_json = (_finish(p)[0] for p in [_start("search", *args),
                                          _start("search", *args, "--json")])
  got = json.loads(as_json)
  assert got["kind"] == "conv" and got["k"] == 4 and len(got["results"]) == 12
  rows = [(r["query"], r["rank"], round(r["distance"], 6), r["path"], r["label"], r["self"])
          for r in got["results"]]
  assert rows == _table_rows(table)
  _, meta = store.load_descriptors(out, "conv")
  row_of = {str(p): i for i, p in enumerate(meta["path"])}
  assert all(r["row"] == row_of[r["path"]] for r in got["results"])
  # Every query left its own row out: the image (found by its path) and the two rows.
  assert [r["self_row"] for r in got["results"][::4]] == [row_of[paths[2]], 5, 7]
  assert not any(r["row"] == r["self_row"] for r in got["results"])
  np.testing.assert_array_equal([r["query_row"] for r in got["results"][::4]], [None, 5, 7])


def test_quiet_logging_keeps_our_warnings_and_errors_only():
  import logging

  ours = str(REPO / "cbir_jax" / "porting" / "vgg.py")
  theirs = "/site-packages/orbax/checkpoint/checkpointer.py"

  def record(name, level, path, msg="m"):
    return logging.LogRecord(name, level, path, 1, msg, None, None)

  keep = cli._QuietFilter().filter
  assert keep(record("absl", logging.WARNING, ours, "unknown checksum"))
  assert not keep(record("absl", logging.INFO, ours))
  assert not keep(record("absl", logging.INFO, theirs))  # orbax's INFO lines
  assert not keep(record("tensorflow", logging.WARNING, theirs))  # deprecations
  assert not keep(record("jax._src.xla_bridge", logging.INFO, theirs))  # backend probing
  assert keep(record("jax._src.xla_bridge", logging.WARNING, theirs))  # why no GPU backend
  assert keep(record("orbax", logging.ERROR, theirs))
  fmt = cli._Formatter("port_weights", None)
  assert fmt.format(record("absl", logging.WARNING, ours, "unknown checksum")) == \
      "port_weights: warning: unknown checksum"
  assert fmt.format(record("orbax", logging.ERROR, theirs, "x")).startswith("E")  # absl's
  env = {"TF_CPP_MIN_LOG_LEVEL": "0"}
  cli.quiet_environment(env)  # the user's own choice stays
  assert env == {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_ENABLE_ONEDNN_OPTS": "0"}
