"""The load test's clients: the sessions they pick from, the calls they make, one loop per client thread.

Each client picks a random session and a random call (Append, Generate or Resume, weighted by Config.mix)
until told to stop; a session past the token cap is replaced by a fresh one under a new id. With several
replicas, each session slot has a home replica (slot i: replica i mod N) that creates the slot's sessions and
serves every call on them: a client holds a channel to each replica and routes each call by its session, so
no call meets another replica's lease (an ABORTED here is an error, not a redirection). Knows the client
only; imports neither torch nor the model.
"""
from __future__ import annotations

import contextlib
import random
import threading
import time
from dataclasses import dataclass

import grpc

from load_stats import FIRST, Recorder
from memsvc.clients.client import MemoryClient

SENTENCES = (
    "I keep my bike in the shed behind the house.",
    "Remind me to call the plumber on Thursday morning.",
    "My sister moved to Lisbon last spring and loves it.",
    "The project deadline moved to the end of the month.",
    "Can you summarize what we discussed about the budget?",
    "I prefer tea to coffee, especially green tea.",
    "Our team meets every Monday at ten in room four.",
    "The dog needs his vaccination before the trip.",
    "What did I say about the garden last time?",
    "I started learning the cello two years ago.",
    "Please keep the answer short and practical.",
    "The invoice number for the new laptop is 77120.",
)
RPCS = ("Append", "Generate", "Resume")


@dataclass
class Config:
    seconds: float = 300.0
    max_calls: int = 100_000
    clients: int = 16
    sessions: int = 50
    resident_budget: int = 256 << 20
    max_new_tokens: int = 8
    max_session_tokens: int = 4096
    mix: tuple[float, float, float] = (0.4, 0.4, 0.2)  # Append, Generate, Resume
    progress_every: float = 15.0
    call_timeout: float = 300.0
    seed: int = 0

    def __post_init__(self):
        if self.seconds <= 0 or self.max_calls < 1:
            raise ValueError("seconds must be > 0 and max_calls >= 1")
        if self.clients < 1 or self.sessions < 1:
            raise ValueError("clients and sessions must be >= 1")
        if self.resident_budget < 0:
            raise ValueError("resident_budget must be >= 0 (0 = no limit)")
        if self.max_new_tokens < 1 or self.max_session_tokens < 64:
            raise ValueError("max_new_tokens must be >= 1 and max_session_tokens >= 64")
        if len(self.mix) != 3 or min(self.mix) < 0 or sum(self.mix) <= 0:
            raise ValueError(f"mix needs three weights >= 0 (Append, Generate, Resume), got {self.mix}")


class Sessions:
    """The session ids the clients pick from; one past the token cap is replaced by a fresh id. Slot i's
    sessions live on replica i mod `replicas`."""

    def __init__(self, n: int, cap: int, replicas: int = 1):
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.replicas = replicas
        self.ids = [f"load-{i:03d}" for i in range(n)]
        self.generation = [0] * n
        self.cap = cap
        self.replacing = [False] * n
        self.replaced = 0
        self.lock = threading.Lock()

    def home(self, i: int) -> int:
        """The replica that serves slot i's sessions."""
        return i % self.replicas

    def pick(self, rng: random.Random) -> tuple[int, str]:
        i = rng.randrange(len(self.ids))
        with self.lock:
            return i, self.ids[i]

    def claim_replacement(self, i: int, sid: str, tokens: int) -> str | None:
        """A new id for slot i if its session `sid` passed the cap and nobody is replacing it yet."""
        with self.lock:
            if tokens <= self.cap or self.replacing[i] or self.ids[i] != sid:
                return None
            self.replacing[i] = True
            self.generation[i] += 1
            return f"load-{i:03d}.{self.generation[i]}"

    def replaced_by(self, i: int, new_id: str | None) -> None:
        with self.lock:
            if new_id is not None:
                self.ids[i] = new_id
                self.replaced += 1
            self.replacing[i] = False


def message(rng: random.Random) -> list[dict]:
    return [{"role": "user", "content": " ".join(rng.sample(SENTENCES, rng.randint(1, 3)))}]


def call(rec: Recorder, rpc: str, fn):
    """Run fn(), recording its latency or its error code; the result, or None on error."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except grpc.RpcError as exc:
        rec.failed(rpc, exc.code().name if exc.code() else "UNKNOWN")
        return None
    except Exception as exc:  # the client itself failed: count it, never hide it
        rec.failed(rpc, f"CLIENT_{type(exc).__name__}")
        return None
    rec.done(rpc, time.perf_counter() - t0)
    return out


def generate(c: MemoryClient, rec: Recorder, sid: str, n: int):
    """Committed greedy generation; records the first chunk's latency as 'Generate (first chunk)'.
    Returns the session's token count after the commit, or None on error."""
    t0 = time.perf_counter()
    tokens = None
    first = True
    for chunk in c.generate(sid, max_new_tokens=n, commit=True):
        if first:
            rec.done(FIRST, time.perf_counter() - t0)
            first = False
        if chunk.HasField("session"):
            tokens = chunk.session.tokens
    return tokens


def new_session(c: MemoryClient, rec: Recorder, sid: str, rng: random.Random) -> int | None:
    if call(rec, "CreateSession", lambda: c.create_session(sid)) is None:
        return None
    r = call(rec, "Append", lambda: c.append(sid, messages=[{"role": "system", "content": "You are a helpful "
                                                               "assistant with a long memory."}] + message(rng)))
    return None if r is None else r.session.tokens


def client_loop(k: int, ports: list[int], cfg: Config, sessions: Sessions, rec: Recorder, stop: threading.Event,
                budget_calls: list[int], budget_lock: threading.Lock) -> None:
    """Client k's calls until stop: one channel per replica (ports[r]), each call to its session's home."""
    rng = random.Random(cfg.seed * 1000 + k)
    with contextlib.ExitStack() as channels:
        replicas = [channels.enter_context(MemoryClient(f"127.0.0.1:{p}", timeout=cfg.call_timeout)) for p in ports]
        while not stop.is_set():
            with budget_lock:
                if budget_calls[0] <= 0:
                    stop.set()
                    return
                budget_calls[0] -= 1
            i, sid = sessions.pick(rng)
            c = replicas[sessions.home(i)]
            rpc = rng.choices(RPCS, weights=cfg.mix)[0]
            if rpc == "Append":
                r = call(rec, rpc, lambda: c.append(sid, messages=message(rng)))
                tokens = None if r is None else r.session.tokens
            elif rpc == "Generate":
                tokens = call(rec, rpc, lambda: generate(c, rec, sid, cfg.max_new_tokens))
            else:
                r = call(rec, rpc, lambda: c.resume(sid))
                tokens = None if r is None else r.tokens
            new_id = sessions.claim_replacement(i, sid, tokens or 0)
            if new_id is not None:
                ok = new_session(c, rec, new_id, rng) is not None
                sessions.replaced_by(i, new_id if ok else None)
