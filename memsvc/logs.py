"""Structured RPC logs: one JSON object per line per RPC on the `memsvc.rpc` logger.

Fields: ts, method, code, ms (duration), tenant, session, peer, and where they
apply tokens_in (appended), tokens_out (generated), finish, limit, error.
Never conversation content: no text, messages or token ids; error messages are
left out for INVALID_ARGUMENT, whose messages may quote the request.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

RPC_LOGGER = "memsvc.rpc"
_log = logging.getLogger(RPC_LOGGER)


def log_rpc(**fields) -> None:
    if not _log.isEnabledFor(logging.INFO):
        return
    doc = {"ts": round(time.time(), 3)}
    doc.update((k, v) for k, v in fields.items() if v is not None and v != "")
    _log.info(json.dumps(doc, ensure_ascii=False, separators=(",", ":"), default=str))


def configure_rpc_log(stream: TextIO | None = None, enabled: bool = True) -> logging.Handler | None:
    """Send the RPC log, bare JSON lines, to `stream` (default stderr); or silence it."""
    for h in list(_log.handlers):
        _log.removeHandler(h)
    _log.propagate = False
    if not enabled:
        _log.setLevel(logging.WARNING)
        return None
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    _log.addHandler(handler)
    _log.setLevel(logging.INFO)
    return handler
