"""A session's record keeps its policy's settings, and the session is read back with them: a default changed in
a later memsvc (codecs, tier sizes) cannot misread what the session stored, while read-side settings (retrieval
budgets) follow the server, settings the record lacks take today's defaults (or, for those the policy lists in
STORED_BEFORE, what sessions stored before them were written with) and settings that no longer exist are
ignored."""
from __future__ import annotations

import dataclasses

import grpc
import pytest
from click.testing import CliRunner

from memsvc.cache.policies import POLICIES, TieredPolicy
from memsvc.cli import main
from memsvc.cache.policies import get_policy, policy_config, stored_policy
from memsvc.store.lmdb import LmdbStore
from memsvc.store.records import SessionRecord
from tests.conftest import running_server

HISTORY = [(10 + 13 * j) % 4000 for j in range(1200)]  # past sink + hot + warm: cold blocks in every layer


def test_every_policy_round_trips_through_its_stored_settings():
    for name in POLICIES:
        policy = get_policy(name)
        config = policy_config(policy)
        assert stored_policy(name, config) == policy, name
        assert all(not isinstance(v, tuple) for v in config.values())  # JSON types: tuples are lists
    # records before settings: today's defaults, but the cold keys every tiered session stored before them
    before = TieredPolicy(key_codec="k6v4_k", pre_rope_keys=False)
    assert TieredPolicy.STORED_BEFORE == {"key_codec": "k6v4_k", "pre_rope_keys": False}
    assert stored_policy("tiered", None) == stored_policy("tiered", {}) == before
    # a record from before pre-RoPE keys existed: its pinned codec, keys at their positions
    older = {k: v for k, v in policy_config(before).items() if k != "pre_rope_keys"}
    assert stored_policy("tiered", older) == before
    assert stored_policy("tiered", {**older, "key_codec": "k8v8_k"}).pre_rope_keys is False
    assert stored_policy("tiered", {**policy_config(TieredPolicy()), "gone": 3}) == TieredPolicy()  # dropped setting
    with pytest.raises(ValueError, match="unknown codec"):
        stored_policy("tiered", {"key_codec": "nope"})
    with pytest.raises(ValueError, match="unknown policy"):
        stored_policy("nope", {})


def test_read_side_settings_follow_the_server_and_the_rest_are_pinned(monkeypatch):
    stored = policy_config(TieredPolicy())
    monkeypatch.setitem(POLICIES, "tiered", lambda **kw: TieredPolicy(**{"hot": 128, "union_floor": 1, **kw}))
    got = stored_policy("tiered", stored)
    assert got.hot == 256 and got.union_floor == 1  # the session's hot tier; the server's retrieval cap


def _greedy(c, sid: str) -> list[int]:
    """12 tokens sampled with a fixed seed (the tiny model's greedy reply repeats one token)."""
    return list(c.generate_text(sid, max_new_tokens=12, commit=False, temperature=1.0, seed=7).token_ids)


def test_a_stored_session_keeps_its_settings_when_the_defaults_change(tmp_path, long_model, monkeypatch):
    data = tmp_path / "d"
    with running_server(data, long_model) as (c, _):
        c.create_session("s", policy="tiered")
        c.append("s", tokens=HISTORY)
        before = _greedy(c, "s")
    with LmdbStore(data, readonly=True) as store:
        rec = store.get("s")
        stored = store.export("s")
    assert rec.layout["policy_config"] == policy_config(TieredPolicy())

    # a later memsvc whose tiered defaults store other codecs and other tier sizes
    changed = dict(boundary_key_codec="k6v4_k", boundary_value_codec="turbo3", hot=128, warm=64, sink=8)
    monkeypatch.setitem(POLICIES, "tiered", lambda **kw: TieredPolicy(**{**changed, **kw}))
    with running_server(data, long_model) as (c, _):
        assert _greedy(c, "s") == before  # read as it was written: same codecs, same tiers, same reply
        c.create_session("new", policy="tiered")
        c.append("new", tokens=HISTORY[:400])
    with LmdbStore(data, readonly=True) as store:
        assert store.get("new").layout["policy_config"]["hot"] == 128  # new sessions take the new defaults
        now = store.export("s")
        assert (now.record, now.tokens, now.kv) == (stored.record, stored.tokens, stored.kv)  # "s" unchanged
    show = CliRunner().invoke(main, ["sessions", "show", "s", "--data-dir", str(data)])
    line = next(x for x in show.output.splitlines() if x.startswith("policy"))
    assert "boundary_key_codec=k8v8_k" in line and "hot=256" in line and "union_floor" not in line, line
    show = CliRunner().invoke(main, ["sessions", "show", "new", "--data-dir", str(data)])
    assert "settings as stored: today's defaults" in show.output, show.output


