"""Errors the align layers share; this module imports nothing, so every layer can raise them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the field, file or flag."""


class RunFinished(Exception):
    """``--resume`` of a run that already reached its end: nothing to train (the message says so)."""
