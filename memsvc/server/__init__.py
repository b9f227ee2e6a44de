"""memsvc.server: the gRPC face of memsvc. build.py makes and runs the server (`create_server`, `serve`),
servicer.py answers each MemoryService RPC, calls.py is the plumbing around every call (auth, parsing, status
codes, limits, metrics and logs)."""
from .build import Service, create_server, serve
from .servicer import MemoryServicer

__all__ = ["MemoryServicer", "Service", "create_server", "serve"]
