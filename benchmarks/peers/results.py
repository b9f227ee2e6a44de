"""Progress lines on stderr, and the JSONL stores an interrupted peers run resumes from.

Knows files and JSON only: nothing of memsvc, the peers or the model.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_jsonl(path: Path, field: str = "key") -> dict:
    """{record[field]: record without it} of a JSONL store (a line cut by an interrupted write is skipped)."""
    done: dict = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interrupted write
                    continue
                done[r.pop(field)] = r
    return done
