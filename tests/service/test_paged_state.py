"""A tiered session's layer states are stored in parts (issue 5: "Appends write only new and changed
blocks"): a short Append writes each layer's small head and the hot pages its tokens landed in, never
the warm rows, the summaries or the cold blocks it did not make; emptied hot pages are dropped; states
stored whole (before parts) still load and are written in parts by their next commit."""
from __future__ import annotations

import torch
from click.testing import CliRunner

from memsvc.cache.tiered.partcodec import decode, digest
from memsvc.cache.tiered.pages import HOT_BASE, HOT_PAGE, LIVE_BASE, SUM_BASE, WARM_BASE, WARM_INDEX, is_cold_block
from memsvc.cache import Backing, KVShape, StoreEntries, load_cache
from memsvc.cache.tiered.cache import STATE_INDEX
from memsvc.cache.tiered.upgrade import whole_state as layer_state
from memsvc.cli import main
from memsvc.cache.policies import get_policy
from memsvc.repair import check_session
from memsvc.store.lmdb import LmdbStore
from tests.conftest import running_server

HISTORY = [(10 + 13 * j) % 4000 for j in range(1200)]  # past sink + hot + warm: 14 cold blocks per layer


class Spy:
    """Records the KV keys and bytes of every commit of the store it wraps."""

    def __init__(self, store):
        self.calls: list[tuple[dict, list]] = []
        self._commit = store.commit

        def commit(record, **kw):
            self.calls.append(({k: len(v) for k, v in kw["blocks"].items()}, list(kw.get("drop", ()))))
            return self._commit(record, **kw)
        store.commit = commit


def _load(store, sid: str):
    """A stored tiered session's cache, as a server loads it (on the CPU)."""
    rec = store.get(sid)
    lay = rec.layout
    shape = KVShape(lay["layers"], lay["kv_heads"], lay["head_dim"], torch.float32, torch.device("cpu"))
    return load_cache(get_policy("tiered"), shape, lay, rec.n_tokens - 1, Backing(StoreEntries(store, sid)))


def _greedy(c, sid: str, n: int = 10) -> list[int]:
    return list(c.generate_text(sid, max_new_tokens=n).token_ids)


def _build(c, sid: str = "s") -> None:
    """A tiered session of HISTORY: 14 cold blocks per layer, a full warm tier, 299 hot tokens."""
    c.create_session(sid, policy="tiered")
    c.append(sid, tokens=HISTORY)


def _loads_upgrades_and_loads_again(tmp_path, long_model, want: list[int], upgraded) -> None:
    """Session "s", stored in an older layout, gives the same greedy reply; `memsvc sessions upgrade` rewrites
    it (upgraded(its KV keys) asserts the new layout, and the store checks clean); it still gives that reply."""
    with running_server(tmp_path, long_model) as (c, server):
        assert _greedy(c, "s") == want
    out = CliRunner().invoke(main, ["sessions", "upgrade", "--data-dir", str(tmp_path)])
    assert out.exit_code == 0 and "1 tiered session(s) rewrote" in out.output
    with LmdbStore(tmp_path) as store:
        upgraded(set(store.kv_keys("s")))
        assert not check_session(store, "s").damaged
    with running_server(tmp_path, long_model) as (c, server):
        assert _greedy(c, "s") == want


def _state_bytes(store, sid: str) -> int:
    return sum(len(store.kv_block(sid, *k)) for k in store.kv_keys(sid) if not is_cold_block(k[1]))


def test_a_one_token_session_stores_no_kv_and_checks_clean(tmp_path, long_model):
    """One token computes nothing (it is fed with the next append): no KV entry, as verify expects (empty layer
    heads once made verify call them stray, seen when a crash test killed the server at that point)."""
    with running_server(tmp_path, long_model) as (c, server):
        store = server.store
        c.create_session("s")
        c.append("s", tokens=[11])
        assert store.kv_keys("s") == [] and not check_session(store, "s").damaged
        c.append("s", tokens=[12, 13])
        assert {k[1] for k in store.kv_keys("s")} >= {STATE_INDEX} and not check_session(store, "s").damaged
    with running_server(tmp_path, long_model) as (c, server):
        c.append("s", tokens=[14])
        assert not check_session(server.store, "s").damaged


