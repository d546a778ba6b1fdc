"""File names and labels as shown to a person: one line each, whatever characters they hold.

A file name may hold a newline, a tab, other control characters or bytes that are not
UTF-8 (kept by Python as lone surrogates); printed as they are, they break a table row or
a caption into pieces that look like other rows. They are shown as Python escapes
(``\\n``, ``\\t``, ``\\x07``, ``\\udcff``); every printable character, non-ASCII letters
included, stays as it is. JSON output needs none of this: JSON escapes them itself.
"""
from __future__ import annotations


def shown(name: str) -> str:
  """`name` on one line: characters that are not printable become escapes.

  A backslash is doubled only in a name that has something escaped, so ordinary names
  (Windows-style ones included) read as they are and an escaped name reads back unambiguously.
  """
  if name.isprintable():
    return name
  # repr() escapes exactly the characters that are not printable, with Python's escapes.
  return "".join("\\\\" if ch == "\\" else ch if ch.isprintable() else repr(ch)[1:-1]
                 for ch in name)


__all__ = ["shown"]
