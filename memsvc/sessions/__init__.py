"""memsvc.sessions: the session manager (manager.py) and the paths of its calls: an Append (turns.py), a
Generate (generate.py), expiry (expiry.py), one call per session at a time (hold.py), leases on the sessions in
memory over a shared store (leases.py), what it reports (measures.py), and what it keeps of each session
(live.py)."""
from .generate import Chunk, GenerateParams
from .hold import DEFAULT_HOLD_WAIT, Holds, SessionBusy
from .live import Admit, Counters, SessionView
from .manager import DEFAULT_BLOCK_CACHE, DEFAULT_DECODED_CACHE, DEFAULT_RESIDENT_BUDGET, SessionManager

__all__ = ["Admit", "Chunk", "Counters", "DEFAULT_BLOCK_CACHE", "DEFAULT_DECODED_CACHE", "DEFAULT_HOLD_WAIT",
           "DEFAULT_RESIDENT_BUDGET", "GenerateParams", "Holds", "SessionBusy", "SessionManager", "SessionView"]
