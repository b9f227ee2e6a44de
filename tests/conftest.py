"""Shared fixtures: the real model (fetched once into $MEMSVC_HOME), tiny random
models that reuse its tokenizer, in-process servers bound to port 0, and one real
PostgreSQL server for the whole run (pg_server; pg_url: a fresh database of it)."""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

# Triton kernels run on CPU through its interpreter. The switch must be set before triton is
# first imported (transformers' SDPA integration imports it, through torch), and tests outside
# tests/kernels import the model stack before that folder's conftest loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    from memsvc.model import pull_default

    return pull_default(quiet=True)


def make_tiny_model(out: Path, tokenizer_dir: Path, *, seed: int, max_positions: int = 512,
                    initializer_range: float = 0.02, layers: int = 2) -> Path:
    """A random Llama of `layers` layers (2 by default) with the real tokenizer and chat template (GQA 4/2, head
    dim 16).
    initializer_range: the weights' std; at 0.3 its replies depend on the context (at the default 0.02 a
    greedy reply is one token over and over, whatever came before)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      tie_word_embeddings=True, initializer_range=initializer_range)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, real_model_dir) -> tuple[Path, Path]:
    """Two tiny models that differ only in their random weights."""
    root = tmp_path_factory.mktemp("tiny-models")
    return (make_tiny_model(root / "tiny-a", real_model_dir, seed=1),
            make_tiny_model(root / "tiny-b", real_model_dir, seed=2))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dirs):
    from memsvc.model import load_model

    return load_model(str(tiny_model_dirs[0]))


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory, real_model_dir) -> Path:
    """A tiny model with 2,048 positions: room for sessions past sink + hot + warm, with cold blocks."""
    return make_tiny_model(tmp_path_factory.mktemp("long-tiny") / "m", real_model_dir, seed=3, max_positions=2048)


@pytest.fixture(scope="session")
def long_model(long_model_dir):
    from memsvc.model import load_model

    return load_model(str(long_model_dir))


@pytest.fixture(scope="session")
def real_model(real_model_dir):
    from memsvc.model import load_model

    return load_model(str(real_model_dir))


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL server started for this test run (tools/pgserver.py: initdb in a temporary directory, a free
    loopback port, fsync off), stopped and removed at its end."""
    from tools.pgserver import PgServer

    try:
        server = PgServer.start(fsync=False)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"the PostgreSQL tests need a PostgreSQL server and none could be started: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database of pg_server for one test, dropped after it; its URL."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url.rsplit("/", 1)[1])


@contextlib.contextmanager
def running_server(data_dir: Path | str, model, **options):
    """An in-process server on 127.0.0.1:0 over data_dir (an LMDB directory, or any store spec such as a
    postgresql:// URL); yields (client, server)."""
    from memsvc.clients.client import MemoryClient
    from memsvc.server import create_server

    server, port = create_server("127.0.0.1:0", data_dir=data_dir, model=model, **options)
    server.start()
    client = MemoryClient(f"127.0.0.1:{port}", timeout=600)
    try:
        yield client, server
    finally:
        client.close()
        server.stop(grace=None).wait()
        server.close()  # the manager (its leases given up), the metrics endpoint, the store and data dir lock


@pytest.fixture
def tiny_server(tmp_path, tiny_model):
    with running_server(tmp_path / "data", tiny_model) as pair:
        yield pair
