"""Exceptions as one line of text: for one-line CLI errors, warnings and recorded failures."""

from __future__ import annotations


def first_line(e: BaseException, typed: bool = False, limit: int | None = None) -> str:
    """The first line of `e`'s message (its type's name if it has none); with `typed`, 'Type: first line'.

    `limit` cuts the message part to that many characters.
    """
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    if limit is not None:
        line = line[:limit]
    if typed:
        return f"{type(e).__name__}: {line}"
    return line or type(e).__name__


def one_line(e: BaseException) -> str:
    """`e`'s whole message on one line (a KeyError's without the quotes its str() adds)."""
    text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else e
    return " ".join(str(text).split()) or type(e).__name__
