"""What every launcher shares: absl flags generated from a config dataclass, and one preamble.

`define(Config)` declares one flag per field (name, type, default, allowed values, help from
the class docstring's "Attributes:"), `config()` builds the dataclass back from the parsed
flags, and `run(prog, main)` starts absl with the XLA:CPU setting, quiet third-party logs
(unless -v is given), the GPU-unused warning, and one-line errors.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import logging
import os
import re
import sys
import types
import typing
from typing import Any, Callable, Mapping

from absl import app, flags
from absl import logging as absl_logging

from cbir_jax import choices, runtime

# Flags this module defines on behalf of a launcher belong to the launcher (its --help).
flags.disclaim_key_flags()

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Read by TensorFlow when it loads (tf.data, TFDS), before any Python logging is set up: its
# C++ start-up lines (oneDNN, CPU features, deprecations) would come first otherwise. oneDNN's
# line goes only with oneDNN off; TensorFlow computes nothing here (Pillow decodes, tf.data
# only moves the bytes), so nothing we output changes.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}
# Third-party loggers whose warnings still show by default: JAX says there why a GPU backend
# did not start (runtime.warn_if_gpu_unused points to it).
_KEEP_WARNINGS = ("jax",)


# --- flags from a dataclass -------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
  """Field name -> its text in the docstring's "Attributes:" section (Google style).

  An entry may name several fields ("threshold, relative: ..."); continuation lines are
  indented deeper than the entry.
  """
  lines = (inspect.getdoc(cls) or "").splitlines()
  start = next((i for i, ln in enumerate(lines) if ln.strip() == "Attributes:"), None)
  if start is None:
    return {}
  head = len(lines[start]) - len(lines[start].lstrip())
  docs: dict[str, str] = {}
  names: list[str] = []
  indent = None
  for line in lines[start + 1:]:
    if not line.strip():
      continue
    depth = len(line) - len(line.lstrip())
    if depth <= head:
      break
    indent = depth if indent is None else indent
    entry = re.match(r"(\w+(?:\s*,\s*\w+)*)\s*:\s*(.*)", line.strip())
    if depth == indent and entry:
      names = [n.strip() for n in entry.group(1).split(",")]
      docs.update({n: entry.group(2) for n in names})
    else:
      docs.update({n: f"{docs[n]} {line.strip()}".strip() for n in names})
  return docs


@dataclasses.dataclass(frozen=True)
class _Kind:
  """What a field's type hint asks of its flag."""
  base: type  # str, int, float or bool (the element type of a list)
  is_list: bool
  as_tuple: bool  # a list flag that goes back into the config as a tuple
  rule: choices.OneOf | None


def _kind_of(hint: Any) -> _Kind:
  rule = choices.one_of(hint)
  if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) != 1:
      raise TypeError(f"unsupported config type {hint}")
    hint = args[0]
  if typing.get_origin(hint) is typing.Annotated:
    hint = typing.get_args(hint)[0]
  origin = typing.get_origin(hint)
  if origin in (tuple, list, collections.abc.Sequence):
    element = _kind_of(typing.get_args(hint)[0])
    return _Kind(element.base, True, origin is not list, rule)
  if hint not in (str, int, float, bool):
    raise TypeError(f"unsupported config type {hint}")
  return _Kind(hint, False, False, rule)


class _ListParser(flags.ListParser):
  """A comma-separated list whose items are converted (int, float) and checked (OneOf)."""

  def __init__(self, base: type, rule: choices.OneOf | None):
    super().__init__()
    self._base, self._rule = base, rule

  def parse(self, argument: Any) -> list[Any]:
    items = super().parse(argument)
    try:
      values = [self._base(v) for v in items]
    except ValueError:
      raise ValueError(f"expected a comma-separated list of {self._base.__name__}, got "
                       f"{argument!r}") from None
    bad = [v for v in values if self._rule and not self._rule.allows(v)]
    if bad:
      raise ValueError(f"unknown {self._rule.what}s {bad}; known: {list(self._rule.offered())}")
    return values

  def flag_type(self) -> str:
    return f"comma separated list of {self._base.__name__}"


