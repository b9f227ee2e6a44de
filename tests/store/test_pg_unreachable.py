"""A PostgreSQL store whose database stops answering: once a call found it unreachable, each call first probes
it with one connection. Where the server is gone but its address swallows connections (a frozen server, a
dead machine whose packets are dropped), a probe takes the whole connect_timeout; the other calls meanwhile
answer UNAVAILABLE at once instead of queueing behind it, each to probe in turn."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from memsvc.store.errors import StoreUnavailable
from memsvc.store.postgres import PgStore

CONNECT_TIMEOUT = 2.0  # PgStore(timeout=2): connect_timeout 2 s
CALLS = 5


@pytest.fixture
def killable_pg():
    from tools.pgserver import PgServer

    server = PgServer.start(fsync=False)
    yield server
    server.stop()


def _black_hole(port: int) -> socket.socket:
    """A listener on port that never accepts: connections complete in the kernel, and nothing ever answers."""
    hole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hole.bind(("127.0.0.1", port))
    hole.listen(64)
    return hole


def test_calls_do_not_queue_behind_a_probe_of_a_database_that_does_not_answer(killable_pg):
    store = PgStore(killable_pg.create_database(), timeout=CONNECT_TIMEOUT)
    try:
        assert store.count() == 0
        killable_pg.kill()
        with pytest.raises(StoreUnavailable):  # the pooled connection is broken: the store now probes first
            store.count()
        hole = _black_hole(killable_pg.port)
        try:
            seconds, messages = [], []

            def call() -> None:
                t0 = time.monotonic()
                try:
                    store.count()
                except StoreUnavailable as exc:
                    messages.append(str(exc))
                seconds.append(time.monotonic() - t0)

            threads = [threading.Thread(target=call) for _ in range(CALLS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=CALLS * CONNECT_TIMEOUT + 30)
        finally:
            hole.close()
        assert len(messages) == CALLS, messages
        assert all("unavailable" in m and "retry" in m for m in messages), messages
        seconds.sort()
        assert seconds[-1] < CONNECT_TIMEOUT + 1.5, seconds  # one probe's timeout, not CALLS of them in a row
        assert seconds[-2] < 1.0, seconds  # the others did not wait for it
    finally:
        store.close()
