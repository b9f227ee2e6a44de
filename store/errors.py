"""Errors of the store. Plain exceptions; the service maps them to status codes."""
from __future__ import annotations


class StoreError(Exception):
    """Anything the store cannot do (missing data dir, refused write, ...)."""


class SessionExists(StoreError):
    pass


class SessionMissing(StoreError):
    pass


class CorruptRecord(StoreError, ValueError):
    """A stored value failed its magic, version, length or checksum check."""

    def __init__(self, message: str, key: bytes | None = None):
        super().__init__(message)
        self.key = key


class CorruptBlock(CorruptRecord):
    pass
