"""File names and labels as shown to a person: one line each, whatever characters they hold.

A file name may hold a newline, a tab, other control characters or bytes that are not
UTF-8 (kept by Python as lone surrogates); printed as they are, they break a table row or
a caption into pieces that look like other rows. They are shown as Python escapes
(``\\n``, ``\\t``, ``\\x07``, ``\\udcff``); every printable character, non-ASCII letters
included, stays as it is. JSON output needs none of this: JSON escapes them itself.
"""
from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
  if ch in _NAMED:
    return _NAMED[ch]
  code = ord(ch)
  return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 \
      else f"\\U{code:08x}"


def shown(name: str) -> str:
  """`name` on one line: characters that are not printable become escapes.

  A backslash is doubled only in a name that has something escaped, so ordinary names
  (Windows-style ones included) read as they are and an escaped name reads back unambiguously.
  """
  if name.isprintable():
    return name
  return "".join("\\\\" if ch == "\\" else ch if ch.isprintable() else _escape(ch)
                 for ch in name)


__all__ = ["shown"]
