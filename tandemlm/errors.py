"""The error types users catch, at the bottom of the package so every layer can raise them.

``deploy``, ``quantize`` and ``models`` all raise these; keeping them here lets ``models`` sit
under ``deploy`` and ``quantize`` without either of those importing the other.
"""

from __future__ import annotations


class EngineError(Exception):
    """A problem with the request or the model that the caller can fix; the message is one line."""


class QuantizeError(EngineError):
    """Quantizing failed or cannot start; the message is one line naming the file, flag or field."""
