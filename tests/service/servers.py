"""An in-process server with the hardening options (auth, limits, metrics), for tests/service."""
from __future__ import annotations

import contextlib
from pathlib import Path


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
