"""One writer per session at a time (issue 25, acceptance 2): calls on one session take turns in arrival order;
a call that would wait past --hold-wait is refused with ABORTED; a streaming Generate holds its session until it
ends or is cancelled."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from memsvc import chat
from memsvc.sessions import Holds, SessionBusy
from tests.conftest import make_tiny_model, running_server

ROUNDS = 20


@pytest.fixture(scope="module")
def context_model(tmp_path_factory, real_model_dir):
    """Replies depend on the context (initializer_range 0.3), 4,096 positions: room for 2 x 20 turns."""
    from memsvc.model import load_model

    path = make_tiny_model(tmp_path_factory.mktemp("writer") / "m", real_model_dir, seed=5, max_positions=4096,
                           initializer_range=0.3)
    return load_model(str(path))


def test_holds_take_turns_in_arrival_order():
    holds = Holds(wait=10)
    order, started = [], []
    first = threading.Event()

    def call(i: int) -> None:
        with holds.hold("s", f"call {i}"):
            order.append(i)
            if i == 0:
                first.set()
                time.sleep(0.3)  # the others line up meanwhile

    threads = [threading.Thread(target=call, args=(0,))]
    threads[0].start()
    first.wait(5)
    for i in range(1, 6):
        threads.append(threading.Thread(target=call, args=(i,)))
        threads[-1].start()
        started.append(i)
        time.sleep(0.02)  # arrival order 1, 2, ... 5
    for t in threads:
        t.join()
    assert order == [0, 1, 2, 3, 4, 5]
    assert not holds.held("s")  # nothing is kept of a session nobody holds


def test_a_call_that_would_wait_too_long_is_refused_and_leaves_the_line():
    holds = Holds(wait=0.2)
    inside, leave = threading.Event(), threading.Event()

    def holder() -> None:
        with holds.hold("s", "a generate"):
            inside.set()
            leave.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    inside.wait(5)
    started = time.monotonic()
    with pytest.raises(SessionBusy) as err:
        with holds.hold("s", "an append"):
            pass
    assert 0.19 <= time.monotonic() - started < 2
    msg = str(err.value)
    assert "session 's' is held by another call (a generate" in msg and "an append" in msg and "--hold-wait" in msg
    with pytest.raises(SessionBusy):  # wait=0: refused at once
        with holds.hold("s", "an unload", wait=0):
            pass
    with holds.hold("other", "a fork", wait=0):  # other sessions are not held up
        pass
    leave.set()
    t.join()
    with holds.hold("s", "an append", wait=0):  # the holder left: free again
        pass
    assert not holds.held("s")
    with pytest.raises(ValueError):
        Holds(wait=float("inf"))


def _worker(client, sid: str, name: str, go: threading.Barrier, calls: list, refused: list, lock) -> None:
    go.wait()
    for i in range(ROUNDS):
        content = f"{name} asks question number {i}: what comes after {i * 7 % 13}?"
        try:
            got = client.append(sid, messages=[{"role": "user", "content": content}])
            with lock:
                calls.append(("append", content, list(got.token_ids), got.session.tokens))
        except grpc.RpcError as exc:
            refused.append(exc)
        try:
            r = client.generate_text(sid, max_new_tokens=6, commit=True)
            with lock:
                calls.append(("generate", r.text, r.token_ids, r.session.tokens))
        except grpc.RpcError as exc:
            refused.append(exc)


def test_two_clients_appending_and_generating_on_one_session_give_a_serial_order(tmp_path, context_model):
    from memsvc.clients.client import MemoryClient

    tok = context_model.tokenizer
    with running_server(tmp_path / "data", context_model) as (client, server):
        client.create_session("shared")
        others = MemoryClient(f"127.0.0.1:{server.port}", timeout=600)
        calls, refused, lock = [], [], threading.Lock()
        go = threading.Barrier(2)
        threads = [threading.Thread(target=_worker, args=(c, "shared", name, go, calls, refused, lock))
                   for c, name in ((client, "alice"), (others, "bob"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        others.close()
        stored = server.store.tokens("shared")
        messages = server.store.get("shared").messages
        # the same calls, one after the other in the order the session took them, on a new session
        client.create_session("serial")
        replay = []
        for kind, what, _, _ in sorted(calls, key=lambda c: c[3]):
            if kind == "append":
                replay.append(list(client.append("serial", messages=[{"role": "user", "content": what}]).token_ids))
            else:
                replay.append(client.generate_text("serial", max_new_tokens=6, commit=True).token_ids)
        serial = server.store.tokens("serial")
    for exc in refused:  # none expected at the default --hold-wait; any that came must say why
        assert exc.code() == grpc.StatusCode.ABORTED and "held by another call" in exc.details()
    assert len(calls) + len(refused) == 4 * ROUNDS
    ordered = sorted(calls, key=lambda c: c[3])  # by the session's length after each call
    start, msgs, replies = 0, [], 0
    for (kind, what, ids, end), again in zip(ordered, replay):
        segment = stored[start:end]
        assert ids == again  # the serial replay gives each call the same ids
        if kind == "append":
            assert segment == ids
            msgs.append({"role": "user", "content": what})
        else:
            lead = chat.generation_prompt_ids(tok, msgs)
            # the committed turn: the assistant's opening, the generated ids (the last may become the end of turn)
            assert segment[:len(lead)] == lead and segment[len(lead):len(lead) + len(ids) - 1] == ids[:-1]
            if lead:
                msgs.append({"role": "assistant", "content": what})
                replies += what != ""
        start = end
    assert start == len(stored)  # the calls tile the session: no call's tokens inside another's
    assert stored == serial  # exactly the serial order of the calls
    assert [{"role": m["role"], "content": m["content"]} for m in messages] == msgs  # every reply intact
    assert replies > 0


def test_a_streaming_generate_holds_its_session_until_cancelled(tmp_path, context_model):
    from memsvc.clients.client import MemoryClient

    with running_server(tmp_path / "data", context_model, hold_wait=0.3) as (client, server):
        client.create_session("s")
        client.append("s", text="a long story begins here and")
        stream = client.generate("s", max_new_tokens=4000)
        next(stream)  # the stream has the session now
        other = MemoryClient(f"127.0.0.1:{server.port}", timeout=60)
        with pytest.raises(grpc.RpcError) as err:
            other.append("s", text=" more")
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert "session 's' is held by another call (a generate" in err.value.details()
        assert "this call (an append) waited 0.3 s" in err.value.details()
        other.create_session("t")  # another session is not held up
        other.append("t", text=" fine")
        stream.cancel()
        deadline = time.monotonic() + 30
        while server.manager.holds.held("s") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert other.append("s", text=" more").session.tokens > 0  # cancelled: the session is free
        other.close()
