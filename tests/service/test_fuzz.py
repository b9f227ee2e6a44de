"""Fuzzing a live server (tiny model) with hypothesis: random and malformed
requests (wrong message types, junk bytes, huge fields, unicode, invalid token
ids, bad keys, random RPC orders) and concurrent calls on one session.

Every reply must be a proper status code (never INTERNAL/UNKNOWN, never a dead
server), and every failed call must leave the store byte for byte as it was.
The default run sends >= 1,000 requests; `-m slow` sends many more.
"""
from __future__ import annotations

import random
import threading

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memsvc.auth import KeyRing, hash_key
from memsvc.limits import Limits
from memsvc.proto import memsvc_pb2 as pb
from tests.service.servers import served

KEY, OTHER_KEY = "fuzz-key-0123456789abcdef", "other-key-0123456789abcdef"
SERVICE = pb.DESCRIPTOR.services_by_name["MemoryService"]
METHODS = [m.name for m in SERVICE.methods]
PROPER = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
          grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
          grpc.StatusCode.UNAUTHENTICATED}
MAX_REQUEST = 256 << 10


class Wire:
    """Raw-bytes calls, so the fuzzer can send anything, well-formed or not."""

    def __init__(self, port: int):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}",
                                             options=[("grpc.max_send_message_length", 8 << 20)])
        self.calls = {}
        for m in SERVICE.methods:
            path = f"/{SERVICE.full_name}/{m.name}"
            self.calls[m.name] = (self.channel.unary_stream if m.server_streaming else self.channel.unary_unary)(
                path, request_serializer=None, response_deserializer=None)

    def call(self, method: str, payload: bytes, metadata) -> tuple[grpc.StatusCode, str, list[bytes]]:
        try:
            result = self.calls[method](payload, metadata=metadata, timeout=60)
            replies = list(result) if isinstance(result, grpc.Call) and not isinstance(result, bytes) else [result]
            return grpc.StatusCode.OK, "", replies
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", []


# ---- strategies -------------------------------------------------------------------------

POOL = ["s0", "s1", "s2"]
huge_text = st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(0, 300_000))
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", "hello", "ünïcödé 🙂", "\x00", "a" * 130]), huge_text)
ids = st.one_of(st.sampled_from(POOL), st.sampled_from(["other:s0", "fuzz:s0", "", "s0 ", "..", "x" * 123]),
                st.text(max_size=20))
labels = st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)
token_ids = st.one_of(
    st.lists(st.integers(0, 600), min_size=0, max_size=40),
    st.lists(st.integers(-(2 ** 63), 2 ** 63 - 1), max_size=5),
    st.builds(lambda t, n: [t] * n, st.integers(0, 100), st.integers(0, 2000)),
)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
messages = st.lists(st.tuples(st.one_of(st.sampled_from(["user", "assistant", "system"]), st.text(max_size=8)),
                              texts), max_size=3)


