"""A load of Appends through a database outage, and the checks of what it left stored (tests of PostgreSQL's
death and failover: test_pg_db_kill.py, test_pg_standby.py).

Each `Writer` is one thread appending token turns (and now and then a committing Generate) to sessions of its
own on one replica, through the raw gRPC stub (what the service answers, with no client-side retry), until
told to stop: it goes on calling while the database is down (a pause of PAUSE between failed calls) and
records each call's start, seconds and status. It keeps, per session, the acknowledged token ids and the
first turn that failed since the last success (cut off at COMMIT, it may have landed whole); the next
acknowledged turn's token count says whether it did.
A session near the tiny model's 512 positions is left for a new one.
"""
from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field

import grpc
from click.testing import CliRunner

from memsvc.cli import main
from memsvc.proto import memsvc_pb2 as pb
from memsvc.proto import memsvc_pb2_grpc as pb_grpc
from memsvc.store.open import open_store
from tests.service.servers import client, served

PAUSE = 0.05  # seconds between a failed call and the next
FULL = 400  # tokens after which a writer goes on in a new session
GENERATES = 0.25  # the share of calls that are a committing Generate (the others: Appends of token ids)


@dataclass
class Call:
    start: float  # time.monotonic()
    seconds: float
    code: str  # grpc status name
    details: str = ""
    method: str = ""  # Append, Generate, CreateSession


@dataclass
class Writer:
    port: int
    name: str
    seed: int
    timeout: float = 60.0  # the gRPC deadline of each call: a hang shows as DEADLINE_EXCEEDED
    acked: dict[str, list[int]] = field(default_factory=dict)  # sid -> acknowledged token ids
    unsure: dict[str, list[int] | None] = field(default_factory=dict)  # sid -> first failed append since an ack
    calls: list[Call] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    landed: int = 0  # failed appends found stored whole afterwards
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name=f"writer-{self.name}", daemon=True)
        thread.start()
        return thread

    def _call(self, fn, request):
        t0 = time.monotonic()
        method = type(request).__name__.removesuffix("Request")
        try:
            reply = fn(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            self.calls.append(Call(t0, time.monotonic() - t0, exc.code().name, exc.details() or "", method))
            return None, exc.code()
        self.calls.append(Call(t0, time.monotonic() - t0, "OK", method=method))
        return reply, grpc.StatusCode.OK

    def _generate(self, stub, sid: str, n: int) -> tuple[list[int], int, grpc.StatusCode]:
        """A committing Generate of up to n tokens: (the ids streamed, the session's tokens after, status); a
        reply streamed whole whose commit then failed may have landed, like an append."""
        t0, ids, tokens = time.monotonic(), [], 0
        try:
            for chunk in stub.Generate(pb.GenerateRequest(session_id=sid, max_new_tokens=n, commit=True),
                                       timeout=self.timeout):
                ids.extend(chunk.token_ids)
                if chunk.HasField("session"):
                    tokens = chunk.session.tokens
        except grpc.RpcError as exc:
            self.calls.append(Call(t0, time.monotonic() - t0, exc.code().name, exc.details() or "", "Generate"))
            return ids, 0, exc.code()
        self.calls.append(Call(t0, time.monotonic() - t0, "OK", method="Generate"))
        return ids, tokens, grpc.StatusCode.OK

    def _run(self) -> None:
        rng = random.Random(self.seed)
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        stub = pb_grpc.MemoryServiceStub(channel)
        made = 0
        sid, created = f"{self.name}-0", False
        try:
            while not self.stop.is_set():
                if not created:
                    _, code = self._call(stub.CreateSession, pb.CreateSessionRequest(session_id=sid))
                    if code == grpc.StatusCode.ALREADY_EXISTS and self.unsure.get(sid) == []:
                        self.calls[-1].code = "OK"  # the create that failed had landed after all
                        code = grpc.StatusCode.OK
                    if code == grpc.StatusCode.OK:
                        created, self.acked[sid], self.unsure[sid] = True, [], None
                    else:
                        self.unsure[sid] = []  # a create cut off at COMMIT may have landed
                        time.sleep(PAUSE)
                    continue
                if rng.random() < GENERATES and self.acked[sid]:
                    ids, tokens, code = self._generate(stub, sid, rng.randrange(1, 5))
                else:
                    ids = [rng.randrange(10, 5000) for _ in range(rng.randrange(1, 9))]
                    req = pb.AppendRequest(session_id=sid)
                    req.tokens.ids.extend(ids)
                    reply, code = self._call(stub.Append, req)
                    tokens = reply.session.tokens if reply is not None else 0
                if code != grpc.StatusCode.OK:
                    if self.unsure[sid] is None:
                        self.unsure[sid] = ids
                    time.sleep(PAUSE)
                    continue
                self._acknowledged(sid, ids, tokens)
                if len(self.acked[sid]) > FULL:
                    made += 1
                    sid, created = f"{self.name}-{made}", False
        finally:
            channel.close()

    def _acknowledged(self, sid: str, ids: list[int], tokens: int) -> None:
        before, maybe = self.acked[sid], self.unsure[sid]
        if tokens == len(before) + len(ids):
            self.acked[sid] = before + ids
        elif maybe is not None and tokens == len(before) + len(maybe) + len(ids):
            self.acked[sid] = before + maybe + ids  # the failed append had landed whole
            self.landed += 1
        else:
            self.mismatches.append(f"{sid}: {tokens} tokens after a turn of {len(ids)} to {len(before)} "
                                   f"acknowledged (unsure: {None if maybe is None else len(maybe)})")
            self.acked[sid] = before + ids
        self.unsure[sid] = None

    def oks_after(self, t: float) -> int:
        return sum(1 for c in self.calls if c.code == "OK" and c.start >= t)


def run_writers(writers: list[Writer]) -> list[threading.Thread]:
    return [w.start() for w in writers]


def stop_writers(writers: list[Writer], threads: list[threading.Thread]) -> None:
    for w in writers:
        w.stop.set()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), f"{t.name} still runs 120 s after it was told to stop"


