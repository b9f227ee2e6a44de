"""memsvc.clients: Python clients that hide the gRPC stubs (sync and asyncio)."""
from .client import AsyncMemoryClient, GenerateResult, MemoryClient

__all__ = ["MemoryClient", "AsyncMemoryClient", "GenerateResult"]