@st.composite
def requests(draw):
    method = draw(st.sampled_from(METHODS))
    sid = draw(ids)
    if method == "CreateSession":
        msg = pb.CreateSessionRequest(session_id=sid, policy=draw(st.sampled_from(["", "full", "zip", "ü"])),
                                      labels=draw(labels))
    elif method == "Append":
        msg = pb.AppendRequest(session_id=sid)
        kind = draw(st.sampled_from(["messages", "text", "tokens", "none"]))
        if kind == "messages":
            msg.messages.SetInParent()
            for role, content in draw(messages):
                msg.messages.messages.add(role=role, content=content)
        elif kind == "text":
            msg.text = draw(texts)
        elif kind == "tokens":
            msg.tokens.SetInParent()
            msg.tokens.ids.extend(draw(token_ids))
    elif method == "Generate":
        msg = pb.GenerateRequest(
            session_id=sid, max_new_tokens=draw(st.one_of(st.integers(-3, 20), st.integers(-(2 ** 31), 2 ** 31 - 1))),
            temperature=draw(st.one_of(st.just(0.0), floats)), top_p=draw(st.one_of(st.just(0.0), floats)),
            stop=draw(st.lists(st.text(max_size=5), max_size=3)), seed=draw(st.integers(0, 2 ** 64 - 1)),
            commit=draw(st.booleans()), prefix=draw(st.one_of(st.just(""), st.text(max_size=10))))
    elif method == "ListSessions":
        msg = pb.ListSessionsRequest(page_size=draw(st.integers(-(2 ** 31), 2 ** 31 - 1) | st.integers(0, 3)),
                                     page_token=draw(ids), labels=draw(labels))
    elif method == "ForkSession":
        msg = pb.ForkSessionRequest(session_id=sid, new_session_id=draw(ids), labels=draw(labels))
    elif method == "GetStats":
        msg = pb.GetStatsRequest()
    else:
        msg = getattr(pb, f"{method}Request")(session_id=sid)
    payload = msg.SerializeToString()
    form = draw(st.sampled_from(["proper"] * 6 + ["junk", "truncated", "other type"]))
    if form == "junk":
        payload = draw(st.binary(max_size=64))
    elif form == "truncated" and payload:
        payload = payload[: draw(st.integers(0, len(payload) - 1))]
    elif form == "other type":
        other = draw(st.sampled_from([pb.GenerateRequest(session_id="s0", max_new_tokens=3),
                                      pb.AppendRequest(session_id="s1", text="hi"), pb.Session(id="s0", tokens=9),
                                      pb.ListSessionsRequest(page_size=7)]))
        payload = other.SerializeToString()
    auth = draw(st.sampled_from(["key"] * 8 + ["other", "none", "bad", "garbage"]))
    metadata = {"key": [("authorization", f"Bearer {KEY}")], "other": [("authorization", f"Bearer {OTHER_KEY}")],
                "none": [], "bad": [("authorization", "Bearer nope")],
                "garbage": [("authorization", draw(st.text(st.characters(min_codepoint=32, max_codepoint=126),
                                                            max_size=30)))]}[auth]
    return method, payload, metadata


# ---- the tests --------------------------------------------------------------------------


@pytest.fixture
def live(tmp_path, tiny_model):
    ring = KeyRing.parse(f"fuzz={hash_key(KEY)}\nother={hash_key(OTHER_KEY)}", source="test", allow_plain=False)
    limits = Limits(max_append_tokens=64, max_session_tokens=400, max_request_bytes=MAX_REQUEST,
                    max_sessions_per_tenant=12, max_bytes_per_tenant=4 << 20)
    with served(tmp_path / "data", tiny_model, api_keys=ring, limits=limits, max_new_tokens=12,
                default_new_tokens=4) as (server, port):
        wire = Wire(port)
        md = [("authorization", f"Bearer {KEY}")]
        for sid in POOL:  # something to hit
            wire.call("CreateSession", pb.CreateSessionRequest(session_id=sid).SerializeToString(), md)
        wire.call("Append", pb.AppendRequest(session_id="s0", text="Some history to start from.").SerializeToString(),
                  md)
        wire.call("CreateSession", pb.CreateSessionRequest(session_id="s0").SerializeToString(),
                  [("authorization", f"Bearer {OTHER_KEY}")])
        try:
            yield server, wire
        finally:
            wire.channel.close()


def _fuzz(server, wire, n_examples: int) -> dict:
    store = server.store
    seen: dict = {"calls": 0, "codes": {}}

    @settings(max_examples=n_examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(requests(), min_size=2, max_size=8))
    def run(batch):
        for method, payload, metadata in batch:
            before = store.dump()
            code, details, _ = wire.call(method, payload, metadata)
            seen["calls"] += 1
            seen["codes"][code.name] = seen["codes"].get(code.name, 0) + 1
            assert code in PROPER, (method, code, details)
            assert details or code == grpc.StatusCode.OK, (method, code)
            if code != grpc.StatusCode.OK:
                assert store.dump() == before, (method, code, details)

    run()
    return seen