def _define_one(name: str, kind: _Kind, default: Any, help_text: str, required: bool,
                fv: flags.FlagValues) -> None:
  common = dict(flag_values=fv, required=required)
  if kind.is_list:
    if kind.rule:
      help_text += f" (from {', '.join(kind.rule.offered())})"
    flags.DEFINE(_ListParser(kind.base, kind.rule), name,
                 None if default is None else list(default), help_text,
                 serializer=flags.CsvListSerializer(","), **common)
  elif kind.rule:
    flags.DEFINE_enum(name, default, list(kind.rule.offered()), help_text, **common)
  else:
    define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              str: flags.DEFINE_string}[kind.base]
    define(name, default, help_text, **common)


class ConfigFlags:
  """The flags `define` made for one dataclass; `config()` reads them back into it."""

  def __init__(self, cls: type, kinds: Mapping[str, _Kind], fv: flags.FlagValues):
    self.cls, self._kinds, self._fv = cls, dict(kinds), fv

  def values(self) -> dict[str, Any]:
    """The parsed flags as field values (lists back to tuples where the field is one)."""
    out = {}
    for name, kind in self._kinds.items():
      v = self._fv[name].value
      out[name] = tuple(v) if kind.as_tuple and v is not None else v
    return out

  def config(self, **overrides: Any) -> Any:
    """The dataclass from the parsed flags; `overrides` replace fields."""
    return self.cls(**{**self.values(), **overrides})


def define(cls: type, *, defaults: Mapping[str, Any] | None = None,
           flag_values: flags.FlagValues = flags.FLAGS) -> ConfigFlags:
  """Declares one absl flag per field of the dataclass `cls`; `.config()` of the result reads
  them back once absl parsed the command line.

  Types: str, int, float, bool (--name / --noname); tuples and sequences of those as
  comma-separated lists; `X | None` for an optional value; `choices.OneOf` annotations as
  enums (lists: every item checked). A field without a default is a required flag. Help
  is the field's entry in the docstring's "Attributes:" section. `defaults` replace field
  defaults (e.g. a path by the repo); tests pass their own `flag_values`.
  """
  hints = typing.get_type_hints(cls, include_extras=True)
  docs = field_docs(cls)
  defaults = dict(defaults or {})
  kinds = {}
  for f in dataclasses.fields(cls):
    kind = _kind_of(hints[f.name])
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    if f.name in defaults:
      default = defaults.pop(f.name)
    elif required:
      default = None
    else:
      default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    _define_one(f.name, kind, default, docs.get(f.name, f.name.replace("_", " ")),
                required, flag_values)
    kinds[f.name] = kind
  if defaults:
    raise ValueError(f"defaults for fields {cls.__name__} does not have: {sorted(defaults)}")
  return ConfigFlags(cls, kinds, flag_values)


# --- the preamble -------------------------------------------------------------------------------


def _ours(record: logging.LogRecord) -> bool:
  """Whether a log record comes from cbir_jax code (a warning it logged itself)."""
  if record.name == "py.warnings":  # captured warnings: "path:line: Category: message"
    return str(record.args[0] if record.args else record.msg).startswith(_PACKAGE_DIR)
  return os.path.abspath(record.pathname).startswith(_PACKAGE_DIR + os.sep)


