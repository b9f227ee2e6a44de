"""Integrity and repair (issue 5, acceptance 3): bytes flipped in stored KV blocks of a session are
detected, rebuilt from the session's token ids, and the next greedy generation equals the undamaged
session's (an exported copy imported before the damage: its blobs are its own). Damaged token ids are
DATA_LOSS. The default run uses a tiny model; `-m slow` damages 100 blocks of a real-model session."""
from __future__ import annotations

import random
import struct
import time
from pathlib import Path

import grpc
import lmdb
import pytest

from memsvc.cache.tiered.pages import is_cold_block
from memsvc.cache.tiered.cache import STATE_INDEX
from memsvc.repair import check_session
from memsvc.store.lmdb import LmdbStore
from tests.conftest import running_server

HISTORY = [(10 + 13 * j) % 4000 for j in range(1200)]  # past sink + hot + warm: 14 cold blocks per layer


def flip(data: Path, sid: str, where, rng: random.Random, db: str = "kv") -> int:
    """Flip one random bit in the stored value of each (layer, index) of sid (db "kv": the blob it
    points to; db "tokens": token block `index`), with the store closed. Returns how many."""
    env = lmdb.open(str(data), max_dbs=8)
    try:
        dbs = {name: env.open_db(name.encode()) for name in ("kv", "blobs", "tokens")}
        with env.begin(write=True) as txn:
            for w in where:
                if db == "kv":
                    bid = txn.get(sid.encode() + b"\0" + struct.pack(">HI", *w), db=dbs["kv"])
                    key, target = bid, dbs["blobs"]
                else:
                    key, target = sid.encode() + b"\0" + struct.pack(">I", w), dbs["tokens"]
                value = bytearray(txn.get(key, db=target))
                i = rng.randrange(len(value))
                value[i] ^= 1 << rng.randrange(8)
                txn.put(key, bytes(value), db=target)
    finally:
        env.close()
    return len(where)


def build(c, sid: str, history: list[int]) -> None:
    """A tiered session made the way clients make them: appends in pieces and committed replies."""
    c.create_session(sid, policy="tiered")
    third = len(history) // 3
    c.append(sid, tokens=history[:2 * third])
    c.generate_text(sid, max_new_tokens=6, commit=True)
    c.generate_text(sid, max_new_tokens=4)  # not committed: rolled back, and so not part of the cache
    c.append(sid, tokens=history[2 * third:])
    c.generate_text(sid, max_new_tokens=5, commit=True)


def _copy(store: LmdbStore, sid: str, new: str) -> None:
    """An independent copy (its own blobs, unlike a fork's)."""
    store.import_session(store.export(sid), new)


def _greedy(c, sid: str, n: int = 12) -> list[int]:
    return list(c.generate_text(sid, max_new_tokens=n).token_ids)


def _damage_and_compare(data: Path, model, sid: str, keys: list, rng: random.Random) -> dict:
    flip(data, sid, keys, rng)
    with LmdbStore(data, readonly=True) as store:
        found = check_session(store, sid)
    assert set(found.kv) == set(keys), "every damaged block is detected"
    with running_server(data, model) as (c, server):
        started = time.perf_counter()
        got = _greedy(c, sid)  # the RPC succeeds: repaired on load or when retrieval meets a block
        seconds = time.perf_counter() - started
        want = _greedy(c, "ref")
        stats = c.stats()
        store = server.store
        assert not check_session(store, sid).damaged
        rec = store.get(sid)
        c.append(sid, tokens=[11, 12, 13])  # and the session goes on
    assert got == want
    assert stats.repairs == 1 and stats.blocks_repaired == len(keys)
    assert rec.extra["repair"]["count"] == 1 and rec.extra["repair"]["last_exact"] is True
    return {"seconds": seconds, "tokens": rec.n_tokens}


@pytest.mark.parametrize("which", ["cold", "parts", "all"])
def test_flipped_blocks_are_detected_repaired_from_tokens_and_generate_identically(tmp_path, long_model, which):
    """cold: only cold blocks, met by retrieval in the middle of the Generate (rolled back, repaired, run
    again); parts: the layer states' warm rows, summary and hot pages (not their heads), met when the
    session loads; all: every entry."""
    data, rng = tmp_path / "data", random.Random(3)
    with running_server(data, long_model) as (c, server):
        build(c, "s", HISTORY)
        _copy(server.store, "s", "ref")
        keys = server.store.kv_keys("s")
    cold = [k for k in keys if is_cold_block(k[1])]
    parts = [k for k in keys if not is_cold_block(k[1]) and k[1] != STATE_INDEX]
    assert len(cold) >= 20 and len(parts) >= 20
    pick = {"cold": rng.sample(cold, 20), "parts": rng.sample(parts, 20), "all": keys}[which]
    _damage_and_compare(data, long_model, "s", pick, rng)


