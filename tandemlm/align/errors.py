"""Errors the align layers share; this module imports nothing, so every layer can raise them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the field, file or flag."""


class RunFinished(Exception):
    """``--resume`` of a run that already reached its end: nothing to train (the message says so)."""


def decode_utf8(raw: bytes, source: str, error: type[Exception] = ValueError) -> str:
    """``raw`` as text; bytes that are not UTF-8 raise ``error`` with one line naming ``source``, line and byte offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise error(
            f"{source} line {line}, byte {exc.start}: not UTF-8 text ({exc.reason}); save the file as UTF-8"
        ) from None