class _QuietFilter(logging.Filter):
  """Default verbosity: cbir_jax's and JAX's warnings, everyone's errors; the rest only at -v."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR:
      return True
    if record.levelno < logging.WARNING:
      return False
    return _ours(record) or record.name.split(".")[0] in _KEEP_WARNINGS


class _Formatter(logging.Formatter):
  """cbir_jax's own records as "prog: warning: message"; others in absl's format."""

  def __init__(self, prog: str, other: logging.Formatter | None):
    super().__init__()
    self._prog, self._other = prog, other or absl_logging.PythonFormatter()

  def format(self, record: logging.LogRecord) -> str:
    if not _ours(record):
      return self._other.format(record)
    text = record.getMessage()
    if record.name == "py.warnings":  # "path:line: Category: message" and the source line
      text = text.splitlines()[0]
    return f"{self._prog}: {record.levelname.lower()}: {text}"


def quiet_environment(environ: typing.MutableMapping[str, str] = os.environ) -> None:
  """Sets QUIET_ENV where the user has not chosen otherwise (before TensorFlow loads)."""
  for key, value in QUIET_ENV.items():
    environ.setdefault(key, value)


def setup_logging(prog: str, *, quiet: bool) -> None:
  """Our warnings with the launcher's prefix; with `quiet`, third-party INFO and warnings off."""
  handler = absl_logging.get_absl_handler()
  handler.setFormatter(_Formatter(prog, handler.python_handler.formatter))
  if quiet:
    absl_logging.set_verbosity(absl_logging.WARNING)
    handler.addFilter(_QuietFilter())
    logging.captureWarnings(True)  # Python warnings through the same filter
    # TensorFlow's Python logger may carry a handler of its own.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def printer(prog: str) -> Callable[[str], None]:
  """A `log` function for libraries: one line on stderr, "prog: message"."""
  def log(msg: str) -> None:
    print(f"{prog}: {msg}", file=sys.stderr, flush=True)
  return log


def warn_if_gpu_unused(prog: str) -> None:
  """runtime.warn_if_gpu_unused with the launcher's prefix (starts JAX only if a GPU is seen)."""
  runtime.warn_if_gpu_unused(printer(prog))


def _help_from(module: types.ModuleType) -> None:
  """--help shows `module`'s docstring and flags, whatever script started it.

  absl's --help lists the flags of the module named by sys.argv[0] and the docstring of
  __main__; a command's flags are defined in cbir_jax/commands/, while the program is a
  console script, `python -m cbir_jax` or a launch/ wrapper.
  """
  for flag in flags.FLAGS.get_key_flags_for_module(module.__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  main_module = sys.modules["__main__"]
  if main_module is not module and module.__doc__:
    main_module.__doc__ = module.__doc__


def run(prog: str, main: Callable[[], int | None], *, gpu_warning: bool = True,
        tune_xla: bool = True,
        errors: tuple[type[BaseException], ...] = (ValueError, OSError)) -> None:
  """Runs `main()` under absl after the shared preamble; its return value is the exit status.

  Preamble: no stray arguments; quiet third-party logs unless -v/--verbosity was given
  (QUIET_ENV set before TensorFlow loads); with `tune_xla`, the XLA:CPU setting
  (runtime.tune_xla_cpu; the benchmark measures XLA's defaults too) before any JAX
  computation; with `gpu_warning`, one line when an NVIDIA GPU is visible but JAX runs on
  the CPU (launchers that must start JAX later, e.g. after jax.distributed.initialize, pass
  False and call `warn_if_gpu_unused` themselves). `errors` are reported as one line
  "prog: error: message" (prog: the launcher's name) with exit status 1.
  """
  _help_from(sys.modules[main.__module__])

  def absl_main(argv: list[str]) -> int | None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet = not flags.FLAGS["verbosity"].present
    if quiet:
      quiet_environment()
    setup_logging(prog, quiet=quiet)
    if tune_xla:
      runtime.tune_xla_cpu()
    if gpu_warning:
      warn_if_gpu_unused(prog)
    try:
      return main()
    except errors as e:
      sys.exit(f"{prog}: error: {e}")
    except KeyboardInterrupt:
      print(f"{prog}: interrupted", file=sys.stderr)
      sys.exit(130)

  app.run(absl_main)


__all__ = ["ConfigFlags", "QUIET_ENV", "define", "field_docs", "printer", "quiet_environment",
           "run", "setup_logging", "warn_if_gpu_unused"]