def _flip_live(store: LmdbStore, sid: str, where, rng: random.Random) -> None:
    """flip() through a store a server has open (in this process)."""
    with store.env.begin(write=True) as txn:
        for w in where:
            bid = txn.get(sid.encode() + b"\0" + struct.pack(">HI", *w), db=store._db["kv"])
            value = bytearray(txn.get(bid, db=store._db["blobs"]))
            value[rng.randrange(len(value))] ^= 1 << rng.randrange(8)
            txn.put(bid, bytes(value), db=store._db["blobs"])


def test_damage_met_in_the_middle_of_a_streamed_reply(tmp_path, long_model):
    """A block goes bad while a reply streams (no block cache and no decoded cache: every step reads the
    store): the step that meets it is rolled back, the session repaired, the reply computed again, and the
    chunks already sent are not sent again."""
    data, rng = tmp_path / "data", random.Random(4)
    with running_server(data, long_model, block_cache_bytes=0, decoded_cache_bytes=0) as (c, server):
        build(c, "s", HISTORY)
        store = server.store
        _copy(store, "s", "ref")
        want = [t for ch in c.generate("ref", max_new_tokens=10, commit=True) for t in ch.token_ids]
        cold = [k for k in store.kv_keys("s") if is_cold_block(k[1])]
        got = []
        for i, ch in enumerate(c.generate("s", max_new_tokens=10, commit=True)):
            got.extend(ch.token_ids)
            if i == 2:
                _flip_live(store, "s", cold[:3], rng)
        assert got == want and len(got) == 10
        assert c.stats().repairs == 1 and not check_session(store, "s").damaged
        assert _greedy(c, "s") == _greedy(c, "ref")


def test_full_session_blocks_are_repaired(tmp_path, long_model):
    data, rng = tmp_path / "data", random.Random(5)
    with running_server(data, long_model) as (c, server):
        c.create_session("s", policy="full")
        c.append("s", tokens=HISTORY[:300])
        c.generate_text("s", max_new_tokens=4, commit=True)
        c.append("s", tokens=HISTORY[300:400])
        _copy(server.store, "s", "ref")
        keys = server.store.kv_keys("s")
    _damage_and_compare(data, long_model, "s", rng.sample(keys, 5), rng)


def test_damaged_token_ids_are_data_loss(tmp_path, long_model):
    data, rng = tmp_path / "data", random.Random(6)
    with running_server(data, long_model) as (c, _):
        build(c, "s", HISTORY[:400])
    flip(data, "s", [0], rng, db="tokens")
    with running_server(data, long_model) as (c, _):
        for call in (lambda: c.resume("s"), lambda: c.generate_text("s", max_new_tokens=2),
                     lambda: c.append("s", tokens=[5])):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.DATA_LOSS
            assert "token ids" in err.value.details() and "cannot be repaired" in err.value.details()
        assert c.stats().repairs == 0


@pytest.mark.slow
def test_100_flipped_blocks_of_a_real_model_session(tmp_path, real_model):
    """Acceptance 3 on SmolLM2-135M: 100 of the 240 stored entries (210 cold blocks, 30 layer states) of a
    ~720-token tiered session."""
    data, rng = tmp_path / "data", random.Random(7)
    words = "the river runs past old stone walls where merchants once traded salt copper grain and wool".split()
    text = " ".join(rng.choice(words) for _ in range(700))
    history = real_model.tokenizer(text, add_special_tokens=False)["input_ids"]
    with running_server(data, real_model) as (c, server):
        started = time.perf_counter()
        build(c, "s", history)
        built = time.perf_counter() - started
        _copy(server.store, "s", "ref")
        keys = server.store.kv_keys("s")
    assert len(keys) >= 200
    out = _damage_and_compare(data, real_model, "s", rng.sample(keys, 100), rng)
    print(f"\nrepair: 100 of {len(keys)} entries of a {out['tokens']}-token tiered session (SmolLM2-135M): "
          f"first Generate incl. repair {out['seconds']:.1f} s; building the session took {built:.1f} s")


def test_a_session_that_changes_while_it_is_rebuilt_is_not_overwritten(tmp_path, long_model, monkeypatch):
    import memsvc.repair as rp
    import memsvc.repair.rebuild as rebuild_mod

    data = tmp_path / "data"
    with running_server(data, long_model) as (c, _):
        build(c, "s", HISTORY[:400])
    flip(data, "s", [(0, STATE_INDEX)], random.Random(8))
    with LmdbStore(data) as store:
        real = rebuild_mod.rebuild

        def racing(*args, **kwargs):  # a server commits a turn meanwhile
            out = real(*args, **kwargs)
            rec = store.get("s")
            store.commit(rec, first_token=rec.n_tokens, tokens=[7], blocks={})
            return out

        monkeypatch.setattr(rebuild_mod, "rebuild", racing)
        with pytest.raises(rp.Unrepairable, match="could not be written back"):
            rp.repair_session(store, long_model, "s")
        assert set(store.check_session("s")["kv"]) == {(0, STATE_INDEX)}  # nothing written
