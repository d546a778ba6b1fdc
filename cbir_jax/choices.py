"""Allowed values of settings, defined once: the launchers' flags and the configs' checks read them.

A config field typed `Annotated[str, OneOf(...)]` (the aliases below) is an enum flag, and
`check(config)` refuses any other value with one line naming the setting.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, Callable

from cbir_jax.descriptors import KINDS, MASK_MODES

COMPUTE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
OUTPUT_DTYPES: tuple[str, ...] = ("float32", "float16")
PROGRESS_MODES: tuple[str, ...] = ("auto", "bar", "log", "none")
# Where images are resized to the network's input: "host" (Pillow, after decoding), "device"
# (in the jitted step, `resize`), "auto" (the measured default of the platform).
RESIZE_MODES: tuple[str, ...] = ("auto", "device", "host")


@dataclasses.dataclass(frozen=True)
class OneOf:
  """The values a string setting may take.

  Attributes:
    values: the allowed values, or a function giving them (when they come from a registry).
    what: how messages name the setting ("compute dtype").
    accept: a function that accepts more than `values` offers (hidden test backbones), or
      None: exactly `values`.
  """
  values: tuple[str, ...] | Callable[[], tuple[str, ...]]
  what: str
  accept: Callable[[str], bool] | None = None

  def offered(self) -> tuple[str, ...]:
    """What flags list and help shows."""
    return tuple(self.values() if callable(self.values) else self.values)

  def allows(self, value: str) -> bool:
    return self.accept(value) if self.accept else value in self.offered()


def _is_backbone(name: str) -> bool:
  from cbir_jax import backbones

  return name in backbones.BACKBONES


def _models() -> tuple[str, ...]:
  from cbir_jax import backbones  # the registry fills at import

  return backbones.names()


Kind = Annotated[str, OneOf(KINDS, "descriptor kind")]
ComputeDtype = Annotated[str, OneOf(COMPUTE_DTYPES, "compute dtype")]
OutputDtype = Annotated[str, OneOf(OUTPUT_DTYPES, "output dtype")]
Masks = Annotated[str, OneOf(MASK_MODES, "masks")]
Progress = Annotated[str, OneOf(PROGRESS_MODES, "progress")]
Resize = Annotated[str, OneOf(RESIZE_MODES, "resize")]
# Flags offer the registry's public names; Python callers may use the test-only ones too.
Model = Annotated[str, OneOf(_models, "model", accept=_is_backbone)]


def one_of(hint: Any) -> OneOf | None:
  """The OneOf of a type hint (Annotated, or Optional/tuple of one), or None."""
  if typing.get_origin(hint) is Annotated:
    return next((m for m in typing.get_args(hint)[1:] if isinstance(m, OneOf)), None)
  return next(filter(None, map(one_of, typing.get_args(hint))), None)


def check(config: Any) -> None:
  """Checks every OneOf field of a dataclass instance (single values and sequences of them).

  Raises:
    ValueError: the first field with a value not allowed, e.g. "compute dtype must be one of
      ('float32', 'bfloat16', 'float16'), got 'int8'".
  """
  hints = typing.get_type_hints(type(config), include_extras=True)
  for f in dataclasses.fields(config):
    rule = one_of(hints[f.name])
    value = getattr(config, f.name)
    if rule is None or value is None:
      continue
    if isinstance(value, str):
      if not rule.allows(value):
        raise ValueError(f"{rule.what} must be one of {rule.offered()}, got {value!r}")
    else:
      bad = [v for v in value if not rule.allows(v)]
      if bad:
        raise ValueError(f"unknown {rule.what}s {bad}; known: {list(rule.offered())}")


__all__ = ["COMPUTE_DTYPES", "KINDS", "MASK_MODES", "OUTPUT_DTYPES", "PROGRESS_MODES",
           "RESIZE_MODES", "OneOf", "Kind", "ComputeDtype", "OutputDtype", "Masks", "Progress", "Resize", "Model", "check", "one_of"]