def test_short_appends_write_the_head_and_their_hot_pages_only(tmp_path, long_model):
    with running_server(tmp_path, long_model) as (c, server):
        store = server.store
        _build(c)
        spy = Spy(store)
        layers = long_model.num_layers
        before = len(HISTORY)  # tokens stored; the cache holds all but the last
        written0 = c.stats().kv_bytes_written
        for step in range(4):  # 4 x 5 tokens: cross a hot page boundary; the hot window (299 + 20) ages no block
            c.append("s", tokens=[100 + step, 200, 300, 400, 500])
            written, dropped = spy.calls[-1]
            new_pos = range(before - 1, before + 4)  # the cache takes the previous last token and 4 new ones
            pages = {HOT_BASE + p // HOT_PAGE for p in new_pos}
            for layer in range(layers):
                mine = {k[1] for k in written if k[0] == layer}
                assert STATE_INDEX in mine
                assert mine - {STATE_INDEX} <= pages, [hex(i) for i in mine]
                assert WARM_INDEX not in mine and not any(SUM_BASE <= i < HOT_BASE for i in mine)
                assert not any(is_cold_block(i) for i in mine)
            assert not dropped
            assert sum(written.values()) < _state_bytes(store, "s") / 4
            before += 5
        assert c.stats().kv_bytes_written - written0 == sum(sum(w.values()) for w, _ in spy.calls)
        assert not check_session(store, "s").damaged
        want = _greedy(c, "s")
    with running_server(tmp_path, long_model) as (c, server):  # the parts load back into the same cache
        assert _greedy(c, "s") == want
        store = server.store
        kv = _load(store, "s")
        # the digests the heads list (not hashed again on load) are those of the stored parts
        assert kv._stored and all(d == digest(decode(store.kv_block("s", *key))) for key, d in kv._stored.items())
        ch = kv.changes()
        assert not ch.payloads and not ch.drop  # nothing to write for a state just loaded


def test_aging_writes_new_blocks_and_drops_emptied_hot_pages(tmp_path, long_model):
    with running_server(tmp_path, long_model) as (c, server):
        store = server.store
        _build(c)
        spy = Spy(store)
        c.append("s", tokens=list(range(500, 580)))  # 80 tokens: a block ages out of the hot window
        written, dropped = spy.calls[-1]
        assert any(is_cold_block(k[1]) for k in written), "the aged block is new"
        assert any(HOT_BASE <= k[1] < WARM_INDEX for k in dropped), "the aged tokens' hot pages"
        assert all(HOT_BASE <= k[1] < WARM_INDEX or WARM_BASE <= k[1] < HOT_BASE for k in dropped)  # or emptied warm groups
        assert not set(dropped) & set(store.kv_keys("s"))
        check = check_session(store, "s")
        assert not check.damaged, check.as_dict()
        c.generate_text("s", max_new_tokens=70, commit=True)  # ages another block through a Generate
        assert not check_session(store, "s").damaged
        want = _greedy(c, "s")
    with running_server(tmp_path, long_model) as (c, server):
        assert _greedy(c, "s") == want


def test_a_state_stored_whole_loads_and_its_next_commit_writes_parts(tmp_path, long_model):
    with running_server(tmp_path, long_model) as (c, server):
        store = server.store
        _build(c)
        want = _greedy(c, "s")
        rec = store.get("s")
        kv = _load(store, "s")
        whole = {(i, STATE_INDEX): layer_state(layer) for i, layer in enumerate(kv.layers)}
        parts = [k for k in store.kv_keys("s") if not is_cold_block(k[1]) and k[1] != STATE_INDEX]
        assert parts
    # rewrite the session as the store held it before parts: one entry per layer state, no parts
    with LmdbStore(tmp_path) as store:
        store.rewrite_kv("s", n_tokens=rec.n_tokens, blocks=whole, drop=parts)
        assert not check_session(store, "s").damaged
        _copy_whole = store.export("s")
    with running_server(tmp_path, long_model) as (c, server):
        store = server.store
        store.import_session(_copy_whole, "u")  # kept whole for `sessions upgrade` below
        assert _greedy(c, "s") == want
        c.append("s", tokens=[7, 8, 9])
        keys = set(store.kv_keys("s"))
        assert any(WARM_BASE <= k[1] < HOT_BASE for k in keys) and any(HOT_BASE <= k[1] < WARM_INDEX for k in keys)
        assert (0, WARM_INDEX) not in keys
        assert not check_session(store, "s").damaged
    # offline, `memsvc sessions upgrade` splits the states of u without changing what it loads into
    out = CliRunner().invoke(main, ["sessions", "upgrade", "--data-dir", str(tmp_path)])
    assert out.exit_code == 0 and "1 tiered session(s) rewrote their layer states in the current layout" in out.output
    with LmdbStore(tmp_path) as store:
        assert parts and all(k in set(store.kv_keys("u")) for k in parts)
        assert not check_session(store, "u").damaged
    with running_server(tmp_path, long_model) as (c, server):
        assert _greedy(c, "u") == want


def test_summary_pages_of_another_size_load_and_upgrade_rewrites_them(tmp_path, long_model, monkeypatch):
    """Summary pages of 4 blocks holding the live masks themselves (before live pages)."""
    import memsvc.cache.tiered.cache as session
    import memsvc.cache.tiered.pages as pages

    monkeypatch.setattr(pages, "SUM_PAGE", 4)  # 14 cold blocks: 4 pages of 4, 4, 4, 2 blocks
    current = pages.layer_parts

    def live_in_summaries(layer, skip=frozenset()):  # the layout before live pages (masks inside the summary
        # pages); it builds every page, as that writer did
        parts = current(layer)
        for i in [i for i in parts if LIVE_BASE <= i < WARM_BASE]:
            parts[SUM_BASE + i - LIVE_BASE][0]["live"] = parts.pop(i)[0]["live"]
        return parts

    monkeypatch.setattr(pages, "layer_parts", live_in_summaries)
    monkeypatch.setattr(session, "layer_parts", live_in_summaries)
    with running_server(tmp_path, long_model) as (c, server):
        _build(c)
        want = _greedy(c, "s")
        assert sum(1 for k in server.store.kv_keys("s") if k[0] == 0 and SUM_BASE <= k[1] < LIVE_BASE) == 4
    monkeypatch.undo()

    def upgraded(keys):  # one summary page and one live page of 16 blocks each
        assert sum(1 for k in keys if k[0] == 0 and SUM_BASE <= k[1] < LIVE_BASE) == 1
        assert sum(1 for k in keys if k[0] == 0 and LIVE_BASE <= k[1] < WARM_BASE) == 1
    _loads_upgrades_and_loads_again(tmp_path, long_model, want, upgraded)


def test_warm_rows_stored_in_one_entry_load_and_upgrade_groups_them(tmp_path, long_model, monkeypatch):
    import memsvc.cache.tiered.pages as pages

    def whole(pos, keep_k, keep_v, sink, block):  # the layout before warm groups: every warm row in one entry
        warm: dict = {}
        pages._put(warm, "keep_k", keep_k)
        pages._put(warm, "keep_v", keep_v)
        return {WARM_INDEX: (warm, {}, int(pos.shape[1]))}

    monkeypatch.setattr(pages, "warm_groups", whole)
    with running_server(tmp_path, long_model) as (c, server):
        _build(c)
        want = _greedy(c, "s")
        assert (0, WARM_INDEX) in set(server.store.kv_keys("s"))
    monkeypatch.undo()

    def upgraded(keys):
        assert (0, WARM_INDEX) not in keys and any(WARM_BASE <= k[1] < HOT_BASE for k in keys)
    _loads_upgrades_and_loads_again(tmp_path, long_model, want, upgraded)


def test_commits_skip_unchanged_summary_and_live_pages_and_store_exactly_the_state(tmp_path, long_model, monkeypatch):
    """A commit rebuilds only the summary and live pages whose blocks changed (also the first commit after a
    resume), yet after every Append the stored state loads to exactly the in-memory one: the live masks of old
    blocks that warm tokens went back to included."""
    import memsvc.cache.tiered.pages as pages
    from memsvc.sessions import SessionManager

    monkeypatch.setattr(pages, "SUM_PAGE", 2)  # 14 blocks: 7 pages, most of them old
    built = []
    current = pages.layer_parts

    def spy(layer, skip=frozenset()):
        built.append(sum(1 for i in current(layer, skip) if SUM_BASE <= i < WARM_BASE))
        return current(layer, skip)
    monkeypatch.setattr(pages, "layer_parts", spy)
    import memsvc.cache.tiered.cache as session
    monkeypatch.setattr(session, "layer_parts", spy)

    def same_state(manager, sid):
        live = manager._live[sid].kv.layers
        loaded = _load(manager.store, sid).layers
        for a, b in zip(live, loaded):
            assert a.n_blocks == b.n_blocks and torch.equal(a.live, b.live)
            for name in ("sum_min", "sum_max", "sum_mean_k", "sum_mean_v"):
                assert all(torch.equal(x, y) for x, y in zip(getattr(a, name), getattr(b, name)))
            assert torch.equal(a.keep_pos, b.keep_pos) and torch.equal(a.hot_pos, b.hot_pos)

    store = LmdbStore(tmp_path)
    try:
        m = SessionManager(store, long_model, sweep_every=0)
        m.create("s", policy="tiered")
        m.append("s", tokens=HISTORY)
        revived = 0
        for turn in range(4):  # each ages a block or two; warm tokens that lose go back to old blocks
            before = [layer.live.clone() for layer in m._live["s"].kv.layers]
            if turn % 2:  # kept tokens lose to the next aged block: they go back to their (old) cold blocks
                for layer in m._live["s"].kv.layers:
                    layer.keep_score = torch.zeros_like(layer.keep_score)
            built.clear()
            m.append("s", tokens=[(7 + 31 * j + turn) % 4000 for j in range(80)])
            old = [(layer.live[:b.shape[0]] != b).any(-1).any(-1) for layer, b in
                   zip(m._live["s"].kv.layers, before)]
            revived += sum(int(o.sum()) for o in old)
            # pages: 2 blocks each, summary + live; rebuilt are the grown last page(s) and the pages of revived blocks
            assert sum(built) < sum(2 * -(-layer.n_blocks // 2) for layer in m._live["s"].kv.layers)
            same_state(m, "s")
        assert revived, "no warm token went back to an old block: the test would not cover live-page changes"
        m._forget("s")
        built.clear()
        m.append("s", tokens=list(range(100, 180)))  # the first commit after a resume skips them too
        assert sum(built) < sum(2 * -(-layer.n_blocks // 2) for layer in m._live["s"].kv.layers)
        same_state(m, "s")
        assert not check_session(store, "s").damaged
    finally:
        store.close()
