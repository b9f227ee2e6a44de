"""The cold block cache one server shares among its tiered sessions: greedy replies are those of a server
without a cache, whatever the other sessions, forks, deletes and reloads; the cache stays within its bound."""
from __future__ import annotations

from tests.service.servers import client, served

HISTORY_A = [(10 + j) % 1000 for j in range(450)]  # past sink + hot: 2 cold blocks a layer (5.5 kB each)
HISTORY_B = [(500 + 7 * j) % 1000 for j in range(450)]


def _reply(c, sid: str) -> list[int]:
    return c.generate_text(sid, max_new_tokens=6).token_ids


def _references(tmp_path, model) -> dict[str, list[int]]:
    """Replies of each history alone, on a server with no block cache."""
    out = {}
    with served(tmp_path / "ref", model, block_cache_bytes=0) as (server, port), client(port) as c:
        for name, hist in (("a", HISTORY_A), ("b", HISTORY_B)):
            c.create_session(name)
            c.append(name, tokens=hist)
            out[name] = _reply(c, name)
        assert server.manager.block_cache.nbytes == 0
    return out


def test_sessions_share_the_cache_but_never_each_others_blocks(tmp_path, tiny_model):
    ref = _references(tmp_path, tiny_model)
    # decoded_cache_bytes=0: decode steps read the block cache itself (not the layers' last decodes)
    with served(tmp_path / "data", tiny_model, block_cache_bytes=30_000, decoded_cache_bytes=0) as (server, port), \
            client(port) as c:
        cache = server.manager.block_cache
        for name, hist in (("a", HISTORY_A), ("b", HISTORY_B)):
            c.create_session(name)
            c.append(name, tokens=hist)
        for _ in range(2):  # interleaved: both sessions' blocks share the small cache
            assert _reply(c, "a") == ref["a"]
            assert _reply(c, "b") == ref["b"]
            assert 0 < cache.nbytes <= 30_000
        assert cache.hits > 0 and cache.evictions > 0
        hits, misses = server.manager.cold_cache()
        assert (hits, misses) == (cache.hits, cache.misses)

        # a fork reads the blocks it shares with its source under its own key, before and after the source goes
        c.fork_session("a", "fork")
        assert _reply(c, "fork") == ref["a"]
        c.delete_session("a")
        assert not any(key[0][0] == "a" for key in list(cache._lru))  # a deleted session's blocks left the cache
        assert _reply(c, "fork") == ref["a"]

        # the same id again, with another history: none of the old blocks may be served
        c.create_session("a")
        c.append("a", tokens=HISTORY_B)
        assert _reply(c, "a") == ref["b"]


def test_a_session_dropped_from_memory_leaves_the_cache(tmp_path, tiny_model):
    ref = _references(tmp_path, tiny_model)
    with served(tmp_path / "data", tiny_model, resident_budget=1, decoded_cache_bytes=0) as (server, port), \
            client(port) as c:
        cache = server.manager.block_cache
        c.create_session("a")
        c.append("a", tokens=HISTORY_A)
        assert cache.nbytes == 0  # the 1-byte budget dropped it after the call, and its blocks with it
        assert _reply(c, "a") == ref["a"]
        assert cache.nbytes == 0 and cache.misses > 0 and cache.hits > 0
        assert _reply(c, "a") == ref["a"]