def test_fuzzed_requests_get_proper_codes_and_failed_calls_change_nothing(live):
    server, wire = live
    seen = _fuzz(server, wire, 300)
    assert seen["calls"] >= 1000, seen
    codes = seen["codes"]
    # the run reached the interesting places, not only the front door
    for code in ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED"):
        assert codes.get(code, 0) > 0, codes
    # and the server still works
    md = [("authorization", f"Bearer {KEY}")]
    code, _, _ = wire.call("GetStats", b"", md)
    assert code == grpc.StatusCode.OK


@pytest.mark.slow
def test_fuzz_long(live):
    server, wire = live
    assert _fuzz(server, wire, 3000)["calls"] >= 10_000


def test_concurrent_calls_on_one_session(live):
    """Eight threads hammer one session; acknowledged appends land whole and in order of acknowledgement."""
    server, wire = live
    md = [("authorization", f"Bearer {KEY}")]
    sid = "hot"
    wire.call("CreateSession", pb.CreateSessionRequest(session_id=sid).SerializeToString(), md)
    first = pb.AppendResponse.FromString(wire.call("Append", pb.AppendRequest(
        session_id=sid, text="The start.").SerializeToString(), md)[2][0])
    acked: list[tuple[int, list[int]]] = []  # (session tokens after, ids appended)
    bad: list = []
    lock = threading.Lock()

    def worker(seed: int):
        rng = random.Random(seed)
        for i in range(25):
            kind = rng.choice(["tokens", "text", "generate", "commit", "resume", "get", "list", "fork", "bad"])
            if kind in ("tokens", "text", "bad"):
                req = pb.AppendRequest(session_id=sid)
                if kind == "tokens":
                    req.tokens.ids.extend(rng.randrange(10, 500) for _ in range(rng.randrange(1, 8)))
                elif kind == "text":
                    req.text = f" turn {seed}-{i}"
                else:
                    req.tokens.ids.extend([5, 10 ** 9])
                method = "Append"
            elif kind in ("generate", "commit"):
                method = "Generate"
                req = pb.GenerateRequest(session_id=sid, max_new_tokens=rng.randrange(1, 4), commit=kind == "commit")
            elif kind == "fork":
                method, req = "ForkSession", pb.ForkSessionRequest(session_id=sid, new_session_id=f"f{seed}-{i}")
            elif kind == "list":
                method, req = "ListSessions", pb.ListSessionsRequest()
            else:
                method = "Resume" if kind == "resume" else "GetSession"
                req = getattr(pb, f"{method}Request")(session_id=sid)
            code, details, replies = wire.call(method, req.SerializeToString(), md)
            with lock:
                if code not in PROPER:
                    bad.append((method, code, details))
                elif code == grpc.StatusCode.OK and method == "Append":
                    resp = pb.AppendResponse.FromString(replies[0])
                    acked.append((resp.session.tokens, list(resp.token_ids)))
                elif code == grpc.StatusCode.OK and kind == "commit":
                    last = pb.GenerateChunk.FromString(replies[-1])
                    acked.append((last.session.tokens, None))
                elif kind == "bad" and code != grpc.StatusCode.INVALID_ARGUMENT:
                    bad.append((method, code, details))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not bad, bad[:5]
    assert acked
    stored = server.store.tokens(f"fuzz:{sid}")
    pos = len(first.token_ids)
    for after, new_ids in sorted(acked):
        assert after > pos  # each acknowledged change ends past the previous one: serialized, none lost
        if new_ids is not None:
            assert stored[after - len(new_ids):after] == new_ids
        pos = after
    assert len(stored) == pos == server.store.get(f"fuzz:{sid}").n_tokens
