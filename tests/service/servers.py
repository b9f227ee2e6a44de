"""An in-process server with the hardening options (auth, limits, metrics), for tests/service."""
from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def served(data_dir: Path, model, address: str = "127.0.0.1:0", **options):
    """Yield (server, port); stop it, then close it (its metrics endpoint, store and data dir lock)."""
    from memsvc.server import create_server

    server, port = create_server(address, data_dir=data_dir, model=model, **options)
    server.start()
    try:
        yield server, port
    finally:
        server.stop(grace=None).wait()
        server.close()  # the manager (its leases given up), the metrics endpoint, the store and data dir lock


def client(port: int, **kwargs):
    from memsvc.clients.client import MemoryClient

    return MemoryClient(f"127.0.0.1:{port}", timeout=120, **kwargs)


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem) in folder: a self-signed certificate for localhost and 127.0.0.1 made by openssl; the
    test is skipped where openssl cannot make one."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl cannot make a test certificate here: {exc}")
    return cert, key