OLD_TIERED = {"key_codec": "k6v4_k", "pre_rope_keys": False}  # tiered's cold keys before 3-bit pre-RoPE ones


def _old_session(data, model, monkeypatch):
    """Session "s" of HISTORY whose record lacks its settings, as a memsvc before `policy_config` wrote it (with
    that memsvc's cold keys). Returns (its sampled reply, its export as stored)."""
    with monkeypatch.context() as m:
        m.setitem(POLICIES, "tiered", lambda **kw: TieredPolicy(**{**OLD_TIERED, **kw}))
        return _old_session_made(data, model)


def _old_session_made(data, model):
    with running_server(data, model) as (c, _):
        c.create_session("s", policy="tiered")
        c.append("s", tokens=HISTORY)
        before = _greedy(c, "s")
    with LmdbStore(data) as store:
        exp = store.export("s")
        rec = SessionRecord.from_bytes(exp.record)
        exp.record = dataclasses.replace(
            rec, layout={k: v for k, v in rec.layout.items() if k != "policy_config"}).to_bytes()
        store.delete("s")
        store.import_session(exp)
        assert "policy_config" not in store.get("s").layout
    return before, exp


def test_without_its_settings_the_old_record_reads_with_todays_defaults(tmp_path, long_model, monkeypatch):
    """A record written before records kept settings is read as before: with the current defaults. If those
    changed the stored codecs, the call is refused as FAILED_PRECONDITION (not misread, nothing changed)."""
    data = tmp_path / "d"
    before, _ = _old_session(data, long_model, monkeypatch)
    with running_server(data, long_model) as (c, _):
        assert _greedy(c, "s") == before
    monkeypatch.setitem(POLICIES, "tiered", lambda **kw: TieredPolicy(**{"boundary_key_codec": "k6v4_k", **kw}))
    with LmdbStore(data, readonly=True) as store:
        stored = store.export("s")
    with running_server(data, long_model) as (c, _):
        with pytest.raises(grpc.RpcError) as e:
            _greedy(c, "s")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # the stored session, not the request
    assert "holds 'k8v8_k' codes" in e.value.details()
    with LmdbStore(data, readonly=True) as store:
        now = store.export("s")
    assert (now.record, now.tokens, now.kv) == (stored.record, stored.tokens, stored.kv)  # nothing changed


def test_upgrade_pins_the_settings_of_old_records(tmp_path, long_model, monkeypatch):
    """`sessions upgrade` gives a record without settings the ones it is read with now, changing nothing else:
    a later change of the defaults then no longer reaches it."""
    data = tmp_path / "d"
    before, exp = _old_session(data, long_model, monkeypatch)
    with LmdbStore(data, readonly=True) as store:
        old = store.get("s")
    out = CliRunner().invoke(main, ["sessions", "upgrade", "--data-dir", str(data)])
    assert out.exit_code == 0 and "1 record(s) now keep their policy's settings" in out.output, out.output
    with LmdbStore(data, readonly=True) as store:
        rec = store.get("s")
        now = store.export("s")
    assert rec.layout == {**old.layout, "policy_config": policy_config(TieredPolicy(**OLD_TIERED))}
    # timestamps, tokens, messages: unchanged; the bytes stored grow by the longer record only
    assert dataclasses.replace(rec, layout=old.layout, stored_bytes=old.stored_bytes) == old
    assert 0 < rec.stored_bytes - old.stored_bytes < 1000
    assert (now.tokens, now.kv) == (exp.tokens, exp.kv)
    monkeypatch.setitem(POLICIES, "tiered", lambda **kw: TieredPolicy(**{"boundary_key_codec": "k6v4_k", **kw}))
    with running_server(data, long_model) as (c, _):
        assert _greedy(c, "s") == before
    again = CliRunner().invoke(main, ["sessions", "upgrade", "--data-dir", str(data)])
    assert "0 record(s) now keep" in again.output, again.output