def wait_for_oks(writers: list[Writer], since: float, count: int, limit: float) -> float:
    """Seconds until every writer has `count` acknowledged calls started after `since`; AssertionError past limit."""
    t0 = time.monotonic()
    while not all(w.oks_after(since) >= count for w in writers):
        assert time.monotonic() - t0 < limit, [(w.name, w.oks_after(since), w.calls[-1:]) for w in writers]
        time.sleep(0.05)
    return time.monotonic() - t0


def check_statuses(writers: list[Writer], down: float, up: float, slowest: float) -> dict:
    """Every call answered OK or UNAVAILABLE (a hang would answer DEADLINE_EXCEEDED, after Writer.timeout);
    each UNAVAILABLE within `slowest` seconds, with a message naming the database and saying to retry; and the
    calls made while the database was down (from `down` + 1 s, when the calls in flight at its death have
    answered, to `up`, when it was being started again) all answered UNAVAILABLE. Returns counts and times."""
    calls = [c for w in writers for c in w.calls]
    assert all(w.mismatches == [] for w in writers), [w.mismatches for w in writers]
    others = [c for c in calls if c.code not in ("OK", "UNAVAILABLE")]
    assert others == [], others[:5]
    failed = [c for c in calls if c.code == "UNAVAILABLE"]
    assert failed, "no call found the database down"
    for c in failed:
        assert "unavailable" in c.details and "127.0.0.1" in c.details and "retry" in c.details, c.details
    assert max(c.seconds for c in failed) < slowest, max(failed, key=lambda c: c.seconds)
    while_down = [c for c in calls if down + 1.0 <= c.start and c.start + c.seconds < up]
    assert while_down and all(c.code == "UNAVAILABLE" for c in while_down), [c for c in while_down
                                                                              if c.code != "UNAVAILABLE"][:3]
    return {"calls": len(calls), "unavailable": len(failed),
            "slowest_unavailable_s": round(max(c.seconds for c in failed), 3),
            "slowest_while_down_s": round(max(c.seconds for c in while_down), 3),
            "oks_before": sum(1 for c in calls if c.code == "OK" and c.start < down),
            "oks_after": sum(1 for c in calls if c.code == "OK" and c.start >= up),
            "generates_ok": sum(1 for c in calls if c.code == "OK" and c.method == "Generate"),
            "landed_unacknowledged": sum(w.landed for w in writers)}


def check_stored(url: str, writers: list[Writer], model) -> int:
    """Every session holds its acknowledged turns (plus, where its last append failed unacknowledged, possibly
    that one whole), passes check_session, resumes on a fresh replica with nothing to repair, and `memsvc
    sessions verify` finds the store sound. Returns how many sessions were checked."""
    sessions = {sid: (toks, w.unsure.get(sid)) for w in writers for sid, toks in w.acked.items()}
    store = open_store(url, readonly=True)
    try:
        for sid, (want, maybe) in sessions.items():
            got = store.tokens(sid)
            assert got == want or (maybe is not None and got == want + maybe), (sid, len(got), len(want))
            sessions[sid] = (got, None)
            report = store.check_session(sid)
            assert report["record"] is None and not report["tokens"] and not report["kv"], (sid, report)
    finally:
        store.close()
    with served(url, model) as (_, port), client(port) as c:
        for sid, (got, _) in sessions.items():
            assert c.resume(sid).tokens == len(got)  # every block read back and checked
        assert c.stats().repairs == 0
    res = CliRunner().invoke(main, ["sessions", "verify", "--store", url, "--json"])
    doc = json.loads(res.stdout)
    assert res.exit_code == 0 and doc["ok"], [s for s in doc["sessions"] if not s["ok"]][:3] or doc["store"]
    return len(sessions)
