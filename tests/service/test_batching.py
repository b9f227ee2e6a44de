"""Continuous batching (memsvc.sessions.steps): requests of many sessions share model steps, and each gets the
tokens it gets alone.

One script of calls runs twice on a tiny model whose replies depend on the context: on a manager that batches
(steps of up to 8 sessions, 32 tokens) with the calls in threads that join and leave mid-stream, and on one that
runs one piece per step with the calls one after another. Replies, streamed chunks and stored tokens must be
the same; the batched run must have packed steps of several sessions, and a prefill beside decodes.
"""
from __future__ import annotations

import threading

import pytest
import torch

from memsvc.sessions.generate import GenerateParams
from memsvc.sessions.manager import SessionManager
from memsvc.sessions.steps import StepConfig, Steps
from memsvc.store.lmdb import LmdbStore
from tests.conftest import make_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory, real_model_dir):
    from memsvc.model import load_model

    out = tmp_path_factory.mktemp("batch-tiny") / "m"
    return load_model(str(make_tiny_model(out, real_model_dir, seed=5, max_positions=2048, initializer_range=0.3)))


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(100, 20000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# (session, policy, history tokens): tiered past sink + hot + warm (cold blocks, retrieval), full, short ones
SESSIONS = [("s0", "tiered", 900), ("s1", "full", 300), ("s2", "tiered", 40), ("s3", "full", 1100),
            ("s4", "tiered", 1200), ("s5", "tiered", 60)]
# (session, params, start after s0 streamed this many chunks, cancel after this many chunks)
GENERATES = [
    ("s0", GenerateParams(max_new_tokens=24, commit=True), 0, None),
    ("s1", GenerateParams(max_new_tokens=12), 2, None),
    ("s2", GenerateParams(max_new_tokens=30, temperature=0.8, seed=7, commit=True), 4, None),
    ("s3", GenerateParams(max_new_tokens=40), 1, 5),  # cancelled mid-stream
    ("s4", GenerateParams(max_new_tokens=16, stop=("zz",)), 6, None),
]
LATE_APPEND = ("s5", 700, 3)  # 700 tokens appended once s0 streamed 3 chunks: a prefill beside the streams


def _prepare(m: SessionManager) -> None:
    for sid, policy, n in SESSIONS:
        m.create(sid, policy=policy)
        m.append(sid, tokens=_ids(n, int(sid[1:])))


def _generate(m: SessionManager, sid: str, p: GenerateParams, cancel_after: int | None, seen=None) -> dict:
    chunks: list[list[int]] = []
    out = {"chunks": chunks, "finish": None, "cancelled": False}

    def cancelled() -> bool:
        return cancel_after is not None and len(chunks) >= cancel_after

    try:
        for c in m.generate(sid, p, cancelled=cancelled):
            chunks.append(c.token_ids)
            out["finish"] = c.finish_reason or out["finish"]
            if seen is not None:
                seen(len(chunks))
    except Exception as exc:  # the cancelled one
        out["cancelled"] = type(exc).__name__
    return out


def _script_alone(m: SessionManager) -> dict:
    _prepare(m)
    results = {sid: _generate(m, sid, p, cancel) for sid, p, _, cancel in GENERATES}
    m.append(LATE_APPEND[0], tokens=_ids(LATE_APPEND[1], 99))
    results["after"] = {sid: _generate(m, sid, GenerateParams(max_new_tokens=8), None)
                        for sid in ("s0", "s2", "s5")}
    return results


def _script_batched(m: SessionManager) -> dict:
    threads = [threading.Thread(target=lambda s=s: (m.create(s[0], policy=s[1]), m.append(s[0], tokens=_ids(
        s[2], int(s[0][1:]))))) for s in SESSIONS]
    for t in threads:  # the histories' prefills run side by side too
        t.start()
    for t in threads:
        t.join()
    streamed = threading.Condition()
    count = [0]

    def seen(n: int) -> None:
        with streamed:
            count[0] = n
            streamed.notify_all()

    def after(k: int) -> None:
        with streamed:
            streamed.wait_for(lambda: count[0] >= k or count[0] < 0, timeout=120)

    results: dict = {}

    def gen(sid, p, start, cancel):
        if sid != "s0":
            after(start)
        results[sid] = _generate(m, sid, p, cancel, seen if sid == "s0" else None)
        if sid == "s0":
            seen(-1)  # s0 is done: nobody waits for it any longer

    def late():
        after(LATE_APPEND[2])
        m.append(LATE_APPEND[0], tokens=_ids(LATE_APPEND[1], 99))

    threads = [threading.Thread(target=gen, args=g) for g in GENERATES] + [threading.Thread(target=late)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    threads, after_results = [], {}
    for sid in ("s0", "s2", "s5"):
        t = threading.Thread(target=lambda s=sid: after_results.__setitem__(
            s, _generate(m, s, GenerateParams(max_new_tokens=8), None)))
        threads.append(t)
        t.start()
    for t in threads:
        t.join()
    results["after"] = after_results
    return results


def test_batched_requests_get_the_tokens_they_get_alone(tmp_path, model):
    widths: list[int] = []
    alone_store, batched_store = LmdbStore(tmp_path / "alone"), LmdbStore(tmp_path / "batched")
    alone = SessionManager(alone_store, model, sweep_every=0, prefill_chunk=64,
                           steps=StepConfig(max_batch=1, step_tokens=32))
    batched = SessionManager(batched_store, model, sweep_every=0, prefill_chunk=64,
                             steps=StepConfig(max_batch=8, step_tokens=32, gather_s=0.02))
    batched.steps.observe = lambda sessions, tokens, waits: widths.append(sessions)
    try:
        want = _script_alone(alone)
        got = _script_batched(batched)
        stored = {sid: (batched_store.tokens(sid), alone_store.tokens(sid)) for sid, _, _ in SESSIONS}
    finally:
        for closing in (alone, batched, alone_store, batched_store):
            closing.close()
    for sid, _, _, cancel in GENERATES:
        assert got[sid]["chunks"] == want[sid]["chunks"], sid
        assert got[sid]["finish"] == want[sid]["finish"], sid
        assert got[sid]["cancelled"] == want[sid]["cancelled"]
    assert want["s3"]["cancelled"] == "Cancelled" and len(want["s3"]["chunks"]) == 5
    assert got["after"] == want["after"]  # the committed replies and the late Append continue the same
    for sid, _, _ in SESSIONS:
        got_tokens, want_tokens = stored[sid]
        assert got_tokens == want_tokens, sid
    assert batched.steps.counts["packed_steps"] > 10 and max(widths) >= 4
    assert alone.steps.counts["packed_steps"] == 0
    assert batched.steps.counts["fallbacks"] == 0


def test_a_long_prefill_does_not_starve_and_is_not_starved(model):
    """A step takes every waiting decode token but keeps room for one prefill chunk, and chunks rotate."""
    steps = Steps(model, StepConfig(max_batch=3, step_tokens=8))
    from memsvc.sessions.steps import _Request

    streams = [_Request(object(), [1], 8, None) for _ in range(4)]
    prefills = [_Request(object(), list(range(20)), 8, None) for _ in range(2)]
    prefills[1].served = -1.0  # served longer ago: goes first
    steps._waiting.extend(streams + prefills)
    first = steps._take()
    assert first == streams[:2] + [prefills[1]]
    second = steps._take()
    assert second == streams[2:] + [prefills[0]]


@pytest.mark.parametrize("bad", [dict(max_batch=0), dict(step_tokens=0), dict(gather_s=-1), dict(gather_s=2)])
def test_step_config_is_checked(bad):
    with pytest.raises(ValueError):
        StepConfig(**bad)


def test_a_damaged_block_met_in_a_packed_step_fails_only_its_own_session(tmp_path, model):
    """Two sessions stream side by side; a cold block of one goes bad mid-stream (no block or decoded cache:
    every step reads the store). The packed step that meets it is undone on both and its pieces run alone:
    the damaged session is repaired and gives its undamaged copy's reply, the other one the reply it gets
    alone, and neither reply is sent twice."""
    from memsvc.cache.tiered.pages import is_cold_block
    from memsvc.repair import check_session
    from tests.service.test_repair import HISTORY, _copy, _flip_live

    store = LmdbStore(tmp_path / "data")
    m = SessionManager(store, model, sweep_every=0, block_cache_bytes=0, decoded_cache_bytes=0,
                       steps=StepConfig(max_batch=4, gather_s=0.05))
    try:
        m.create("s", policy="tiered")
        m.append("s", tokens=HISTORY)
        m.create("o", policy="full")
        m.append("o", tokens=_ids(500, 8))
        _copy(store, "s", "s-ref")
        _copy(store, "o", "o-ref")
        params = GenerateParams(max_new_tokens=12)
        want = {sid: _generate(m, sid + "-ref", params, None)["chunks"] for sid in ("s", "o")}
        cold = [k for k in store.kv_keys("s") if is_cold_block(k[1])]
        rng = __import__("random").Random(4)
        got: dict = {}

        def damage_at(n: int) -> None:
            if n == 3:
                _flip_live(store, "s", cold[:3], rng)

        threads = [threading.Thread(target=lambda: got.__setitem__("s", _generate(m, "s", params, None, damage_at))),
                   threading.Thread(target=lambda: got.__setitem__("o", _generate(m, "o", params, None)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got["s"]["chunks"] == want["s"] and got["o"]["chunks"] == want["o"]
        assert m.counters.repairs == 1 and not check_session(store, "s").damaged
        assert m.steps.counts["fallbacks"] >= 1 and m.steps.counts["packed_steps"] > 0
    finally:
        m.close()
        store.close()
