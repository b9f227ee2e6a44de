"""The resident-session budget: idle sessions beyond it are dropped from memory
(least recently used first) and load again on their next call, answering exactly
as if they had stayed; a session a call is using is never dropped."""
from __future__ import annotations

import pytest

from memsvc.sessions import SessionManager
from tests.conftest import running_server

N_SESSIONS = 4


def _history(i: int) -> list[int]:
    return [(10 + 7 * i + j) % 1000 for j in range(450)]  # past sink + hot: cold blocks too


def _workload(c, check=lambda: None) -> dict:
    """Build the sessions, then two rounds over them; every reply, keyed by (session, round, kind)."""
    out = {}
    for i in range(N_SESSIONS):
        c.create_session(f"s{i}")
        c.append(f"s{i}", tokens=_history(i))
        check()
    for rnd in range(2):
        for i in range(N_SESSIONS):
            sid = f"s{i}"
            out[sid, rnd, "greedy"] = c.generate_text(sid, max_new_tokens=6).token_ids
            out[sid, rnd, "sampled"] = c.generate_text(sid, max_new_tokens=6, temperature=1.0, seed=rnd).token_ids
            check()
            c.append(sid, tokens=[20 + i, 21, 22])
            out[sid, rnd, "commit"] = c.generate_text(sid, max_new_tokens=4, commit=True).token_ids
            check()
    return out


def test_unloaded_sessions_answer_identically(tmp_path, tiny_model):
    with running_server(tmp_path / "ref", tiny_model, resident_budget=0) as (c, _):
        ref = _workload(c)
        st = c.stats()
        assert st.sessions_resident == N_SESSIONS and st.sessions_unloaded == 0
        assert st.session_loads == N_SESSIONS  # each loaded once, by its first Append
        one = max(c.get_session(f"s{i}").bytes_resident for i in range(N_SESSIONS))
        ref_processed = st.model_tokens_processed
        ref_tokens = [c.get_session(f"s{i}").tokens for i in range(N_SESSIONS)]
    budget = one * 3 // 2  # room for one idle session, not two
    with running_server(tmp_path / "small", tiny_model, resident_budget=budget) as (c, _):
        def check():
            st = c.stats()
            assert st.bytes_resident <= budget and st.sessions_resident <= 1

        assert _workload(c, check) == ref
        st = c.stats()
        assert st.resident_budget == budget
        assert st.sessions_unloaded >= N_SESSIONS * 2
        assert st.session_loads == st.sessions_unloaded + st.sessions_resident  # each load: still here or dropped
        assert st.model_tokens_processed == ref_processed  # loading recomputes nothing
        assert [c.get_session(f"s{i}").tokens for i in range(N_SESSIONS)] == ref_tokens
        c.resume("s0")
        assert c.get_session("s0").resident


def test_a_session_in_use_is_never_dropped(tmp_path, tiny_model):
    with running_server(tmp_path / "data", tiny_model, resident_budget=1) as (c, server):
        m = server.manager
        for sid in ("a", "b"):
            c.create_session(sid)
            c.append(sid, tokens=_history(0))
        assert c.stats().sessions_resident == 0  # a 1-byte budget keeps no idle session
        with m.holds.hold("a"):  # as a call on "a" would
            m._load("a")
            c.append("b", tokens=[5, 6, 7])  # "b"'s call ends over the budget: only "b" is idle
            assert m.resident()[0] == 1 and m.view("a").resident and not m.view("b").resident
        c.resume("b")
        assert m.resident() == (0, 0)
        assert c.stats().sessions_unloaded == 5


def test_resident_budget_is_validated(tmp_path, tiny_model):
    from memsvc.store.lmdb import LmdbStore

    store = LmdbStore(tmp_path / "data")
    try:
        for bad in (-1, 1.5, True):
            with pytest.raises(ValueError, match="resident_budget"):
                SessionManager(store, tiny_model, resident_budget=bad)
    finally:
        store.close()
